"""Linear warping: jaxreg.spatial.warp against the naive JAX path, SciPy and PyTorch grid_sample (CPU or GPU).

For each shape, a random moving image and a smooth random displacement (a few voxels) are warped trilinearly with
zero padding outside the image (jaxreg ``mode="constant"``, SciPy ``mode="grid-constant"``, torch
``padding_mode="zeros"``, ``align_corners=True``). Timed, in one process, min (and median) over ``--repeats`` runs
after one warm-up (which includes compilation), each call ending in ``block_until_ready`` / returning a NumPy array:

* ``jaxreg fwd``: ``jit(warp(moving, u))``;
* ``jaxreg v+g``: ``jit(value_and_grad(u -> mean((warp(stop_gradient(moving), u) - fixed) ** 2)))``;
* ``naive fwd`` / ``naive v+g``: the same through ``jax.scipy.ndimage.map_coordinates(order=1)`` on
  ``identity_grid + u`` (autodiff of the gather);
* ``scipy fwd``: ``scipy.ndimage.map_coordinates(order=1, mode="grid-constant")`` (single-threaded);
* ``torch fwd`` / ``torch f+b``: ``F.grid_sample`` trilinear, forward and forward + backward w.r.t. the grid,
  ``torch.set_num_threads(--threads)``; skipped when torch is not importable.

Outputs are cross-checked (max abs difference to jaxreg) and the gradients of the two JAX paths compared.

Run:  python benchmarks/bench_warp.py [--shape 160x192x224 --shape 80x98x85] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from jaxreg import spatial

DEFAULT_SHAPES = ("160x192x224", "80x98x85")


def _timeit(fn, repeats):
    """Warm-up call (compilation) then ``repeats`` timed calls; returns (first, min, median) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, min(times), statistics.median(times)


def _block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def _data(shape, seed=0):
    """Moving and fixed images in [0, 1] and a smooth displacement of up to ~3 voxels, float32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    moving = ndi.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
    moving = (moving - moving.min()) / (moving.max() - moving.min())
    fixed = np.roll(moving, 1, axis=0)
    coarse = rng.normal(size=tuple(max(2, s // 16) for s in shape) + (len(shape),)).astype(np.float32)
    u = np.asarray(jax.image.resize(jnp.asarray(coarse), shape + (len(shape),), method="cubic"))
    u = (3.0 * u / np.abs(u).max()).astype(np.float32)
    return moving.astype(np.float32), fixed.astype(np.float32), u


def _jax_fns(moving, fixed, u):
    ndim = u.shape[-1]

    def naive_warp(img, disp):
        coords = spatial.identity_grid(disp.shape[:-1], dtype=disp.dtype) + disp
        return jax.scipy.ndimage.map_coordinates(img, [coords[..., k] for k in range(ndim)], order=1,
                                                 mode="constant", cval=0.0)

    def loss(warp_fn):
        def f(disp, img, fix):
            return jnp.mean((warp_fn(jax.lax.stop_gradient(img), disp) - fix) ** 2)
        return f

    def jaxreg_warp(img, disp):
        return spatial.warp(img, disp, mode="constant")

    fns = {
        "jaxreg fwd": jax.jit(jaxreg_warp),
        "jaxreg v+g": jax.jit(jax.value_and_grad(loss(jaxreg_warp))),
        "naive fwd": jax.jit(naive_warp),
        "naive v+g": jax.jit(jax.value_and_grad(loss(naive_warp))),
    }
    m, f, d = jnp.asarray(moving), jnp.asarray(fixed), jnp.asarray(u)
    calls = {
        "jaxreg fwd": lambda: _block(fns["jaxreg fwd"](m, d)),
        "jaxreg v+g": lambda: _block(fns["jaxreg v+g"](d, m, f)),
        "naive fwd": lambda: _block(fns["naive fwd"](m, d)),
        "naive v+g": lambda: _block(fns["naive v+g"](d, m, f)),
    }
    return calls


def _torch_calls(moving, fixed, u, threads, device="cpu"):
    """``grid_sample`` forward and forward + backward (w.r.t. the grid) calls on ``device`` ("cpu" with ``threads``
    threads, or "cuda"), each waiting for its result; and a call returning the forward as a NumPy array."""
    try:
        import torch
        import torch.nn.functional as F
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
        print(f"torch not importable ({type(exc).__name__}: {exc}); skipping grid_sample")
        return {}, None
    if device == "cpu":
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shape = moving.shape
    img = torch.from_numpy(moving)[None, None].to(device)
    fix = torch.from_numpy(fixed)[None, None].to(device)
    coords = np.moveaxis(np.indices(shape, dtype=np.float32), 0, -1) + u  # voxel coordinates, array axis order
    norm = 2.0 * coords / (np.array(shape, np.float32) - 1.0) - 1.0  # align_corners=True
    grid0 = torch.from_numpy(np.ascontiguousarray(norm[..., ::-1]))[None].to(device)  # (x, y, z) = reversed

    def fwd():
        with torch.no_grad():
            out = F.grid_sample(img, grid0, mode="bilinear", padding_mode="zeros", align_corners=True)
        sync()
        return out

    def fwd_bwd():
        grid = grid0.clone().requires_grad_(True)
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        loss = ((out - fix) ** 2).mean()
        loss.backward()
        sync()
        return grid.grad

    return {"torch fwd": fwd, "torch f+b": fwd_bwd}, lambda: fwd()[0, 0].cpu().numpy()


def bench(shape, repeats, threads):
    moving, fixed, u = _data(shape)
    coords = np.moveaxis(np.indices(shape, dtype=np.float32), 0, -1) + u
    scipy_coords = np.ascontiguousarray(np.moveaxis(coords, -1, 0))
    calls = _jax_fns(moving, fixed, u)
    calls["scipy fwd"] = lambda: ndi.map_coordinates(moving, scipy_coords, order=1, mode="grid-constant", cval=0.0)
    tcalls, torch_out = _torch_calls(moving, fixed, u, threads)
    calls.update(tcalls)

    rows = {name: _timeit(fn, repeats) for name, fn in calls.items()}  # first call compiles

    # correctness cross-checks
    ref = np.asarray(calls["jaxreg fwd"]())
    checks = {
        "naive fwd": float(np.abs(np.asarray(calls["naive fwd"]()) - ref).max()),
        "scipy fwd": float(np.abs(calls["scipy fwd"]() - ref).max()),
    }
    if torch_out is not None:
        checks["torch fwd"] = float(np.abs(torch_out() - ref).max())
    (v1, g1), (v2, g2) = calls["jaxreg v+g"](), calls["naive v+g"]()
    g1, g2 = np.asarray(g1), np.asarray(g2)
    grad_rel = float(np.abs(g1 - g2).max() / max(np.abs(g2).max(), 1e-30))

    return rows, checks, (float(v1), float(v2), grad_rel)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", help="e.g. 160x192x224 (repeatable; default: %s)" % ", ".join(DEFAULT_SHAPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (JAX uses every core)")
    args = p.parse_args(argv)
    shapes = [tuple(int(s) for s in sh.lower().split("x")) for sh in (args.shape or DEFAULT_SHAPES)]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus, "
          f"load avg {os.getloadavg()[0]:.2f}, repeats {args.repeats}")
    for shape in shapes:
        rows, checks, (v1, v2, grad_rel) = bench(shape, args.repeats, args.threads)
        print(f"\n### {'x'.join(map(str, shape))} float32  (load avg {os.getloadavg()[0]:.2f})\n")
        print("| path | first call s (compile) | min ms | median ms | max abs diff vs jaxreg fwd |")
        print("| --- | --- | --- | --- | --- |")
        for name, (first, tmin, tmed) in rows.items():
            diff = checks.get(name, "")
            diff = f"{diff:.2e}" if isinstance(diff, float) else diff
            print(f"| {name} | {first:.3f} | {1e3 * tmin:.1f} | {1e3 * tmed:.1f} | {diff} |")
        t = {k: v[1] for k, v in rows.items()}
        print(f"\nloss jaxreg {v1:.6g} vs naive {v2:.6g}; gradient max rel diff {grad_rel:.2e}")
        print("ratios (min times):")
        print(f"  SciPy fwd / jaxreg fwd       = {t['scipy fwd'] / t['jaxreg fwd']:.2f}x")
        if "torch fwd" in t:
            print(f"  torch fwd / jaxreg fwd       = {t['torch fwd'] / t['jaxreg fwd']:.2f}x")
            print(f"  torch f+b / jaxreg v+g       = {t['torch f+b'] / t['jaxreg v+g']:.2f}x")
        print(f"  naive fwd / jaxreg fwd       = {t['naive fwd'] / t['jaxreg fwd']:.2f}x")
        print(f"  naive v+g / jaxreg v+g       = {t['naive v+g'] / t['jaxreg v+g']:.2f}x")
        print(f"  jaxreg v+g / jaxreg fwd      = {t['jaxreg v+g'] / t['jaxreg fwd']:.2f}x")


if __name__ == "__main__":
    main()
