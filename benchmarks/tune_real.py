"""Choose the presets on real anatomy: variants of a preset on Mindboggle TUNE subjects (never the REPORT ones).

    python benchmarks/tune_real.py --base default --variants default,reg0.5,... [--resolution 2] [--max-pairs N]
        [--out benchmarks/results/tune_real_DATE.json]

Each variant is ``PRESETS[base]`` with the fields of ``VARIANTS[name]`` replaced; every variant runs on the same ring
pairs of ``bench_real.TUNE`` subjects (fixed ``s[i]``, moving ``s[i+1]``) through ``jaxreg.world.register_images``
(whole field of view, the moving image on its own grid) and is scored by ``bench_real.score``: mean Dice over the
manual regions (cortex and subcortex apart), % folding and SD log J inside the fixed brain, seconds per pair (warm:
the persistent compilation cache is on, and the first pair of a variant is also run once untimed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_real  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> RegisterOptions fields replacing those of the base preset
VARIANTS: dict[str, dict] = {
    "base": {},
    "diffeo": {"deformable": "diffeo"},
    "reg1": {"reg_weight": 1.0},
    "sigma2": {"field_sigma": 2.0},
    "no_full": {"levels": (4, 2), "iterations": (100, 80)},
    "diffeo_no_full": {"deformable": "diffeo", "levels": (4, 2), "iterations": (100, 80)},
    "window7": {"metric_options": {"window": 7}},
    "reg1_sigma2": {"reg_weight": 1.0, "field_sigma": 2.0},
    "crop": {"crop": True},
    "diffeo_crop": {"deformable": "diffeo", "crop": True},
    "diffeo_crop_lr0.6": {"deformable": "diffeo", "crop": True, "learning_rate": 0.6},
    "diffeo_crop_reg0.1": {"deformable": "diffeo", "crop": True, "reg_weight": 0.1},
    "diffeo_crop_sigma0.5": {"deformable": "diffeo", "crop": True, "field_sigma": 0.5},
    "crop_reg1": {"crop": True, "reg_weight": 1.0},
    "diffeo_crop_reg0.05": {"deformable": "diffeo", "crop": True, "reg_weight": 0.05},
    "diffeo_crop_sigma2": {"deformable": "diffeo", "crop": True, "field_sigma": 2.0},
    "diffeo_crop_reg1": {"deformable": "diffeo", "crop": True, "reg_weight": 1.0},
    "diffeo_crop_reg0.5": {"deformable": "diffeo", "crop": True, "reg_weight": 0.5},
    "diffeo_crop_sigma1.5": {"deformable": "diffeo", "crop": True, "field_sigma": 1.5},
    "diffeo_crop_reg0.2": {"deformable": "diffeo", "crop": True, "reg_weight": 0.2},
    "reg0.4": {"reg_weight": 0.4},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=bench_real.DEFAULT_DATA)
    ap.add_argument("--base", default="default")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--resolution", type=float, default=2.0)
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--diffeo-steps", type=int, default=None,
                    help="optimize.DIFFEO_STEPS for this run (exp steps of each greedy diffeo update) [as shipped]")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxreg/jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from jaxreg import optimize

    if args.diffeo_steps is not None:
        optimize.DIFFEO_STEPS = args.diffeo_steps

    pairs = bench_real.pairs(bench_real.TUNE)[: args.max_pairs]
    rows = []
    for name in args.variants.split(","):
        opts = optimize.with_overrides(optimize.PRESETS[args.base], VARIANTS[name])
        for k, (fid, mid) in enumerate(pairs):
            fixed, fixed_labels = bench_real.load(args.data, fid, args.resolution)
            moving, moving_labels = bench_real.load(args.data, mid, args.resolution)
            if k == 0:  # compile (or load from the cache) outside the timing
                bench_real.run_jaxreg(fixed, moving, None, opts)
            out = bench_real.run_jaxreg(fixed, moving, moving_labels, opts)
            row = {"variant": name, "fixed": fid, "moving": mid, "seconds": out["seconds"],
                   "level_seconds": out["level_seconds"],
                   "iterations": {k: int(np.sum(~np.isnan(h))) for k, h in out["registration"].history.items()},
                   **bench_real.score(fixed_labels, out["warped_labels"], out["disp"])}
            rows.append(row)
            print(f"{name:>24} {mid:>2}->{fid:<2} Dice {row['dice_mean']:.4f} (ctx {row['dice_cortex']:.4f}, "
                  f"sub {row['dice_subcortex']:.4f}) fold {row['folding_pct']:.4f}% sdlogJ {row['sd_log_jac']:.3f} "
                  f"{row['seconds']:.1f} s", flush=True)
        mine = [r for r in rows if r["variant"] == name]
        print(f"== {name}: Dice {np.mean([r['dice_mean'] for r in mine]):.4f} fold "
              f"{np.mean([r['folding_pct'] for r in mine]):.4f}% max {np.max([r['folding_pct'] for r in mine]):.4f}% "
              f"s {np.mean([r['seconds'] for r in mine]):.1f}", flush=True)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        result = {"command": "python benchmarks/tune_real.py " + " ".join(argv or sys.argv[1:]), "commit": commit,
                  "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "base": args.base, "diffeo_steps": optimize.DIFFEO_STEPS,
                  "variants": {n: VARIANTS[n] for n in args.variants.split(",")}, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
