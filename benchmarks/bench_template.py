"""Group-wise template building on real Mindboggle subjects (issue #17): build time, sharpness, one round batched
against the same registrations one by one, and segmentation of held-out subjects through the template against direct
pair-wise multi-atlas propagation.

    python benchmarks/bench_template.py --data ../shared/data --subjects 1-10 --targets 11,12,13,14 \\
        --resolution 2 --out benchmarks/results/template_mindboggle_2mm_DATE.json

Steps: (1) ``groupwise.build_template`` of the ``--subjects`` (T1 at ``--resolution`` mm, each on its own grid), its
seconds and sharpness (mean NCC of the warped subjects with the template) per round; (2) the last deformable round's
registrations again, one ``optimize.register`` call per subject, for the batched/sequential time ratio; (3) the
subjects' labels fused in template space (majority vote) and carried to every ``--targets`` subject by one
``default`` registration (target fixed, template moving); (4) with ``--direct``: each subject registered to each
target directly (``default``) and the warped labels fused by majority vote (multi-atlas), plus the mean single-atlas
Dice; (5) with ``--ants N`` (run with a Python that has antspyx): ANTsPy's ``build_template`` (N SyN iterations) of
the same images, its seconds and its sharpness after registering every subject to it by SyN, and with
``--syn-sharpness`` the jaxreg template's sharpness measured the same way. Dice over the manual regions (all,
cortex, subcortex) as ``bench_real.score``. Raw results go to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_real  # noqa: E402


def _ids(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def syn_sharpness(template, images) -> float:
    """Mean NCC over ``template``'s foreground (``groupwise``'s sharpness) of the ANTs ``images`` registered to the
    ANTs image ``template`` by SyN."""
    import ants
    import jax.numpy as jnp

    from jaxreg import groupwise, optimize

    data = jnp.asarray(template.numpy(), jnp.float32)
    fg = jnp.asarray(optimize._foreground(np.asarray(data)), jnp.float32)
    ncc = []
    for im in images:
        warped = ants.registration(fixed=template, moving=im, type_of_transform="SyN")["warpedmovout"].numpy()
        ncc.append(float(groupwise._ncc(jnp.asarray(warped, jnp.float32), data, fg)))
    return float(np.mean(ncc))


def _ants_subjects(vols: dict, subjects: list) -> list:
    from jaxreg.data import io, preprocess

    return [bench_real._ants_image(io.Volume(preprocess.normalize(np.asarray(vols[s][0].data, np.float32)),
                                             vols[s][0].affine)) for s in subjects]


def ants_template(vols: dict, subjects: list, iterations: int) -> dict:
    """ANTsPy's ``build_template`` (SyN, its defaults: the first image's grid, gradient step 0.2, no-rigid affine
    average) of the normalised subjects; its seconds, and the mean NCC over the template's foreground of each subject
    registered to it by SyN (``groupwise``'s sharpness)."""
    import ants

    images = _ants_subjects(vols, subjects)
    t = time.perf_counter()
    tpl = ants.build_template(image_list=images, iterations=iterations, type_of_transform="SyN")
    seconds = time.perf_counter() - t
    data = tpl.numpy()
    out = {"iterations": iterations, "seconds": seconds, "sharpness": syn_sharpness(tpl, images),
           "shape": list(data.shape), "version": getattr(ants, "__version__", "?")}
    print(f"ANTsPy build_template ({iterations} SyN iterations) {data.shape}: {seconds:.0f} s, sharpness "
          f"{out['sharpness']:.4f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=bench_real.DEFAULT_DATA)
    ap.add_argument("--subjects", default="1-10", help="template subjects, e.g. 1-10 or 1,2,5")
    ap.add_argument("--targets", default="11,12,13,14", help="held-out subjects segmented through the template")
    ap.add_argument("--resolution", type=float, default=2.0)
    ap.add_argument("--affine-rounds", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", default="pairwise", choices=("pairwise", "joint"))
    ap.add_argument("--direct", action="store_true", help="also direct pair-wise multi-atlas propagation")
    ap.add_argument("--no-sequential", action="store_true", help="skip the one-by-one timing of a round")
    ap.add_argument("--ants", type=int, default=0, metavar="N",
                    help="also ANTsPy's ants.build_template (N iterations of SyN, its defaults) on the same images, "
                         "and its sharpness after registering each subject to it (SyN) [0: skip]")
    ap.add_argument("--skip-jaxreg", action="store_true", help="only the ANTs template (with --ants)")
    ap.add_argument("--syn-sharpness", action="store_true",
                    help="also the jaxreg template's sharpness with every subject registered to it by ANTsPy SyN (as "
                         "--ants measures its own template)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data, "mindboggle20")):
        print(f"skipped: no mindboggle20 under {args.data}")
        return 0
    import jax
    import jax.numpy as jnp

    from jaxreg import groupwise, optimize, world
    from jaxreg.data import io, preprocess

    subjects, targets = _ids(args.subjects), _ids(args.targets)
    vols = {s: bench_real.load(args.data, s, args.resolution) for s in subjects + targets}
    record = {"command": " ".join(["python"] + sys.argv), "date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                          "devices": [str(d) for d in jax.devices()]},
              "git": bench_real._git(), "subjects": subjects, "targets": targets, "resolution": args.resolution,
              "mode": args.mode, "affine_rounds": args.affine_rounds, "rounds": args.rounds}

    def save():
        io.write_json(args.out, record)

    if args.ants:
        record["ants"] = ants_template(vols, subjects, args.ants)
        save()
    if args.skip_jaxreg:
        return 0
    t0 = time.perf_counter()
    tpl = groupwise.build_template([vols[s][0] for s in subjects], affine_rounds=args.affine_rounds,
                                   deformable_rounds=args.rounds, mode=args.mode, progress=print)
    record["build_seconds"] = time.perf_counter() - t0
    record["round_seconds"], record["sharpness"] = list(tpl.seconds), list(tpl.sharpness)
    record["template_shape"] = list(tpl.template.shape)
    print(f"template {tpl.template.shape} of {len(subjects)} subjects in {record['build_seconds']:.0f} s; "
          f"sharpness per round {[round(v, 4) for v in tpl.sharpness]}", flush=True)
    save()
    if args.syn_sharpness:
        record["syn_sharpness"] = syn_sharpness(bench_real._ants_image(tpl.template), _ants_subjects(vols, subjects))
        print(f"sharpness with SyN registrations to the jaxreg template: {record['syn_sharpness']:.4f}", flush=True)
        save()

    if not args.no_sequential and args.rounds:
        # the last round's registrations again: batched (compiled already) and one by one (compiled once first)
        opts = groupwise.DEFORMABLE_OPTIONS
        fixed = np.asarray(tpl.template.data)
        zero = jnp.zeros((*fixed.shape, fixed.ndim), jnp.float32)
        stack = np.stack([np.asarray(optimize.pull(jnp.asarray(preprocess.normalize(np.asarray(vols[s][0].data,
                                                                                             np.float32))),
                                                   zero, tpl.grid(i, vols[s][0])))
                          for i, s in enumerate(subjects)])
        spacing = np.full(fixed.ndim, args.resolution)
        t = time.perf_counter()
        jax.block_until_ready(optimize.register_batch(np.broadcast_to(fixed, stack.shape), stack, options=opts,
                                                      initial_disp=tpl.fields, spacing=spacing).disp)
        batched = time.perf_counter() - t
        optimize.register(fixed, stack[0], options=opts, initial_disp=tpl.fields[0], spacing=spacing)  # compile
        t = time.perf_counter()
        for i in range(len(subjects)):
            jax.block_until_ready(optimize.register(fixed, stack[i], options=opts, initial_disp=tpl.fields[i],
                                                    spacing=spacing).disp)
        sequential = time.perf_counter() - t
        record["round_batched_seconds"], record["round_sequential_seconds"] = batched, sequential
        print(f"one deformable round: batched {batched:.1f} s, one by one {sequential:.1f} s "
              f"(ratio {sequential / batched:.2f})", flush=True)
        save()

    fused = groupwise.template_labels(tpl, [vols[s][0] for s in subjects], [vols[s][1] for s in subjects])
    rows = []
    for t_id in targets:
        target, target_labels = vols[t_id]
        t = time.perf_counter()
        reg = groupwise.propagate_labels(tpl, fused, target)
        row = {"target": t_id, "method": "template", "seconds": time.perf_counter() - t,
               **bench_real.score(target_labels, reg.warped_labels)}
        rows.append(row)
        print(f"target {t_id}: through the template Dice {row['dice_mean']:.3f} ({row['seconds']:.1f} s)", flush=True)
        if args.direct:
            t = time.perf_counter()
            warped, single = [], []
            for s in subjects:
                r = world.register_images(target, vols[s][0], preset="default", moving_labels=vols[s][1])
                lab = np.asarray(r.warped_labels.data)
                warped.append(lab)
                single.append(bench_real.score(target_labels, lab)["dice_mean"])
            vote = groupwise.majority_vote(np.stack(warped))
            rows.append({"target": t_id, "method": "direct_multi_atlas", "seconds": time.perf_counter() - t,
                         "single_atlas_dice_mean": float(np.mean(single)), **bench_real.score(target_labels, vote)})
            print(f"target {t_id}: direct multi-atlas Dice {rows[-1]['dice_mean']:.3f} (single atlases "
                  f"{np.mean(single):.3f}; {rows[-1]['seconds']:.1f} s)", flush=True)
        record["rows"] = rows
        save()

    lines = ["| method | targets | Dice mean | cortex | subcortex | s/target |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        vals = {k: np.mean([r[k] for r in sel]) for k in ("dice_mean", "dice_cortex", "dice_subcortex", "seconds")}
        lines.append(f"| {method} | {len(sel)} | {vals['dice_mean']:.3f} | {vals['dice_cortex']:.3f} | "
                     f"{vals['dice_subcortex']:.3f} | {vals['seconds']:.1f} |")
    record["table_md"] = "\n".join(lines)
    save()
    print("\n" + record["table_md"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
