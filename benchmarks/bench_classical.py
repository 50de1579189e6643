"""Classical pairwise registration, side by side: jaxreg presets, ANTsPy SyN, elastix (affine + B-spline), identity.

Pairs come from ``jaxreg.data.synthetic.mni_pair(seed, resolution=R, contrast=C)``: the MNI152 T1 template (fixed)
against a randomly affinely and non-linearly deformed copy (moving), T1 -> T1 (``t1``) or T2-like -> T1 with bias
field and noise (``t2``, multimodal). Every method runs on the same pairs in the same process.

Per method and contrast the table gives the mean Dice over labels 1, 2, 3 (CSF, GM, WM;
``jaxreg.metrics.dice``), the % of voxels with Jacobian determinant <= 0 (worst pair; ``jaxreg.spatial.
jacobian_determinant`` on the total displacement for jaxreg and elastix, ``ants.create_jacobian_determinant_image``
on the SyN warp for ANTs), and the registration time per pair: the first pair separately (for jaxreg it includes JIT
compilation: the jit caches are cleared before each preset's first pair) and the mean over later pairs (compiled
programs reused; with ``--repeats R`` each later pair is timed R times and the minimum kept), wall-clock and process
CPU seconds. Times cover the registration only (not label warping).

``--batch B`` also times ``jaxreg.optimize.register_batch`` on B T1 pairs (stacked on axis 0) against B calls of
``register`` with the same preset, both compiled beforehand.

Run (2 mm, 3 pairs, both contrasts, all methods):
    python benchmarks/bench_classical.py --contrast t1 --batch 8
    python benchmarks/bench_classical.py --contrast t2 --batch 0
    python benchmarks/bench_classical.py --resolution 1 --pairs 1 --contrast t1 --methods identity,fast-t1,diffeo-t1,ants
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")  # before ants/itk are imported

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxreg import metrics, optimize, spatial  # noqa: E402
from jaxreg.data.synthetic import mni_pair  # noqa: E402

LABELS = (1, 2, 3)

# The presets. "fast-t1" and "diffeo-t1" take the library's "default" and "diffeo" definitions
# (_LIBRARY_NAMES), and every other library preset is added under its own name ("fast", "multimodal", ...).
# "fast-mm" keeps the definition (MI in both stages).
_LOCAL_PRESETS = {
    "svf-t1": optimize.RegisterOptions(deformable="svf", metric="lncc", metric_options={"window": 5}),
    "fast-mm": optimize.RegisterOptions(deformable="disp", metric="mi", affine_metric="mi"),
    "fast-mm-mind": optimize.RegisterOptions(deformable="disp", metric="mind", affine_metric="mi"),
    "fast-mm-ngf": optimize.RegisterOptions(deformable="disp", metric="ngf", affine_metric="mi"),
}
_LIBRARY_NAMES = {"fast-t1": "default", "diffeo-t1": "diffeo"}


def _presets():
    lib = optimize.PRESETS
    out = {ours: lib[theirs] for ours, theirs in _LIBRARY_NAMES.items()}
    out.update(_LOCAL_PRESETS)
    out.update({k: v for k, v in lib.items() if k not in _LIBRARY_NAMES.values() and k not in out})
    return out, ("jaxreg.optimize.PRESETS (" + ", ".join(f"{a}={b}" for a, b in _LIBRARY_NAMES.items())
                 + ", other library presets under their own names) + local")


PRESETS, PRESETS_SOURCE = _presets()
DIFFEOMORPHIC = ("svf", "diffeo")  # deformable models whose folding target is 0
_T1 = ("fast-t1", "fast", "diffeo-t1", "svf-t1")
# the library's multimodal preset replaces the local NGF variant when it is the same option set
_MM_NGF = "multimodal" if PRESETS.get("multimodal") == PRESETS["fast-mm-ngf"] else "fast-mm-ngf"
_T2 = ("multimodal", _MM_NGF, "fast-mm", "fast-mm-mind")
DEFAULT_PRESETS = {"t1": tuple(dict.fromkeys(k for k in _T1 if k in PRESETS)),
                   "t2": tuple(dict.fromkeys(k for k in _T2 if k in PRESETS))}
PEERS = ("ants", "elastix")


# ------------------------------------------------------------------------------------------------------ methods
def _mean_dice(fixed_labels, warped_labels):
    d = metrics.dice(np.asarray(fixed_labels), np.asarray(warped_labels).astype(np.int32), labels=list(LABELS))
    return float(np.mean([d[k] for k in LABELS])), {k: float(d[k]) for k in LABELS}


def _fold_pct(jac):
    return 100.0 * float(np.mean(np.asarray(jac) <= 0))


def run_identity(pair, first):
    return dict(warped_labels=pair["moving_labels"], fold=0.0, wall=0.0, cpu=0.0)


def make_jaxreg(name):
    preset = PRESETS[name]

    def run(pair, first):
        if first:
            jax.clear_caches()  # the first pair of each preset pays the full compilation
        w, c = time.perf_counter(), time.process_time()
        res = optimize.register(pair["fixed"], pair["moving"], options=preset)
        jax.block_until_ready((res.disp, res.warped))
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        labels = np.asarray(spatial.warp_labels(pair["moving_labels"], res.disp))
        fold = _fold_pct(spatial.jacobian_determinant(res.disp))
        return dict(warped_labels=labels, fold=fold, wall=wall, cpu=cpu,
                    iters={k: int(np.sum(~np.isnan(np.asarray(h)))) for k, h in res.history.items()})
    return run


def run_ants(pair, first):
    import ants

    sp = tuple(float(s) for s in pair["spacing"])
    # ants.from_numpy keeps the array's axis order: array axis k is image axis k (same as .numpy()).
    fi = ants.from_numpy(np.ascontiguousarray(pair["fixed"], np.float32), spacing=sp)
    mo = ants.from_numpy(np.ascontiguousarray(pair["moving"], np.float32), spacing=sp)
    ml = ants.from_numpy(np.ascontiguousarray(pair["moving_labels"], np.float32), spacing=sp)
    w, c = time.perf_counter(), time.process_time()
    reg = ants.registration(fixed=fi, moving=mo, type_of_transform="SyN")
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    try:
        lab = ants.apply_transforms(fixed=fi, moving=ml, transformlist=reg["fwdtransforms"],
                                    interpolator="nearestNeighbor").numpy()
        warp_file = [t for t in reg["fwdtransforms"] if t.endswith("Warp.nii.gz")]
        fold = (_fold_pct(ants.create_jacobian_determinant_image(fi, warp_file[0], do_log=False).numpy())
                if warp_file else float("nan"))
    finally:
        for f in set(reg["fwdtransforms"]) | set(reg["invtransforms"]):
            if os.path.isfile(f) and f.startswith(("/tmp", os.environ.get("TMPDIR", "/tmp"))):
                os.remove(f)
    return dict(warped_labels=np.rint(lab).astype(np.int32), fold=fold, wall=wall, cpu=cpu)


def _to_itk(arr, spacing):
    import itk

    # itk arrays are (z, y, x): reverse the axes; spacing is given in (x, y, z) = our array axis order.
    img = itk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr, np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    return img


def run_elastix(pair, first):
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(2)
    sp = pair["spacing"]
    fi, mo, ml = _to_itk(pair["fixed"], sp), _to_itk(pair["moving"], sp), _to_itk(pair["moving_labels"], sp)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("affine"))
    po.AddParameterMap(po.GetDefaultParameterMap("bspline"))
    w, c = time.perf_counter(), time.process_time()
    _, tp = itk.elastix_registration_method(fi, mo, parameter_object=po, log_to_console=False)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    for i in range(tp.GetNumberOfParameterMaps()):
        tp.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
    lab = itk.GetArrayFromImage(itk.transformix_filter(ml, transform_parameter_object=tp, log_to_console=False))
    lab = np.rint(lab.transpose(2, 1, 0)).astype(np.int32)
    # total displacement in mm, components (x, y, z) = our axes; identity direction, so voxels = mm / spacing
    # transformix writes deformationField.nii into its output directory (the cwd by default): use a scratch one
    with tempfile.TemporaryDirectory() as scratch:
        field = itk.GetArrayFromImage(itk.transformix_deformation_field(
            fi, tp, log_to_console=False, output_directory=scratch + os.sep))
    disp = np.ascontiguousarray(field.transpose(2, 1, 0, 3)) / np.asarray(sp, np.float32).reshape(1, 1, 1, 3)
    fold = _fold_pct(spatial.jacobian_determinant(disp.astype(np.float32)))
    return dict(warped_labels=lab, fold=fold, wall=wall, cpu=cpu)


def method_runner(name):
    if name == "identity":
        return run_identity
    if name == "ants":
        return run_ants
    if name == "elastix":
        return run_elastix
    if name in PRESETS:
        return make_jaxreg(name)
    raise SystemExit(f"unknown method {name!r}; choose from identity, ants, elastix, {', '.join(PRESETS)}")


# ------------------------------------------------------------------------------------------------------ driver
def _available(name):
    mod = {"ants": "ants", "elastix": "itk"}.get(name)
    if mod is None:
        return True
    try:
        __import__(mod)
        return True
    except Exception as exc:  # noqa: BLE001
        print(f"skipping {name}: cannot import {mod} ({type(exc).__name__}: {exc})", flush=True)
        return False


def evaluate(contrast, methods, pairs, resolution, repeats=1):
    data = [mni_pair(seed, resolution=resolution, contrast=contrast) for seed in range(pairs)]
    print(f"\n{contrast}: {pairs} pair(s) at {resolution} mm, shape {data[0]['fixed'].shape}", flush=True)
    rows = []
    for name in methods:
        if not _available(name):
            continue
        run = method_runner(name)
        per = []
        for i, pair in enumerate(data):
            out = run(pair, first=(i == 0))
            # extra timed runs of the same pair (not for the first pair, whose single run includes compilation)
            for _ in range(repeats - 1 if i > 0 else 0):
                again = run(pair, first=False)
                out["wall"], out["cpu"] = min(out["wall"], again["wall"]), min(out["cpu"], again["cpu"])
            dice, per_label = _mean_dice(pair["fixed_labels"], out["warped_labels"])
            per.append(dict(seed=i, dice=dice, per_label=per_label, fold=out["fold"], wall=out["wall"],
                            cpu=out["cpu"], iters=out.get("iters"), load=os.getloadavg()[0]))
            print(f"  {name:14s} pair {i}: dice {dice:.4f} fold {out['fold']:.4f}% wall {out['wall']:.1f}s "
                  f"cpu {out['cpu']:.1f}s load {os.getloadavg()[0]:.1f}" + (f" iters {out['iters']}" if out.get("iters") else ""),
                  flush=True)
        later = per[1:] or per
        rows.append(dict(
            contrast=contrast, method=name, pairs=len(per),
            dice=float(np.mean([p["dice"] for p in per])),
            dice_sd=float(np.std([p["dice"] for p in per])),
            per_label={k: float(np.mean([p["per_label"][k] for p in per])) for k in LABELS},
            fold_max=float(np.max([p["fold"] for p in per])),
            first_wall=per[0]["wall"], first_cpu=per[0]["cpu"],
            later_wall=float(np.mean([p["wall"] for p in later])),
            later_cpu=float(np.mean([p["cpu"] for p in later])),
            per_pair=per,
        ))
    return rows


def batch_benchmark(name, size, resolution):
    """register_batch on ``size`` T1 pairs vs ``size`` x register (both compiled first); per-pair time ratio."""
    preset = PRESETS[name]
    data = [mni_pair(seed, resolution=resolution, contrast="t1") for seed in range(size)]
    fixed = np.stack([d["fixed"] for d in data])
    moving = np.stack([d["moving"] for d in data])
    print(f"\nbatch: {size} T1 pairs, preset {name}", flush=True)
    jax.block_until_ready(optimize.register(data[0]["fixed"], data[0]["moving"], options=preset).disp)  # compile
    single, single_dice = [], []
    for d in data:
        w = time.perf_counter()
        res = optimize.register(d["fixed"], d["moving"], options=preset)
        jax.block_until_ready(res.disp)
        single.append(time.perf_counter() - w)
        single_dice.append(_mean_dice(d["fixed_labels"], spatial.warp_labels(d["moving_labels"], res.disp))[0])
    w = time.perf_counter()
    jax.block_until_ready(optimize.register_batch(fixed, moving, options=preset).disp)
    batch_first = time.perf_counter() - w
    w = time.perf_counter()
    res = optimize.register_batch(fixed, moving, options=preset)
    jax.block_until_ready(res.disp)
    batch_wall = time.perf_counter() - w
    batch_dice = [_mean_dice(d["fixed_labels"], spatial.warp_labels(d["moving_labels"], res.disp[i]))[0]
                  for i, d in enumerate(data)]
    out = dict(preset=name, size=size, single_mean=float(np.mean(single)), single_total=float(np.sum(single)),
               batch_first=batch_first, batch_wall=batch_wall, ratio=batch_wall / size / float(np.mean(single)),
               single_dice=float(np.mean(single_dice)), batch_dice=float(np.mean(batch_dice)),
               load=os.getloadavg()[0])
    print(f"  {size} x register: {out['single_total']:.1f}s ({out['single_mean']:.1f}s/pair, dice {out['single_dice']:.4f}); "
          f"register_batch: first {batch_first:.1f}s, compiled {batch_wall:.1f}s ({batch_wall / size:.1f}s/pair, "
          f"dice {out['batch_dice']:.4f}); per-pair ratio {out['ratio']:.2f}", flush=True)
    return out


def markdown(rows):
    lines = ["| contrast | method | mean Dice ± sd | CSF | GM | WM | folding % (worst pair) | first pair s (wall / cpu) "
             "| later pairs s/pair (wall / cpu) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pl = r["per_label"]
        fold = "n/a" if np.isnan(r["fold_max"]) else f"{r['fold_max']:.4f}"
        later = "–" if r["pairs"] < 2 else f"{r['later_wall']:.1f} / {r['later_cpu']:.1f}"
        lines.append(f"| {r['contrast']} | {r['method']} | {r['dice']:.4f} ± {r['dice_sd']:.4f} | {pl[1]:.3f} | {pl[2]:.3f} "
                     f"| {pl[3]:.3f} | {fold} | {r['first_wall']:.1f} / {r['first_cpu']:.1f} | {later} |")
    return "\n".join(lines)


def targets(rows):
    """The issue's targets: per peer and contrast, a jaxreg preset >= 0.01 Dice better, >= 4x faster, folding ok."""
    lines = []
    for contrast in sorted({r["contrast"] for r in rows}):
        rs = {r["method"]: r for r in rows if r["contrast"] == contrast}
        ours = [r for m, r in rs.items() if m in PRESETS]
        for peer in PEERS:
            if peer not in rs or not ours:
                continue
            p = rs[peer]
            for r in ours:
                limit = 0.0 if PRESETS[r["method"]].deformable in DIFFEOMORPHIC else 0.05
                t_ours = r["later_wall"] if r["pairs"] > 1 else r["first_wall"]
                t_peer = p["later_wall"] if p["pairs"] > 1 else p["first_wall"]
                ok_d = r["dice"] >= p["dice"] + 0.01
                ok_t = t_ours * 4 <= t_peer
                ok_f = r["fold_max"] <= limit
                lines.append(f"- {contrast} {r['method']} vs {peer}: dDice {r['dice'] - p['dice']:+.4f} "
                             f"({'met' if ok_d else 'MISSED'}), speed-up {t_peer / max(t_ours, 1e-9):.2f}x "
                             f"({'met' if ok_t else 'MISSED'}), folding {r['fold_max']:.4f}% <= {limit}% "
                             f"({'met' if ok_f else 'MISSED'}) -> {'ALL MET' if ok_d and ok_t and ok_f else 'not met'}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--resolution", type=int, default=2, choices=(1, 2))
    p.add_argument("--contrast", default="t1,t2", help="comma list of t1, t2")
    p.add_argument("--methods", default=None,
                   help="comma list of identity, ants, elastix and preset names (%s); default: identity, the "
                        "contrast's presets, ants, elastix" % ", ".join(PRESETS))
    p.add_argument("--repeats", type=int, default=1,
                   help="time each later pair this many times and keep the minimum (wall and CPU separately)")
    p.add_argument("--batch", type=int, default=8, help="register_batch size on T1 pairs (0 skips)")
    p.add_argument("--batch-preset", default="fast-t1")
    p.add_argument("--quick", action="store_true", help="1 pair, no elastix, no batch benchmark")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.batch = 1, 0
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    for k, v in PRESETS.items():
        print(f"  preset {k}: {v}")
    print(f"jaxreg commit {commit}, jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus, "
          f"load avg {os.getloadavg()[0]:.2f}, presets from {PRESETS_SOURCE}", flush=True)
    rows = []
    for contrast in [c.strip() for c in args.contrast.split(",") if c.strip()]:
        if args.methods:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        else:
            methods = ["identity", *DEFAULT_PRESETS[contrast], *PEERS]
        if args.quick:
            methods = [m for m in methods if m != "elastix"]
        rows += evaluate(contrast, methods, args.pairs, args.resolution, args.repeats)
    batch = batch_benchmark(args.batch_preset, args.batch, args.resolution) if args.batch > 0 else None
    print("\n" + markdown(rows))
    print("\nTargets (jaxreg time: later-pair mean when there are >= 2 pairs):\n" + targets(rows))
    if batch:
        print(f"\nregister_batch({batch['size']}) per pair / register per pair = {batch['ratio']:.2f} "
              f"(target <= 0.5: {'met' if batch['ratio'] <= 0.5 else 'MISSED'})")
    print(f"\nload avg at end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(commit=commit, rows=rows, batch=batch, argv=sys.argv[1:]), f, indent=1, default=str)


if __name__ == "__main__":
    main()
