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

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PRESETS = {
    "vxm1": dict(encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 8, 8)),
    "vxm2": dict(encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 32, 16, 16)),
}


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
        k = (3,) * nd
        skips = [x]
        for i, f in enumerate(self.encoder):
            x = nn.leaky_relu(nn.Conv(f, k, strides=(2,) * nd, name=f"enc{i}")(x), 0.2)
            skips.append(x)
        skips.pop()  # the deepest map is the decoder's input, not a skip
        for i, f in enumerate(self.decoder):
            x = nn.leaky_relu(nn.Conv(f, k, name=f"dec{i}")(x), 0.2)
            if i < len(self.encoder):
                x = jnp.concatenate([upsample(x, nd), skips.pop()], axis=-1)
        return x


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
