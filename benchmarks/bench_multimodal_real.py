"""Real multimodal registration (issue #16's reference table): the classical engine with each multimodal similarity
against ANTsPy with mutual information, on real MR ↔ TRUS prostate pairs and on real open_ms brains moved by a
known motion.

    python benchmarks/bench_multimodal_real.py --data ../shared/data \\
        --methods identity,affine_mi,mi,nmi,ngf,mind,ants_mi --out benchmarks/results/multimodal_real_DATE.json

Cases (``jaxreg.data.multimodal``): ``prostate`` MR (moving) → TRUS (fixed), the 20 cases of ``prostate_mr_trus``
(gland Dice, landmark TRE in mm); ``open_ms`` T2 and FLAIR (moving) → T1 (fixed) of patients 07 and 19 at
``--resolution`` mm, each moved by ``--seeds`` known random affine + smooth motions (end-point error in mm over the
brain, lesion Dice). Methods: ``identity``; ``affine_mi`` (the engine's affine stage by MI only); ``mi``, ``nmi``,
``ngf``, ``mind``: the ``multimodal`` preset (affine by MI, then a dense deformable stage) with that similarity in
the deformable stage (``ngf`` is the preset itself); ``ants_mi``: ANTsPy ``SyN`` with Mattes MI in both stages (run
with a Python that has antspyx). ``--start centre``: the prostate cases start from the map that brings the two
grids' centres together (``multimodal.centre_start``; ``identity`` is then that map, the engine refines it instead
of starting from the centres of mass; not applied to ANTsPy) instead of the engine's default start. Each case's raw
row goes to ``--out`` with the command and commit.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_real  # noqa: E402

METRICS = ("mi", "nmi", "ngf", "mind")


def cases(data: str, which: str, resolution: float, seeds: int, limit: int | None = None):
    from jaxreg.data import multimodal

    out = []
    if "prostate" in which:
        out += multimodal.prostate_cases(os.path.join(data, "prostate_mr_trus"),
                                         cases=None if limit is None else range(limit))
    if "open_ms" in which:
        for patient in ("patient07", "patient19"):
            for contrast in ("T2", "FLAIR"):
                for seed in range(seeds):
                    c = multimodal.open_ms_case(os.path.join(data, "open_ms"), patient, moving=contrast, seed=seed,
                                                resolution=resolution)
                    out.append(dataclasses.replace(c, name=f"{c.name}_s{seed}"))
                    if limit is not None and sum(x.name.startswith("open_ms") for x in out) >= limit:
                        return out
    return out


def options(method: str):
    from jaxreg import optimize

    base = optimize.PRESETS["multimodal"]
    if method == "affine_mi":
        return dataclasses.replace(base, deformable=None)
    return dataclasses.replace(base, metric=method, metric_options=None)


def run_ants(case):
    """ANTsPy SyN, Mattes MI in the affine and deformable stages; a ``world.Registration``-like object for
    ``multimodal.score`` built from the composed displacement."""
    import ants

    from jaxreg import world

    fi, mo = bench_real._ants_image(case.fixed), bench_real._ants_image(case.moving)
    scratch = tempfile.mkdtemp(prefix="bench_mm_ants_")
    reg = ants.registration(fixed=fi, moving=mo, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes",
                            outprefix=os.path.join(scratch, "reg_"))
    composed = ants.apply_transforms(fixed=fi, moving=mo, transformlist=reg["fwdtransforms"],
                                     compose=os.path.join(scratch, "c_"))
    vox = bench_real._physical_to_voxels(ants.image_read(composed).numpy(), fi.direction, fi.spacing)
    return world.Registration(case.fixed, case.moving, None, np.eye(4), np.asarray(vox, np.float32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=bench_real.DEFAULT_DATA)
    ap.add_argument("--cases", default="prostate,open_ms")
    ap.add_argument("--methods", default="identity,affine_mi," + ",".join(METRICS) + ",ants_mi")
    ap.add_argument("--resolution", type=float, default=2.0, help="open_ms resampling (mm)")
    ap.add_argument("--seeds", type=int, default=1, help="known motions per open_ms contrast")
    ap.add_argument("--limit", type=int, help="at most N cases of each kind (a quick look)")
    ap.add_argument("--start", choices=("default", "centre"), default="default",
                    help="prostate cases: the engine's start (centres of mass) or the grids' centres")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"skipped: no data folder {args.data}")
        return 0
    from jaxreg import world
    from jaxreg.data import io, multimodal

    methods = args.methods.split(",")
    record = {"command": " ".join(["python"] + sys.argv), "date": datetime.date.today().isoformat(),
              "git": bench_real._git(), "versions": bench_real._versions(), "resolution": args.resolution,
              "start": args.start, "rows": []}

    def save():
        io.write_json(args.out, record)

    for case in cases(args.data, args.cases, args.resolution, args.seeds, args.limit):
        print(f"{case.name}: fixed {case.fixed.shape}, moving {case.moving.shape}", flush=True)
        for method in methods:
            row = {"case": case.name, "method": method}
            try:
                t = time.perf_counter()
                start = None
                if args.start == "centre" and case.name.startswith("prostate"):
                    start = multimodal.centre_start(case.fixed, case.moving)
                if method == "identity":
                    shift = np.zeros(3) if start is None else start[:3, 3]
                    vox = np.linalg.solve(case.fixed.affine[:3, :3], shift)  # a constant world shift, in voxels
                    reg = world.Registration(case.fixed, case.moving, None, np.eye(4),
                                             np.broadcast_to(vox, (*case.fixed.shape, 3)).astype(np.float32))
                elif method == "ants_mi":
                    reg = run_ants(case)
                else:
                    reg = world.register_images(case.fixed, case.moving, options=options(method),
                                                initial_affine=start)
                row["seconds"] = time.perf_counter() - t
                row.update(multimodal.score(case, reg))
            except Exception as exc:  # noqa: BLE001  a failed method is a result
                row["error"] = f"{type(exc).__name__}: {exc}"
            record["rows"].append(row)
            shown = {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}
            print(f"  {method:>10}: {row.get('error') or shown}", flush=True)
            save()
    lines = ["| cases | method | n | gland / lesion Dice | TRE mm | EPE mm | s/case |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in ("prostate", "open_ms"):
        for method in methods:
            rows = [r for r in record["rows"] if r["case"].startswith(kind) and r["method"] == method
                    and "error" not in r]
            if not rows:
                continue

            def mean(key):
                v = [r[key] for r in rows if r.get(key) is not None]
                return f"{np.mean(v):.3f}" if v else "–"
            dice = mean("dice_gland") if kind == "prostate" else mean("dice_lesions")
            lines.append(f"| {kind} | {method} | {len(rows)} | {dice} | {mean('tre_mm')} | {mean('epe_mm')} | "
                         f"{mean('seconds')} |")
    record["table_md"] = "\n".join(lines)
    save()
    print("\n" + record["table_md"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
