"""Random spatial and intensity augmentation on the device (pure JAX, jit/vmap-friendly, one example per call).

Every function takes a PRNG ``key`` first and is deterministic given it; batches come from ``jax.vmap`` (or
``augment_batch``, which splits one key over the batch). Nothing leaves the device, so the augmentation can run
inside a jitted training step (``jaxreg.training.make_train_step(..., augment=...)``).

Conventions (as in ``jaxreg.spatial``): an image is ``(*S)`` float, a label map ``(*S)`` integer, a displacement
``(*S, ndim)`` in voxels of the grid it lives on. Warping pulls: ``augmented[x] = image[x + disp(x)]``. The random
spatial transform is the point map ``phi(x) = A (x + u(x) - c) + t + c``: first a smooth deformation ``u``, then an
affine ``(A, t)`` about the grid centre ``c = (S - 1) / 2`` in voxel units (``spatial.affine_to_disp``'s
convention). Because it maps output positions to input positions, a scaling ``> 1`` in ``A`` makes the content
look smaller and a translation ``+t`` moves it by ``-t``. Angles and shears act on voxel indices (on anisotropic
voxels a "rotation" is not rigid in mm).

* ``random_affine(key, ndim, ...)`` — ``(ndim+1, ndim+1)`` homogeneous voxel matrix.
* ``random_smooth_disp(key, shape, ...)`` — smooth random field from a coarse control grid (optionally integrated
  as a stationary velocity: diffeomorphic).
* ``random_disp(key, shape, ...)`` — the dense displacement of ``phi`` (both of the above combined).
* ``augment_pair(key, example, ...)`` — one spatial transform for the moving image and its labels (optionally an
  independent one for the fixed image), then random gamma, bias field and noise.
* ``augment_batch(key, batch, ...)`` — ``augment_pair`` over the leading batch axis.
* ``AugmentConfig`` / ``default_config()`` / ``from_config`` — the options as a hashable value and as the
  ``config.data.augment`` block of an ml_collections config.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import spatial, transforms

__all__ = ["random_affine", "random_smooth_disp", "random_disp", "random_intensity", "augment_pair",
           "augment_batch", "AugmentConfig", "default_config", "from_config"]

_METHODS = ("linear", "cubic")
_LABEL_MODES = ("nearest", "onehot")


def _check_ndim(ndim):
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")


def _non_negative(**values):
    for name, v in values.items():
        if not (isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


# ----------------------------------------------------------------------------------------------------- spatial
# Every sampler below is written as "uniform numbers in [0, 1) -> sample" (``_*_from_unit``) with a ``key``-taking
# public wrapper that makes one flat ``jax.random.uniform`` draw. ``augment_pair`` makes a single draw for all its
# transforms: on XLA:CPU every random call site is a separate threefry compilation (0.2-0.6 s of CPU each on the
# shared 2-core machine; augment_pair's compilation went from 3.5 to 1.5 CPU-seconds with one draw).
def _affine_count(ndim):
    return (1 if ndim == 2 else 3) + 2 * ndim + ndim * ndim


def _check_affine(ndim, rotation_deg, scaling, translation, shear):
    _check_ndim(ndim)
    _non_negative(rotation_deg=rotation_deg, scaling=scaling, translation=translation, shear=shear)
    if scaling >= 1:
        raise ValueError(f"scaling must be < 1 (scales are drawn in [1 - scaling, 1 + scaling]), got {scaling}")


def _affine_from_unit(unit, ndim, rotation_deg, scaling, translation, shear):
    n_angles = 1 if ndim == 2 else 3
    sizes = np.cumsum([n_angles, ndim, ndim, ndim * ndim])
    sym = 2 * unit - 1  # uniform in [-1, 1)
    angles = math.radians(rotation_deg) * sym[: sizes[0]]
    shift = translation * sym[sizes[0]: sizes[1]]
    scales = 1.0 + scaling * sym[sizes[1]: sizes[2]]
    shears = shear * sym[sizes[2]: sizes[3]].reshape(ndim, ndim)
    matrix = transforms.rigid(jnp.concatenate([angles, shift]))
    upper = np.triu(np.ones((ndim, ndim), bool), k=1)
    h = jnp.eye(ndim, dtype=unit.dtype) + jnp.where(upper, shears, 0)
    linear = matrix[:ndim, :ndim] @ (scales.reshape(ndim, 1) * h)
    return matrix.at[:ndim, :ndim].set(linear)


def random_affine(key, ndim: int, *, rotation_deg: float = 0.0, scaling: float = 0.0, translation: float = 0.0,
                  shear: float = 0.0, dtype=jnp.float32) -> jax.Array:
    """A random homogeneous ``(ndim+1, ndim+1)`` matrix in voxel units, acting about the grid centre.

    ``A = R @ diag(s) @ H`` and ``t``, all drawn uniformly: rotation angles (one in 2-D, three Euler angles about the
    array axes in 3-D, ``transforms.rigid``'s order) in ``[-rotation_deg, rotation_deg]`` degrees; per-axis scales
    ``s_d`` in ``[1 - scaling, 1 + scaling]``; a unit upper-triangular shear ``H`` with off-diagonal entries in
    ``[-shear, shear]``; translation ``t_d`` in ``[-translation, translation]`` voxels. ``spatial.affine_to_disp(M,
    shape)`` gives its displacement on a grid of any ``shape`` (pull: ``y = A (x - c) + t + c``). All magnitudes 0
    give the identity exactly.
    """
    _check_affine(ndim, rotation_deg, scaling, translation, shear)
    unit = jax.random.uniform(key, (_affine_count(ndim),), dtype)
    return _affine_from_unit(unit, ndim, rotation_deg, scaling, translation, shear)


def _to_normal(unit):
    """Standard normal values from uniform ones in [0, 1) (inverse CDF, as ``jax.random.normal``)."""
    lo = np.nextafter(np.asarray(-1.0, unit.dtype), np.asarray(0.0, unit.dtype))
    return np.sqrt(2.0).astype(unit.dtype) * jax.lax.erf_inv(jnp.maximum(2 * unit - 1, lo))


def _control_shape(shape, spacing):
    return tuple(max(2, int(round(s / spacing))) for s in shape)


def _interp_matrix(n: int, m: int, method: str) -> np.ndarray:
    """``(n, m)`` weights interpolating ``m`` samples to ``n`` over the same extent, centres aligned.

    Output ``i`` sits at input position ``p = (i + 0.5) m / n - 0.5`` (``jax.image.resize``'s half-pixel
    convention); ``"linear"`` uses the two nearest samples, ``"cubic"`` the Keys kernel (a = -0.5) on four; indices
    past the ends are clamped (edge values repeated). Rows sum to 1.
    """
    p = (np.arange(n) + 0.5) * m / n - 0.5
    base = np.floor(p).astype(int)
    w = np.zeros((n, m))
    taps = (0, 1) if method == "linear" else (-1, 0, 1, 2)
    for o in taps:
        d = np.abs(p - (base + o))
        if method == "linear":
            k = np.maximum(1 - d, 0)
        else:
            k = np.where(d <= 1, 1.5 * d**3 - 2.5 * d**2 + 1, np.where(d < 2, -0.5 * (d**3 - 5 * d**2 + 8 * d - 4), 0))
        np.add.at(w, (np.arange(n), np.clip(base + o, 0, m - 1)), k)
    return w


def _upsample(coarse, shape, method):
    """Interpolate ``coarse`` ``(*m, C)`` to ``(*shape, C)`` with separable ``_interp_matrix`` products."""
    out = coarse
    for axis, n in enumerate(shape):
        w = jnp.asarray(_interp_matrix(int(n), coarse.shape[axis], method), coarse.dtype)
        out = jnp.moveaxis(jnp.tensordot(w, out, axes=(1, axis)), 0, axis)
    return out


def _smooth_count(shape, spacing):
    return math.prod(_control_shape(shape, spacing)) * len(shape) if spacing > 0 else 0


def _check_smooth(shape, spacing, max_norm, method, int_steps):
    _check_ndim(len(shape))
    _non_negative(spacing=spacing, max_norm=max_norm)
    if spacing <= 0:
        raise ValueError(f"spacing must be > 0 voxels, got {spacing}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if int(int_steps) < 0:
        raise ValueError(f"int_steps must be >= 0, got {int_steps}")


def _smooth_from_unit(unit, shape, spacing, max_norm, method, int_steps):
    ndim = len(shape)
    if max_norm == 0:
        return jnp.zeros(shape + (ndim,), unit.dtype)
    control = _control_shape(shape, spacing) + (ndim,)
    field = _upsample(_to_normal(unit).reshape(control), shape, method)
    peak = jnp.sqrt(jnp.max(jnp.sum(field * field, axis=-1)))
    field = field * (max_norm / jnp.maximum(peak, jnp.finfo(unit.dtype).tiny))
    if int_steps:
        field = spatial.integrate_velocity(field, steps=int(int_steps))
    return field


def random_smooth_disp(key, shape, *, spacing: float = 8.0, max_norm: float = 1.0, method: str = "cubic",
                       int_steps: int = 0, dtype=jnp.float32) -> jax.Array:
    """A smooth random displacement ``(*shape, ndim)`` in voxels whose largest vector is about ``max_norm``.

    I.i.d. standard-normal vectors on a control grid of ``max(2, round(S_d / spacing))`` points per axis (so about
    ``spacing`` voxels apart, covering the same extent with centres aligned, as ``spatial.resize_disp``) are
    interpolated to ``shape`` (``method`` ``"cubic"``, Keys' kernel as ``jax.image.resize``, or ``"linear"``;
    separable matrix products, edge values repeated past the outermost control points) and scaled so that the
    longest vector is exactly ``max_norm`` voxels. With ``int_steps > 0`` that field is a stationary velocity,
    integrated by scaling and squaring (``spatial.integrate_velocity``): the result is diffeomorphic and its
    largest vector is close to, not exactly, ``max_norm``. ``max_norm = 0`` gives zeros.
    """
    shape = tuple(int(s) for s in shape)
    _check_smooth(shape, spacing, max_norm, method, int_steps)
    if max_norm == 0:
        return jnp.zeros(shape + (len(shape),), dtype)
    unit = jax.random.uniform(key, (_smooth_count(shape, spacing),), dtype)
    return _smooth_from_unit(unit, shape, spacing, max_norm, method, int_steps)


def random_disp(key, shape, *, rotation_deg: float = 0.0, scaling: float = 0.0, translation: float = 0.0,
                shear: float = 0.0, deform: float = 0.0, deform_spacing: float = 8.0, deform_method: str = "cubic",
                deform_int_steps: int = 0, dtype=jnp.float32) -> jax.Array:
    """Dense displacement ``(*shape, ndim)`` (voxels, pull) of ``phi(x) = A (x + u(x) - c) + t + c``.

    ``(A, t)`` is ``random_affine(k1, ndim, rotation_deg=..., scaling=..., translation=..., shear=...)`` and ``u``
    is ``random_smooth_disp(k2, shape, spacing=deform_spacing, max_norm=deform, method=deform_method,
    int_steps=deform_int_steps)`` with ``k1, k2 = jax.random.split(key)``. So ``random_disp`` with ``deform=0``
    equals ``spatial.affine_to_disp(random_affine(k1, ...), shape)``, and ``warp(image, random_disp(...))`` first
    deforms, then applies the affine. Composed exactly (the affine is linear): ``disp = u + (A - I)(x - c) + t +
    (A - I) u``; diffeomorphic when ``deform_int_steps > 0`` (and ``A`` is invertible, which ``scaling < 1`` with a
    unit shear diagonal guarantees).
    """
    shape = tuple(int(s) for s in shape)
    k_affine, k_deform = jax.random.split(key)
    matrix = random_affine(k_affine, len(shape), rotation_deg=rotation_deg, scaling=scaling, translation=translation,
                           shear=shear, dtype=dtype)
    u = None
    if deform > 0:
        u = random_smooth_disp(k_deform, shape, spacing=deform_spacing, max_norm=deform, method=deform_method,
                               int_steps=deform_int_steps, dtype=dtype)
    return spatial.affine_to_disp(matrix, shape) if u is None else spatial.compose_affine(matrix, u)


# --------------------------------------------------------------------------------------------------- intensity
def _intensity_count(shape, gamma, bias, bias_spacing, noise_std):
    n_bias = math.prod(_control_shape(shape, bias_spacing)) if bias > 0 else 0
    return 2 + n_bias + (math.prod(shape) if noise_std > 0 else 0)


def _check_intensity(gamma, bias, bias_spacing, noise_std):
    _non_negative(gamma=gamma, bias=bias, bias_spacing=bias_spacing, noise_std=noise_std)
    if bias > 0 and bias_spacing <= 0:
        raise ValueError(f"bias_spacing must be > 0 voxels, got {bias_spacing}")


def _intensity_from_unit(unit, image, gamma, bias, bias_spacing, noise_std):
    if not (gamma > 0 or bias > 0 or noise_std > 0):
        return image
    dtype = image.dtype
    control = _control_shape(image.shape, bias_spacing) if bias > 0 else ()
    n_bias = math.prod(control) if bias > 0 else 0
    normal = _to_normal(unit[2:])
    x = image
    if gamma > 0:
        x = jnp.maximum(x, 0) ** jnp.exp(gamma * (2 * unit[0] - 1))
    if bias > 0:
        field = _upsample(normal[:n_bias].reshape(control + (1,)), image.shape, "cubic")[..., 0]
        x = x * jnp.exp(bias * field)
    if noise_std > 0:
        x = x + (noise_std * unit[1]) * normal[n_bias:].reshape(image.shape)
    if bias > 0 or noise_std > 0:
        x = jnp.maximum(x, 0)
        x = x / jnp.maximum(jnp.max(x), jnp.finfo(dtype).tiny)
    return x


def random_intensity(key, image, *, gamma: float = 0.0, bias: float = 0.0, bias_spacing: float = 32.0,
                     noise_std: float = 0.0) -> jax.Array:
    """Random gamma, smooth multiplicative bias field and Gaussian noise on an image ``(*S)`` in about [0, 1].

    In order: ``x ← max(x, 0) ** g`` with ``log g`` uniform in ``[-gamma, gamma]``; ``x ← x * exp(bias * f)`` with
    ``f`` a smooth field (unit-normal values on a control grid ``bias_spacing`` voxels apart, cubic interpolation);
    ``x ← x + sigma * n`` with ``sigma`` uniform in ``[0, noise_std]`` and ``n`` standard normal per voxel. When
    ``bias`` or ``noise_std`` is non-zero the result is clipped at 0 and divided by its maximum (back to [0, 1]).
    All magnitudes 0 return the image unchanged. Same shape and dtype as ``image``.
    """
    _check_intensity(gamma, bias, bias_spacing, noise_std)
    image = jnp.asarray(image)
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(f"image must be a floating-point array, got dtype {image.dtype} with shape {image.shape}")
    _check_ndim(image.ndim)
    if not (gamma > 0 or bias > 0 or noise_std > 0):
        return image
    unit = jax.random.uniform(key, (_intensity_count(image.shape, gamma, bias, bias_spacing, noise_std),),
                              image.dtype)
    return _intensity_from_unit(unit, image, gamma, bias, bias_spacing, noise_std)


# -------------------------------------------------------------------------------------------------------- pairs
_SPATIAL = ("rotation_deg", "scaling", "translation", "shear", "deform", "deform_spacing", "deform_method",
            "deform_int_steps")
_INTENSITY = ("gamma", "bias", "bias_spacing", "noise_std")


def _warp_labels(labels, disp, mode, num_labels):
    out = spatial.warp_labels(labels, disp, num_labels=num_labels if mode == "onehot" else None)
    return out.astype(labels.dtype)


def augment_pair(key, example: dict, *, rotation_deg: float = 0.0, scaling: float = 0.0, translation: float = 0.0,
                 shear: float = 0.0, deform: float = 0.0, deform_spacing: float = 8.0, deform_method: str = "cubic",
                 deform_int_steps: int = 0, fixed_spatial: bool = False, gamma: float = 0.0, bias: float = 0.0,
                 bias_spacing: float = 32.0, noise_std: float = 0.0, fixed_intensity: bool = True,
                 labels: str = "nearest", num_labels: int | None = None) -> dict:
    """Randomly transform one registration example on the device.

    Args:
      key: PRNG key; the output is deterministic given it.
      example: dict with ``moving``, ``fixed`` ``(*S)`` float images (about [0, 1]) and optional ``moving_labels``,
        ``fixed_labels`` ``(*S)`` integer label maps. Other entries are passed through unchanged.
      rotation_deg, scaling, translation, shear, deform, deform_spacing, deform_method, deform_int_steps: the spatial
        transform, ``random_disp``'s options (degrees, fraction, voxels, fraction, voxels, voxels).
      fixed_spatial: also warp ``fixed`` (and ``fixed_labels``) through an independent draw of the same transform.
      gamma, bias, bias_spacing, noise_std: ``random_intensity``'s options, applied to ``moving`` (after warping)
        and, if ``fixed_intensity``, to ``fixed`` with an independent draw.
      labels: ``"nearest"`` (nearest-neighbour sampling) or ``"onehot"`` (linear warp of the one-hot encoding, then
        arg-max; needs ``num_labels`` and labels in ``[0, num_labels)``). Outside the image: label 0.

    Returns:
      a new dict with the same keys, shapes and dtypes: ``moving[x] = moving_in[x + disp(x)]`` (linear, zero
      outside), ``moving_labels`` pulled through the same ``disp``; ``fixed`` likewise with its own field when
      ``fixed_spatial``. A network trained on the result has to undo the augmentation as well as the pair's own
      misalignment. Label values stay in their input range. Spatial magnitudes all 0 skip the warps; intensity
      magnitudes all 0 skip the intensity step (all 0: the example is returned unchanged).

    All random numbers come from one ``jax.random.uniform`` draw, so the transform for a given ``key`` is not the
    one ``random_disp(key, ...)`` returns (same distribution, different sample).
    """
    for name in ("moving", "fixed"):
        if name not in example:
            raise ValueError(f"example must have a {name!r} image, got keys {sorted(example)}")
    moving, fixed = jnp.asarray(example["moving"]), jnp.asarray(example["fixed"])
    if moving.shape != fixed.shape or moving.ndim not in (2, 3):
        raise ValueError(f"moving and fixed must be (*S) images on one 2-D or 3-D grid, got {moving.shape} and "
                         f"{fixed.shape}")
    for name in ("moving", "fixed"):
        if not jnp.issubdtype(jnp.asarray(example[name]).dtype, jnp.floating):
            raise ValueError(f"example[{name!r}] must be a floating-point image, got {jnp.asarray(example[name]).dtype}")
    for name in ("moving_labels", "fixed_labels"):
        if name in example and jnp.shape(example[name]) != moving.shape:
            raise ValueError(f"example[{name!r}] must have the images' shape {moving.shape}, got "
                             f"{jnp.shape(example[name])}")
        if name in example and not jnp.issubdtype(jnp.asarray(example[name]).dtype, jnp.integer):
            raise ValueError(f"example[{name!r}] must be an integer label map, got dtype "
                             f"{jnp.asarray(example[name]).dtype}")
    if labels not in _LABEL_MODES:
        raise ValueError(f"labels must be one of {_LABEL_MODES}, got {labels!r}")
    if labels == "onehot" and (num_labels is None or num_labels < 2):
        raise ValueError(f"labels='onehot' needs num_labels >= 2, got {num_labels}")
    shape, dtype = moving.shape, moving.dtype
    _check_affine(len(shape), rotation_deg, scaling, translation, shear)
    _check_smooth(shape, deform_spacing, deform, deform_method, deform_int_steps)
    _check_intensity(gamma, bias, bias_spacing, noise_std)
    has_spatial = any(v > 0 for v in (rotation_deg, scaling, translation, shear, deform))
    has_intensity = any(v > 0 for v in (gamma, bias, noise_std))
    warped_sides = (["moving", "fixed"] if fixed_spatial else ["moving"]) if has_spatial else []
    intensity_sides = (["moving", "fixed"] if fixed_intensity else ["moving"]) if has_intensity else []

    if not (warped_sides or intensity_sides):
        return dict(example)
    # One uniform draw for everything (see the note above the samplers); rows per side, processed under vmap.
    n_affine = _affine_count(len(shape))
    n_smooth = _smooth_count(shape, deform_spacing) if deform > 0 else 0
    n_intensity = _intensity_count(shape, gamma, bias, bias_spacing, noise_std) if has_intensity else 0
    n_spatial_all = len(warped_sides) * (n_affine + n_smooth)
    unit = jax.random.uniform(key, (n_spatial_all + len(intensity_sides) * n_intensity,), dtype)
    out = dict(example)
    images = {"moving": moving, "fixed": fixed}
    if warped_sides:
        def side_disp(u):
            matrix = _affine_from_unit(u[:n_affine], len(shape), rotation_deg, scaling, translation, shear)
            smooth = (_smooth_from_unit(u[n_affine:], shape, deform_spacing, deform, deform_method,
                                        deform_int_steps) if deform > 0 else None)
            return spatial.affine_to_disp(matrix, shape) if smooth is None else spatial.compose_affine(matrix, smooth)

        disps = jax.vmap(side_disp)(unit[:n_spatial_all].reshape(len(warped_sides), -1))
        warped = jax.vmap(spatial.warp)(jnp.stack([images[n] for n in warped_sides]), disps)
        for i, name in enumerate(warped_sides):
            images[name] = warped[i]
            if f"{name}_labels" in example:
                out[f"{name}_labels"] = _warp_labels(jnp.asarray(example[f"{name}_labels"]), disps[i], labels,
                                                     num_labels)
    if intensity_sides:
        changed = jax.vmap(lambda u, x: _intensity_from_unit(u, x, gamma, bias, bias_spacing, noise_std))(
            unit[n_spatial_all:].reshape(len(intensity_sides), -1), jnp.stack([images[n] for n in intensity_sides]))
        for i, name in enumerate(intensity_sides):
            images[name] = changed[i]
    out["moving"], out["fixed"] = images["moving"], images["fixed"]
    return out


def augment_batch(key, batch: dict, **options) -> dict:
    """``augment_pair`` over the leading axis of every array in ``batch`` (``(B, *S)``), one key per example.

    The example keys are ``jax.random.split(key, B)``, so example ``i`` of a batch gets the same augmentation as
    ``augment_pair(jax.random.split(key, B)[i], example_i, **options)``.
    """
    if "moving" not in batch:
        raise ValueError(f"batch must have a 'moving' entry, got keys {sorted(batch)}")
    n = jnp.shape(batch["moving"])[0]
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k, ex: augment_pair(k, ex, **options))(keys, batch)


# ------------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """``augment_pair``'s options as one hashable value (a static argument of a jitted step).

    ``options()`` returns them as keyword arguments. Validated on construction (magnitudes >= 0, ``scaling < 1``,
    known modes, ``num_labels`` for one-hot labels).
    """

    rotation_deg: float = 0.0
    scaling: float = 0.0
    translation: float = 0.0
    shear: float = 0.0
    deform: float = 0.0
    deform_spacing: float = 8.0
    deform_method: str = "cubic"
    deform_int_steps: int = 0
    fixed_spatial: bool = False
    gamma: float = 0.0
    bias: float = 0.0
    bias_spacing: float = 32.0
    noise_std: float = 0.0
    fixed_intensity: bool = True
    labels: str = "nearest"
    num_labels: int | None = None

    def __post_init__(self):
        _non_negative(rotation_deg=self.rotation_deg, scaling=self.scaling, translation=self.translation,
                      shear=self.shear, deform=self.deform, deform_spacing=self.deform_spacing, gamma=self.gamma,
                      bias=self.bias, bias_spacing=self.bias_spacing, noise_std=self.noise_std)
        if self.scaling >= 1:
            raise ValueError(f"augment scaling must be < 1, got {self.scaling}")
        if self.deform_spacing <= 0 or self.bias_spacing <= 0:
            raise ValueError(f"augment deform_spacing and bias_spacing must be > 0 voxels, got "
                             f"{self.deform_spacing} and {self.bias_spacing}")
        if self.deform_method not in _METHODS:
            raise ValueError(f"augment deform_method must be one of {_METHODS}, got {self.deform_method!r}")
        if self.deform_int_steps < 0:
            raise ValueError(f"augment deform_int_steps must be >= 0, got {self.deform_int_steps}")
        if self.labels not in _LABEL_MODES:
            raise ValueError(f"augment labels must be one of {_LABEL_MODES}, got {self.labels!r}")
        if self.labels == "onehot" and (self.num_labels is None or self.num_labels < 2):
            raise ValueError(f"augment labels='onehot' needs num_labels >= 2, got {self.num_labels}")

    @property
    def spatial(self) -> bool:
        """Whether any spatial magnitude is non-zero."""
        return any(getattr(self, k) > 0 for k in ("rotation_deg", "scaling", "translation", "shear", "deform"))

    def options(self) -> dict:
        """Keyword arguments for ``augment_pair`` / ``augment_batch``."""
        return dataclasses.asdict(self)


def default_config():
    """The ``config.data.augment`` block (an ml_collections ``ConfigDict``): off, every magnitude 0.

    Fields: ``enabled`` and ``AugmentConfig``'s fields except ``num_labels`` (taken from the dataset).
    """
    import ml_collections

    fields = {f.name: f.default for f in dataclasses.fields(AugmentConfig) if f.name != "num_labels"}
    return ml_collections.ConfigDict({"enabled": False, **fields})


def from_config(cfg, *, num_labels: int | None = None) -> AugmentConfig | None:
    """``AugmentConfig`` of a ``config.data.augment`` block, or None when it is missing or not ``enabled``.

    Unknown fields raise ``ValueError`` (a misspelt magnitude would otherwise be silently ignored).
    """
    if cfg is None or not cfg.enabled:
        return None
    known = {f.name for f in dataclasses.fields(AugmentConfig)} - {"num_labels"}
    values = {k: v for k, v in dict(cfg).items() if k != "enabled"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config.data.augment has unknown fields {unknown}; known: {sorted(known)}")
    casts = {f.name: f.type for f in dataclasses.fields(AugmentConfig)}
    for k, v in values.items():
        if casts[k] == "float":
            values[k] = float(v)
        elif casts[k] == "int":
            values[k] = int(v)
        elif casts[k] == "bool":
            values[k] = bool(v)
    return AugmentConfig(**values, num_labels=None if num_labels is None else int(num_labels))
