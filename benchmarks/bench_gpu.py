"""GPU check and timings in one short run: warp, classical 2 mm registration, a 3-D network trained on the device.

Made for a lent GPU with little time on it (the machine has no nilearn and no network), in two steps:

    python benchmarks/bench_gpu.py --prepare .gpu/mni.npz --pairs 6        # here: template + held-out pairs
    python benchmarks/bench_gpu.py --data .gpu/mni.npz --out OUT/gpu.json   # there: the three parts below

1. **warp** (160×192×224 and 80×98×85; ``bench_warp.py``'s data and calls): ``jaxreg fwd`` and ``v+g``
   (value and gradient of SSD w.r.t. the field, moving image constant) against the naive ``map_coordinates`` path and
   PyTorch ``grid_sample`` (forward, forward+backward w.r.t. the grid) on the same GPU; median of ``--repeats``
   after a warm-up. Bandwidth: a trilinear warp must at least read the field (``ndim`` floats), read the image once
   and write the output: ``(ndim + 2) * 4`` bytes per voxel; reported as GB/s at the measured time.
2. **classical**: ``optimize.register`` with the ``fast`` and ``default`` presets on the held-out MNI pairs
   (80×96×80 at 2 mm, moving = random affine + smooth deformation of the template); seconds per pair (first pair
   includes compilation; the mean over the later ones is the number that matters), mean Dice (CSF, GM, WM).
3. **network**: VoxelMorph-1 (``configs/mni_3d_augment.py``'s setup: fixed = template, moving = the template
   warped on the device by a random affine (``--affine-scale`` times ±10°, ±10 %, ±4 voxels) + smooth deformation,
   local NCC + diffusion) trained for ``--train-seconds``; then the same held-out pairs: Dice and seconds per pair
   for the network alone (with ``--prealign``: after the classical affine stage, VoxelMorph's usual setting) and for
   the network + instance optimisation, beside the classical rows.

Writes everything to ``--out`` (JSON, after each part, so a run stopped early keeps what it finished) and prints
Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

LABELS = (1, 2, 3)


# ---------------------------------------------------------------------------------------------------- prepare
def prepare(path, pairs, seed, shape):
    """``pairs`` held-out ``mni_pair`` pairs (fixed = the template), cropped to ``shape``, into one npz."""
    from jaxreg.data import preprocess, synthetic

    out = {}
    for i in range(pairs):
        p = synthetic.mni_pair(np.random.default_rng([seed, i]))
        for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
            a = preprocess.crop_or_pad(p[k], shape)
            out[f"{k}_{i}"] = a.astype(np.float16 if a.dtype == np.float32 else np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {pairs} pairs of {shape})")


def load_pairs(path):
    z = np.load(path)
    n = len([k for k in z.files if k.startswith("moving_labels_")])
    return [{k: (z[f"{k}_{i}"].astype(np.float32) if "labels" not in k else z[f"{k}_{i}"].astype(np.int32))
             for k in ("fixed", "moving", "fixed_labels", "moving_labels")} for i in range(n)]


# ------------------------------------------------------------------------------------------------------ helpers
def _median_time(fn, repeats, sync):
    sync(fn())  # warm-up, compilation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _dice(fixed_labels, warped_labels):
    """Mean Dice over ``LABELS`` (NumPy here: ``jaxreg.metrics`` needs nibabel, absent on the GPU machine)."""
    f, w = np.asarray(fixed_labels), np.asarray(warped_labels)
    return float(np.mean([2 * np.sum((f == k) & (w == k)) / (np.sum(f == k) + np.sum(w == k)) for k in LABELS]))


def _save(out, results):
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, out)


# --------------------------------------------------------------------------------------------------------- warp
def bench_warp(shape, repeats):
    """``bench_warp.py``'s data and calls (jaxreg, the naive path, torch ``grid_sample`` on CUDA), median times."""
    import jax.numpy as jnp

    import bench_warp as bw  # the sibling script (benchmarks/ is on sys.path when this file runs)
    from jaxreg import spatial

    moving, fixed, u = bw._data(shape)
    calls = bw._jax_fns(moving, fixed, u)  # each call waits for its result
    skipped = "torch not importable"
    try:
        tcalls, torch_out = bw._torch_calls(moving, fixed, u, threads=None, device="cuda")
    except Exception as exc:  # noqa: BLE001 - no CUDA: report, go on
        tcalls, torch_out, skipped = {}, None, f"{type(exc).__name__}: {exc}"
    calls.update(tcalls)
    row = {k: _median_time(fn, repeats, lambda _: None) for k, fn in calls.items()}
    if torch_out is None:
        row["torch"] = f"skipped: {skipped}"
    else:
        ours = np.asarray(spatial.warp(jnp.asarray(moving), jnp.asarray(u)))
        row["torch max abs diff"] = float(np.abs(torch_out() - ours).max())
    n = int(np.prod(shape))
    row["fwd GB/s (>= (ndim+2)*4 B/voxel)"] = (3 + 2) * 4 * n / row["jaxreg fwd"] / 1e9
    row["v+g / fwd"] = row["jaxreg v+g"] / row["jaxreg fwd"]
    return row


# ---------------------------------------------------------------------------------------------------- classical
def bench_classical(pairs, presets):
    import jax

    from jaxreg import optimize, spatial

    rows = {}
    for name in presets:
        times, dices, res = [], [], None
        for p in pairs:
            t = time.perf_counter()
            res = optimize.register(p["fixed"], p["moving"], options=optimize.PRESETS[name])
            jax.block_until_ready(res.disp)
            times.append(time.perf_counter() - t)
            dices.append(_dice(p["fixed_labels"], spatial.warp_labels(p["moving_labels"], res.disp)))
        rows[name] = {"first_s": times[0], "later_s_mean": float(np.mean(times[1:])) if len(times) > 1 else None,
                      "dice_mean": float(np.mean(dices)), "dice_std": float(np.std(dices)),
                      "identity_dice": float(np.mean([_dice(p["fixed_labels"], p["moving_labels"]) for p in pairs])),
                      "last_pair_seconds_per_level": {k: float(v) for k, v in res.seconds.items()},
                      "last_pair_iterations": {k: int(np.sum(~np.isnan(np.asarray(h)))) for k, h in res.history.items()}}
        print(name, rows[name], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------ network
def bench_network(pairs, seconds, batch_size, instance_iterations, learning_rate, prealign, affine_scale):
    import jax
    import jax.numpy as jnp

    from jaxreg import models, optimize, spatial, training
    from jaxreg.data import augment as aug
    from jaxreg.methods import voxelmorph

    model = models.build(ndim=3, preset="vxm1")
    tx = training.make_optimizer("adam", learning_rate)
    augment = aug.AugmentConfig(rotation_deg=10.0 * affine_scale, scaling=0.10 * affine_scale,
                                translation=4.0 * affine_scale, deform=2.0, deform_spacing=8.0, deform_method="cubic")
    loss = voxelmorph.Loss(model, similarity="lncc", similarity_options=(("window", 9),), regularizer="diffusion",
                           reg_weight=1.0, augment=augment)
    step = training.make_train_step(loss, tx)
    template = jnp.asarray(pairs[0]["fixed"])  # every pair's fixed image is the template
    shape = template.shape
    state = training.create_state(model, tx, jax.random.key(0), shape)
    batch = {"fixed": jnp.broadcast_to(template, (batch_size,) + shape),
             "moving": jnp.broadcast_to(template, (batch_size,) + shape)}
    key = jax.random.key(1)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, jax.random.fold_in(key, 0))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    n, t0, losses = 1, time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        state, metrics = step(state, batch, jax.random.fold_in(key, n))
        n += 1
        if n % 100 == 0:
            losses.append((n, float(metrics["loss"])))
            print(f"step {n} loss {losses[-1][1]:.4f}", flush=True)
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - t0
    predict = voxelmorph.make_predict(model)
    params = state.params

    def net(p):
        """The network's field; with ``prealign``, the classical affine first and the network on its result."""
        fixed, moving = jnp.asarray(p["fixed"]), jnp.asarray(p["moving"])
        if not prealign:
            return predict(params, moving, fixed)["disp"]
        affine = optimize.register(fixed, moving, options=optimize.PRESETS["affine"]).disp
        u = predict(params, spatial.warp(moving, affine), fixed)["disp"]
        return spatial.compose(affine, u)  # first u, then the affine: moving[phi_a(x + u(x))]

    jax.block_until_ready(net(pairs[0]))  # compile
    rows = {"steps": n, "batch_size": batch_size, "prealign": prealign, "affine_scale": affine_scale, "train_s": train_s, "compile_s": compile_s,
            "steps_per_s": (n - 1) / train_s, "loss_curve": losses}
    for label, fn in (("network", net), ("network+io", None)):
        times, dices = [], []
        for p in pairs:
            t = time.perf_counter()
            disp = net(p)
            if fn is None:
                disp = optimize.register(p["fixed"], p["moving"], options=optimize.PRESETS["default"],
                                         initial_disp=disp, transform=None, init=None, deformable="disp",
                                         levels=(1,), iterations=(instance_iterations,)).disp
            jax.block_until_ready(disp)
            times.append(time.perf_counter() - t)
            dices.append(_dice(p["fixed_labels"], spatial.warp_labels(p["moving_labels"], disp)))
        rows[label] = {"first_s": times[0], "later_s_mean": float(np.mean(times[1:])),
                       "dice_mean": float(np.mean(dices)), "dice_std": float(np.std(dices))}
        print(label, rows[label], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prepare", help="write the template and held-out pairs to this npz (needs nilearn) and stop")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--seed", type=int, default=1_000_000)
    p.add_argument("--shape", default="80x96x80", help="crop/pad of the prepared pairs (U-Net: multiples of 16)")
    p.add_argument("--data", help="npz written by --prepare")
    p.add_argument("--out", help="JSON results file")
    p.add_argument("--parts", default="warp,classical,network")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warp-shapes", default="160x192x224,80x98x85")
    p.add_argument("--presets", default="fast,default")
    p.add_argument("--train-seconds", type=float, default=180.0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--instance-iterations", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of the network")
    p.add_argument("--prealign", action="store_true",
                   help="network part: the classical affine stage first, the network on its result")
    p.add_argument("--affine-scale", type=float, default=1.0,
                   help="training augmentation's affine magnitudes (1: ±10°, ±10 %%, ±4 voxels)")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.pairs, args.seed, tuple(int(n) for n in args.shape.split("x")))
        return
    import jax

    results = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(results, flush=True)
    parts = args.parts.split(",")
    if "warp" in parts:
        results["warp"] = {}
        for shape in [tuple(int(n) for n in s.split("x")) for s in args.warp_shapes.split(",")]:
            results["warp"]["x".join(map(str, shape))] = row = bench_warp(shape, args.repeats)
            print(shape, {k: (f"{v * 1e3:.3f} ms" if isinstance(v, float) and "/" not in k and "GB" not in k
                              and "diff" not in k else v) for k, v in row.items()}, flush=True)
            _save(args.out, results)
    pairs = load_pairs(args.data) if args.data else []
    if "classical" in parts and pairs:
        results["classical"] = bench_classical(pairs, args.presets.split(","))
        _save(args.out, results)
    if "network" in parts and pairs:
        results["network"] = bench_network(pairs, args.train_seconds, args.batch_size, args.instance_iterations, args.lr,
                                           args.prealign, args.affine_scale)
        _save(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
