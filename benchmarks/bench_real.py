"""Real inter-subject registration on Mindboggle (OASIS-TRT-20) subjects: jaxreg presets against ANTsPy, elastix and the
identity, with Dice over the manual regions (cortex and subcortex apart), HD95, folding and seconds.

    python benchmarks/bench_real.py --data ../shared/data --subjects report --resolution 2 \\
        --methods identity,default,fast,diffeo,ants_syn,ants_synquick,elastix [--crop] [--hd95] [--cli] \\
        [--max-pairs N] [--2d] --out benchmarks/results/real_2mm_DATE.json

Library part (``import bench_real`` with ``benchmarks/`` on ``sys.path``): ``TUNE`` / ``REPORT`` subject ids (choose
presets on TUNE, report on REPORT), ``pairs``, ``load`` (resampled, optionally cropped, cached under
``/tmp/jaxreg_bench_cache``), ``REGIONS``, ``score`` and ``run_jaxreg``.

Pairs: each subject registered to the next one in a ring (fixed ``s[i]``, moving ``s[i+1]``). Images and labels are
resampled to ``--resolution`` mm on a grid that covers the stored 1 mm field of view (labels by nearest neighbour);
1 mm means as stored. Every method's warped labels live on the fixed grid and are scored against the fixed labels:
Dice per region present in the fixed labels (mean over all, DKT cortex 1000-2999, subcortical 1-999), HD95 (mm,
mean over the regions present in both maps, optional), and for a displacement in fixed voxels the % of voxels with
Jacobian determinant <= 0 and the SD of log J, both inside the fixed brain mask (labels > 0).

Peers run when their module imports (``ants``: antspyx; ``itk`` with elastix: itk-elastix) and are recorded as
skipped otherwise; run the script with a Python that has them (benchmarks/README.md, "Installing the peers").
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data")
CACHE = os.environ.get("JAXREG_BENCH_CACHE", "/tmp/jaxreg_bench_cache")

#: Subject ids: presets are chosen on TUNE, figures reported on REPORT (Mindboggle-101 OASIS-TRT-20 ids 1-14).
TUNE = (1, 2, 3, 4, 5, 6)
REPORT = (7, 8, 9, 10, 11, 12, 13, 14)

#: How the label values split into regions: name -> predicate on a label value.
REGIONS = {
    "cortex": lambda v: 1000 <= v <= 2999,  # DKT31 cortical labels (1002-2035 in this set)
    "subcortex": lambda v: 0 < v < 1000,  # CMA subcortical / other labels
}


# ------------------------------------------------------------------------------------------------------ data
def pairs(subjects) -> list[tuple[int, int]]:
    """``[(fixed_id, moving_id)]``: each subject registered to the next one in a ring, e.g. (7, 8), ..., (14, 7)."""
    s = [int(v) for v in subjects]
    if len(s) < 2:
        raise ValueError(f"need at least two subjects, got {s}")
    return [(s[i], s[(i + 1) % len(s)]) for i in range(len(s))]


def _grid(vol, resolution: float):
    """Shape and affine of a ``resolution`` mm grid covering ``vol``'s field of view (voxel centres shifted so the
    new voxels tile the old extent from its corner)."""
    spacing = vol.spacing
    factor = resolution / spacing
    shape = tuple(int(np.ceil(n / f)) for n, f in zip(vol.shape, factor))
    affine = vol.affine.copy()
    affine[:3, :3] = vol.affine[:3, :3] * factor
    affine[:3, 3] = vol.affine[:3, 3] + vol.affine[:3, :3] @ ((factor - 1) / 2)
    return shape, affine


def _resampled(data_dir, sid: int, resolution: float):
    """``(t1 float32, labels int32, affine)`` of subject ``sid`` at ``resolution`` mm, cached as npz."""
    from jaxreg.data import io, preprocess

    key = os.path.join(CACHE, f"mindboggle_{int(sid)}_{float(resolution):g}mm.npz")
    if os.path.exists(key):
        try:
            with np.load(key) as z:
                return z["t1"], z["labels"], z["affine"]
        except Exception:  # a half-written or stale file: rebuild it
            pass
    folder = os.path.join(data_dir, "mindboggle20")
    t1 = io.load(os.path.join(folder, f"t1_{int(sid)}.nii.gz"))
    labels = io.load_labels(os.path.join(folder, f"labels_{int(sid)}.nii.gz"))
    if float(resolution) == 1.0:
        t1d, labd, affine = np.asarray(t1.data, np.float32), np.asarray(labels.data, np.int32), t1.affine
    else:
        shape, affine = _grid(t1, float(resolution))
        t1d = np.asarray(preprocess.resample_to(t1, shape, affine, order=1).data, np.float32)
        labd = np.rint(np.asarray(preprocess.resample_to(labels, shape, affine, order=0).data)).astype(np.int32)
    os.makedirs(CACHE, exist_ok=True)
    tmp = f"{key}.{os.getpid()}.tmp.npz"
    np.savez(tmp, t1=t1d, labels=labd, affine=np.asarray(affine, np.float64))
    os.replace(tmp, key)
    return t1d, labd, np.asarray(affine, np.float64)


def crop_box(labels: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """Bounding box of ``labels > 0`` plus ``margin`` voxels per side (clipped to the grid)."""
    idx = np.argwhere(np.asarray(labels) > 0)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, labels.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def load(data_dir, sid: int, resolution: float = 2.0, crop: bool = False, margin: int = 4):
    """Mindboggle subject ``sid`` as ``(t1, labels)`` ``io.Volume`` s at ``resolution`` mm (1.0: as stored, no
    resampling; labels by nearest neighbour, int32), whole field of view; ``crop=True``: cropped to the brain's
    bounding box (labels > 0) plus ``margin`` voxels, the affine shifted to match. Resampled arrays are cached in
    ``/tmp/jaxreg_bench_cache`` (``JAXREG_BENCH_CACHE``)."""
    from jaxreg.data import io

    t1, labels, affine = _resampled(data_dir, sid, resolution)
    if crop:
        box = crop_box(labels, margin)
        shift = np.eye(4)
        shift[:3, 3] = [b.start for b in box]
        affine = affine @ shift
        t1, labels = t1[box], labels[box]
    return io.Volume(np.ascontiguousarray(t1), affine), io.Volume(np.ascontiguousarray(labels), affine)


# ------------------------------------------------------------------------------------------------------ metrics
def _nanmean(values) -> float | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    return float(v.mean()) if v.size else None


def score(fixed_labels, warped_labels, disp_vox=None, spacing=None, *, hd95: bool = False) -> dict:
    """Accuracy of one registration on the fixed grid.

    fixed_labels, warped_labels: label maps (arrays or ``io.Volume``) of one shape. disp_vox: optional
    ``(*S, ndim)`` displacement in fixed voxels (the whole map, e.g. ``Registration.total_disp``). spacing: mm per
    axis (default: the fixed Volume's, else 1).

    Returns ``dice_mean`` (mean over the regions present in the fixed labels), ``dice_cortex``, ``dice_subcortex``,
    ``n_regions``, ``missing_regions`` (fixed regions absent from the warped map); with ``hd95``: ``hd95_mean`` (mm,
    mean over the regions present in both maps); with ``disp_vox``: ``folding_pct`` (% voxels with det J <= 0) and
    ``sd_log_jac``, both within the fixed brain mask (labels > 0), and ``folding_pct_fov`` (whole grid); None where
    not computed.
    """
    from jaxreg import metrics

    if spacing is None and hasattr(fixed_labels, "spacing"):
        spacing = fixed_labels.spacing
    f = np.asarray(getattr(fixed_labels, "data", fixed_labels))
    w = np.asarray(getattr(warped_labels, "data", warped_labels))
    if f.shape != w.shape:
        raise ValueError(f"fixed labels {f.shape} and warped labels {w.shape} differ in shape")
    f = f.astype(np.int32) if f.dtype.kind in "biu" else np.rint(f).astype(np.int32)
    w = w.astype(np.int32) if w.dtype.kind in "biu" else np.rint(w).astype(np.int32)
    regions = [int(v) for v in np.unique(f) if v != 0]
    d = metrics.dice(f, w, labels=regions)
    present_w = set(np.unique(w).tolist())
    out = {
        "dice_mean": _nanmean(d.values()),
        **{f"dice_{name}": _nanmean([d[r] for r in regions if pred(r)]) for name, pred in REGIONS.items()},
        "n_regions": len(regions),
        "missing_regions": int(sum(r not in present_w for r in regions)),
        "hd95_mean": None,
        "folding_pct": None,
        "sd_log_jac": None,
        "folding_pct_fov": None,
    }
    if hd95:
        h = metrics.hd95(f, w, labels=[r for r in regions if r in present_w], spacing=spacing)
        out["hd95_mean"] = _nanmean(h.values())
    if disp_vox is not None:
        from jaxreg import spatial

        disp = np.asarray(disp_vox, np.float32)
        if disp.shape[:-1] != f.shape:
            raise ValueError(f"displacement {disp.shape} does not match the label grid {f.shape}")
        jac = np.asarray(spatial.jacobian_determinant(disp), np.float64)
        mask = f > 0
        out["folding_pct"] = 100.0 * metrics.folding_fraction(jac, mask=mask)
        out["folding_pct_fov"] = 100.0 * metrics.folding_fraction(jac)  # whole field of view, for comparison
        out["sd_log_jac"] = metrics.sd_log_jacobian(jac, mask=mask)
    return out


# ------------------------------------------------------------------------------------------------------ methods
def run_jaxreg(fixed, moving, moving_labels, options, **kw) -> dict:
    """One ``jaxreg.world.register_images`` call: ``options`` a ``jaxreg.optimize.RegisterOptions`` (e.g.
    ``PRESETS["default"]``); ``kw`` go to ``register_images`` (masks, ``initial_affine``, field overrides).

    Returns ``warped_labels`` (int32 array on the fixed grid), ``disp`` (``Registration.total_disp``: the whole map
    in fixed voxels), ``seconds`` (wall, including the label warp), ``cpu_seconds`` (process CPU time),
    ``level_seconds`` (the engine's own per-stage/level wall times) and ``registration`` (the object).
    """
    from jaxreg import world

    t0, c0 = time.perf_counter(), time.process_time()
    reg = world.register_images(fixed, moving, options=options, moving_labels=moving_labels, **kw)
    warped = np.asarray(reg.warped_labels.data) if moving_labels is not None else None
    disp = np.asarray(reg.total_disp, np.float32)
    return {"warped_labels": warped, "disp": disp, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0, "level_seconds": dict(reg.seconds), "registration": reg}
