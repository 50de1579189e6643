"""Registration network: (moving, fixed) → U-Net → flow head → [scaling and squaring] → displacement → warps.

One unbatched example per call (``jax.vmap`` the ``apply`` for batches):

* ``moving``, ``fixed``: ``(*S)`` or ``(*S, C)`` float images on the same grid, ``S`` divisible by
  ``2 ** len(encoder)``.
* Output dict: ``disp`` ``(*S, ndim)`` displacement in voxels of the fixed grid (pull: ``warped[x] =
  moving[x + disp(x)]``); ``velocity`` ``(*S, ndim)`` the stationary velocity field when ``int_steps > 0`` (else the
  same as ``disp``: the regulariser is applied to it); ``warped`` the moving image warped by ``disp`` (its input
  shape); ``warped_labels`` ``(*S, K)`` the warped one-hot labels when ``moving_onehot`` is given (linear, so
  differentiable).

The flow head is a 3^ndim convolution with weights ~ Normal(0, FLOW_INIT_STD = 1e-5) and zero bias, so an untrained network starts
close to the identity. With ``int_steps > 0`` the head's output is a velocity integrated by scaling and squaring
(``spatial.integrate_velocity``); ``int_downsize = 2`` integrates at half resolution (``spatial.resize_disp`` down,
integrate, back up), as VoxelMorph does to save time.

``downsize = 2`` runs the whole U-Net at half resolution (both images smoothed and resampled by
``spatial.downsample``; ``S`` then divisible by ``2 ** (len(encoder) + 1)``): the flow head's field (and its
integration) lives on the half grid and is resized to ``S`` (``spatial.resize_disp``) before warping, so ``disp`` and
``warped`` stay full size while the convolutions cost about 1/8 in 3-D; ``velocity`` is then the half-grid field.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxreg import spatial
from jaxreg.models.unet import PRESETS, Conv, UNet

#: Standard deviation of the flow head's initial weights (small: the untrained network is close to identity).
FLOW_INIT_STD = 1e-5


def _channels(x, ndim):
    return x if x.ndim == ndim + 1 else jnp.expand_dims(x, -1)


class RegistrationNet(nn.Module):
    """VoxelMorph-style registration model (see module docstring).

    Attributes:
      ndim: 2 or 3 spatial axes.
      encoder, decoder: U-Net feature lists (``PRESETS["vxm1"]`` by default).
      int_steps: scaling-and-squaring steps; 0 predicts a displacement directly.
      int_downsize: 1, or 2 to integrate the velocity at half resolution.
      downsize: 1, or 2 to run the U-Net at half resolution (module docstring).
    """

    ndim: int
    encoder: Sequence[int] = PRESETS["vxm1"]["encoder"]
    decoder: Sequence[int] = PRESETS["vxm1"]["decoder"]
    int_steps: int = 0
    int_downsize: int = 1
    downsize: int = 1

    @nn.compact
    def __call__(self, moving, fixed, moving_onehot=None):
        nd = self.ndim
        if self.int_downsize not in (1, 2):
            raise ValueError(f"int_downsize must be 1 or 2, got {self.int_downsize}")
        if self.downsize not in (1, 2):
            raise ValueError(f"downsize must be 1 or 2, got {self.downsize}")
        m, f = _channels(moving, nd), _channels(fixed, nd)
        if m.shape[:nd] != f.shape[:nd] or m.ndim != nd + 1 or f.ndim != nd + 1:
            raise ValueError(f"moving and fixed must be (*S) or (*S, C) on one {nd}-D grid, got {moving.shape} and "
                             f"{fixed.shape}")
        shape = f.shape[:nd]
        x = jnp.concatenate([m, f], axis=-1)
        if self.downsize > 1:
            x = spatial.downsample(x, self.downsize, ndim=nd)
        x = UNet(nd, tuple(self.encoder), tuple(self.decoder), name="unet")(x)
        flow = Conv(nd, nd, kernel_init=nn.initializers.normal(FLOW_INIT_STD), name="flow")(x)
        flow = flow.astype(moving.dtype)
        if self.int_steps > 0:
            v = flow
            if self.int_downsize > 1:
                v = spatial.resize_disp(v, tuple(s // self.int_downsize for s in flow.shape[:nd]))
            disp = spatial.resize_disp(spatial.integrate_velocity(v, steps=self.int_steps), shape)
        else:
            disp = spatial.resize_disp(flow, shape)
        out = {"disp": disp, "velocity": flow, "warped": spatial.warp(moving, disp)}
        if moving_onehot is not None:
            out["warped_labels"] = spatial.warp(moving_onehot, disp)
        return out


def build(*, ndim: int, preset: str | None = "vxm1", encoder=None, decoder=None, int_steps: int = 0,
          int_downsize: int = 1, downsize: int = 1) -> RegistrationNet:
    """A ``RegistrationNet`` from a preset name (``"vxm1"``, ``"vxm2"``) or explicit, non-empty encoder and decoder
    feature lists (which win over the preset)."""
    if encoder and decoder:
        enc, dec = tuple(int(f) for f in encoder), tuple(int(f) for f in decoder)
    else:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} (or give encoder and decoder), got {preset!r}")
        enc, dec = PRESETS[preset]["encoder"], PRESETS[preset]["decoder"]
    return RegistrationNet(ndim=ndim, encoder=enc, decoder=dec, int_steps=int_steps, int_downsize=int_downsize,
                           downsize=downsize)
