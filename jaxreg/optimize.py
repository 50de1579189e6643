"""Classical per-pair registration: parametric then deformable stages, multi-resolution, optax, compiled loops.

    result = register(fixed, moving)                                     # the RegisterOptions() defaults
    result = register(fixed, moving, metric="mi")                        # defaults with one field replaced
    result = register(fixed, moving, options=PRESETS["affine"], iterations=(10,))   # a preset, one field replaced
    result = register(fixed, moving, metric=my_loss, metric_options={"scale": 2.0})  # any callable similarity

Every setting of the engine is a field of the frozen, validated ``RegisterOptions`` (``PRESETS`` names a few);
``register`` takes one as ``options=`` and replaces single fields by keyword (``**overrides``). What belongs to one
call only (masks, a starting field or matrix, a progress callback) is an argument of ``register``, not an option.

``register(fixed, moving)`` finds the transform that maps fixed-grid points to moving positions,
``y(x) = A((x + u(x)) - c) + t + c``: a deformable field ``u`` (voxels, fixed grid) followed by a homogeneous matrix
``M = [A t]`` acting about the grid centre ``c`` (see ``spatial.affine_to_disp``). The total displacement
``disp = y - x`` is what ``spatial.warp(moving, disp)`` pulls through when both images share one grid. A moving image
on its own grid (another shape, voxel size, orientation or field of view) keeps it: ``moving_grid`` (fixed voxel →
moving voxel, ``inv(moving_affine) @ fixed_affine``) carries the points there, every pyramid level samples the moving
image's own pyramid once per point (``pull``), and nothing outside the fixed field of view is lost.

Stages (each optional): moments initialisation (centre of mass), a parametric stage (translation, rigid, similarity
or affine) and a deformable stage (``"disp"`` dense displacement, ``"svf"`` stationary velocity field integrated by
scaling and squaring, ``"diffeo"`` greedy diffeomorphic updates by composition, or ``"bspline"`` free-form
deformation). Each stage runs coarse to fine over a Gaussian pyramid; each level is one compiled ``lax.while_loop``
of optax updates that stops at its iteration budget or when the loss improves by less than ``tol`` (relative) over
``window`` iterations. Compilation happens once per shape and static option set (a callable metric is part of that
set: pass the same function object to reuse the compiled levels); the images are arguments, never captured constants.

``register_batch`` runs the same program on a batch of same-shaped pairs through ``vmap``. Thirion's Demons (and its
diffeomorphic variant), the classic baseline, lives in ``jaxreg.demons``.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import time
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from jaxreg import _validate, losses, spatial, transforms

DEFORMABLE = ("disp", "svf", "bspline", "diffeo")
#: starts of the parametric stage (``RegisterOptions.init``): centres of mass, grid centres
INITS = ("com", "centre")
#: scaling-and-squaring steps of each greedy "diffeo" update (its exponential; 2 and 4 gave the same Dice and
#: folding on three TUNE pairs, the full-resolution level 4-17 % faster with 2: BENCHMARKS.md)
DIFFEO_STEPS = 2
#: ``crop=True``: the deformable stage's box grows by this fraction of the image size on each side ...
CROP_MARGIN = 0.05
#: ... and its size is rounded up to a multiple of this many voxels (a few compiled shapes per data set)
CROP_MULTIPLE = 16
OPTIMIZERS = ("adam", "sgd")
#: a pyramid level keeps at least this many voxels along every axis (or the whole axis when it is shorter)
MIN_LEVEL_SIZE = 4
#: with ``register(progress=...)`` a level's compiled loop runs this many iterations per call, reporting between
PROGRESS_EVERY = 10


def _elapsed(t0: float, result) -> float:
    """Seconds since ``t0`` once ``result`` is computed (JAX dispatches asynchronously: without the wait a level's
    time would be its dispatch time and the work would be charged to whatever waits next)."""
    jax.block_until_ready(result)
    return time.perf_counter() - t0


class Result(NamedTuple):
    """Outcome of a registration (a pytree; batched along axis 0 by ``register_batch``).

    matrix: ``(ndim+1, ndim+1)`` voxel matrix about the grid centre (applied after the deformable field).
    disp: ``(*spatial, ndim)`` total displacement in fixed-grid voxels (``warp(moving, disp)`` gives ``warped``).
    warped: the moving image warped onto the fixed grid.
    velocity: the stationary velocity field for ``deformable="svf"`` (else zeros), ``(*spatial, ndim)``.
    history: per stage and level, the loss at every iteration (NaN after convergence), ``{name: (iters,)}``.
    seconds: wall-clock time per stage and level, including compilation.
    """

    matrix: jax.Array
    disp: jax.Array
    warped: jax.Array
    velocity: jax.Array
    history: dict
    seconds: dict


# ------------------------------------------------------------------------------------------------------ options
def _all_ints(values, low) -> bool:
    return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low for v in values)


def _number(name, value, low, strict, *, keep_int=False):
    """``value`` as a float (an int stays one with ``keep_int``), checked > ``low`` (``strict``) or >= ``low``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not (value > low if strict else value >= low):  # also rejects NaN
        raise ValueError(f"{name} must be a number {'>' if strict else '>='} {low}, got {value!r}")
    return int(value) if keep_int and isinstance(value, numbers.Integral) else float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegisterOptions:
    """Every setting of ``register`` (frozen; checked on construction; ``dataclasses.replace`` to derive one).

    Defaults in brackets. Sequences given as lists become tuples; ``metric_options`` and ``affine_metric_options``
    are copied into plain dicts (treat them as read-only).

    init: ``"com"`` shifts the moving image's intensity centre of mass onto the fixed one's before the parametric
      stage, ``"centre"`` the moving grid's centre onto the fixed grid's (for images centred on the same anatomy
      but on grids that share no world frame, e.g. the prostate MR ↔ ultrasound pairs; the identity when both
      images share a grid), None starts from the identity ["com"].
    transform: parametric stage, a key of ``transforms.PARAMETRIC`` ("translation", "rigid", "similarity",
      "affine") or None to skip it ["affine"].
    deformable: deformable stage, one of ``DEFORMABLE`` or None to skip it ["disp"]: "disp" (dense displacement),
      "svf" (stationary velocity, scaling and squaring, exact gradient through the integration: diffeomorphic but
      slow on CPU), "diffeo" (greedy diffeomorphic: the displacement is updated by composition with the exponential
      of each smoothed optax step, as in diffeomorphic Demons and ANTs' greedy SyN: invertible and as cheap as
      "disp"), "bspline" (cubic B-spline free-form deformation).
    metric: similarity of the deformable stage (lower is better): a key of ``losses.SIMILARITIES`` or a callable
      ``fn(fixed, warped, *, mask=None, **metric_options) -> scalar`` (e.g. ``jaxreg.methods.learned_metric.metric``
      with ``metric_options={"checkpoint": PATH}``) ["lncc"].
    metric_options: keyword options of ``metric``, e.g. ``{"window": 7}`` (lncc, voxels), ``{"bins": 32}`` (mi,
      nmi); None for none [None].
    affine_metric: similarity of the parametric stage, as ``metric``; None uses ``metric`` [None].
    affine_metric_options: its keyword options. None: ``metric_options`` when the parametric stage uses ``metric``,
      else none (that metric's defaults); ``{}`` always means no options [None].
    levels: pyramid downsampling factors of the deformable stage, coarse to fine, each an int >= 1 [(4, 2, 1)].
      Every level of a stage that runs must keep at least ``MIN_LEVEL_SIZE`` voxels along each image axis (the
      whole axis when it is shorter); ``register`` checks this before compiling anything.
    iterations: maximum iterations per deformable level, one int for all levels or one per level, >= 0
      [(100, 80, 40)].
    affine_levels, affine_iterations: the same for the parametric stage [(4, 2), (100, 50)].
    regularizer: penalty on the deformable field, a key of ``losses.REGULARIZERS`` or None ["diffusion"]; for
      "svf" the velocity is regularised, else the displacement.
    reg_weight: its weight, >= 0 (0 disables it) [0.3].
    learning_rate: step size of the deformable stage, > 0, in voxels [0.3].
    affine_learning_rate: step size of the parametric stage, > 0, in radians / (max(shape)/20) voxels [0.02].
      Both are cosine-decayed to 10 % within each level.
    optimizer: "adam", "sgd" (with momentum 0.9) or any ``optax.GradientTransformation`` (then used as given for
      every level: the learning rates and decay do not apply) ["adam"].
    tol: a level stops when the mean loss of the last ``window`` iterations improved by less than ``tol``
      (relative) on the ``window`` before, >= 0; 0 runs every iteration [1e-4].
    window: that window, in iterations, >= 1 [10].
    bspline_spacing: B-spline control-point spacing in full-resolution voxels, > 0, one for all axes or one per
      axis [4].
    steps: scaling-and-squaring steps of "svf", >= 0 [7].
    field_sigma: for "disp", "svf" and "diffeo" the optimised field (or update) is Gaussian-smoothed with this
      sigma (level voxels) before use, which keeps Adam's per-voxel steps smooth; 0 optimises it directly, >= 0
      [1.0].
    crop: run the deformable stage on the box of the fixed grid that holds either image's foreground after the
      parametric stage (``CROP_MARGIN`` of the size added on each side, the box rounded up to a multiple of
      ``CROP_MULTIPLE`` voxels so that the images of a data set share a few compiled shapes); the field outside
      the box continues its border values. Foreground: mask > 0, else intensity above 10 % of the 1st–99th
      percentile range. Whole heads or images without background keep the full grid [False].
    """

    init: str | None = "com"
    transform: str | None = "affine"
    deformable: str | None = "disp"
    metric: str | Callable[..., jax.Array] = "lncc"
    metric_options: Mapping[str, Any] | None = None
    affine_metric: str | Callable[..., jax.Array] | None = None
    affine_metric_options: Mapping[str, Any] | None = None
    levels: tuple[int, ...] = (4, 2, 1)
    iterations: int | tuple[int, ...] = (100, 80, 40)
    affine_levels: tuple[int, ...] = (4, 2)
    affine_iterations: int | tuple[int, ...] = (100, 50)
    regularizer: str | None = "diffusion"
    reg_weight: float = 0.3
    learning_rate: float = 0.3
    affine_learning_rate: float = 0.02
    optimizer: str | optax.GradientTransformation = "adam"
    tol: float = 1e-4
    window: int = 10
    bspline_spacing: float | tuple[float, ...] = 4
    steps: int = 7
    field_sigma: float = 1.0
    crop: bool = False

    def __post_init__(self):
        def choice(name, valid, *, none=True, metric=False):
            value = getattr(self, name)
            if (value is None and none) or (isinstance(value, str) and value in valid) or (metric and callable(value)):
                return
            also = " or a callable fn(fixed, warped, *, mask=None, **options) -> scalar" if metric else ""
            raise ValueError(f"{name} must be one of {sorted(valid)}{' or None' if none else ''}{also}, got {value!r}")

        choice("init", INITS)
        choice("transform", transforms.PARAMETRIC)
        choice("deformable", DEFORMABLE)
        choice("metric", losses.SIMILARITIES, none=False, metric=True)
        choice("affine_metric", losses.SIMILARITIES, metric=True)
        choice("regularizer", losses.REGULARIZERS)
        for name in ("metric_options", "affine_metric_options"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{name} must be a dict of keyword options (or None), got "
                                     f"{type(value).__name__} {value!r}")
                self._set(name, dict(value))
        for name in ("levels", "affine_levels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value or not _all_ints(value, 1):
                raise ValueError(f"{name} must be a non-empty tuple of pyramid factors (ints >= 1, coarse to fine), "
                                 f"got {value!r}")
            self._set(name, tuple(int(v) for v in value))
        for name, levels in (("iterations", self.levels), ("affine_iterations", self.affine_levels)):
            value = getattr(self, name)
            many = isinstance(value, (list, tuple))
            if not _all_ints(value if many else (value,), 0):
                raise ValueError(f"{name} must be an int >= 0 or one per level, got {value!r}")
            if many and len(value) != len(levels):
                raise ValueError(f"{name} must be a single value or one per level ({len(levels)}), got {value}")
            self._set(name, tuple(int(v) for v in value) if many else int(value))
        for name, low, strict in (("reg_weight", 0, False), ("learning_rate", 0, True),
                                  ("affine_learning_rate", 0, True), ("tol", 0, False), ("field_sigma", 0, False)):
            self._set(name, _number(name, getattr(self, name), low, strict))
        if not isinstance(self.crop, bool):
            raise ValueError(f"crop must be True or False, got {self.crop!r}")
        for name, low in (("window", 1), ("steps", 0)):
            value = getattr(self, name)
            if not _all_ints((value,), low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
            self._set(name, int(value))
        spacing = self.bspline_spacing
        if isinstance(spacing, (list, tuple)):
            if not spacing:
                raise ValueError(f"bspline_spacing must be > 0, one value or one per axis, got {spacing!r}")
            self._set("bspline_spacing", tuple(_number("bspline_spacing", s, 0, True, keep_int=True)
                                               for s in spacing))
        else:
            self._set("bspline_spacing", _number("bspline_spacing", spacing, 0, True, keep_int=True))
        named = isinstance(self.optimizer, str) and self.optimizer in OPTIMIZERS
        if not named and not isinstance(self.optimizer, optax.GradientTransformation):
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} or an optax.GradientTransformation, got "
                             f"{self.optimizer!r}")

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def affine_similarity(self) -> tuple[str | Callable[..., jax.Array], dict]:
        """``(metric, keyword options)`` of the parametric stage after the None rules of ``affine_metric`` and
        ``affine_metric_options`` (the deformable stage's are ``metric`` and ``metric_options or {}``)."""
        options = self.affine_metric_options
        if options is None:  # None means "unset"; a different metric starts from its defaults
            same = self.affine_metric is None or self.affine_metric == self.metric
            options = (self.metric_options or {}) if same else {}
        return (self.metric if self.affine_metric is None else self.affine_metric), dict(options)


#: Named option sets (the ``jaxreg`` command's ``--preset``, the benchmarks): ``register(f, m, options=PRESETS[k])``.
#: ``default``, ``fast`` and ``diffeo`` were chosen on real inter-subject pairs of Mindboggle subjects 1-6 at 2 mm
#: (``benchmarks/tune_real.py``; reported on subjects 7-14 in BENCHMARKS.md): greedy diffeomorphic updates on the
#: box around both brains. Regularisation 0.2 kept every tuning pair's folding <= 0.05 % of the brain (mean Dice
#: 0.593); 0.5 gave none at all (0.576); dense "disp" updates reached 0.601 with 0.67 % folding.
PRESETS: dict[str, RegisterOptions] = {
    "default": RegisterOptions(deformable="diffeo", metric="lncc", metric_options={"window": 5}, reg_weight=0.2,
                               crop=True),
    # about 2x fewer iterations than the default
    "fast": RegisterOptions(deformable="diffeo", metric="lncc", metric_options={"window": 5}, reg_weight=0.2,
                            crop=True, iterations=(60, 40, 20), affine_iterations=(60, 30)),
    "diffeo": RegisterOptions(deformable="diffeo", metric="lncc", metric_options={"window": 5}, reg_weight=0.5,
                              crop=True),
    # affine by mutual information, then NGF: on T2-like -> T1 MNI pairs NGF gave 0.843 Dice (0 % folding) against
    # 0.777 (0.09 % folding) with MI in the deformable stage (BENCHMARKS.md)
    "multimodal": RegisterOptions(deformable="disp", metric="ngf", affine_metric="mi"),
    "affine": RegisterOptions(deformable=None, metric="lncc", metric_options={"window": 5}),
}


@dataclasses.dataclass(frozen=True)
class _Level:
    """Static description of one compiled optimisation level (hashable: it keys the jit cache)."""

    kind: str  # "affine" or "deformable"
    model: str  # transform name or deformable model
    metric: str | Callable[..., jax.Array]  # a losses.SIMILARITIES key or the function itself
    metric_options: tuple
    regularizer: str | None
    reg_weight: float
    optimizer: Any
    max_iter: int
    tol: float
    window: int
    spacing: tuple | None = None  # B-spline control spacing (reference voxels)
    grid_shape: tuple | None = None  # reference grid for the B-spline
    steps: int = 7  # scaling and squaring
    sigma: float = 0.0  # Gaussian smoothing of dense parameters (level voxels)


# -------------------------------------------------------------------------------------------------- the level loop
def _masked_similarity(cfg, fixed, warped, mask):
    fn = cfg.metric if callable(cfg.metric) else losses.SIMILARITIES[cfg.metric]
    return fn(fixed, warped, mask=mask, **dict(cfg.metric_options))


def _blur_zero(x, taps):
    """Separable filter of ``x (*S, C)`` with symmetric ``taps`` and zero padding (a self-adjoint linear map)."""
    r = len(taps) // 2
    for axis in range(x.ndim - 1):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        padded = jnp.pad(x, pad)
        x = sum(w * jax.lax.slice_in_dim(padded, k, k + n, axis=axis) for k, w in enumerate(taps))
    return x


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _smooth_params(x, taps):
    """Gaussian smoothing of dense parameters; its VJP is the same filter (cheaper than autodiff of the pads)."""
    return _blur_zero(x, taps)


_smooth_params.defvjp(lambda x, taps: (_blur_zero(x, taps), None), lambda taps, _, g: (_blur_zero(g, taps),))


def _taps(sigma):
    return tuple(float(t) for t in spatial.gaussian_kernel(sigma, truncate=2.0))


def _field(params, base, *, cfg):
    """Deformable params → (displacement u in level voxels, the field that is regularised).

    The dense field is ``base + smooth(params)`` ("disp", "svf": Gaussian-smoothed parameters) or
    ``base + bspline(params)``; ``base`` carries the previous levels (or an initial field). For "svf" the dense
    field is a velocity and ``u = exp(base + ...)``.
    """
    shape = base.shape[:-1]
    if cfg.model == "diffeo":  # params is the whole displacement, updated by composition (see _level_steps)
        return params, params
    if cfg.model == "bspline":
        return base + transforms.bspline_to_disp(params, shape, cfg.spacing, grid_shape=cfg.grid_shape), None
    field = base + (_smooth_params(params, _taps(cfg.sigma)) if cfg.sigma > 0 else params)
    if cfg.model == "svf":
        return spatial.integrate_velocity(field, steps=cfg.steps), field
    return field, field


def _loss(params, cfg, data):
    fixed, moving, fixed_mask, moving_mask, matrix = (
        data["fixed"], data["moving"], data["fixed_mask"], data["moving_mask"], data["matrix"]
    )
    shape = fixed.shape
    reg = 0.0
    if cfg.kind == "affine":
        disp = spatial.affine_to_disp(_level_matrix(params, data["scale"], data["spacing"], model=cfg.model), shape)
    else:
        u, reg_field = _field(params, data["base"], cfg=cfg)
        disp = spatial.compose_affine(matrix, u)
        if cfg.regularizer is not None and cfg.reg_weight > 0:
            reg = cfg.reg_weight * losses.REGULARIZERS[cfg.regularizer](u if reg_field is None else reg_field)
    moving = jax.lax.stop_gradient(moving)
    grid = data.get("grid")
    warped = pull(moving, disp, grid)
    mask = fixed_mask
    if moving_mask is not None:
        pulled = pull(moving_mask, disp, grid)
        mask = mask * pulled if mask is not None else pulled
    return _masked_similarity(cfg, fixed, warped, mask) + reg


def pull(moving: ArrayLike, disp: ArrayLike, grid: ArrayLike | None = None, *, order: int = 1) -> jax.Array:
    """``moving`` sampled at the fixed-grid points ``x + disp(x)``: on the fixed grid itself (``grid`` None:
    ``spatial.warp``) or, for a moving image on its own grid, at the moving voxels ``grid @ [x + disp(x), 1]``
    (``grid`` the homogeneous fixed-voxel → moving-voxel matrix): one interpolation either way.

    ``moving`` ``(*S_moving)`` or ``(*S_moving, C)``; ``disp`` ``(*S_fixed, ndim)`` fixed-grid voxels; ``order`` 1
    linear, 0 nearest (label maps as floats). Returns ``(*S_fixed[, C])``; zero outside the moving image.
    """
    if grid is None:
        return spatial.warp(moving, disp, order=order)
    nd = disp.shape[-1]
    points = spatial.identity_grid(disp.shape[:-1], dtype=disp.dtype) + disp
    grid = jnp.asarray(grid, disp.dtype)
    coords = points @ grid[:nd, :nd].T + grid[:nd, nd].reshape((1,) * nd + (nd,))
    return spatial.sample(moving, coords, order=order)


def level_grid(grid, fixed_shape, moving_shape, factor):
    """The fixed-voxel → moving-voxel matrix between the pyramid levels ``factor`` of both images (host NumPy).

    ``grid`` ``(..., ndim+1, ndim+1)`` maps full-resolution fixed voxels to full-resolution moving voxels. A level
    keeps the grid centre and scales voxel positions about it by ``level_shape / shape`` per axis (as
    ``spatial.downsample`` and ``_rescale_matrix`` do), separately for each image.
    """
    def to_level(shape):
        shape = np.asarray(shape, np.float64)
        d = np.asarray(spatial.level_shape(tuple(int(n) for n in shape), factor), np.float64) / shape
        c, c_level = (shape - 1) / 2, (shape * d - 1) / 2
        m = np.eye(len(shape) + 1)
        m[:-1, :-1] = np.diag(d)
        m[:-1, -1] = c_level - d * c
        return m

    return to_level(moving_shape) @ np.asarray(grid, np.float64) @ np.linalg.inv(to_level(fixed_shape))


def _translation_slice(model, ndim):
    """Where the translation sits in a parametric model's parameter vector (see ``transforms``)."""
    start = {"translation": 0, "rigid": 1 if ndim == 2 else 3, "affine": ndim * ndim}
    start["similarity"] = start["rigid"]
    return slice(start[model], start[model] + ndim)


def _level_matrix(params, scale, spacing=None, *, model):
    """Matrix of the parametric model at a pyramid level: ``D M D⁻¹`` with ``D = diag(level / full size)``.

    ``scale`` is ``(*D, unit)``: translations are optimised in units of ``unit`` full-resolution voxels (mm with
    ``spacing``) so that Adam's step size suits angles and shifts alike. With ``spacing`` (the fixed voxel size, mm
    per axis) the parameters describe the transform in millimetres, ``M = S⁻¹ M_mm S`` with ``S = diag(spacing)``,
    so that a rigid or similarity transform stays one on anisotropic voxels.
    """
    ndim = scale.shape[0] - 1
    m = transforms.to_matrix(model, params.at[_translation_slice(model, ndim)].multiply(scale[-1]))
    if spacing is not None:
        m = _rescale_matrix(m, 1.0 / spacing)
    return _rescale_matrix(m, scale[:ndim])


def _rescale_matrix(matrix, d):
    """``D M D⁻¹`` for ``D = diag(d)``: a centre-relative voxel matrix moved to a grid ``d`` times the size."""
    ndim = d.shape[0]
    ratio = d.reshape(ndim, 1) / d.reshape(1, ndim)
    return matrix.at[..., :ndim, :ndim].multiply(ratio).at[..., :ndim, ndim].multiply(d)


def _level_start(params, cfg: _Level):
    """The loop state of a level before its first iteration: ``(i, params, opt_state, history, done)``."""
    history = jnp.full((cfg.max_iter,), jnp.nan, dtype=jnp.float32)
    return jnp.int32(0), params, cfg.optimizer.init(params), history, jnp.array(False)


def _level_steps(state, data, stop, cfg: _Level):
    """Continue a level's optax loop from ``state`` until iteration ``stop`` (a traced int: every chunk of a level
    is the same program) or convergence: the loss improved by less than ``cfg.tol`` (relative) over the last
    ``cfg.window`` iterations. ``history`` holds the loss of every iteration run (NaN after convergence)."""
    opt = cfg.optimizer
    value_and_grad = jax.value_and_grad(_loss)

    def cond(state):
        i, _, _, _, done = state
        return (i < stop) & ~done

    def body(state):
        i, params, opt_state, history, _ = state
        value, grad = value_and_grad(params, cfg, data)
        updates, opt_state = opt.update(grad, opt_state, params)
        if cfg.model == "diffeo":
            # greedy diffeomorphic step: u <- u o exp(smooth(update)); a composition of small diffeomorphisms
            step = _smooth_params(updates, _taps(cfg.sigma)) if cfg.sigma > 0 else updates
            params = spatial.compose(params, spatial.integrate_velocity(step, steps=DIFFEO_STEPS))
        else:
            params = optax.apply_updates(params, updates)
        history = history.at[i].set(value.astype(jnp.float32))
        # mean loss over the last window against the window before it
        w = max(1, min(cfg.window, cfg.max_iter // 2))  # windows fit in the history
        recent = jax.lax.dynamic_slice(jnp.nan_to_num(history), (jnp.maximum(i + 1 - w, 0),), (w,))
        before = jax.lax.dynamic_slice(jnp.nan_to_num(history), (jnp.maximum(i + 1 - 2 * w, 0),), (w,))
        improvement = (jnp.mean(before) - jnp.mean(recent)) / jnp.maximum(jnp.abs(jnp.mean(before)), 1e-12)
        done = (i + 1 >= 2 * w) & (improvement < cfg.tol)
        return i + 1, params, opt_state, history, done

    return jax.lax.while_loop(cond, body, state)


_level_start_jit = jax.jit(_level_start, static_argnames="cfg")
_level_steps_jit = jax.jit(_level_steps, static_argnames="cfg")
_level_start_batch = jax.jit(jax.vmap(_level_start, in_axes=(0, None)), static_argnames="cfg")
_level_steps_batch = jax.jit(jax.vmap(_level_steps, in_axes=(0, 0, None, None)), static_argnames="cfg")


def _optimise_level(params, data, cfg: _Level, *, batched=False, report=None):
    """Optimise ``params`` over one level; returns ``(params, loss history (max_iter,))`` (batched along axis 0).

    The loop is compiled (``_level_steps``) and runs in one call, or, with ``report``, in calls of
    ``PROGRESS_EVERY`` iterations with ``report(iterations done, last loss)`` between them (the same compiled
    program: a host callback inside the loop would keep it out of the persistent compilation cache).
    """
    if cfg.max_iter == 0:
        return params, jnp.zeros(params.shape[:1] + (0,) if batched else (0,), jnp.float32)
    start, steps = (_level_start_batch, _level_steps_batch) if batched else (_level_start_jit, _level_steps_jit)
    state = start(params, cfg)
    chunk = PROGRESS_EVERY if report else cfg.max_iter
    for stop in range(chunk, cfg.max_iter + chunk, chunk):
        state = steps(state, data, np.int32(min(stop, cfg.max_iter)), cfg)
        if report:
            i, history, done = jax.device_get((state[0], state[3], state[4]))
            report(int(i), float(history[int(i) - 1]))
            if done:
                break
    return state[1], state[3]


@functools.lru_cache(maxsize=256)
def _per_pair(fn, batched, **options):
    """``fn`` with the keyword ``options`` bound, compiled, and vmapped over axis 0 when ``batched`` (a batch of
    pairs): the glue between levels (downsampling, resizing and composing fields).

    Run eagerly, these would dispatch (and compile) every primitive on its own. ``fn`` is a module-level function and
    ``options`` are hashable, so each distinct call is compiled once and reused (cached here, then by ``jax.jit``).
    """
    f = partial(fn, **options) if options else fn
    return jax.jit(jax.vmap(f) if batched else f)


# ------------------------------------------------------------------------------------------------------- helpers
def centre_of_mass_shift(fixed, moving, fixed_mask=None, moving_mask=None, grid=None):
    """Translation (fixed-grid voxels) taking the fixed image's intensity centroid to the moving one's: ``(ndim,)``.

    Intensities are taken above each image's minimum and weighted by the masks when given. With ``grid`` (the
    fixed-voxel → moving-voxel matrix of a moving image on its own grid) the moving centroid is carried back into
    fixed voxels first, so the shift is the one between the two centroids in world space.
    """
    def com(img, mask):
        w = img - jnp.min(img)
        if mask is not None:
            w = w * mask
        points = spatial.identity_grid(img.shape, dtype=img.dtype)
        total = jnp.maximum(jnp.sum(w), 1e-12)
        return jnp.sum(points * w[..., None], axis=tuple(range(img.ndim))) / total
    target = com(moving, moving_mask)
    if grid is not None:
        grid = jnp.asarray(grid, target.dtype)
        nd = target.shape[0]
        target = jnp.linalg.solve(grid[:nd, :nd], target - grid[:nd, nd])
    return target - com(fixed, fixed_mask)


def grid_centre_shift(fixed, moving, grid=None):
    """Translation (fixed-grid voxels) taking the fixed grid's centre to the moving grid's: ``(ndim,)``.

    Only the images' shapes are read. With ``grid`` (the fixed-voxel → moving-voxel matrix of a moving image on its
    own grid) the moving grid's centre is carried back into fixed voxels, so the shift is the one between the two
    grids' centres in world space; without, both images share one grid and the shift is zero.
    """
    nd = fixed.ndim
    if grid is None:
        return jnp.zeros(nd, fixed.dtype)
    centre = lambda a: (jnp.asarray(a.shape, fixed.dtype) - 1) / 2  # noqa: E731
    grid = jnp.asarray(grid, fixed.dtype)
    return jnp.linalg.solve(grid[:nd, :nd], centre(moving) - grid[:nd, nd]) - centre(fixed)


@functools.lru_cache(maxsize=64)
def _optimizer(name, learning_rate, max_iter):
    """Adam or SGD+momentum with a cosine decay to 10 % over the level (cached: the optimiser keys the jit cache)."""
    schedule = optax.cosine_decay_schedule(learning_rate, max(max_iter, 1), alpha=0.1)
    if name == "adam":
        return optax.adam(schedule)
    if name == "sgd":
        return optax.sgd(schedule, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam', 'sgd' or an optax.GradientTransformation, got {name!r}")


def _level_optimizer(optimizer, learning_rate, max_iter):
    """The optax transformation of one level: ``optimizer`` itself when it is one, else ``_optimizer``'s."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    return _optimizer(optimizer, learning_rate, max_iter)


def _one_per(value, n):
    """``value`` as an ``n``-tuple: a tuple as it is (its length already checked), a single value repeated."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


# --------------------------------------------------------------------------------------------------- the driver
@dataclasses.dataclass(frozen=True)
class _Pairs:
    """The checked images of one call: one pair, or a batch of pairs along axis 0 when ``batched``."""

    fixed: jax.Array
    moving: jax.Array
    fixed_mask: jax.Array | None
    moving_mask: jax.Array | None
    batched: bool
    grid: np.ndarray | None = None  # fixed voxel -> moving voxel (host float64), None: one shared grid
    spacing: np.ndarray | None = None  # fixed voxel size in mm (host float64): parametric stage in mm

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape of one image."""
        return self.fixed.shape[1:] if self.batched else self.fixed.shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.fixed.dtype

    def per_pair(self, fn, **options):
        """``fn(*args, **options)`` for every pair, compiled (see ``_per_pair``)."""
        return _per_pair(fn, self.batched, **options)

    def broadcast(self, x):
        """One pair's ``x`` repeated for every pair of a batch (``x`` itself for one pair)."""
        return jnp.broadcast_to(x, self.fixed.shape[:1] + x.shape) if self.batched else x

    def run_level(self, params, data, cfg: _Level, report=None):
        """``_optimise_level`` for one pair or vmapped over the batch (``report``: one pair only)."""
        return _optimise_level(params, data, cfg, batched=self.batched, report=None if self.batched else report)

    @property
    def moving_shape(self) -> tuple[int, ...]:
        """The spatial shape of one moving image (its own grid when ``grid`` is given)."""
        return self.moving.shape[1:] if self.batched else self.moving.shape

    def at_level(self, factor, **extra) -> dict:
        """One level's ``data``: the images and masks downsampled by ``factor`` (each on its own grid), the level's
        fixed → moving voxel matrix ``grid`` (None on one shared grid), plus the ``extra`` entries."""
        down = self.per_pair(spatial.downsample, factor=factor)
        data = {"fixed": down(self.fixed), "moving": down(self.moving), "grid": None}
        for name in ("fixed_mask", "moving_mask"):
            mask = getattr(self, name)
            data[name] = None if mask is None else down(mask)
        if self.grid is not None:
            data["grid"] = jnp.asarray(level_grid(self.grid, self.shape, self.moving_shape, factor), self.dtype)
        return {**data, **extra}

    def cropped(self, box: tuple[slice, ...]) -> _Pairs:
        """These pairs with the fixed image (and mask) cut to ``box`` (slices of the fixed grid); the moving image
        keeps its grid, reached through the shifted ``grid`` (fixed-box voxel → moving voxel)."""
        lead = (slice(None),) if self.batched else ()
        shift = np.eye(self.ndim + 1)
        shift[:-1, -1] = [b.start for b in box]
        grid = (np.eye(self.ndim + 1) if self.grid is None else self.grid) @ shift
        if self.batched and grid.ndim == 2:
            grid = np.broadcast_to(grid, self.fixed.shape[:1] + grid.shape)
        mask = None if self.fixed_mask is None else self.fixed_mask[lead + box]
        return dataclasses.replace(self, fixed=self.fixed[lead + box], fixed_mask=mask, grid=grid)

    def pulled(self, image, disp):
        """``image`` (on the moving grid) pulled onto the fixed grid through the full-resolution ``disp``."""
        grid = None if self.grid is None else jnp.asarray(self.grid, self.dtype)
        return self.per_pair(pull)(image, disp, grid)


class _Log:
    """Loss history and seconds per stage and level, passed to ``callback(name, history)`` as each level ends, and
    ``progress(name, iteration, max_iterations, loss)`` during each level (one pair only)."""

    def __init__(self, callback, progress=None):
        self.history, self.seconds, self.callback, self.progress = {}, {}, callback, progress

    def run_level(self, pairs: _Pairs, name: str, params, data, cfg: _Level):
        """``pairs.run_level`` reporting ``progress(name, ...)`` every ``PROGRESS_EVERY`` iterations if given."""
        report = None if self.progress is None else lambda i, loss: self.progress(name, i, cfg.max_iter, loss)
        return pairs.run_level(params, data, cfg, report)

    def level_done(self, name, history, t0, result):
        self.history[name] = history
        self.seconds[name] = _elapsed(t0, result)
        if self.callback:
            self.callback(name, history)


def _checked_pairs(fixed, moving, fixed_mask, moving_mask, moving_grid, spacing, *, batched) -> _Pairs:
    """Float, finite 2-D or 3-D images (same shape unless ``moving_grid`` relates their grids), non-empty masks of
    their image's shape (as the images' dtype), and a finite, invertible ``moving_grid``."""
    lead = 1 if batched else 0
    fixed = _validate.floating(fixed, "fixed")
    moving = _validate.floating(moving, "moving")
    if moving_grid is None:
        _validate.same_shape(fixed, moving, "fixed", "moving")
    elif moving.ndim != fixed.ndim or moving.shape[:lead] != fixed.shape[:lead]:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} must have the same number of axes"
                         f"{' and batch size' if batched else ''}")
    if fixed.ndim - lead not in (2, 3):
        raise ValueError(f"fixed and moving must be 2-D or 3-D{' (after the batch axis)' if batched else ''}, "
                         f"got {fixed.shape}")
    _validate.finite(fixed, "fixed")
    _validate.finite(moving, "moving")
    grid = None
    if moving_grid is not None:
        nd = fixed.ndim - lead
        grid = np.asarray(moving_grid, np.float64)
        if grid.shape != fixed.shape[:lead] + (nd + 1, nd + 1):
            raise ValueError(f"moving_grid must have shape {fixed.shape[:lead] + (nd + 1, nd + 1)} (homogeneous "
                             f"fixed voxel -> moving voxel matrix), got {grid.shape}")
        if not np.isfinite(grid).all() or np.any(np.abs(np.linalg.det(grid[..., :nd, :nd])) < 1e-12):
            raise ValueError("moving_grid must be finite and invertible (inv(moving_affine) @ fixed_affine)")
    masks = {}
    for name, m in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        if m is not None:
            m = jnp.asarray(m)
            image = fixed if name == "fixed_mask" else moving
            if m.shape != image.shape:
                raise ValueError(f"{name} must have the shape of its image {image.shape}, got {m.shape}")
            m = m.astype(fixed.dtype)
            per_pair = jnp.sum(m.reshape(m.shape[:lead] + (-1,)), axis=-1)
            if not isinstance(m, jax.core.Tracer) and bool(jnp.any(per_pair <= 0)):
                raise ValueError(f"{name} is empty (no voxel > 0)")
        masks[name] = m
    if spacing is not None:
        nd = fixed.ndim - lead
        spacing = np.asarray(spacing, np.float64).reshape(-1)
        if spacing.shape != (nd,) or not np.isfinite(spacing).all() or np.any(spacing <= 0):
            raise ValueError(f"spacing must be {nd} positive voxel sizes (mm), got {spacing}")
    return _Pairs(fixed, moving, masks["fixed_mask"], masks["moving_mask"], batched, grid, spacing)


def _check_setup(pairs: _Pairs, opts: RegisterOptions, initial_disp, initial_matrix):
    """What ``RegisterOptions`` cannot check alone: pyramids against the fixed image's shape (before anything
    compiles: a factor of 1000 would build a Gaussian of thousands of taps; a moving image on its own grid is only
    sampled, so its coarse levels may be smaller), per-axis B-spline spacing, starting values."""
    shape, ndim, lead = pairs.shape, pairs.ndim, pairs.fixed.shape[:1] if pairs.batched else ()

    def fits(factor):
        return all(n >= min(MIN_LEVEL_SIZE, s) for n, s in zip(spatial.level_shape(shape, factor), shape))


    for name, factors, runs in (("affine_levels", opts.affine_levels, opts.transform is not None),
                                ("levels", opts.levels, opts.deformable is not None)):
        bad = [f for f in factors if not fits(f)] if runs else []
        if bad:
            largest = max(f for f in range(1, max(shape) + 1) if fits(f))
            raise ValueError(f"{name}={factors}: factor {bad[0]} shrinks the {shape} image to "
                             f"{spatial.level_shape(shape, bad[0])}; every level needs at least {MIN_LEVEL_SIZE} "
                             f"voxels per axis (or the whole axis), so factors up to {largest} fit")
    spacing = opts.bspline_spacing
    if isinstance(spacing, tuple) and len(spacing) != ndim:
        raise ValueError(f"bspline_spacing must be a single value or one per axis ({ndim}), got {spacing}")
    if initial_disp is not None and jnp.shape(initial_disp) != pairs.fixed.shape + (ndim,):
        raise ValueError(f"initial_disp must have shape {pairs.fixed.shape + (ndim,)}, got {jnp.shape(initial_disp)}")
    if initial_matrix is not None and jnp.shape(initial_matrix) != lead + (ndim + 1, ndim + 1):
        raise ValueError(f"initial_matrix must have shape {lead + (ndim + 1, ndim + 1)}, got "
                         f"{jnp.shape(initial_matrix)}")


def _parametric_stage(pairs: _Pairs, opts: RegisterOptions, initial_matrix, log: _Log) -> jax.Array:
    """The ``(ndim+1, ndim+1)`` matrix (per pair) of ``opts.transform``, optimised coarse to fine over
    ``affine_levels`` from the centre-of-mass shift (``init="com"``), the grids' centres' (``"centre"``) or the
    identity; without a transform, ``initial_matrix`` or the identity."""
    shape, ndim, dtype, model = pairs.shape, pairs.ndim, pairs.dtype, opts.transform
    if model is None:
        eye = pairs.broadcast(jnp.eye(ndim + 1, dtype=dtype))
        return eye if initial_matrix is None else jnp.asarray(initial_matrix, dtype)
    mm = pairs.spacing is not None  # parameters in millimetres (see _level_matrix)
    spacing = pairs.broadcast(jnp.asarray(pairs.spacing, dtype)) if mm else None
    extent = np.asarray(shape, np.float64) * (pairs.spacing if mm else 1.0)
    trans_unit = float(extent.max()) / 20.0  # translations are optimised in these units (see _level_matrix)
    params = pairs.broadcast(jnp.zeros(transforms.num_params(model, ndim), dtype))
    if opts.init is not None:
        grid = None if pairs.grid is None else jnp.asarray(pairs.grid, dtype)
        if opts.init == "com":
            shift = pairs.per_pair(centre_of_mass_shift)(pairs.fixed, pairs.moving, pairs.fixed_mask,
                                                         pairs.moving_mask, grid)
        else:
            shift = pairs.per_pair(grid_centre_shift)(pairs.fixed, pairs.moving, grid)
        if mm:
            shift = shift * spacing
        params = params.at[..., _translation_slice(model, ndim)].set(shift / trans_unit)
    metric, metric_options = opts.affine_similarity()
    for factor, iters in zip(opts.affine_levels, _one_per(opts.affine_iterations, len(opts.affine_levels))):
        t0 = time.perf_counter()
        lshape = spatial.level_shape(shape, factor)
        scale = np.array([n / s for n, s in zip(lshape, shape)] + [trans_unit], np.float64).astype(dtype)
        data = pairs.at_level(factor, matrix=None, scale=pairs.broadcast(jnp.asarray(scale)), spacing=spacing)
        cfg = _Level("affine", model, metric, tuple(sorted(metric_options.items())), None, 0.0,
                     _level_optimizer(opts.optimizer, opts.affine_learning_rate, iters), iters, opts.tol, opts.window)
        params, hist = log.run_level(pairs, f"{model}@{factor}", params, data, cfg)
        log.level_done(f"{model}@{factor}", hist, t0, params)
    full_scale = jnp.asarray(np.array([1.0] * ndim + [trans_unit]).astype(dtype))
    return pairs.per_pair(_level_matrix, model=model)(params, pairs.broadcast(full_scale), spacing)


def _deformable_stage(pairs: _Pairs, opts: RegisterOptions, matrix, initial_disp, log: _Log):
    """``(u, velocity)``: the displacement (fixed-grid voxels, applied before ``matrix``) of ``opts.deformable``,
    optimised coarse to fine over ``levels`` from ``initial_disp`` (or zeros), and the stationary velocity of "svf"
    (else zeros). Each level optimises a correction on top of ``base``, the previous levels' field."""
    shape, ndim, dtype, model = pairs.shape, pairs.ndim, pairs.dtype, opts.deformable
    velocity = zeros = pairs.broadcast(jnp.zeros(shape + (ndim,), dtype))
    base = zeros if initial_disp is None else jnp.asarray(initial_disp, dtype)
    if model is None:
        return base, velocity
    bspline = model == "bspline"
    spacing = _one_per(opts.bspline_spacing, ndim)
    metric_options = tuple(sorted((opts.metric_options or {}).items()))
    for factor, iters in zip(opts.levels, _one_per(opts.iterations, len(opts.levels))):
        t0 = time.perf_counter()
        lshape = spatial.level_shape(shape, factor)
        d = np.array([n / s for n, s in zip(lshape, shape)]).astype(dtype)
        base = pairs.per_pair(spatial.resize_disp, shape=lshape)(base)
        data = pairs.at_level(factor, matrix=_rescale_matrix(matrix, d), base=base)
        if bspline:
            params = pairs.broadcast(jnp.zeros(transforms.bspline_grid_shape(shape, spacing) + (ndim,), dtype))
        else:
            params = base if model == "diffeo" else jnp.zeros_like(base)
        cfg = _Level("deformable", model, opts.metric, metric_options, opts.regularizer, opts.reg_weight,
                     _level_optimizer(opts.optimizer, opts.learning_rate, iters), iters, opts.tol, opts.window,
                     spacing if bspline else None, shape if bspline else None, opts.steps, opts.field_sigma)
        params, hist = log.run_level(pairs, f"{model}@{factor}", params, data, cfg)
        u, dense = pairs.per_pair(_field, cfg=cfg)(params, base)
        base = u if dense is None else dense  # the dense displacement (disp, bspline, diffeo) or velocity (svf)
        log.level_done(f"{model}@{factor}", hist, t0, base)
    base = pairs.per_pair(spatial.resize_disp, shape=shape)(base)
    if model == "svf":
        return pairs.per_pair(spatial.integrate_velocity, steps=opts.steps)(base), base
    return base, velocity


def _foreground(image) -> np.ndarray:
    """Host boolean foreground of ``image`` (batch axes included): above 10 % of its 1st–99th percentile range."""
    low, high = np.percentile(image, [1, 99])
    return image > low + 0.1 * (high - low)


def _crop_box(pairs: _Pairs, matrix) -> tuple[slice, ...] | None:
    """The fixed-grid box of the deformable stage (``RegisterOptions.crop``), or None for the whole grid: the
    bounding box of the fixed foreground and the moving foreground pulled through ``matrix`` (over every pair of a
    batch), grown by ``CROP_MARGIN`` per side, rounded up to a multiple of ``CROP_MULTIPLE`` and kept inside the
    grid (host computation after the parametric stage)."""
    shape, lead = pairs.shape, 1 if pairs.batched else 0
    disp = pairs.per_pair(spatial.affine_to_disp, shape=shape)(matrix)
    moving = pairs.moving if pairs.moving_mask is None else pairs.moving_mask
    pulled = np.asarray(pairs.pulled(moving, disp))
    fixed = np.asarray(pairs.fixed if pairs.fixed_mask is None else pairs.fixed_mask)
    fg = (fixed > 0 if pairs.fixed_mask is not None else _foreground(fixed))
    fg = fg | (pulled > 0.5 if pairs.moving_mask is not None else _foreground(pulled))
    fg = fg.reshape((-1,) + shape).any(axis=0) if lead else fg
    hit = np.argwhere(fg)
    if not hit.size:
        return None
    box = []
    for n, first, last in zip(shape, hit.min(axis=0), hit.max(axis=0)):
        margin = int(np.ceil(CROP_MARGIN * n))
        lo, hi = max(int(first) - margin, 0), min(int(last) + 1 + margin, n)
        size = min(n, -(-(hi - lo) // CROP_MULTIPLE) * CROP_MULTIPLE)
        lo = min(max(lo - (size - (hi - lo)) // 2, 0), n - size)
        box.append(slice(lo, lo + size))
    return None if all(b.stop - b.start == n for b, n in zip(box, shape)) else tuple(box)


def _recentre(matrix, box, shape):
    """``matrix`` (about the centre ``c`` of ``shape``) as a matrix of the box's voxels about the box's centre
    ``c_b``: the same ``A``, translation ``t + (A - I) d`` with ``d = c_b + start - c``."""
    nd = len(shape)
    d = jnp.asarray([(b.stop - b.start - 1) / 2 + b.start - (n - 1) / 2 for b, n in zip(box, shape)], matrix.dtype)
    a = matrix[..., :nd, :nd] - jnp.broadcast_to(jnp.eye(nd, dtype=matrix.dtype), matrix.shape[:-2] + (nd, nd))
    return matrix.at[..., :nd, nd].add(jnp.einsum("...ij,j->...i", a, d))


def _uncrop(field, box, shape, batched):
    """A field ``(*box shape, C)`` computed on ``box`` back on the whole grid ``shape``: outside the box it
    continues its border values (continuous, so no fold is made at the box's faces)."""
    pad = [(b.start, n - b.stop) for b, n in zip(box, shape)]
    return jnp.pad(field, ([(0, 0)] if batched else []) + pad + [(0, 0)], mode="edge")


def _warn_if_folded(matrix, ndim: int) -> None:
    """A ``RuntimeWarning`` when the parametric transform (``(..., ndim+1, ndim+1)``, one per pair) has a linear
    part with determinant <= 0: a reflection or a collapse, which no anatomy needs (the images' similarity was
    optimised somewhere meaningless, e.g. MI across modalities from a poor start)."""
    det = np.linalg.det(np.asarray(matrix, np.float64)[..., :ndim, :ndim])
    bad = np.flatnonzero(np.atleast_1d(det) <= 0)
    if bad.size:
        which = f" (pairs {bad.tolist()} of the batch)" if np.ndim(det) else ""
        warnings.warn(f"the parametric stage returned a reflection or collapse, determinant "
                      f"{np.atleast_1d(det)[bad].round(3).tolist()}{which}: the result is not an anatomical "
                      f"alignment; try another start (init), a rigid or similarity transform, or another "
                      f"affine_metric", RuntimeWarning, stacklevel=3)


def _register(fixed, moving, opts: RegisterOptions, *, batched, fixed_mask, moving_mask, moving_grid, spacing,
              initial_disp, initial_matrix, callback, progress=None) -> Result:
    pairs = _checked_pairs(fixed, moving, fixed_mask, moving_mask, moving_grid, spacing, batched=batched)
    _check_setup(pairs, opts, initial_disp, initial_matrix)
    log = _Log(callback, progress)
    matrix = _parametric_stage(pairs, opts, initial_matrix, log)
    _warn_if_folded(matrix, pairs.ndim)
    box = _crop_box(pairs, matrix) if opts.crop and opts.deformable else None
    if box is None:
        u, velocity = _deformable_stage(pairs, opts, matrix, initial_disp, log)
    else:  # the box's voxels x_box = x - start, its points y_box = y - start (the moving grid adds the start back)
        lead = (slice(None),) if batched else ()
        start = None if initial_disp is None else jnp.asarray(initial_disp)[lead + box]
        u, velocity = _deformable_stage(pairs.cropped(box), opts, _recentre(matrix, box, pairs.shape), start, log)
        u, velocity = (_uncrop(f, box, pairs.shape, batched) for f in (u, velocity))
    disp = pairs.per_pair(spatial.compose_affine)(matrix, u)
    warped = pairs.pulled(pairs.moving, disp)
    return Result(matrix, disp, warped, velocity, log.history, log.seconds)


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(RegisterOptions))


def instance_options(iterations: int, preset: str | RegisterOptions = "default", *,
                     levels: tuple = (1,)) -> RegisterOptions:
    """Instance optimisation of a given field (``register(..., initial_disp=...)``, e.g. a network's): ``iterations``
    steps at full resolution with ``preset``'s (a key of ``PRESETS`` or a ``RegisterOptions``) similarity,
    regulariser and step size, and its deformable model when that is dense (greedy ``"diffeo"`` updates composed
    onto the field, or ``"disp"``; else ``"disp"``); no parametric stage, no crop. ``levels=(2, 1)``: ``iterations`` steps at half resolution first, then
    ``iterations // 2`` at full resolution (each level halves the count of the one before)."""
    base = preset if isinstance(preset, RegisterOptions) else PRESETS[preset]
    model = base.deformable if base.deformable in ("disp", "diffeo") else "disp"
    counts = tuple(max(1, int(iterations) >> i) for i in range(len(levels)))
    return dataclasses.replace(base, transform=None, init=None, deformable=model, levels=tuple(levels),
                               iterations=counts, crop=False)


def with_overrides(options: RegisterOptions | None, overrides: dict) -> RegisterOptions:
    """``options`` (default ``RegisterOptions()``) with the fields named in ``overrides`` replaced."""
    if options is None:
        options = RegisterOptions()
    elif not isinstance(options, RegisterOptions):
        raise TypeError(f"options must be a RegisterOptions (e.g. PRESETS['default']), got {type(options).__name__}; "
                        "single fields go as keywords, e.g. register(fixed, moving, metric='mi')")
    unknown = sorted(set(overrides) - _OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid options (RegisterOptions fields): "
                         f"{sorted(_OPTION_NAMES)}")
    return dataclasses.replace(options, **overrides) if overrides else options


def register(fixed: ArrayLike, moving: ArrayLike, *, options: RegisterOptions | None = None,
             fixed_mask: ArrayLike | None = None, moving_mask: ArrayLike | None = None,
             moving_grid: ArrayLike | None = None, spacing: ArrayLike | None = None,
             initial_disp: ArrayLike | None = None, initial_matrix: ArrayLike | None = None,
             callback: Callable[[str, jax.Array], Any] | None = None,
             progress: Callable[[str, int, int, float], Any] | None = None, **overrides) -> Result:
    """Register ``moving`` onto ``fixed`` (``(*spatial)`` float, 2-D or 3-D); returns a ``Result``.

    The images share one grid unless ``moving_grid`` says how the moving image's own grid lies: then the moving
    image (and its mask) keep their shape and are sampled through ``moving_grid`` at every level, so nothing outside
    the fixed field of view is lost and every result is interpolated once.

    options: the settings, a ``RegisterOptions`` [``RegisterOptions()``; see also ``PRESETS``].
    overrides: ``RegisterOptions`` fields by name replacing those of ``options``, e.g.
      ``register(f, m, options=PRESETS["affine"], iterations=(10,))``; an unknown name is a ``ValueError``. Only the
      named fields change: another ``metric`` keeps ``options.metric_options`` unless that is replaced too.
    fixed_mask, moving_mask: weights on their image's grid; the similarity is computed where both are > 0 [None].
    moving_grid: ``(ndim+1, ndim+1)`` homogeneous matrix from fixed voxel indices to moving voxel indices, e.g.
      ``inv(moving_affine) @ fixed_affine`` for NIfTI affines [None: the moving image lies on the fixed grid]. The
      transform stays in fixed-grid voxels: ``Result.disp`` is a fixed-grid displacement and the moving image is
      sampled at ``moving_grid @ [x + disp(x), 1]`` (``pull``); the world map follows as
      ``fixed_affine ∘ (x ↦ x + disp(x)) ∘ inv(fixed_affine)``.
    spacing: ``(ndim,)`` fixed voxel size in mm: the parametric stage is then parametrised in millimetres, so a
      rigid or similarity transform stays rigid on anisotropic voxels and translations are steps in mm (the world
      call ``jaxreg.world.register_images`` passes it) [None: voxel units, as for isotropic images].
    initial_disp: ``(*spatial, ndim)`` deformable field (fixed-grid voxels) to start from, e.g. instance
      optimisation of a network's output; applied before the matrix [None].
    initial_matrix: ``(ndim+1, ndim+1)`` matrix about the grid centre used when ``transform`` is None [None].
    callback: ``callback(stage_level_name, loss_history)`` after each level [None].
    progress: ``progress(stage_level_name, iteration, max_iterations, loss)`` during each level, every
      ``PROGRESS_EVERY`` iterations and when it converges, e.g. progress bars (one pair; the compiled loop runs in
      chunks between the calls, the same program as without ``progress``) [None].

    Raises ``ValueError`` naming the argument or option before anything is compiled: bad images or masks, invalid
    options, or a pyramid level that leaves fewer than ``MIN_LEVEL_SIZE`` voxels along an axis of the image.
    """
    opts = with_overrides(options, overrides)
    return _register(fixed, moving, opts, batched=False, fixed_mask=fixed_mask, moving_mask=moving_mask,
                     moving_grid=moving_grid, spacing=spacing, initial_disp=initial_disp,
                     initial_matrix=initial_matrix, callback=callback, progress=progress)


def register_batch(fixed: ArrayLike, moving: ArrayLike, *, options: RegisterOptions | None = None,
                   fixed_mask: ArrayLike | None = None, moving_mask: ArrayLike | None = None,
                   moving_grid: ArrayLike | None = None, spacing: ArrayLike | None = None,
                   initial_disp: ArrayLike | None = None, initial_matrix: ArrayLike | None = None,
                   callback: Callable[[str, jax.Array], Any] | None = None, **overrides) -> Result:
    """``register`` for a batch ``(B, *spatial)`` of same-shaped pairs, one compiled ``vmap`` program per level.

    Arguments as ``register``; masks, ``moving_grid``, ``initial_disp`` and ``initial_matrix`` carry the batch axis
    too (the moving images share one shape). Every field of the result has a leading batch axis.
    """
    opts = with_overrides(options, overrides)
    return _register(fixed, moving, opts, batched=True, fixed_mask=fixed_mask, moving_mask=moving_mask,
                     moving_grid=moving_grid, spacing=spacing, initial_disp=initial_disp, initial_matrix=initial_matrix, callback=callback)
