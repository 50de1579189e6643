"""Local NCC and mutual information: jaxreg against naive JAX versions, MONAI and neurite (VoxelMorph's torch NCC).

For each shape, a smooth random ``fixed`` image and a ``warped`` image that is a noisy monotone remap of a shifted
copy are built in float32, both spanning exactly [0, 1]. Timed in one process: JAX functions are compiled ahead
(``jit(...).lower(...).compile()``, compile time reported apart); every case then gets one warm-up call and
``--repeats`` timed calls (fewer, at least one, when the warm-up says they would take more than ``--budget-s``),
reported as the median (and min) wall time from ``time.perf_counter`` and the median process CPU time (all
threads; less sensitive to other jobs on a shared machine). Each call ends in ``block_until_ready`` (JAX) or
returns a tensor (torch). Modes:

* ``fwd``: the loss value alone;
* ``v+g``: value and gradient w.r.t. the warped (moving) image (``jax.value_and_grad`` / torch ``backward``).

LNCC cases (window ``--window``, default 9):

* ``jaxreg``: ``jaxreg.losses.local_ncc`` (separable ``lax.reduce_window`` box sums, one per moment);
* ``stacked (old)``: jaxreg's previous implementation (moments stacked on a trailing channel axis, window counts
  as one full-size constant), for a before/after in the same process;
* ``naive conv``: VoxelMorph's formulation in JAX: five dense ``lax.conv_general_dilated`` calls with an all-ones
  ``window^ndim`` kernel (one per moment), ``u_I = I_sum / n`` etc.; ``n`` is the in-image window size (a sixth conv
  of ones) so the value equals jaxreg's (VoxelMorph itself divides by the full window size everywhere). XLA:CPU runs
  these one-channel 3-D convolutions very slowly, so it only runs up to ``--dense-max-voxels``;
* ``naive sep``: MONAI's scheme in JAX: each moment filtered separately by ``ndim`` 1-D convolutions;
* ``monai``: ``monai.losses.LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")`` (full window size at the
  borders and variances clamped at ``smooth_dr``, so its value differs from jaxreg's near the borders);
* ``neurite``: ``neurite.nn.modules.NCC`` (what ``voxelmorph.nn.losses.NCC`` now points to; full window size at the
  borders), negated.

MI cases (``--bins``, default 32):

* ``jaxreg``: ``jaxreg.losses.mutual_information`` (cubic B-spline Parzen window, ``W_f^T W_w`` by chunks);
* ``naive scatter``: the same histogram by a scatter-add of each voxel's 4x4 B-spline weights (``.at[].add``);
* ``jaxreg gauss``: ``mutual_information(kernel="gaussian", sigma=0.5)``, which is MONAI's Gaussian definition;
* ``monai gauss``: ``monai.losses.GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=bins,
  sigma_ratio=0.5)`` (equal to ``jaxreg gauss`` up to its 1e-7 smoothing constants).

Also reported: the max abs difference of each value (and gradient) to the matching jaxreg case (``jaxreg gauss`` for
``monai gauss``); XLA's buffer estimate for JAX (``compiled.memory_analysis()``: temporaries + output, MB); and the
peak memory increase during the warm-up call ("peak +MB": host RSS, ``VmHWM - VmRSS`` after resetting ``VmHWM``
through ``/proc/self/clear_refs``, Linux only, an under-estimate when the allocator reuses memory it already holds;
for torch on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before). torch runs with
``torch.set_num_threads(--threads)`` on ``--torch-device``; JAX uses every core (or its default device). torch,
MONAI and neurite are optional (skipped with a message when not importable).

Run:  python benchmarks/bench_losses.py [--shape 160x192x224 --shape 80x96x80 --shape 256x256] [--repeats 5]
      [--loss lncc --loss mi] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi
from jax import lax

from jaxreg import losses

DEFAULT_SHAPES = ("160x192x224", "80x96x80", "256x256")


# ------------------------------------------------------------------------------------------------ measurement
def _run(fn, repeats, budget_s, peak_of=None):
    """One warm-up call (its output and peak memory are kept), then ``repeats`` timed calls (fewer, at least one,
    when the warm-up says they would take more than ``budget_s``). Returns a dict of the output, the warm-up time,
    the median and min wall time, the median process CPU time (all threads) and the peak memory increase in MB
    (``peak_of(fn) -> (out, MB)``; default: host RSS)."""
    t0 = time.perf_counter()
    out, peak = (peak_of or _call_with_peak_rss)(fn)
    first = time.perf_counter() - t0
    n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    wall, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(out=out, warmup_s=first, median_s=statistics.median(wall), min_s=min(wall),
                cpu_s=statistics.median(cpu), repeats=n, peak_mb=peak)


def _rss_kb():
    text = open("/proc/self/status").read()
    return {k: int(v) for k, v in re.findall(r"(VmHWM|VmRSS):\s+(\d+) kB", text)}


def _call_with_peak_rss(fn):
    """``(fn(), peak resident-memory increase in MB during the call)``; the peak is None where /proc does not
    allow resetting it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return fn(), None
    before = _rss_kb()["VmRSS"]  # read after the reset: memory freed meanwhile can only lower the result
    out = fn()
    return out, max(0.0, (_rss_kb()["VmHWM"] - before) / 1024)


def _block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def _loadavg():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------ data
def _unit(x):
    x = x.astype(np.float32)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)  # exactly 0 and 1 at the extremes


def _data(shape, seed=0):
    """fixed, warped: float32 images spanning exactly [0, 1], correlated but not identical."""
    rng = np.random.default_rng(seed)
    fixed = _unit(ndi.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0))
    shifted = np.roll(fixed, 2, axis=0)
    warped = _unit(np.sqrt(shifted) + 0.05 * rng.random(shape, dtype=np.float32))
    return fixed, warped


# ------------------------------------------------------------------------------------------------ naive JAX LNCC
def _conv(x, kernel):
    """'same' zero-padded correlation of a (*S) image with a (*K) kernel."""
    nd = x.ndim
    spec = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[nd]
    out = lax.conv_general_dilated(x[None, ..., None], kernel[..., None, None], (1,) * nd, "SAME",
                                   dimension_numbers=spec, precision=lax.Precision.HIGHEST)
    return out[0, ..., 0]


def naive_lncc_conv(fixed, warped, *, window=9, eps=1e-5):
    """VoxelMorph's local NCC with dense box convolutions (one per moment), ``n`` = in-image window size."""
    i, j = fixed, warped
    box = jnp.ones((window,) * i.ndim, i.dtype)
    n = _conv(jnp.ones_like(i), box)
    i_sum, j_sum, i2_sum, j2_sum, ij_sum = (_conv(x, box) for x in (i, j, i * i, j * j, i * j))
    u_i, u_j = i_sum / n, j_sum / n
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * n
    i_var = i2_sum - 2 * u_i * i_sum + u_i * u_i * n
    j_var = j2_sum - 2 * u_j * j_sum + u_j * u_j * n
    return -jnp.mean(cross * cross / (i_var * j_var + eps))


def naive_lncc_separable(fixed, warped, *, window=9, eps=1e-5):
    """MONAI's scheme in JAX: every moment filtered on its own by ``ndim`` 1-D box convolutions."""
    nd = fixed.ndim

    def box(x):
        for axis in range(nd):
            shape = [1] * nd
            shape[axis] = window
            x = _conv(x, jnp.ones(shape, x.dtype))
        return x

    i, j = fixed, warped
    n = box(jnp.ones_like(i))
    i_sum, j_sum, i2_sum, j2_sum, ij_sum = (box(x) for x in (i, j, i * i, j * j, i * j))
    cross = ij_sum - i_sum * j_sum / n
    i_var = i2_sum - i_sum * i_sum / n
    j_var = j2_sum - j_sum * j_sum / n
    return -jnp.mean(cross * cross / (i_var * j_var + eps))


def stacked_lncc(fixed, warped, *, window=9, eps=1e-5):
    """jaxreg's ``local_ncc`` as it was before this benchmark (no mask): the five moments stacked on a trailing
    channel axis, one separable ``reduce_window`` pass per axis, and the window counts as one full-size constant."""
    f, w = fixed - jnp.mean(fixed), warped - jnp.mean(warped)
    sums = jnp.stack([f, w, f * f, w * w, f * w], axis=-1)
    for axis in range(f.ndim):
        dims, pad = [1] * sums.ndim, [(0, 0)] * sums.ndim
        dims[axis], pad[axis] = window, (window // 2, window // 2)
        sums = lax.reduce_window(sums, np.zeros((), sums.dtype), lax.add, dims, (1,) * sums.ndim, pad)
    count = np.ones(())
    for n in f.shape:
        i = np.arange(n)
        count = count[..., None] * (np.minimum(i + window // 2, n - 1) - np.maximum(i - window // 2, 0) + 1)
    n = jnp.asarray(count, f.dtype)
    sf, sw, sff, sww, sfw = (sums[..., i] for i in range(5))
    cross = sfw - sf * sw / n
    var_f = jnp.maximum(sff - sf * sf / n, 0)
    var_w = jnp.maximum(sww - sw * sw / n, 0)
    return -jnp.mean(cross * cross / (var_f * var_w + eps))


# ------------------------------------------------------------------------------------------------ naive JAX MI
def _positions(x, bins):
    lo, hi = lax.stop_gradient(jnp.min(x)), lax.stop_gradient(jnp.max(x))
    t = (x - lo) * ((bins - 1) / (hi - lo))
    return jnp.where(t < 0, 0, jnp.where(t > bins - 1, bins - 1, t)).ravel()


def _bspline_taps(t, bins):
    """The 4 bins a cubic B-spline of width 1 bin touches around each ``t``: (N, 4) indices and normalised weights."""
    idx = jnp.floor(t).astype(jnp.int32)[:, None] + jnp.arange(-1, 3, dtype=jnp.int32)[None, :]
    a = jnp.abs(t[:, None] - idx.astype(t.dtype))
    k = jnp.where(a < 1, 2 / 3 - a * a + a * a * a / 2, jnp.where(a < 2, (2 - a) ** 3 / 6, 0))
    k = jnp.where((idx >= 0) & (idx < bins), k, 0)
    return jnp.clip(idx, 0, bins - 1), k / jnp.sum(k, axis=1, keepdims=True)


def naive_mi_scatter(fixed, warped, *, bins=32):
    """Parzen (cubic B-spline) MI with the joint histogram built by one scatter-add of N x 16 weights."""
    fi, fk = _bspline_taps(_positions(fixed, bins), bins)
    wi, wk = _bspline_taps(_positions(warped, bins), bins)
    flat = (fi[:, :, None] * bins + wi[:, None, :]).ravel()
    hist = jnp.zeros(bins * bins, fixed.dtype).at[flat].add((fk[:, :, None] * wk[:, None, :]).ravel())
    p = hist.reshape(bins, bins) / jnp.sum(hist)

    def entropy(q):
        return -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1)), 0))

    return -(entropy(p.sum(1)) + entropy(p.sum(0)) - entropy(p))


# ------------------------------------------------------------------------------------------------ cases
def _jax_case(loss, fixed, warped):
    """Compiled forward and value+grad (w.r.t. warped) calls of ``loss(fixed, warped)``, with compile times."""
    f, w = jnp.asarray(fixed), jnp.asarray(warped)
    out = {}
    for mode, fn in (("fwd", lambda w, f: loss(f, w)), ("v+g", jax.value_and_grad(lambda w, f: loss(f, w)))):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(w, f).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        xla_mb = None if mem is None else (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
        out[mode] = dict(call=lambda c=compiled: _block(c(w, f)), compile_s=compile_s, xla_mb=xla_mb,
                         peak_of=None if jax.default_backend() == "cpu" else lambda fn: (fn(), None))
    return out


def _torch_case(loss, fixed, warped, device):
    import torch
    f = torch.from_numpy(fixed)[None, None].to(device)
    w0 = torch.from_numpy(warped)[None, None].to(device)
    cuda = torch.device(device).type == "cuda"

    def sync(x):
        if cuda:
            torch.cuda.synchronize()
        return x

    def fwd():
        with torch.no_grad():
            return sync(loss(w0, f))

    def vg():
        w = w0.clone().requires_grad_(True)
        value = loss(w, f)
        value.backward()
        return sync((value.detach(), w.grad[0, 0]))

    def cuda_peak(fn):  # device memory: peak allocated during the call, above what was allocated before
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        return out, (torch.cuda.max_memory_allocated() - before) / 2**20

    peak_of = cuda_peak if cuda else None
    return {"fwd": dict(call=fwd, peak_of=peak_of), "v+g": dict(call=vg, peak_of=peak_of)}


def _torch_losses(ndim, window, bins, threads):
    """{name: callable(warped, fixed)} for the torch peers that import; prints what is skipped."""
    peers = {}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
        print(f"torch not importable ({type(exc).__name__}: {exc}); skipping MONAI and neurite")
        return peers, {}
    torch.set_num_threads(threads)
    versions = {"torch": torch.__version__}
    try:
        import monai
        from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
        versions["monai"] = monai.__version__
        lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=ndim, kernel_size=window, kernel_type="rectangular")
        mi = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=bins, sigma_ratio=0.5)
        peers["lncc monai"] = lambda w, f: lncc(w, f)
        peers["mi monai gauss"] = lambda w, f: mi(w, f)
    except Exception as exc:  # noqa: BLE001
        print(f"MONAI not importable ({type(exc).__name__}: {exc}); skipping it")
    try:
        import neurite
        from neurite.nn.modules import NCC
        versions["neurite"] = getattr(neurite, "__version__", "?")
        ncc = NCC(window_size=window)
        peers["lncc neurite"] = lambda w, f: -ncc(w, f).reshape(())
    except Exception as exc:  # noqa: BLE001
        print(f"neurite not importable ({type(exc).__name__}: {exc}); skipping voxelmorph's torch NCC")
    return peers, versions


def _cases(shape, which, window, bins, threads, fixed, warped, dense_max_voxels, torch_device):
    """({name: {"fwd" | "v+g": {"call": ..., ...}}}, {package: version}) for the cases that can run; LNCC first."""
    nd = len(shape)
    cases = {}
    if "lncc" in which:
        cases["lncc jaxreg"] = _jax_case(lambda f, w: losses.local_ncc(f, w, window=window), fixed, warped)
        cases["lncc stacked (old)"] = _jax_case(lambda f, w: stacked_lncc(f, w, window=window), fixed, warped)
        if np.prod(shape) <= dense_max_voxels:
            cases["lncc naive conv"] = _jax_case(lambda f, w: naive_lncc_conv(f, w, window=window), fixed, warped)
        else:
            print(f"skipping lncc naive conv at {shape}: more than --dense-max-voxels={dense_max_voxels:g} voxels")
        cases["lncc naive sep"] = _jax_case(lambda f, w: naive_lncc_separable(f, w, window=window), fixed, warped)
    if "mi" in which:
        cases["mi jaxreg"] = _jax_case(lambda f, w: losses.mutual_information(f, w, bins=bins), fixed, warped)
        cases["mi naive scatter"] = _jax_case(lambda f, w: naive_mi_scatter(f, w, bins=bins), fixed, warped)
        cases["mi jaxreg gauss"] = _jax_case(
            lambda f, w: losses.mutual_information(f, w, bins=bins, kernel="gaussian", sigma=0.5), fixed, warped)
    peers, versions = _torch_losses(nd, window, bins, threads)
    for name, loss in peers.items():
        if name.split()[0] in which:
            cases[name] = _torch_case(loss, fixed, warped, torch_device)
    cases = dict(sorted(cases.items(), key=lambda kv: kv[0].split()[0] != "lncc"))  # stable: LNCC rows first
    return cases, versions


def _ref_name(case):
    """The jaxreg case a case's values and gradients are compared with."""
    if case in ("mi jaxreg gauss", "mi monai gauss"):
        return "mi jaxreg gauss"
    return case.split()[0] + " jaxreg"


def _as_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def bench(shape, which, repeats, window, bins, threads, budget_s, dense_max_voxels, torch_device="cpu"):
    fixed, warped = _data(shape)
    cases, versions = _cases(shape, which, window, bins, threads, fixed, warped, dense_max_voxels, torch_device)
    rows = []
    results = {}
    for name, modes in cases.items():
        for mode, case in modes.items():
            r = _run(case["call"], repeats, budget_s, case.get("peak_of"))
            results[name, mode] = r.pop("out")
            rows.append(dict(shape="x".join(map(str, shape)), case=name, mode=mode, **r,
                             compile_s=case.get("compile_s"), xla_mb=case.get("xla_mb"), load=_loadavg()))
    for row in rows:  # accuracy against the matching jaxreg case
        ref = _ref_name(row["case"])
        out, ref_out = results[row["case"], row["mode"]], results[ref, row["mode"]]
        if row["mode"] == "fwd":
            row["value"] = float(_as_numpy(out))
            row["value_diff"] = abs(row["value"] - float(_as_numpy(ref_out)))
        else:
            row["value"] = float(_as_numpy(out[0]))
            row["value_diff"] = abs(row["value"] - float(_as_numpy(ref_out[0])))
            g, g_ref = _as_numpy(out[1]), _as_numpy(ref_out[1])
            row["grad_diff"] = float(np.abs(g - g_ref).max())
            row["grad_max"] = float(np.abs(g_ref).max())
    return rows, versions


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def print_table(rows):
    print("| case | mode | median ms | min ms | n | CPU ms | vs jaxreg (median) | compile s | XLA MB | peak +MB "
          "| value | abs diff value | abs diff grad (max abs grad) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = {(r["case"], r["mode"]): r["median_s"] for r in rows}
    for r in rows:
        ratio = r["median_s"] / base[_ref_name(r["case"]), r["mode"]]
        grad = "" if "grad_diff" not in r else f"{r['grad_diff']:.1e} ({r['grad_max']:.1e})"
        print(f"| {r['case']} | {r['mode']} | {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f} | {r['repeats']} "
              f"| {1e3 * r['cpu_s']:.0f} | {ratio:.2f}x "
              f"| {_fmt(r['compile_s'], '.2f')} | {_fmt(r['xla_mb'], '.0f')} | {_fmt(r['peak_mb'], '.0f')} "
              f"| {r['value']:.6f} | {r['value_diff']:.1e} | {grad} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append",
                   help="e.g. 160x192x224 (repeatable; default: %s)" % ", ".join(DEFAULT_SHAPES))
    p.add_argument("--loss", action="append", choices=("lncc", "mi"), help="repeatable; default both")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--bins", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (JAX uses every core)")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="fewer timed calls (at least 1) when the warm-up says repeats would take longer")
    p.add_argument("--dense-max-voxels", type=float, default=3e5,
                   help="run the dense-convolution LNCC only up to this many voxels (XLA:CPU is very slow on it)")
    p.add_argument("--torch-device", default="cpu", help="torch device for the MONAI/neurite peers, e.g. cuda")
    p.add_argument("--json", help="write all rows and the environment to this file")
    args = p.parse_args(argv)
    shapes = [tuple(int(s) for s in sh.lower().split("x")) for sh in (args.shape or DEFAULT_SHAPES)]
    which = tuple(args.loss or ("lncc", "mi"))
    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), jax=jax.__version__,
               platform=jax.devices()[0].platform, device=str(jax.devices()[0]), cpus=os.cpu_count(),
               machine=platform.machine(), repeats=args.repeats, window=args.window, bins=args.bins,
               threads=args.threads, torch_device=args.torch_device)
    print(f"{env['date']}: jax {jax.__version__} on {env['platform']}, {env['cpus']} cpus, load avg {_loadavg()}, "
          f"repeats {args.repeats}, window {args.window}, bins {args.bins}")
    all_rows = []
    for shape in shapes:
        rows, versions = bench(shape, which, args.repeats, args.window, args.bins, args.threads, args.budget_s,
                               args.dense_max_voxels, args.torch_device)
        env.update(versions)
        print(f"\n### {'x'.join(map(str, shape))} float32  (load avg {_loadavg()}; {versions})\n")
        print_table(rows)
        all_rows += rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, rows=all_rows), fh, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
