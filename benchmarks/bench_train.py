"""jaxreg's registration network vs the voxelmorph package (PyTorch backend): inference and training-step time.

Same machine, same shape (96×128×96, batch 1), both on CPU with 2 threads. voxelmorph 0.3.4's ``VxmPairwise``
(neurite ``BasicUNet`` 16×5 levels, 5 scaling-and-squaring steps; loss neurite NCC window 9 + 0.01 · l2 gradient,
Adam) against jaxreg's ``RegistrationNet`` VoxelMorph-1 (encoder 16,32,32,32 / decoder 32,32,32,32,8,8) with the
same 5 integration steps at full resolution and the same loss (``lncc`` window 9 + 0.01 · diffusion), and also
without integration. The architectures are not identical (voxelmorph 0.3.4 no longer ships the vxm1 layout); the
parameter counts are printed. Times are the minimum and median of ``--repeats`` calls after one untimed call
(compilation for JAX, allocator warm-up for PyTorch); CPU seconds are reported too (steadier on a shared machine).

Run (the bench venv has torch and voxelmorph; see /work/benchenv/REPORT.md):

    /work/benchenv/bin/python benchmarks/bench_train.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _timeit(fn, repeats):
    fn()  # warm-up / compile
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"min_s": min(wall), "median_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def _pair(shape):
    import numpy as np

    from jaxreg.data import preprocess, synthetic

    try:
        p = synthetic.mni_pair(0, resolution=2)
    except ImportError:
        p = synthetic.synthetic_pair(0, shape=shape)
    return (preprocess.crop_or_pad(p["moving"], shape).astype(np.float32),
            preprocess.crop_or_pad(p["fixed"], shape).astype(np.float32))


def bench_jaxreg(moving, fixed, repeats, int_steps):
    import jax
    import jax.numpy as jnp

    from jaxreg import models, training
    from jaxreg.methods import voxelmorph

    shape = moving.shape
    model = models.build(ndim=3, preset="vxm1", int_steps=int_steps)
    tx = training.make_optimizer("adam", 1e-4)
    state = training.create_state(model, tx, jax.random.key(0), shape)
    loss = voxelmorph.Loss(model, similarity="lncc", similarity_options=(("window", 9),), reg_weight=0.01)
    step = training.make_train_step(loss, tx)
    predict = voxelmorph.make_predict(model)
    m, f = jnp.asarray(moving), jnp.asarray(fixed)
    batch = {"moving": m[None], "fixed": f[None]}
    t0 = time.perf_counter()
    jax.block_until_ready(predict(state.params, m, f))
    compile_infer = time.perf_counter() - t0
    infer = _timeit(lambda: jax.block_until_ready(predict(state.params, m, f)["disp"]), repeats)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch, jax.random.key(0))
        jax.block_until_ready(metrics["loss"])

    t0 = time.perf_counter()
    one_step()
    compile_step = time.perf_counter() - t0
    train = _timeit(one_step, repeats)
    return {"params": models.count_params(state.params), "inference": infer, "train_step": train,
            "first_inference_s": compile_infer, "first_step_s": compile_step}


def bench_voxelmorph(moving, fixed, repeats):
    import neurite as ne
    import torch
    import voxelmorph as vxm

    torch.set_num_threads(2)
    model = vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1)
    ncc = ne.nn.modules.NCC(window_size=9)
    grad = ne.nn.modules.SpatialGradient(penalty="l2")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    m = torch.from_numpy(moving)[None, None]
    f = torch.from_numpy(fixed)[None, None]

    def infer():
        with torch.no_grad():
            model(m, f, return_warped_source=True)

    def step():
        opt.zero_grad()
        vel, warped = model(m, f, return_warped_source=True, return_field_type="velocity")
        loss = -ncc(f, warped).mean() + 0.01 * grad(vel)
        loss.backward()
        opt.step()

    n_params = sum(p.numel() for p in model.parameters())
    return {"params": int(n_params), "inference": _timeit(infer, repeats), "train_step": _timeit(step, repeats)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 128, 96))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    shape = tuple(args.shape)
    moving, fixed = _pair(shape)
    results = {"shape": shape, "cores": os.cpu_count(), "load_avg_start": os.getloadavg()}
    results["jaxreg_vxm1_svf5"] = bench_jaxreg(moving, fixed, args.repeats, int_steps=5)
    print(json.dumps(results, indent=1), flush=True)
    results["jaxreg_vxm1_disp"] = bench_jaxreg(moving, fixed, args.repeats, int_steps=0)
    print(json.dumps(results["jaxreg_vxm1_disp"], indent=1), flush=True)
    if not args.skip_torch:
        results["voxelmorph_VxmPairwise"] = bench_voxelmorph(moving, fixed, args.repeats)
    results["load_avg_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
