"""Where a U-Net step spends its time: every convolution of jaxreg's VoxelMorph-1 network, layer by layer.

For each 3^3 convolution of ``RegistrationNet`` (preset ``vxm1``: encoder 16,32,32,32 with stride 2; decoder
32,32,32,32,8,8 after upsample + concatenate; the 3-channel flow head), at the shape it runs at for one input of
``--shape`` (batch 1, 2 input channels), time in one process:

* ``xla``: ``lax.conv_general_dilated`` as a 3-D convolution (what ``flax.linen.Conv`` runs);
* ``jaxreg``: ``jaxreg.models.unet.conv`` (on CPU: three 2-D convolutions over depth slices, one per depth tap;
  elsewhere XLA's 3-D convolution), and on other backends also ``taps``, the depth-tap form forced;
* ``torch``: ``torch.nn.functional.conv3d`` with ``--threads`` threads (skipped when torch is not importable);

each forward and forward + backward (gradients w.r.t. the input and the kernel), minimum over ``--repeats`` calls
after a warm-up (compilation). The table ends with the sums over layers, the network's conv time per step.

Run:  python benchmarks/bench_unet.py [--shape 80x96x80] [--repeats 3] [--skip-xla]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg.models import unet


def layers(shape, encoder, decoder, in_channels=2, flow=3):
    """(name, input shape (D, H, W), C_in, C_out, stride) of every convolution of the U-Net + flow head."""
    out, size, c = [], tuple(shape), in_channels
    sizes, chans = [size], [c]
    for i, f in enumerate(encoder):
        out.append((f"enc{i}", size, c, f, 2))
        size, c = tuple(s // 2 for s in size), f
        sizes.append(size)
        chans.append(c)
    sizes.pop()
    chans.pop()
    for i, f in enumerate(decoder):
        out.append((f"dec{i}", size, c, f, 1))
        c = f
        if i < len(encoder):
            size, c = sizes.pop(), c + chans.pop()
    out.append(("flow", size, c, flow, 1))
    return out


def _time(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _jax_paths(x, w, stride, skip_xla):
    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride,) * 3, "SAME", dimension_numbers=unet._DN[3])

    def ours(x, w):
        return unet.conv(x, w, stride)

    def taps(x, w):
        return unet._conv_depth_taps(x, w, stride, [unet._same_padding(n, stride) for n in x.shape[1:4]])

    paths = {"jaxreg": ours} if skip_xla else {"xla": xla, "jaxreg": ours}
    if jax.default_backend() != "cpu":
        paths["taps"] = taps
    out = {}
    for name, f in paths.items():
        fwd = jax.jit(f)
        fb = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
        out[name] = (lambda fwd=fwd: jax.block_until_ready(fwd(x, w)),
                     lambda fb=fb: jax.block_until_ready(fb(x, w)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="80x96x80")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-xla", action="store_true", help="do not time XLA's 3-D convolution (slow on CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    try:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cpus, load avg "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__ if torch else '-'} ({args.threads} threads); "
          f"input {shape}, batch 1, min of {args.repeats}")
    rng = np.random.default_rng(0)
    rows, totals = [], {}
    net = unet.PRESETS["vxm1"]
    for name, size, cin, cout, stride in layers(shape, net["encoder"], net["decoder"]):
        x = jnp.asarray(rng.standard_normal((1,) + size + (cin,)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, 3, cin, cout)) * 0.1, jnp.float32)
        row = {"layer": name, "input": "x".join(map(str, size)), "channels": f"{cin}->{cout}", "stride": stride}
        for path, (fwd, fb) in _jax_paths(x, w, stride, args.skip_xla).items():
            row[f"{path} fwd"], row[f"{path} f+b"] = _time(fwd, args.repeats), _time(fb, args.repeats)
        if torch is not None:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            tx = torch.tensor(np.moveaxis(np.asarray(x), -1, 1).copy(), requires_grad=True, device=dev)
            tw = torch.tensor(np.transpose(np.asarray(w), (4, 3, 0, 1, 2)).copy(), requires_grad=True, device=dev)
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

            def t_conv():  # SAME for stride 2 on even sizes pads (0, 1): F.pad, then a valid convolution
                if stride == 2:
                    return F.conv3d(F.pad(tx, (0, 1, 0, 1, 0, 1)), tw, stride=2)
                return F.conv3d(tx, tw, padding=1)

            def t_fwd():
                with torch.no_grad():
                    t_conv()
                sync()

            def t_fb():
                (t_conv() ** 2).sum().backward()
                sync()

            row["torch fwd"], row["torch f+b"] = _time(t_fwd, args.repeats), _time(t_fb, args.repeats)
        for k, v in row.items():
            if isinstance(v, float):
                totals[k] = totals.get(k, 0.0) + v
        rows.append(row)
        print("  " + ", ".join(f"{k} {v * 1e3:.1f} ms" if isinstance(v, float) else f"{k} {v}"
                               for k, v in row.items()), flush=True)
    cols = [k for k in rows[0] if isinstance(rows[0][k], float)]
    print("\n| layer | input | channels | stride | " + " | ".join(f"{c} ms" for c in cols) + " |")
    print("| --- " * (4 + len(cols)) + "|")
    for r in rows:
        print(f"| {r['layer']} | {r['input']} | {r['channels']} | {r['stride']} | "
              + " | ".join(f"{r[c] * 1e3:.1f}" for c in cols) + " |")
    print("| **all convolutions** | | | | " + " | ".join(f"**{totals[c] * 1e3:.0f}**" for c in cols) + " |")
    for a, b in (("xla f+b", "jaxreg f+b"), ("torch f+b", "jaxreg f+b"), ("xla fwd", "jaxreg fwd"),
                 ("torch fwd", "jaxreg fwd")):
        if a in totals and b in totals:
            print(f"  {a} / {b} = {totals[a] / totals[b]:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": shape, "rows": rows, "totals": totals}, fh, indent=1)


if __name__ == "__main__":
    main()
