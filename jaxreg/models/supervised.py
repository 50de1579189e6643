"""Similarity-steered displacement regression (Cao et al., MICCAI 2017): the network and its similarity-map cue.

The network regresses the displacement ``u(x)`` (``(ndim,)``, fixed-grid voxels, pull convention ``fixed[x] ≈
moving[x + u(x)]``) at the centre ``x`` of a fixed patch and a moving patch, from three inputs: the two patches and
the **similarity map** of the fixed patch's centre neighbourhood against the moving patch,

    S_x(d) = NCC( fixed[x + e],  moving[x + d + e] ),   e ∈ [-w, w]^ndim (the window),  d ∈ [-R, R]^ndim,

the local (windowed) normalised cross-correlation of the fixed window centred at ``x`` with the moving window
centred at every position ``x + d`` of the moving patch (``R = radius`` offsets each way, ``w = window``). Its peak
sits near ``d = u(x)`` when the displacement lies within the search range, which is what steers the regression.
Images are zero outside their grid; a window with (almost) no variance gives ``S = 0`` (see ``similarity_map``).

Architecture (``SimilaritySteeredNet``), every layer either a ``VALID`` convolution or per-position:

* appearance stream: the two patches as channels ``[moving, fixed]`` go through ``3^ndim`` ``VALID`` convolutions
  with the given ``features`` and ``dilations`` (+ LeakyReLU 0.2), which shrink a patch of side
  ``2 * sum(dilations) + 1`` to one position;
* similarity stream: the map ``S_x`` (side ``2R + 1``, one channel) through ``3^ndim`` ``VALID`` convolutions
  (``sim_features``, LeakyReLU), flattened, then a dense layer of ``sim_out`` units;
* head: the two streams' vectors concatenated, a dense layer of ``head`` units (LeakyReLU) and a linear layer
  ``"flow"`` to ``ndim`` outputs.

``patch(moving_patch, fixed_patch)`` applies it to one pair of patches (side ``2 * patch_radius + 1``, the larger of
the two streams' needs) and returns the centre's displacement. ``__call__(moving, fixed)`` is its **fully
convolutional equivalent**: the images are zero-padded by the appearance stream's radius and the same ``VALID``
convolutions run over the whole grid, while the similarity maps of every voxel come from ``similarity_map`` (a
cost volume with one channel per offset) and go through the similarity stream as a batch of maps; one pass returns
the displacement of every voxel, ``(*S, ndim)``, equal to ``patch`` at each voxel of patches cut from the
zero-padded images. (In the paper the map is one more image channel of the patch; here it has its own stream so
that the dense pass stays convolutional: a convolution over each voxel's map cannot be shared between voxels.)
The displacement is in voxels of the input grid and is not smoothed (``jaxreg.methods.supervised`` smooths it).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxreg import _validate

#: Added to the product of the two windows' intensity variances before the square root of the NCC denominator
#: (images scaled to [0, 1]): flat or nearly flat windows (background, noise-only regions) give a map near 0.
SIM_EPS = 1e-6


def offsets(radius: int, ndim: int) -> np.ndarray:
    """The ``(K, ndim)`` integer offsets ``d ∈ [-radius, radius]^ndim`` in row-major order, ``K = (2R+1)^ndim``.

    This is the channel order of ``similarity_map``; ``reshape((2R+1,) * ndim)`` of a channel vector gives the map
    on its own grid (axis ``i`` indexes ``d_i + R``).
    """
    return np.array(list(itertools.product(range(-radius, radius + 1), repeat=ndim)), dtype=np.int32).reshape(-1, ndim)


def _check_sizes(radius, window, name="similarity_map"):
    for arg, v, lo in (("radius", radius, 0), ("window", window, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}: {arg} must be an integer >= {lo}, got {v!r}")


def _box_valid(x, size: int, axes: Sequence[int]):
    """Sum of ``x`` over windows of side ``size`` on ``axes`` (``VALID``: each such axis shrinks by ``size - 1``)."""
    dims = [1] * x.ndim
    for a in axes:
        dims[a] = size
    return lax.reduce_window(x, np.zeros((), x.dtype), lax.add, dims, (1,) * x.ndim, "VALID")


def _ncc(sf, sff, sm, smm, sfm, n, eps):
    """Windowed NCC from window sums (``n`` voxels per window); variances clipped at 0 against round-off."""
    mf, mm = sf / n, sm / n
    var_f = jnp.maximum(sff / n - mf * mf, 0.0)
    var_m = jnp.maximum(smm / n - mm * mm, 0.0)
    cov = sfm / n - mf * mm
    return cov / jnp.sqrt(var_f * var_m + eps)


def similarity_map(fixed, moving, *, radius: int, window: int, eps: float = SIM_EPS) -> jax.Array:
    """Similarity maps of every voxel: ``(*S, K)``, channel ``k`` is ``S_x(d_k)`` with ``d_k = offsets(R, ndim)[k]``.

    ``S_x(d)`` is the NCC of ``fixed`` on the window ``x + [-window, window]^ndim`` with ``moving`` on the window
    ``x + d + [-window, window]^ndim`` (both images zero outside their grid), computed from window sums:
    ``cov / sqrt(var_f * var_m + eps)`` with the windows' intensity means, variances and covariance (population,
    divided by ``(2 window + 1)^ndim``). Values lie in [-1, 1]; flat windows give about 0.

    Args:
      fixed, moving: ``(*S)`` float images on one grid (2-D or 3-D), intensities about [0, 1].
      radius: ``R``, the largest offset searched along each axis (voxels).
      window: ``w``, the half-width of the correlation window (side ``2w + 1``).

    Returns:
      ``(*S, (2R+1)^ndim)`` array of the images' dtype.
    """
    fixed = _validate.floating(fixed, "fixed")
    moving = _validate.floating(moving, "moving")
    _validate.same_shape(fixed, moving, "fixed", "moving")
    if fixed.ndim not in (2, 3):
        raise ValueError(f"similarity_map: fixed and moving must be 2-D or 3-D images, got shape {fixed.shape}")
    _check_sizes(radius, window)
    dtype = jnp.result_type(fixed.dtype, moving.dtype)
    fixed, moving = fixed.astype(dtype), moving.astype(dtype)
    nd, shape, size = fixed.ndim, fixed.shape, 2 * window + 1
    n = float(size**nd)
    axes = tuple(range(nd))
    fp = jnp.pad(fixed, window)  # (*S + 2w)
    mp = jnp.pad(moving, radius + window)  # (*S + 2R + 2w)
    sf, sff = _box_valid(fp, size, axes), _box_valid(fp * fp, size, axes)  # (*S)
    sm_all, smm_all = _box_valid(mp, size, axes), _box_valid(mp * mp, size, axes)  # (*S + 2R)
    d = jnp.asarray(offsets(radius, nd) + radius)  # start indices, (K, nd)
    window_of = lambda a, ext: jax.vmap(lambda s: lax.dynamic_slice(a, tuple(s), tuple(n_ + ext for n_ in shape)))(d)
    sm, smm = window_of(sm_all, 0), window_of(smm_all, 0)  # (K, *S)
    shifted = window_of(mp, 2 * window)  # (K, *S + 2w): moving[x + d] on the padded fixed grid
    sfm = _box_valid(shifted * fp[None], size, tuple(range(1, nd + 1)))  # (K, *S)
    out = _ncc(sf[None], sff[None], sm, smm, sfm, n, eps)
    return jnp.moveaxis(out, 0, -1)


def patch_similarity_map(fixed_patch, moving_patch, *, window: int, eps: float = SIM_EPS) -> jax.Array:
    """The similarity map of one patch pair: ``(2R+1,) * ndim`` with ``R = (side - 1) / 2 - window``.

    The fixed template is the centre window (side ``2 window + 1``) of ``fixed_patch``; entry ``p`` is its NCC with
    the window of ``moving_patch`` centred ``p - R`` voxels from the patch centre (every position where the window
    fits in the patch). Both patches are square/cubic with odd side ``2 (R + window) + 1``. For patches cut around
    ``x`` from zero-padded images this equals ``similarity_map(fixed, moving, radius=R, window=window)[x]``
    reshaped to ``(2R+1,) * ndim``.
    """
    fixed_patch = _validate.floating(fixed_patch, "fixed_patch")
    moving_patch = _validate.floating(moving_patch, "moving_patch")
    _validate.same_shape(fixed_patch, moving_patch, "fixed_patch", "moving_patch")
    _check_sizes(0, window, "patch_similarity_map")
    nd, side = fixed_patch.ndim, fixed_patch.shape[0]
    if nd not in (2, 3) or any(s != side for s in fixed_patch.shape) or side % 2 == 0 or side < 2 * window + 1:
        raise ValueError(f"patch_similarity_map: patches must be square/cubic (2-D or 3-D) with an odd side >= "
                         f"2 * window + 1 = {2 * window + 1}, got {fixed_patch.shape}")
    dtype = jnp.result_type(fixed_patch.dtype, moving_patch.dtype)
    fixed_patch, moving_patch = fixed_patch.astype(dtype), moving_patch.astype(dtype)
    size, centre = 2 * window + 1, side // 2
    n = float(size**nd)
    template = lax.dynamic_slice(fixed_patch, (centre - window,) * nd, (size,) * nd)
    axes = tuple(range(nd))
    sm, smm = _box_valid(moving_patch, size, axes), _box_valid(moving_patch * moving_patch, size, axes)
    spec = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    sfm = lax.conv_general_dilated(moving_patch[None, ..., None], template[..., None, None], (1,) * nd, "VALID",
                                   dimension_numbers=spec, precision=lax.Precision.HIGHEST)[0, ..., 0]
    sf, sff = jnp.sum(template), jnp.sum(template * template)
    return _ncc(sf, sff, sm, smm, sfm, n, eps)


class SimilaritySteeredNet(nn.Module):
    """Patch CNN regressing the centre displacement, with a fully convolutional dense pass (module docstring).

    Attributes:
      ndim: 2 or 3 spatial axes.
      features, dilations: the appearance stream's ``VALID`` ``3^ndim`` convolutions (equal lengths); its patch
        radius is ``sum(dilations)``.
      radius, window: the similarity map's search radius ``R`` and correlation half-width ``w`` (voxels).
      sim_features: the similarity stream's ``VALID`` ``3^ndim`` convolutions on the ``(2R+1)^ndim`` map (at most
        ``R`` of them; ``()`` flattens the map straight into the dense layer).
      sim_out, head: widths of the similarity stream's dense layer and of the head's hidden layer.
      eps: the similarity map's ``eps``.
    """

    ndim: int
    features: Sequence[int] = (32, 32, 32, 32, 32)
    dilations: Sequence[int] = (1, 1, 2, 4, 1)
    radius: int = 4
    window: int = 2
    sim_features: Sequence[int] = (16, 32)
    sim_out: int = 64
    head: int = 64
    eps: float = SIM_EPS

    @property
    def app_radius(self) -> int:
        """Radius of the appearance stream's patch (its receptive field is ``2 * app_radius + 1`` wide)."""
        return int(sum(self.dilations))

    @property
    def patch_radius(self) -> int:
        """Radius of the patches ``patch`` takes: ``max(app_radius, radius + window)``."""
        return max(self.app_radius, self.radius + self.window)

    def setup(self):
        if self.ndim not in (2, 3):
            raise ValueError(f"SimilaritySteeredNet.ndim must be 2 or 3, got {self.ndim}")
        if len(self.features) != len(self.dilations) or not self.features:
            raise ValueError(f"SimilaritySteeredNet: features and dilations must be non-empty and of equal length, "
                             f"got {tuple(self.features)} and {tuple(self.dilations)}")
        if any(int(d) < 1 for d in self.dilations):
            raise ValueError(f"SimilaritySteeredNet: dilations must be >= 1, got {tuple(self.dilations)}")
        _check_sizes(self.radius, self.window, "SimilaritySteeredNet")
        if len(self.sim_features) > self.radius:
            raise ValueError(f"SimilaritySteeredNet: at most radius = {self.radius} similarity convolutions fit the "
                             f"(2R+1)-wide map, got sim_features {tuple(self.sim_features)}")
        k = (3,) * self.ndim
        self.app = [nn.Conv(f, k, kernel_dilation=int(d), padding="VALID", name=f"app{i}")
                    for i, (f, d) in enumerate(zip(self.features, self.dilations))]
        self.sim = [nn.Conv(f, k, padding="VALID", name=f"sim{i}") for i, f in enumerate(self.sim_features)]
        self.sim_dense = nn.Dense(self.sim_out, name="sim_dense")
        self.hidden = nn.Dense(self.head, name="head")
        # "flow": jaxreg.training.init_params draws it ~ Normal(0, FLOW_INIT_STD), so an untrained net predicts ~0
        self.flow = nn.Dense(self.ndim, name="flow")

    def _appearance(self, moving, fixed):
        x = jnp.stack([moving, fixed], axis=-1)
        for conv in self.app:
            x = nn.leaky_relu(conv(x), 0.2)
        return x

    def _similarity(self, maps):
        """``(N, *(2R+1,)*ndim)`` maps → ``(N, sim_out)``."""
        x = maps[..., None]
        for conv in self.sim:
            x = nn.leaky_relu(conv(x), 0.2)
        return nn.leaky_relu(self.sim_dense(x.reshape(x.shape[0], -1)), 0.2)

    def _head(self, a, s):
        h = nn.leaky_relu(self.hidden(jnp.concatenate([a, s], axis=-1)), 0.2)
        return self.flow(h)

    def _check(self, moving, fixed, name):
        moving = _validate.floating(moving, f"moving{name}")
        fixed = _validate.floating(fixed, f"fixed{name}")
        _validate.same_shape(moving, fixed, f"moving{name}", f"fixed{name}")
        if moving.ndim != self.ndim:
            raise ValueError(f"moving{name} and fixed{name} must have {self.ndim} axes (one unbatched example, no "
                             f"channel axis), got {moving.shape}")
        return moving, fixed

    def patch(self, moving_patch, fixed_patch):
        """Displacement ``(ndim,)`` (voxels) at the centre of one patch pair of side ``2 * patch_radius + 1``."""
        moving_patch, fixed_patch = self._check(moving_patch, fixed_patch, "_patch")
        side = 2 * self.patch_radius + 1
        if moving_patch.shape != (side,) * self.ndim:
            raise ValueError(f"patches must have shape {(side,) * self.ndim} (2 * patch_radius + 1 per axis), got "
                             f"{moving_patch.shape}")
        crop = lambda x, r: x[(slice(self.patch_radius - r, self.patch_radius + r + 1),) * self.ndim]
        ra, rs = self.app_radius, self.radius + self.window
        a = self._appearance(crop(moving_patch, ra), crop(fixed_patch, ra)).reshape(-1)
        smap = patch_similarity_map(crop(fixed_patch, rs), crop(moving_patch, rs), window=self.window, eps=self.eps)
        s = self._similarity(smap[None])[0]
        return self._head(a, s)

    def __call__(self, moving, fixed):
        """Displacement of every voxel ``(*S, ndim)`` (voxels, pull) for images ``(*S)``: one dense pass."""
        moving, fixed = self._check(moving, fixed, "")
        shape, r = moving.shape, self.app_radius
        a = self._appearance(jnp.pad(moving, r), jnp.pad(fixed, r))  # (*S, features[-1])
        maps = similarity_map(fixed, moving, radius=self.radius, window=self.window, eps=self.eps)
        s = self._similarity(maps.reshape((-1,) + (2 * self.radius + 1,) * self.ndim))
        return self._head(a, s.reshape(shape + (-1,)))


def build(*, ndim: int, **options) -> SimilaritySteeredNet:
    """A ``SimilaritySteeredNet`` from keyword options (tuples for the feature lists; see the class)."""
    known = {"features", "dilations", "radius", "window", "sim_features", "sim_out", "head", "eps"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"model options {sorted(unknown)} unknown; valid: {sorted(known)}")
    for k in ("features", "dilations", "sim_features"):
        if k in options:
            options[k] = tuple(int(v) for v in options[k])
    for k in ("radius", "window", "sim_out", "head"):
        if k in options:
            options[k] = int(options[k])
    return SimilaritySteeredNet(ndim=int(ndim), **options)
