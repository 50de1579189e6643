"""A VoxelMorph-style U-Net for 2-D and 3-D inputs (Flax linen), channels last.

Input ``(*S, C)`` (one example) or ``(B, *S, C)``; output ``(..., *S, F)`` with ``F = decoder[-1]``. ``S`` must be
divisible by ``2 ** len(encoder)``.

Architecture (VoxelMorph, Balakrishnan et al. 2019): every encoder layer is a 3^ndim convolution with stride 2
followed by LeakyReLU(0.2), so encoder level ``i`` works at ``1 / 2**(i+1)`` resolution. The first ``len(encoder)``
decoder layers each apply a convolution + LeakyReLU, upsample by 2 (nearest neighbour, repeat: transposed
convolutions are slow on XLA:CPU) and concatenate the encoder feature map of that resolution (the input itself at
full resolution). The remaining decoder layers are convolutions at full resolution.

Presets (``PRESETS``): ``"vxm1"`` encoder (16, 32, 32, 32), decoder (32, 32, 32, 32, 8, 8); ``"vxm2"`` the same
encoder, decoder (32, 32, 32, 32, 32, 16, 16).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PRESETS = {
    "vxm1": dict(encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 8, 8)),
    "vxm2": dict(encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 32, 16, 16)),
}


_DN = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _same_padding(size: int, stride: int) -> tuple[int, int]:
    """TensorFlow/XLA ``"SAME"`` padding of a 3-tap window: output ``ceil(size / stride)``."""
    total = max((-(-size // stride) - 1) * stride + 3 - size, 0)
    return total // 2, total - total // 2


def conv(x, kernel, stride: int = 1):
    """3^nd ``"SAME"`` convolution: ``x`` ``(B, *S, C)`` (channels last), ``kernel`` ``(3,)*nd + (C, F)``, ``stride``
    1 or 2 on every axis → ``(B, *ceil(S / stride), F)``.

    On CPU a 3-D convolution is computed as three 2-D convolutions, one per depth tap, over the depth slices folded
    into the batch, and summed: XLA:CPU runs 2-D convolutions far faster than 3-D ones. For all
    convolutions of VoxelMorph-1 at 80×96×80 on 2 cores this took forward 7.3 s → 1.2 s and forward + backward
    24.8 s → 3.7 s (PyTorch: 0.55 s and 3.5 s; ``benchmarks/bench_unet.py``). Other backends use XLA's 3-D
    convolution (on an H100 the depth-tap form was 1.14x slower).
    """
    nd = kernel.ndim - 2
    pads = [_same_padding(n, stride) for n in x.shape[1:1 + nd]]
    if nd == 2 or jax.default_backend() != "cpu":
        return jax.lax.conv_general_dilated(x, kernel, (stride,) * nd, pads, dimension_numbers=_DN[nd])
    return _conv_depth_taps(x, kernel, stride, pads)


def _conv_depth_taps(x, kernel, stride, pads):
    """3-D convolution as one 2-D convolution per depth tap over the (strided) depth slices, summed."""
    b, depth = x.shape[:2]
    out_depth = -(-depth // stride)
    x = jnp.pad(x, [(0, 0), pads[0]] + [(0, 0)] * 3)
    out = 0
    for tap in range(3):
        slab = jax.lax.slice_in_dim(x, tap, tap + stride * (out_depth - 1) + 1, stride, axis=1)
        y = jax.lax.conv_general_dilated(slab.reshape((b * out_depth,) + slab.shape[2:]), kernel[tap],
                                         (stride, stride), pads[1:], dimension_numbers=_DN[2])
        out = out + y
    return out.reshape((b, out_depth) + y.shape[1:])


class Conv(nn.Module):
    """A 3^ndim ``"SAME"`` convolution with bias (``conv``); parameters named, shaped and initialised as ``nn.Conv``'s
    (``kernel`` ``(3,)*ndim + (C, F)``, ``bias`` ``(F,)``). Input ``(*S, C)`` or ``(..., *S, C)``."""

    features: int
    ndim: int
    stride: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3,) * self.ndim + (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        lead = x.shape[:-self.ndim - 1]
        y = conv(x.reshape((-1,) + x.shape[-self.ndim - 1:]), kernel.astype(x.dtype), self.stride)
        y = y.reshape(lead + y.shape[1:])
        return y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (self.features,))


def upsample(x, ndim: int):
    """Nearest-neighbour upsampling by 2 of the ``ndim`` spatial axes just before the channel axis."""
    for axis in range(x.ndim - 1 - ndim, x.ndim - 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x


class UNet(nn.Module):
    """U-Net with strided-convolution encoder and upsample + convolution decoder (see module docstring).

    Attributes:
      ndim: number of spatial axes (2 or 3).
      encoder: feature counts of the encoder layers (each halves the resolution).
      decoder: feature counts of the decoder layers; needs ``len(decoder) >= len(encoder)``.
    """

    ndim: int
    encoder: Sequence[int] = PRESETS["vxm1"]["encoder"]
    decoder: Sequence[int] = PRESETS["vxm1"]["decoder"]

    @nn.compact
    def __call__(self, x):
        nd = self.ndim
        if nd not in (2, 3):
            raise ValueError(f"UNet.ndim must be 2 or 3, got {nd}")
        if len(self.decoder) < len(self.encoder):
            raise ValueError(f"UNet needs len(decoder) >= len(encoder), got {self.encoder} and {self.decoder}")
        if x.ndim not in (nd + 1, nd + 2):
            raise ValueError(f"UNet input must be (*S, C) or (B, *S, C) with {nd} spatial axes, got {x.shape}")
        spatial = x.shape[x.ndim - 1 - nd: x.ndim - 1]
        factor = 2 ** len(self.encoder)
        if any(s % factor for s in spatial):
            raise ValueError(f"UNet spatial shape {spatial} must be divisible by 2**len(encoder) = {factor}; "
                             f"pad with jaxreg.data.preprocess.pad_to_multiple")
        skips = [x]
        for i, f in enumerate(self.encoder):
            x = nn.leaky_relu(Conv(f, nd, stride=2, name=f"enc{i}")(x), 0.2)
            skips.append(x)
        skips.pop()  # the deepest map is the decoder's input, not a skip
        for i, f in enumerate(self.decoder):
            x = nn.leaky_relu(Conv(f, nd, name=f"dec{i}")(x), 0.2)
            if i < len(self.encoder):
                x = jnp.concatenate([upsample(x, nd), skips.pop()], axis=-1)
        return x


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
