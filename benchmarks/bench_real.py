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
        except (OSError, KeyError, ValueError) as exc:  # a half-written or stale file: rebuild it
            print(f"rebuilding {key}: {exc}", file=sys.stderr)
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


def run_model(model, fixed, moving, moving_labels, refine: int = 0) -> dict:
    """One ``jaxreg.atlas.Model.register`` call (``--model``): both images aligned to the model's template, the
    network's field (``refine`` engine iterations from it), carried back to the fixed grid. Returns what
    ``run_jaxreg`` returns. The model's cache of alignments is emptied first: every call pays for both affine
    alignments, as a single ``jaxreg register --model`` does (``level_seconds["align"]`` says how much)."""
    model.aligned.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    reg = model.register(fixed, moving, refine=refine, moving_labels=moving_labels)
    warped = np.asarray(reg.warped_labels.data) if moving_labels is not None else None
    return {"warped_labels": warped, "disp": np.asarray(reg.total_disp, np.float32),
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "level_seconds": dict(reg.seconds), "registration": reg}


def run_identity(fixed, moving, moving_labels) -> dict:
    """No registration: the moving labels pulled onto the fixed grid through world coordinates (nearest)."""
    from jaxreg.data import preprocess

    t0, c0 = time.perf_counter(), time.process_time()
    lab = preprocess.resample_to(moving_labels, fixed.shape, fixed.affine, order=0).data
    return {"warped_labels": np.rint(np.asarray(lab)).astype(np.int32),
            "disp": np.zeros((*fixed.shape, fixed.ndim), np.float32),
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _physical_to_voxels(field: np.ndarray, direction: np.ndarray, spacing) -> np.ndarray:
    """A displacement in physical (ITK, LPS) mm, ``(*S, nd)`` on a grid with ``direction``/``spacing``, as grid
    voxels: ``M^-1 d`` with ``M = direction @ diag(spacing)`` (the LPS/RAS sign flip cancels in ``M^-1``)."""
    m = np.asarray(direction, np.float64) @ np.diag(np.asarray(spacing, np.float64))
    return (np.asarray(field, np.float64) @ np.linalg.inv(m).T).astype(np.float32)


ANTS_TRANSFORMS = {"ants_syn": "SyN", "ants_synquick": "antsRegistrationSyNQuick[s]",
                   "ants_syn_full": "antsRegistrationSyN[s]"}


def itk_geometry(vol):
    """``(origin, spacing, direction)`` of an ``io.Volume`` in ITK's LPS convention (index order = array axes). A 2-D
    Volume gets its in-plane spacing, the identity direction and origin 0 (2-D cases share one grid)."""
    a = np.asarray(vol.affine, np.float64)
    nd = vol.ndim
    spacing = np.linalg.norm(a[:3, :nd], axis=0)
    if nd == 2:
        return np.zeros(2), spacing, np.eye(2)
    lps = np.diag([-1.0, -1.0, 1.0])
    return lps @ a[:3, 3], spacing, (lps @ a[:3, :3]) / spacing


def _ants_image(vol, dtype=np.float32):
    import ants

    origin, spacing, direction = itk_geometry(vol)
    return ants.from_numpy(np.ascontiguousarray(np.asarray(vol.data, dtype)), origin=tuple(map(float, origin)),
                           spacing=tuple(map(float, spacing)), direction=direction)


def _itk_image(vol):
    import itk

    origin, spacing, direction = itk_geometry(vol)
    nd = vol.ndim
    img = itk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(vol.data, np.float32),
                                                                  tuple(range(nd))[::-1])))
    img.SetOrigin([float(v) for v in origin])
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction, np.float64)))
    return img


def run_ants(fixed, moving, moving_labels, type_of_transform: str = "SyN", *, displacement: bool = True) -> dict:
    """ANTsPy ``registration`` of ``moving`` onto ``fixed`` (``io.Volume`` s, world geometry kept), labels through
    ``apply_transforms(..., interpolator="nearestNeighbor")``, the whole map composed into one displacement field
    (``apply_transforms(compose=...)``) and expressed in fixed voxels."""
    import ants

    fi, mo, ml = _ants_image(fixed), _ants_image(moving), _ants_image(moving_labels)
    scratch = tempfile.mkdtemp(prefix="bench_real_ants_")
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    try:
        reg = ants.registration(fixed=fi, moving=mo, type_of_transform=type_of_transform,
                                outprefix=os.path.join(scratch, "reg_"))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0 + _children_cpu() - k0
        lab = ants.apply_transforms(fixed=fi, moving=ml, transformlist=reg["fwdtransforms"],
                                    interpolator="nearestNeighbor").numpy()
        disp = None
        if displacement:
            composed = ants.apply_transforms(fixed=fi, moving=mo, transformlist=reg["fwdtransforms"],
                                             compose=os.path.join(scratch, "composed_"))
            arr = ants.image_read(composed).numpy()  # (*S, nd), physical LPS mm
            disp = _physical_to_voxels(arr, fi.direction, fi.spacing)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"warped_labels": np.rint(lab).astype(np.int32), "disp": disp, "seconds": seconds, "cpu_seconds": cpu}


def run_elastix(fixed, moving, moving_labels) -> dict:
    """elastix default "affine" + "bspline" parameter maps (itk-elastix), labels through transformix with
    ``FinalBSplineInterpolationOrder`` 0, the whole map from ``transformix_deformation_field`` in fixed voxels."""
    import itk

    fi, mo, ml = _itk_image(fixed), _itk_image(moving), _itk_image(moving_labels)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("affine"))
    po.AddParameterMap(po.GetDefaultParameterMap("bspline"))
    scratch = tempfile.mkdtemp(prefix="bench_real_elastix_")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        _, tp = itk.elastix_registration_method(fi, mo, parameter_object=po, log_to_console=False,
                                                output_directory=scratch + os.sep)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        for i in range(tp.GetNumberOfParameterMaps()):
            tp.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
        lab = itk.GetArrayFromImage(itk.transformix_filter(ml, transform_parameter_object=tp, log_to_console=False,
                                                           output_directory=scratch + os.sep))
        field = itk.GetArrayFromImage(itk.transformix_deformation_field(fi, tp, log_to_console=False,
                                                                        output_directory=scratch + os.sep))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    nd = lab.ndim
    rev = tuple(range(nd))[::-1]
    lab = np.rint(np.transpose(lab, rev)).astype(np.int32)  # ITK arrays are (z, y, x)
    field = np.transpose(field, (*rev, nd))
    _, spacing, direction = itk_geometry(fixed)
    disp = _physical_to_voxels(field, direction, spacing)
    return {"warped_labels": lab, "disp": disp, "seconds": seconds, "cpu_seconds": cpu}


def jaxreg_executable() -> list[str]:
    """The ``jaxreg`` command of the running Python (its console script, else ``python -m jaxreg.cli``)."""
    exe = os.path.join(os.path.dirname(sys.executable), "jaxreg")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "jaxreg.cli"]


def run_cli(paths: dict, preset: str, out_dir: str, cache_dir: str) -> dict:
    """``jaxreg register FIXED MOVING -o OUT --preset P --moving-labels ML --quiet`` in a fresh process (persistent
    compilation cache in ``cache_dir``): wall and CPU seconds of the command, its own report's split, warped labels."""
    from jaxreg.data import io

    env = {**os.environ, "JAXREG_CACHE_DIR": cache_dir}
    cmd = [*jaxreg_executable(), "register", paths["fixed"], paths["moving"], "-o", out_dir, "--preset", preset,
           "--moving-labels", paths["moving_labels"], "--quiet"]
    t0, k0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - k0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = {"seconds": seconds, "cpu_seconds": cpu,
           "warped_labels": np.asarray(io.load_labels(os.path.join(out_dir, "warped_labels.nii.gz")).data, np.int32)}
    try:
        with open(os.path.join(out_dir, "report.json")) as fh:
            rep = json.load(fh)
        out["register_seconds"] = rep["seconds"]["register"]
        out["in_process_seconds"] = rep["seconds"].get("total")
        out["level_seconds"] = rep["seconds"].get("per_level")
    except (OSError, KeyError, ValueError):
        pass
    return out


# ------------------------------------------------------------------------------------------------------ 2-D slices
def axial_axis(affine: np.ndarray) -> int:
    """The array axis closest to the world superior-inferior axis (RAS z)."""
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3]) / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))


def slice_pair(fixed, fixed_labels, moving, moving_labels, *, affine_options=None) -> dict:
    """Matched axial slices: ``moving`` aligned to ``fixed`` in 3-D by jaxreg's affine preset (image linear, labels
    nearest), then the axial slice through the fixed brain's centre from both. Returns 2-D ``io.Volume`` s (affine:
    the in-plane columns and the slice's origin) and the 3-D affine's seconds."""
    from jaxreg import optimize, world
    from jaxreg.data import io

    t0 = time.perf_counter()
    reg = world.register_images(fixed, moving, options=affine_options or optimize.PRESETS["affine"])
    seconds = time.perf_counter() - t0
    warped, warped_labels = reg.warped, reg.apply(moving_labels, labels=True)
    ax = axial_axis(fixed.affine)
    k = round(float(np.argwhere(np.asarray(fixed_labels.data) > 0)[:, ax].mean()))
    keep = [a for a in range(3) if a != ax]

    def take(v):
        return np.ascontiguousarray(np.take(np.asarray(v.data), k, axis=ax))

    a2 = np.eye(4)
    a2[:3, 0], a2[:3, 1] = fixed.affine[:3, keep[0]], fixed.affine[:3, keep[1]]
    a2[:3, 3] = fixed.affine[:3, 3] + fixed.affine[:3, ax] * k
    return {"fixed": io.Volume(take(fixed).astype(np.float32), a2), "fixed_labels": io.Volume(take(fixed_labels), a2),
            "moving": io.Volume(take(warped).astype(np.float32), a2),
            "moving_labels": io.Volume(take(warped_labels).astype(np.int32), a2), "axis": ax, "index": k,
            "affine_seconds": seconds}


# ------------------------------------------------------------------------------------------------------ driver
PEERS = ("identity", "ants_syn", "ants_synquick", "ants_syn_full", "elastix")
DEFAULT_METHODS = "identity,default,fast,diffeo,ants_syn,ants_synquick,elastix"
METRICS = ("dice_mean", "dice_cortex", "dice_subcortex", "hd95_mean", "folding_pct", "sd_log_jac", "seconds",
           "cpu_seconds")


def available(method: str) -> str | None:
    """None when ``method`` can run here, else why not."""
    try:
        if method.startswith("ants_"):
            import ants  # noqa: F401
        elif method == "elastix":
            import itk

            if not hasattr(itk, "elastix_registration_method"):
                return "itk has no elastix_registration_method (pip install itk-elastix)"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _subjects(spec: str) -> tuple[int, ...]:
    named = {"tune": TUNE, "report": REPORT, "all": TUNE + REPORT}
    return named[spec] if spec in named else tuple(int(v) for v in spec.split(","))


def _git() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                  check=False).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--", "jaxreg").splitlines()
            if git("status", "--porcelain", "--", "jaxreg") else []}


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("jax", "jaxlib", "numpy", "ants", "itk"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def _stats(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not v.size:
        return None
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def summarize(rows: list[dict]) -> dict:
    """Per method: mean, sd, n of every metric over its pairs (failed/skipped rows left out)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == method and not r.get("error")]
        s = {k: _stats([r.get(k) for r in ok]) for k in (*METRICS, "seconds_first_call", "register_seconds",
                                                         "compile_seconds_est", "missing_regions")}
        s["pairs"] = len(ok)
        s["failed"] = sum(1 for r in rows if r["method"] == method and r.get("error"))
        out[method] = s
    return out


def _fmt(stat, digits=3, sd=True) -> str:
    if not stat:
        return "–"
    m = f"{stat['mean']:.{digits}f}"
    return f"{m} ± {stat['sd']:.{digits}f}" if sd and stat["n"] > 1 else m


def table(summary: dict) -> str:
    """The Markdown table of a summary (mean ± sd over pairs)."""
    lines = ["| method | pairs | Dice mean | cortex | subcortex | HD95 mm | folding % | SD logJ | s/pair wall | CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, s in summary.items():
        lines.append(f"| {method} | {s['pairs']} | {_fmt(s['dice_mean'])} | {_fmt(s['dice_cortex'])} | "
                     f"{_fmt(s['dice_subcortex'])} | {_fmt(s['hd95_mean'], 2)} | {_fmt(s['folding_pct'], 3)} | "
                     f"{_fmt(s['sd_log_jac'], 3)} | {_fmt(s['seconds'], 1)} | {_fmt(s['cpu_seconds'], 1)} |")
    timing = [(m, s) for m, s in summary.items() if s.get("seconds_first_call") or s.get("register_seconds")]
    if timing:
        head = ("| method | first call s (compile incl.) | compiled call s | compile s (est.) | "
                "command's own register s |")
        lines += ["", head, "| --- | --- | --- | --- | --- |"]
        for m, s in timing:
            lines.append(f"| {m} | {_fmt(s['seconds_first_call'], 1, False)} | {_fmt(s['seconds'], 1)} | "
                         f"{_fmt(s['compile_seconds_est'], 1, False)} | {_fmt(s['register_seconds'], 1)} |")
    return "\n".join(lines)


def _row_metrics(result: dict, fixed_labels, hd95: bool) -> dict:
    return score(fixed_labels, result["warped_labels"], result.get("disp"), fixed_labels.spacing, hd95=hd95)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder holding mindboggle20/")
    ap.add_argument("--subjects", default="report", help="report, tune, all or comma-separated ids [report]")
    ap.add_argument("--resolution", type=float, default=2.0, help="mm (1: as stored) [2]")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="comma-separated: identity, jaxreg preset names, ants_syn, ants_synquick, ants_syn_full, "
                         f"elastix [{DEFAULT_METHODS}]")
    ap.add_argument("--crop", action="store_true", help="crop each image to its brain's bounding box + margin")
    ap.add_argument("--margin", type=int, default=4, help="crop margin in voxels [4]")
    ap.add_argument("--hd95", action="store_true", help="also HD95 (slow: one distance transform per region)")
    ap.add_argument("--cli", action="store_true", help="also time `jaxreg register` in a fresh process per pair for "
                                                        "every jaxreg preset (warm persistent compilation cache)")
    ap.add_argument("--cli-pairs", action="store_true",
                    help="also time `jaxreg register --pairs CSV` (every pair in one process) for every jaxreg preset")
    ap.add_argument("--max-pairs", type=int, default=None, help="only the first N ring pairs")
    ap.add_argument("--all-pairs", action="store_true", help="every ordered pair of the subjects, not a ring")
    ap.add_argument("--model", help="a jaxreg model folder or packaged name (jaxreg.atlas): adds the methods 'model' "
                                    "and 'model+rN' for each N of --refine")
    ap.add_argument("--refine", default="", help="comma-separated refinement iterations for --model, e.g. 20,50")
    ap.add_argument("--limit", default="", help="per-method pair limits, e.g. elastix=2,ants_syn_full=1")
    ap.add_argument("--no-warm-repeat", action="store_true",
                    help="jaxreg: do not register the first pair twice (first call with compilation, then compiled)")
    ap.add_argument("--2d", dest="two_d", action="store_true",
                    help="matched axial slices after a 3-D affine alignment (jaxreg's affine preset)")
    ap.add_argument("--out", help="JSON file for the per-pair results (rewritten after every row)")
    args = ap.parse_args(argv)

    from jaxreg import optimize
    from jaxreg.data import io

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    model = None
    if args.model:
        from jaxreg import atlas

        model = atlas.load_model(args.model)
        methods += ["model"] + [f"model+r{int(n)}" for n in args.refine.split(",") if n.strip()]
    for m in methods:
        if m.startswith("model") and model is not None:
            continue
        if m not in PEERS and m not in optimize.PRESETS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(PEERS)}, {', '.join(optimize.PRESETS)}")
    limits = {k: int(v) for k, v in (kv.split("=") for kv in args.limit.split(",") if kv)}
    skipped = {m: why for m in methods if (why := available(m))}
    for m, why in skipped.items():
        print(f"skipping {m}: {why}", flush=True)
    subjects = _subjects(args.subjects)
    todo = ([(f, m) for f in subjects for m in subjects if f != m] if args.all_pairs
            else pairs(subjects))[: args.max_pairs]
    presets = [m for m in methods if m in optimize.PRESETS and m not in skipped]
    data = os.path.abspath(args.data)
    record = {
        "benchmark": "bench_real", "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "git": _git(), "versions": _versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "loadavg_start": list(os.getloadavg())},
        "config": {"subjects": list(subjects), "pairs": todo, "resolution_mm": args.resolution, "crop": args.crop,
                   "margin": args.margin, "two_d": args.two_d, "hd95": args.hd95, "cli": args.cli,
                   "cli_pairs": args.cli_pairs,
                   "methods": methods, "limits": limits, "skipped": skipped, "data": data,
                   "model": None if model is None else {"path": model.path, **model.meta},
                   "mask": "folding and SD log J inside the fixed labels > 0"},
        "rows": [], "cli_warmup": {}, "cli_pairs": {}, "slices": [],
    }
    rows = record["rows"]

    def save():
        record["summary"] = summarize(rows)
        record["table_md"] = table(record["summary"])
        record["machine"]["loadavg_end"] = list(os.getloadavg())
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            io.write_json(args.out, record)

    tmp = tempfile.mkdtemp(prefix="bench_real_")
    cache_dir = os.path.join(tmp, "xla_cache")
    seen = {}  # jaxreg method -> shapes already compiled in this process
    done = {m: 0 for m in methods}
    cli_pairs = []  # (paths, fixed labels, row base) of every pair, for --cli-pairs
    try:
        for pi, (fid, mid) in enumerate(todo):
            fixed, fixed_labels = load(data, fid, args.resolution, args.crop, args.margin)
            moving, moving_labels = load(data, mid, args.resolution, args.crop, args.margin)
            base = {"fixed": fid, "moving": mid, "fixed_shape": list(fixed.shape), "moving_shape": list(moving.shape)}
            if args.two_d:
                sl = slice_pair(fixed, fixed_labels, moving, moving_labels)
                fixed, fixed_labels, moving, moving_labels = sl["fixed"], sl["fixed_labels"], sl["moving"], \
                    sl["moving_labels"]
                base.update(slice_axis=sl["axis"], slice_index=sl["index"], slice_shape=list(fixed.shape))
                record["slices"].append({**base, "affine_seconds": sl["affine_seconds"]})
            paths = None
            if (args.cli or args.cli_pairs) and presets:
                paths = {k: os.path.join(tmp, f"pair{pi}_{k}.nii.gz") for k in ("fixed", "moving", "moving_labels")}
                io.save(paths["fixed"], fixed)
                io.save(paths["moving"], moving)
                io.save(paths["moving_labels"], io.Volume(np.asarray(moving_labels.data, np.int32),
                                                          moving_labels.affine))
            print(f"pair {fid} <- {mid}: fixed {fixed.shape}, moving {moving.shape}", flush=True)
            for method in methods:
                if method in skipped:
                    continue
                if method in limits and done[method] >= limits[method]:
                    continue
                row = {**base, "method": method}
                try:
                    if method == "identity":
                        res = run_identity(fixed, moving, moving_labels)
                    elif method in ANTS_TRANSFORMS:
                        res = run_ants(fixed, moving, moving_labels, ANTS_TRANSFORMS[method])
                    elif method == "elastix":
                        res = run_elastix(fixed, moving, moving_labels)
                    else:
                        key = (fixed.shape, moving.shape)
                        first = key not in seen.setdefault(method, set())
                        if method.startswith("model"):
                            refine = int(method.split("+r")[1]) if "+r" in method else 0
                            once = lambda: run_model(model, fixed, moving, moving_labels, refine)  # noqa: E731
                        else:
                            once = lambda: run_jaxreg(fixed, moving, moving_labels,  # noqa: E731
                                                      optimize.PRESETS[method])
                        res = once()
                        seen[method].add(key)
                        row["compiled_before"] = not first
                        if first and not args.no_warm_repeat:
                            warm = once()
                            row["seconds_first_call"] = res["seconds"]
                            row["cpu_seconds_first_call"] = res["cpu_seconds"]
                            row["level_seconds_first_call"] = res["level_seconds"]
                            row["compile_seconds_est"] = res["seconds"] - warm["seconds"]
                            row["dice_mean_first_call"] = score(fixed_labels, res["warped_labels"])["dice_mean"]
                            res = warm
                        row["level_seconds"] = res["level_seconds"]
                    row.update(seconds=res["seconds"], cpu_seconds=res["cpu_seconds"])
                    row.update(_row_metrics(res, fixed_labels, args.hd95))
                except Exception as exc:  # noqa: BLE001  a failed method is a result, not the end of the run
                    row["error"] = f"{type(exc).__name__}: {exc}"
                done[method] += 1
                rows.append(row)
                _print_row(row)
                save()
                if method in presets and args.cli:
                    _cli_rows(method, paths, fixed_labels, base, tmp, cache_dir, pi, record, args.hd95)
                    save()
            if paths is not None:
                cli_pairs.append((paths, fixed_labels, base))
        for preset in presets if args.cli_pairs else ():
            _cli_pairs_rows(preset, cli_pairs, tmp, cache_dir, record, args.hd95)
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save()
    print(f"\n{' '.join(sys.argv)}\n", flush=True)
    print(record["table_md"], flush=True)
    if record["cli_warmup"]:
        print("\nCLI first call with an empty compilation cache (not in the table): " + ", ".join(
            f"{m} {r.get('seconds', float('nan')):.1f} s" for m, r in record["cli_warmup"].items()), flush=True)
    return 0


def _print_row(row: dict) -> None:
    if row.get("error"):
        print(f"  {row['method']:>16}: FAILED {row['error']}", flush=True)
        return
    extra = (f" (first call {row['seconds_first_call']:.1f} s)" if "seconds_first_call" in row else "")
    hd = f" HD95 {row['hd95_mean']:.2f}" if row.get("hd95_mean") is not None else ""
    fold = f" fold {row['folding_pct']:.3f}% sdlogJ {row['sd_log_jac']:.3f}" if row.get("folding_pct") is not None \
        else ""
    print(f"  {row['method']:>16}: Dice {row['dice_mean']:.3f} (ctx {row['dice_cortex']:.3f}, sub "
          f"{row['dice_subcortex']:.3f}){hd}{fold} {row['seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU"
          f"{extra}", flush=True)


def _cli_pairs_rows(preset, cli_pairs, tmp, cache_dir, record, hd95) -> None:
    """``jaxreg register --pairs CSV --preset P --quiet`` over every pair in one fresh process (the persistent
    compilation cache of the run): rows ``P_cli_pairs`` (Dice of each pair's warped labels, its seconds) and the
    command's own summary (wall time, s/pair, first pair, s/pair after it) in ``record["cli_pairs"][P]``."""
    from jaxreg.data import io

    method, out_dir = f"{preset}_cli_pairs", os.path.join(tmp, f"cli_pairs_{preset}")
    csv_path = os.path.join(tmp, f"pairs_{preset}.csv")
    with open(csv_path, "w") as fh:
        fh.write("name,fixed,moving,moving_labels\n")
        for k, (paths, _, _) in enumerate(cli_pairs):
            fh.write(f"pair{k},{paths['fixed']},{paths['moving']},{paths['moving_labels']}\n")
    cmd = [*jaxreg_executable(), "register", "--pairs", csv_path, "-o", out_dir, "--preset", preset, "--quiet"]
    t0, k0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, env={**os.environ, "JAXREG_CACHE_DIR": cache_dir}, capture_output=True, text=True,
                          check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - k0
    entry = {"command": " ".join(cmd), "wall_seconds": wall, "cpu_seconds": cpu, "returncode": proc.returncode,
             "pairs": len(cli_pairs), "wall_seconds_per_pair": wall / max(len(cli_pairs), 1)}
    try:
        with open(os.path.join(out_dir, "pairs.json")) as fh:
            entry["summary_seconds"] = json.load(fh)["seconds"]
    except (OSError, KeyError, ValueError) as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}; {proc.stderr[-1000:]}"
    record["cli_pairs"][preset] = entry
    print(f"  {method}: {len(cli_pairs)} pairs in {wall:.1f} s = {entry['wall_seconds_per_pair']:.1f} s/pair "
          f"(rc {proc.returncode})", flush=True)
    for k, (paths, fixed_labels, base) in enumerate(cli_pairs):
        row = {**base, "method": method}
        try:
            with open(os.path.join(out_dir, f"pair{k}", "report.json")) as fh:
                rep = json.load(fh)
            warped = np.asarray(io.load_labels(os.path.join(out_dir, f"pair{k}", "warped_labels.nii.gz")).data,
                                np.int32)
            row.update(seconds=rep["seconds"]["register"] + rep["seconds"].get("io", 0.0),
                       cpu_seconds=float("nan"), split=rep["seconds"])
            row.update(score(fixed_labels, warped, None, fixed_labels.spacing, hd95=hd95))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"
        record["rows"].append(row)
        _print_row(row)


def _cli_rows(preset, paths, fixed_labels, base, tmp, cache_dir, pi, record, hd95) -> None:
    """``jaxreg register`` rows for one preset and pair; the first call of the run (empty compilation cache) is
    recorded apart, in ``record["cli_warmup"]``, and the pair is then run again with the cache warm."""
    method = f"{preset}_cli"
    try:
        if preset not in record["cli_warmup"]:
            cold = run_cli(paths, preset, os.path.join(tmp, f"cli_{preset}_warmup"), cache_dir)
            record["cli_warmup"][preset] = {**base, **{k: v for k, v in cold.items() if k != "warped_labels"}}
        res = run_cli(paths, preset, os.path.join(tmp, f"cli_{preset}_{pi}"), cache_dir)
        row = {**base, "method": method, **{k: v for k, v in res.items() if k != "warped_labels"}}
        row.update(score(fixed_labels, res["warped_labels"], None, fixed_labels.spacing, hd95=hd95))
    except Exception as exc:  # noqa: BLE001
        row = {**base, "method": method, "error": f"{type(exc).__name__}: {exc}"}
    record["rows"].append(row)
    _print_row(row)


if __name__ == "__main__":
    sys.exit(main())
