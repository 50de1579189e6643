"""Does jaxreg's registration uncertainty point at its label-transfer errors? Real inter-subject Mindboggle
(OASIS-TRT-20) pairs registered with a preset, both uncertainty maps of ``jaxreg.uncertainty``, and how well each
ranks the voxels whose warped label is wrong.

    python benchmarks/bench_uncertainty.py --data ../shared/data --subjects 11,12,13,14 --pairs 4 --resolution 2 \\
        --out benchmarks/results/uncertainty_2mm_DATE.json [--methods laplace,ensemble] [--save-maps DIR]

Per pair (each subject registered to the next one in a ring, ``bench_real.pairs``; images and labels from
``bench_real.load``: resampled to ``--resolution`` mm, cached): ``world.register_images(fixed, moving,
preset=--preset, moving_labels=...)``, then each map (``uncertainty.estimate``; sd in mm on the fixed grid). The
error is the label-transfer error inside the fixed brain: ``warped label != fixed label`` where ``fixed label > 0``.
Scores, inside the fixed brain: ``auc`` (``uncertainty.error_auc``: the probability that a wrong voxel is ranked
above a right one; 0.5 is chance) and ``spearman`` (rank correlation of the map with the 0/1 error), the mean sd over
wrong and over right voxels, and the seconds of each map (the first pair's include compilation). A baseline with no
registration uncertainty in it, ``boundary``: minus the distance (mm) to the nearest boundary between fixed labels
(label-transfer errors gather at region boundaries, so any map that is large near edges scores above 0.5).

Raw rows go to ``--out`` (JSON, with the command line, ``git rev-parse HEAD`` and the settings); a Markdown table is
printed. Without the data folder the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_real  # noqa: E402  (benchmarks/ on sys.path: its loader, pairs and scores)

MAPS = ("laplace", "ensemble")
BASELINES = ("boundary",)
#: the boundary band: brain voxels within this many mm of a boundary between fixed labels
BAND_MM = 2.0


def boundary_score(labels: np.ndarray, spacing) -> np.ndarray:
    """Minus the distance (mm) from each voxel to the nearest voxel that has a face neighbour of another label:
    ``(*S)`` float32, 0 on label boundaries, lower farther inside a region."""
    from scipy import ndimage

    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        diff = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    if not edge.any():
        return np.zeros(labels.shape, np.float32)
    return -ndimage.distance_transform_edt(~edge, sampling=np.asarray(spacing, np.float64)).astype(np.float32)


def score_map(sd: np.ndarray, error: np.ndarray, brain: np.ndarray, band: np.ndarray) -> dict:
    """AUC and Spearman correlation of ``sd`` with ``error`` inside ``brain``, the AUC inside ``band`` (brain voxels
    near a label boundary, where a misplaced map changes the label: the question there is which of them are wrong),
    and the mean of ``sd`` over the wrong and the right voxels."""
    from jaxreg import uncertainty

    wrong, right = brain & error, brain & ~error
    return {"auc": uncertainty.error_auc(sd, error, mask=brain),
            "auc_band": uncertainty.error_auc(sd, error, mask=band),
            "spearman": uncertainty.spearman(sd, error, mask=brain),
            "mean_wrong": float(sd[wrong].mean()), "mean_right": float(sd[right].mean()),
            "brain_mean": float(sd[brain].mean()), "brain_p95": float(np.percentile(sd[brain], 95))}


def _stats(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not v.size:
        return None
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def table(rows: list[dict], methods) -> str:
    """Markdown: one line per pair and map (AUC, Spearman, mean sd on wrong / right voxels, seconds), then the mean
    over pairs of each map."""
    lines = ["| pair | map | AUC (brain) | AUC (boundary band) | Spearman | sd wrong mm | sd right mm | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for m in methods:
            s = r["maps"].get(m)
            if s is None or s.get("error"):
                lines.append(f"| {r['fixed']} ← {r['moving']} | {m} | failed: {s and s.get('error')} | | | | | |")
                continue
            sec = f"{s['seconds']:.1f}" if s.get("seconds") is not None else "–"
            lines.append(f"| {r['fixed']} ← {r['moving']} | {m} | {s['auc']:.3f} | {s['auc_band']:.3f} | "
                         f"{s['spearman']:.3f} | "
                         f"{s['mean_wrong']:.3f} | {s['mean_right']:.3f} | {sec} |")
    if len(rows) > 1:
        for m in methods:
            ok = [r["maps"][m] for r in rows if m in r["maps"] and not r["maps"][m].get("error")]
            auc, rho = _stats([s["auc"] for s in ok]), _stats([s["spearman"] for s in ok])
            band = _stats([s["auc_band"] for s in ok])
            sec = _stats([s.get("seconds") for s in ok])
            if auc:
                sec_text = f"{sec['mean']:.1f}" if sec else "–"
                lines.append(f"| mean of {auc['n']} | {m} | {auc['mean']:.3f} ± {auc['sd']:.3f} | "
                             f"{band['mean']:.3f} ± {band['sd']:.3f} | "
                             f"{rho['mean']:.3f} ± {rho['sd']:.3f} | | | {sec_text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=bench_real.DEFAULT_DATA, help="folder holding mindboggle20/")
    ap.add_argument("--subjects", default="11,12,13,14", help="comma-separated subject ids (a ring of pairs) "
                                                             "[11,12,13,14]")
    ap.add_argument("--pairs", type=int, default=4, help="the first N ring pairs [4]")
    ap.add_argument("--resolution", type=float, default=2.0, help="mm (1: as stored) [2]")
    ap.add_argument("--preset", default="default", help="jaxreg preset of the registration [default]")
    ap.add_argument("--methods", default=",".join(MAPS), help=f"comma-separated maps of {MAPS} [{','.join(MAPS)}]")
    ap.add_argument("--members", type=int, default=8, help="ensemble members [8]")
    ap.add_argument("--iterations", type=int, default=30, help="ensemble: iterations per member [30]")
    ap.add_argument("--amplitude", type=float, default=1.0, help="ensemble: perturbation RMS, voxels [1]")
    ap.add_argument("--smoothness", type=float, default=5.0, help="ensemble: perturbation sigma, voxels [5]")
    ap.add_argument("--probes", type=int, default=16, help="laplace: Hutchinson probes [16]")
    ap.add_argument("--seed", type=int, default=0, help="seed of both maps [0]")
    ap.add_argument("--save-maps", help="folder for NIfTI maps per pair (sd of each map, error, fixed labels)")
    ap.add_argument("--out", help="JSON file for the raw results (rewritten after every pair)")
    args = ap.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in MAPS]
    if unknown:
        raise SystemExit(f"unknown map(s) {unknown}; choose from {', '.join(MAPS)}")
    data = os.path.abspath(args.data)
    if not os.path.isdir(os.path.join(data, "mindboggle20")):
        print(f"skipping: no Mindboggle data at {os.path.join(data, 'mindboggle20')} (--data)", flush=True)
        return 0

    from jaxreg import uncertainty, world
    from jaxreg.data import io

    subjects = [int(v) for v in args.subjects.split(",") if v.strip()]
    todo = bench_real.pairs(subjects)[: args.pairs]
    options = {"laplace": {"probes": args.probes, "seed": args.seed},
               "ensemble": {"members": args.members, "iterations": args.iterations, "amplitude": args.amplitude,
                            "smoothness": args.smoothness, "seed": args.seed}}
    record = {
        "benchmark": "bench_uncertainty", "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "git": bench_real._git(),
        "versions": bench_real._versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "loadavg_start": list(os.getloadavg())},
        "config": {"subjects": subjects, "pairs": todo, "resolution_mm": args.resolution, "preset": args.preset,
                   "methods": methods, "options": options, "baselines": list(BASELINES), "data": data,
                   "error": "warped label != fixed label inside the fixed brain (fixed label > 0)"},
        "rows": [],
    }

    def save():
        record["table_md"] = table(record["rows"], methods + list(BASELINES))
        record["summary"] = {m: {k: _stats([r["maps"][m].get(k) for r in record["rows"] if m in r["maps"]
                                            and not r["maps"][m].get("error")]) for k in ("auc", "spearman", "seconds")}
                             for m in methods + list(BASELINES)}
        record["machine"]["loadavg_end"] = list(os.getloadavg())
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            io.write_json(args.out, record)

    for fid, mid in todo:
        fixed, fixed_labels = bench_real.load(data, fid, args.resolution)
        moving, moving_labels = bench_real.load(data, mid, args.resolution)
        print(f"pair {fid} <- {mid}: fixed {fixed.shape}, moving {moving.shape}", flush=True)
        t0 = time.perf_counter()
        reg = world.register_images(fixed, moving, preset=args.preset, moving_labels=moving_labels)
        warped = np.asarray(reg.warped_labels.data)
        row = {"fixed": fid, "moving": mid, "fixed_shape": list(fixed.shape), "moving_shape": list(moving.shape),
               "register_seconds": time.perf_counter() - t0, "maps": {}}
        labels = np.asarray(fixed_labels.data)
        brain = labels > 0
        error = warped != labels
        row.update(bench_real.score(fixed_labels, warped))
        row["error_fraction"] = float(error[brain].mean())
        print(f"  registered in {row['register_seconds']:.1f} s: Dice {row['dice_mean']:.3f}, "
              f"{100 * row['error_fraction']:.1f} % of the brain mislabelled", flush=True)
        maps = {"boundary": boundary_score(labels, fixed.spacing)}
        band = brain & (maps["boundary"] >= -BAND_MM)
        row["band_error_fraction"] = float(error[band].mean())
        row["maps"]["boundary"] = {**score_map(maps["boundary"], error, brain, band), "seconds": None}
        for m in methods:
            try:
                t0 = time.perf_counter()
                maps[m] = uncertainty.estimate(reg, method=m, **options[m])
                seconds = time.perf_counter() - t0
                row["maps"][m] = {**score_map(maps[m], error, brain, band), "seconds": seconds,
                                  "finite": bool(np.isfinite(maps[m]).all())}
            except Exception as exc:  # noqa: BLE001  a failed map is a result, not the end of the run
                row["maps"][m] = {"error": f"{type(exc).__name__}: {exc}"}
            s = row["maps"][m]
            print(f"  {m:>9}: " + (f"FAILED {s['error']}" if s.get("error") else
                                   f"AUC {s['auc']:.3f} (band {s['auc_band']:.3f}), Spearman {s['spearman']:.3f}, "
                                   f"sd wrong {s['mean_wrong']:.3f} "
                                   f"/ right {s['mean_right']:.3f} mm, {s['seconds']:.1f} s"), flush=True)
        b = row["maps"]["boundary"]
        print(f"   boundary: AUC {b['auc']:.3f} (band {b['auc_band']:.3f}), Spearman {b['spearman']:.3f}", flush=True)
        if args.save_maps:
            folder = os.path.join(args.save_maps, f"{fid}_{mid}")
            os.makedirs(folder, exist_ok=True)
            for name, arr in maps.items():
                io.save(os.path.join(folder, f"{name}.nii.gz"), io.Volume(np.asarray(arr, np.float32), fixed.affine))
            io.save(os.path.join(folder, "error.nii.gz"), io.Volume((error & brain).astype(np.int32), fixed.affine))
            io.save(os.path.join(folder, "fixed_labels.nii.gz"), io.Volume(labels.astype(np.int32), fixed.affine))
        record["rows"].append(row)
        save()
    save()
    print(f"\n{' '.join(sys.argv)}\n", flush=True)
    print(record["table_md"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
