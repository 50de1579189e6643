"""Affine registration of real scanner-space images in world coordinates against the data set's reference transforms.

    python benchmarks/bench_world.py [--data ../shared/data] [--out benchmarks/results/world_openms_DATE.json]

Pairs from ``open_ms/longitudinal/patient01`` (raw scanner-space acquisitions, anisotropic grids that differ per
image): between visits, study2 FLAIR -> study1 FLAIR (reference: ``R2 @ inv(R1)`` with ``Rk`` the data set's
``studyK_FLAIR_to_common_space.txt``, both maps from the common space to the study's FLAIR); within a visit, T1W and
T2W -> FLAIR (reference: ``studyK_{T1W,T2W}_intrastudy_to_FLAIR.txt``, FLAIR -> T1W/T2W). Every transform maps fixed
world points to moving world points (RAS mm). Measure: the mean (and 95th percentile, max) distance in mm between the
points that the found affine and the reference map each voxel of the fixed image's head to (head: voxels above 10 %
of the image's 99th percentile, dilated); the identity's distance beside it. jaxreg runs ``jaxreg.world.
register_images`` with no initial transform (centre-of-mass start) and the parametric stage only (``VARIANTS``: the
"affine" preset's levels 4-2 with an affine or a rigid transform, both parametrised in millimetres, and rigid with a
full-resolution level), local NCC for the mono-modal pair, mutual information for the multimodal ones. ANTsPy's and elastix's affine registrations run in the
same script when ``ants`` / ``itk`` import (peers; see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import scipy.ndimage as ndi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pairs(folder):
    """``[(name, fixed path, moving path, reference (4,4) RAS fixed->moving, multimodal)]``."""
    from jaxreg.data import itk

    p = os.path.join(folder, "open_ms", "longitudinal", "patient01")
    f = lambda name: os.path.join(p, name)  # noqa: E731
    r1 = itk.read_affine(f("study1_FLAIR_to_common_space.txt"))
    r2 = itk.read_affine(f("study2_FLAIR_to_common_space.txt"))
    out = [("visit2 FLAIR -> visit1 FLAIR", f("study1_FLAIR.nii.gz"), f("study2_FLAIR.nii.gz"), r2 @ np.linalg.inv(r1),
            False)]
    for k in (1, 2):
        for c in ("T1W", "T2W"):
            out.append((f"visit{k} {c} -> FLAIR", f(f"study{k}_FLAIR.nii.gz"), f(f"study{k}_{c}.nii.gz"),
                        itk.read_affine(f(f"study{k}_{c}_intrastudy_to_FLAIR.txt")), True))
    return out


def head_points(vol) -> np.ndarray:
    """World points (RAS mm, ``(N, 3)``) of the head voxels of a fixed image."""
    data = np.asarray(vol.data, np.float64)
    mask = ndi.binary_dilation(data > 0.1 * np.percentile(data, 99), iterations=2)
    idx = np.argwhere(mask).astype(np.float64)
    return idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]


def distance(found, reference, points) -> dict:
    """Distances (mm) between ``found`` and ``reference`` (``(4, 4)``) at ``points``: mean, p95, max."""
    h = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    d = np.linalg.norm(h @ (found - reference).T, axis=1)
    return {"mean_mm": float(d.mean()), "p95_mm": float(np.percentile(d, 95)), "max_mm": float(d.max())}


#: jaxreg variants: name -> register_images options on top of the "affine" preset
VARIANTS = {
    "jaxreg affine": dict(transform="affine"),
    "jaxreg rigid": dict(transform="rigid"),
    "jaxreg rigid, levels 4-2-1": dict(transform="rigid", affine_levels=(4, 2, 1), affine_iterations=(100, 50, 30)),
}


def run_jaxreg(fixed, moving, multimodal, variant):
    from jaxreg import world

    overrides = {"metric": "mi", "metric_options": {"bins": 32}} if multimodal else {}
    t0 = time.perf_counter()
    reg = world.register_images(fixed, moving, preset="affine", **VARIANTS[variant], **overrides)
    return reg.world_matrix, time.perf_counter() - t0


def run_ants(fixed_path, moving_path, multimodal):
    import ants

    from jaxreg.data import itk

    t0 = time.perf_counter()
    out = ants.registration(ants.image_read(fixed_path), ants.image_read(moving_path), type_of_transform="Affine",
                            aff_metric="mattes" if multimodal else "GC")
    return itk.read_affine(out["fwdtransforms"][0]), time.perf_counter() - t0


def run_elastix(fixed_path, moving_path, multimodal):
    """elastix's default "affine" parameter map (Mattes mutual information, 4 resolutions), read back through an ITK
    transform file so that the one reader (``jaxreg.data.itk.read_affine``) converts LPS to RAS."""
    import tempfile

    import itk

    from jaxreg.data import itk as jitk

    t0 = time.perf_counter()
    fixed, moving = itk.imread(fixed_path, itk.F), itk.imread(moving_path, itk.F)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("affine"))
    _, params = itk.elastix_registration_method(fixed, moving, parameter_object=po, log_to_console=False)
    seconds = time.perf_counter() - t0
    values = " ".join(params.GetParameter(0, "TransformParameters"))
    centre = " ".join(params.GetParameter(0, "CenterOfRotationPoint"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "elastix_affine.txt")
        with open(path, "w") as f:
            f.write("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                    f"Parameters: {values}\nFixedParameters: {centre}\n")
        return jitk.read_affine(path), seconds


def mindboggle_crop(folder, fixed_id=1, moving_id=2, resolution=2.0):
    """The field-of-view case on real anatomy: Mindboggle subject ``moving_id`` registered to ``fixed_id`` (both
    resampled to ``resolution`` mm), as given and cropped to its brain's bounding box (+ 4 voxels): with the moving
    image on its own grid the crop should change nothing. Returns mean Dice over the labels and seconds per case."""
    from jaxreg import metrics, world
    from jaxreg.data import io, preprocess

    def load(kind, i):
        vol = (io.load_labels if kind == "labels" else io.load)(os.path.join(folder, "mindboggle20", f"{kind}_{i}.nii.gz"))
        shape = tuple(int(np.ceil(n / resolution)) for n in vol.shape)
        affine = vol.affine.copy()
        affine[:3, :3] = vol.affine[:3, :3] * resolution
        affine[:3, 3] = vol.affine[:3, 3] + vol.affine[:3, :3] @ np.full(3, (resolution - 1) / 2)
        return preprocess.resample_to(vol, shape, affine, order=0 if kind == "labels" else 1)

    fixed, fixed_labels = load("t1", fixed_id), load("labels", fixed_id)
    moving, moving_labels = load("t1", moving_id), load("labels", moving_id)
    brain = np.argwhere(moving_labels.data > 0)
    lo, hi = np.maximum(brain.min(0) - 4, 0), np.minimum(brain.max(0) + 5, moving.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    cropped = io.Volume(moving.data[crop], moving.affine @ shift)
    cropped_labels = io.Volume(moving_labels.data[crop], moving.affine @ shift)
    out = {"fixed": fixed_id, "moving": moving_id, "resolution_mm": resolution, "fixed_shape": list(fixed.shape),
           "cropped_shape": list(cropped.shape)}
    for name, (m, ml) in {"as given": (moving, moving_labels), "cropped to the brain": (cropped, cropped_labels)}.items():
        t0 = time.perf_counter()
        reg = world.register_images(fixed, m, preset="default", moving_labels=ml)
        seconds = time.perf_counter() - t0
        dice = metrics.dice(fixed_labels.data, reg.warped_labels.data)
        out[name] = {"dice_mean": float(np.nanmean(list(dice.values()))), "seconds": seconds}
        print(f"mindboggle {moving_id} -> {fixed_id}, {name} {m.shape}: Dice {out[name]['dice_mean']:.3f} "
              f"in {seconds:.1f} s", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--out", help="JSON file for the per-pair results")
    ap.add_argument("--repeats", type=int, default=1, help="jaxreg runs per pair (the first includes compilation)")
    ap.add_argument("--mindboggle", action="store_true", help="also the cropped-moving-image case on Mindboggle")
    ap.add_argument("--skip-openms", action="store_true", help="only the Mindboggle case")
    args = ap.parse_args(argv)
    from jaxreg.data import io

    peers = {}
    try:
        import ants  # noqa: F401

        peers["ANTsPy Affine"] = run_ants
    except ImportError:
        pass
    try:
        import itk

        if hasattr(itk, "elastix_registration_method"):
            peers["elastix affine"] = run_elastix
    except ImportError:
        pass
    rows = []
    for name, fixed_path, moving_path, reference, multimodal in ([] if args.skip_openms else pairs(args.data)):
        fixed, moving = io.load(fixed_path), io.load(moving_path)
        points = head_points(fixed)
        row = {"pair": name, "fixed_shape": list(fixed.shape), "fixed_spacing_mm": fixed.spacing.round(3).tolist(),
               "moving_shape": list(moving.shape), "moving_spacing_mm": moving.spacing.round(3).tolist(),
               "identity": distance(np.eye(4), reference, points)}
        for variant in VARIANTS:
            seconds = []
            for _ in range(args.repeats):
                found, s = run_jaxreg(fixed, moving, multimodal, variant)
                seconds.append(s)
            row[variant] = {**distance(found, reference, points), "seconds": seconds, "matrix": found.tolist()}
        for peer, fn in peers.items():
            found, s = fn(fixed_path, moving_path, multimodal)
            row[peer] = {**distance(found, reference, points), "seconds": [s]}
        rows.append(row)
        print(f"{name}: identity {row['identity']['mean_mm']:.2f} mm"
              + "".join(f", {k} {row[k]['mean_mm']:.2f} mm in {min(row[k]['seconds']):.1f} s"
                        for k in (*VARIANTS, *peers)), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": "python benchmarks/bench_world.py " + " ".join(argv or sys.argv[1:]), "commit": commit,
              "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "peers": list(peers), "rows": rows}
    if args.mindboggle:
        result["mindboggle_crop"] = mindboggle_crop(args.data)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
