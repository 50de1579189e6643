"""Thirion's Demons and diffeomorphic Demons (Vercauteren et al. 2009): a mono-modal deformable baseline.

``demons(fixed, moving)`` returns a displacement ``u`` of shape ``(*spatial, ndim)`` in fixed-grid voxels with the
pull convention of ``jaxreg.spatial``: ``warp(moving, u)[x] = moving[x + u(x)] ≈ fixed[x]``. The images must share
one grid, one contrast, and already be affinely aligned (e.g. by ``jaxreg.optimize.register(..., deformable=None)``).

Each iteration, with ``w = moving∘φ`` the moving image warped by the current field (``φ(x) = x + u(x)``) and
``r = fixed - w`` the residual, computes the demons force

    δ(x) = r J / (|J|² + α² r²),    α = 1 / (2 max_step)

which is a Gauss-Newton step on ``½ (w(x + δ) - fixed(x))²`` damped where the residual is large relative to the
gradient (``|δ| <= 1 / (2α) = max_step`` always; the vector is also clipped to ``max_step`` for safety). ``J`` is

* ``force="symmetric"`` (default): the ESM / symmetric force ``J = (∇fixed + ∇w) / 2`` (Vercauteren et al.), or
* ``force="fixed"``: Thirion's classic force with the fixed image's gradient ``J = ∇fixed``.

Gradients are central differences (``jnp.gradient``) in fixed-grid voxels. The update ``δ`` is smoothed with
``sigma_fluid`` ("fluid-like" regularisation), applied, and the total field is smoothed with ``sigma_diffusion``
("diffusion-like"). Classic Demons adds the update, ``u ← u + δ``; diffeomorphic Demons composes with its
exponential, ``φ ← φ ∘ exp(δ)``, i.e. ``u ← spatial.compose(u, exp(δ))`` with ``exp`` by scaling and squaring
(as ``spatial.integrate_velocity``, with enough squarings to bring ``δ`` below 1/8 voxel), which keeps the Jacobian
determinant positive in practice.

Multi-resolution: both images go down a Gaussian pyramid (``spatial.downsample``); the field is carried between
levels with ``spatial.resize_disp``. Each level is one compiled ``lax.fori_loop`` (images are jit arguments; the
static options key the jit cache), so a level compiles once per grid shape and option set, whatever its
iteration count. Sigmas and ``max_step`` are in voxels of the level's grid. The moving image is sampled with
``mode="nearest"``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import _validate, spatial

FORCES = ("symmetric", "fixed")


class _Config(NamedTuple):
    """Static options of one compiled level (hashable: it keys the jit cache; the iteration count is traced)."""

    sigma_fluid: float
    sigma_diffusion: float
    diffeomorphic: bool
    max_step: float
    force: str
    exp_steps: int


def _gradient(image):
    """Central-difference gradient of ``image (*S)``: ``(*S, ndim)`` in intensity per voxel."""
    return jnp.stack(jnp.gradient(image), axis=-1)


def _update(cfg, fixed, grad_fixed, warped):
    """Demons update ``δ (*S, ndim)`` from the residual ``fixed - warped`` (before fluid smoothing)."""
    residual = (fixed - warped)[..., None]
    jac = grad_fixed if cfg.force == "fixed" else 0.5 * (grad_fixed + _gradient(warped))
    alpha2 = (0.5 / cfg.max_step) ** 2
    denom = jnp.sum(jac * jac, axis=-1, keepdims=True) + alpha2 * residual * residual
    ok = denom > jnp.finfo(denom.dtype).tiny
    delta = jnp.where(ok, residual * jac / jnp.where(ok, denom, 1.0), 0.0)
    norm = jnp.sqrt(jnp.sum(delta * delta, axis=-1, keepdims=True))
    return delta * jnp.minimum(1.0, cfg.max_step / jnp.maximum(norm, cfg.max_step))


def _exp(velocity, steps):
    """Scaling and squaring as ``spatial.integrate_velocity``, the squarings in a loop (one compose to compile)."""
    return jax.lax.fori_loop(0, steps, lambda _, d: spatial.compose(d, d), velocity / (2.0 ** steps))


def _run_level(fixed, moving, disp, iterations, cfg: _Config):
    """``iterations`` Demons steps on one pyramid level's images and field ``(*S, ndim)`` (level voxels)."""
    ndim = fixed.ndim
    grad_fixed = _gradient(fixed)

    def body(_, u):
        warped = spatial.warp(moving, u, mode="nearest")
        delta = _update(cfg, fixed, grad_fixed, warped)
        if cfg.sigma_fluid > 0:
            delta = spatial.gaussian_smooth(delta, cfg.sigma_fluid, ndim=ndim)
        if cfg.diffeomorphic:
            u = spatial.compose(u, _exp(delta, cfg.exp_steps))
        else:
            u = u + delta
        if cfg.sigma_diffusion > 0:
            u = spatial.gaussian_smooth(u, cfg.sigma_diffusion, ndim=ndim)
        return u

    return jax.lax.fori_loop(0, iterations, body, disp)


_run_level_jit = jax.jit(_run_level, static_argnames="cfg")
_resize_jit = jax.jit(spatial.resize_disp, static_argnames="shape")


@partial(jax.jit, static_argnames="factor")
def _downsample_pair(fixed, moving, factor):
    return spatial.downsample(fixed, factor), spatial.downsample(moving, factor)


def _per_level(value, n, name, kind):
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name} must be a single value or one per level ({n} levels), got {value!r}")
    for v in values:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < kind:
            raise ValueError(f"{name} must hold integers >= {kind}, got {value!r}")
    return tuple(int(v) for v in values)


def _nonnegative(value, name, *, strict=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (strict and v == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}")
    return v


def demons(fixed, moving, *, levels=(4, 2, 1), iterations=(100, 50, 25), sigma_fluid: float = 1.0,
           sigma_diffusion: float = 1.5, diffeomorphic: bool = False, max_step: float = 1.0,
           force: str = "symmetric", initial_disp=None) -> jax.Array:
    """Register ``moving`` onto ``fixed`` with (diffeomorphic) Demons; returns the displacement ``(*spatial, ndim)``.

    Args:
      fixed, moving: ``(*spatial)`` float images on one grid, 2-D or 3-D, same contrast, affinely aligned.
      levels: pyramid downsampling factors, coarse to fine (positive integers) [(4, 2, 1)].
      iterations: iterations per level, one integer or one per level [(100, 50, 25)].
      sigma_fluid: Gaussian sigma (level voxels) smoothing each update; 0 turns it off [1.0].
      sigma_diffusion: Gaussian sigma (level voxels) smoothing the total field each iteration; 0: off [1.5].
      diffeomorphic: compose with ``exp(update)`` instead of adding the update [False].
      max_step: largest update length in level voxels; sets the force's damping ``α = 1 / (2 max_step)`` [1.0].
      force: ``"symmetric"`` (ESM: mean of the fixed and warped-moving gradients) or ``"fixed"`` (Thirion's classic,
        fixed gradient) ["symmetric"].
      initial_disp: ``(*spatial, ndim)`` field (fixed-grid voxels, pull convention) to start from [None: zero].

    Returns:
      ``disp`` ``(*spatial, ndim)`` in fixed-grid voxels, the images' (promoted) float dtype, such that
      ``spatial.warp(moving, disp)`` approximates ``fixed``.

    Raises:
      ValueError: non-float, non-finite, mismatched or non 2-D/3-D images, a badly shaped ``initial_disp``, or
        invalid options (each message names the argument).
    """
    fixed = _validate.floating(fixed, "fixed")
    moving = _validate.floating(moving, "moving")
    _validate.same_shape(fixed, moving, "fixed", "moving")
    if fixed.ndim not in (2, 3):
        raise ValueError(f"fixed and moving must be 2-D or 3-D single-channel images, got shape {fixed.shape}")
    _validate.finite(fixed, "fixed")
    _validate.finite(moving, "moving")
    shape, ndim = fixed.shape, fixed.ndim
    dtype = jnp.result_type(fixed.dtype, moving.dtype)
    fixed, moving = fixed.astype(dtype), moving.astype(dtype)

    if not isinstance(levels, (tuple, list)) or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty tuple of positive integer factors, got {levels!r}")
    levels = _per_level(levels, len(levels), "levels", 1)
    iterations = _per_level(iterations, len(levels), "iterations", 0)
    for factor in levels:
        if min(spatial.level_shape(shape, factor)) < 2:
            raise ValueError(f"levels: factor {factor} shrinks images of shape {shape} below 2 voxels along an axis")
    sigma_fluid = _nonnegative(sigma_fluid, "sigma_fluid")
    sigma_diffusion = _nonnegative(sigma_diffusion, "sigma_diffusion")
    max_step = _nonnegative(max_step, "max_step", strict=True)
    if force not in FORCES:
        raise ValueError(f"force must be one of {FORCES}, got {force!r}")
    if not isinstance(diffeomorphic, (bool, np.bool_)):
        raise ValueError(f"diffeomorphic must be a bool, got {diffeomorphic!r}")
    # scaling and squaring brings the update below 1/8 voxel before the first composition
    exp_steps = max(1, math.ceil(math.log2(max_step / 0.125))) if diffeomorphic else 0

    if initial_disp is None:
        disp = jnp.zeros(shape + (ndim,), dtype)
    else:
        disp = _validate.field(initial_disp, "initial_disp")
        if disp.shape != shape + (ndim,):
            raise ValueError(f"initial_disp must have shape {shape + (ndim,)} for images {shape}, got {disp.shape}")
        disp = disp.astype(dtype)

    for factor, iters in zip(levels, iterations):
        if iters > 0:
            level_fixed, level_moving = _downsample_pair(fixed, moving, factor=factor)
            if disp.shape[:-1] != level_fixed.shape:
                disp = _resize_jit(disp, shape=level_fixed.shape)
            cfg = _Config(sigma_fluid, sigma_diffusion, bool(diffeomorphic), max_step, force, exp_steps)
            disp = _run_level_jit(level_fixed, level_moving, disp, np.int32(iters), cfg=cfg)
    return disp if disp.shape[:-1] == shape else _resize_jit(disp, shape=shape)
