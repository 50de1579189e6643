"""Parametric transforms → homogeneous matrices and dense fields; B-spline free-form deformation; inversion.

Matrices are ``(ndim+1, ndim+1)`` homogeneous, in voxel units, and act about the grid centre as in
``spatial.affine_to_disp``: a fixed-grid point ``x`` maps to the moving point ``y = A (x - c) + t + c``. All parameter
vectors are zero at the identity, so an optimiser can start from zeros. Angles are in radians, translations in voxels.

| name          | 2-D parameters                       | 3-D parameters                                   |
| ------------- | ------------------------------------ | ------------------------------------------------ |
| translation   | (t0, t1)                             | (t0, t1, t2)                                     |
| rigid         | (angle, t0, t1)                      | (angle0, angle1, angle2, t0, t1, t2), Euler      |
| similarity    | rigid + (log_scale,)                 | rigid + (log_scale,)                             |
| affine        | (A - I).ravel() (4) + t (2)          | (A - I).ravel() (9) + t (3)                      |
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxreg import _validate
from jaxreg.spatial import warp


def _homogeneous(linear, translation):
    ndim = linear.shape[0]
    top = jnp.concatenate([linear, translation.reshape(ndim, 1)], axis=1)
    bottom = jnp.zeros((1, ndim + 1), linear.dtype).at[0, ndim].set(1)
    return jnp.concatenate([top, bottom], axis=0)


def _rotation(angles, ndim):
    if ndim == 2:
        c, s = jnp.cos(angles[0]), jnp.sin(angles[0])
        return jnp.stack([jnp.stack([c, -s]), jnp.stack([s, c])])
    mats = []
    for axis in range(3):  # rotation about array axis `axis`, applied in order 0, 1, 2
        c, s = jnp.cos(angles[axis]), jnp.sin(angles[axis])
        i, j = [a for a in range(3) if a != axis]
        m = jnp.eye(3, dtype=angles.dtype)
        m = m.at[i, i].set(c).at[i, j].set(-s).at[j, i].set(s).at[j, j].set(c)
        mats.append(m)
    return mats[2] @ mats[1] @ mats[0]


def translation(params: ArrayLike) -> jax.Array:
    """Translation ``params`` ``(ndim,)`` in voxels → homogeneous matrix ``(ndim+1, ndim+1)``.

    The matrix maps fixed-grid voxel positions to moving ones, ``y = x + t`` (module docstring).
    """
    params = _validate.floating(params, "params")
    ndim = params.shape[0]
    return _homogeneous(jnp.eye(ndim, dtype=params.dtype), params)


def rigid(params: ArrayLike) -> jax.Array:
    """Rotation then translation → homogeneous matrix ``(ndim+1, ndim+1)`` acting about the grid centre.

    ``params``: ``(3,)`` in 2-D ``(angle, t0, t1)`` or ``(6,)`` in 3-D ``(angle0, angle1, angle2, t0, t1, t2)``;
    angles in radians (3-D: rotations about array axes 0, 1, 2 applied in that order), translations in voxels.
    """
    params = _validate.floating(params, "params")
    ndim = {3: 2, 6: 3}.get(params.shape[0])
    if ndim is None:
        raise ValueError(f"rigid params must have 3 (2-D) or 6 (3-D) entries, got shape {params.shape}")
    n_ang = 1 if ndim == 2 else 3
    return _homogeneous(_rotation(params[:n_ang], ndim), params[n_ang:])


def similarity(params: ArrayLike) -> jax.Array:
    """Rigid parameters followed by a log isotropic scale → homogeneous matrix ``(ndim+1, ndim+1)``.

    ``params``: ``(4,)`` in 2-D, ``(7,)`` in 3-D (``rigid``'s then ``log_scale``; scale ``exp(log_scale)``, 1 at 0).
    """
    params = _validate.floating(params, "params")
    if params.shape[0] not in (4, 7):
        raise ValueError(f"similarity params must have 4 (2-D) or 7 (3-D) entries, got shape {params.shape}")
    m = rigid(params[:-1])
    ndim = m.shape[0] - 1
    scale = jnp.exp(params[-1])
    return m.at[:ndim, :ndim].multiply(scale)


def affine(params: ArrayLike) -> jax.Array:
    """``(A - I).ravel()`` followed by the translation (voxels) → homogeneous matrix ``(ndim+1, ndim+1)``.

    ``params``: ``(6,)`` in 2-D, ``(12,)`` in 3-D; the matrix maps fixed voxel ``x`` to ``A (x - c) + t + c``.
    """
    params = _validate.floating(params, "params")
    ndim = {6: 2, 12: 3}.get(params.shape[0])
    if ndim is None:
        raise ValueError(f"affine params must have 6 (2-D) or 12 (3-D) entries, got shape {params.shape}")
    linear = jnp.eye(ndim, dtype=params.dtype) + params[: ndim * ndim].reshape(ndim, ndim)
    return _homogeneous(linear, params[ndim * ndim:])


#: name -> (parameters → matrix, number of parameters for ndim = 2, 3)
PARAMETRIC = {
    "translation": (translation, {2: 2, 3: 3}),
    "rigid": (rigid, {2: 3, 3: 6}),
    "similarity": (similarity, {2: 4, 3: 7}),
    "affine": (affine, {2: 6, 3: 12}),
}


def num_params(name: str, ndim: int) -> int:
    """Number of parameters of a parametric transform in ``ndim`` dimensions."""
    if name not in PARAMETRIC:
        raise ValueError(f"unknown transform {name!r}; choose from {sorted(PARAMETRIC)}")
    return PARAMETRIC[name][1][ndim]


def to_matrix(name: str, params: ArrayLike) -> jax.Array:
    """Homogeneous matrix ``(ndim+1, ndim+1)`` of the parametric transform ``name`` (a key of ``PARAMETRIC``).

    ``params`` has shape ``(num_params(name, ndim),)`` (the table in the module docstring); zeros give the identity.
    """
    if name not in PARAMETRIC:
        raise ValueError(f"unknown transform {name!r}; choose from {sorted(PARAMETRIC)}")
    return PARAMETRIC[name][0](params)


def invert_matrix(matrix: ArrayLike) -> jax.Array:
    """Inverse of a homogeneous matrix ``(ndim+1, ndim+1)``: it maps moving voxel positions back to fixed ones, with
    the same centre convention (so ``affine_to_disp(invert_matrix(M), shape)`` pulls the other way)."""
    return jnp.linalg.inv(_validate.floating(matrix, "matrix"))


# ------------------------------------------------------------------------------------------- B-spline free-form
def bspline_grid_shape(shape: Sequence[int], spacing: float | Sequence[float]) -> tuple[int, ...]:
    """Control-grid shape for an image ``shape`` with control points every ``spacing`` voxels.

    Control point ``j`` sits at voxel ``(j - 1) * spacing``: one point before the first voxel and enough after the
    last so every voxel has its 4 supporting points.
    """
    spacing = (spacing,) * len(shape) if np.isscalar(spacing) else tuple(spacing)
    return tuple(int(math.floor((s - 1) / sp)) + 4 for s, sp in zip(shape, spacing))


def _bspline_matrix(size, grid_size, n_ctrl, spacing, dtype):
    """``(size, n_ctrl)`` cubic B-spline weights at the ``size`` voxel centres of a grid spanning ``grid_size`` voxels.

    Output voxel ``i`` sits at reference position ``p = (i + 0.5) * grid_size / size - 0.5`` (centres aligned) and
    control point ``j`` at ``(j - 1) * spacing``.
    """
    p = (np.arange(size) + 0.5) * grid_size / size - 0.5
    r = np.abs(p[:, None] / spacing + 1.0 - np.arange(n_ctrl)[None, :])
    w = np.where(r < 1, 2 / 3 - r**2 + r**3 / 2, np.where(r < 2, (2 - r) ** 3 / 6, 0.0))
    return jnp.asarray(w, dtype)


def bspline_to_disp(control: ArrayLike, shape: Sequence[int], spacing: float | Sequence[float], *,
                    grid_shape: Sequence[int] | None = None) -> jax.Array:
    """Dense displacement ``(*shape, ndim)`` of a cubic B-spline control grid ``(*bspline_grid_shape, ndim)``.

    The control grid is laid on the reference grid ``grid_shape`` (default ``shape``) with points every ``spacing``
    voxels, coefficients in reference voxels. The field is evaluated on ``shape``, a grid of the same extent (e.g. a
    pyramid level), and returned in that grid's voxels. One small matrix product per axis: cheap and exactly
    differentiable. The field pulls like any displacement: ``warp(moving, bspline_to_disp(...))``.
    """
    control = _validate.field(control, "control")
    ndim = control.shape[-1]
    shape = tuple(shape)
    grid_shape = shape if grid_shape is None else tuple(grid_shape)
    spacing = (spacing,) * ndim if np.isscalar(spacing) else tuple(spacing)
    expected = bspline_grid_shape(grid_shape, spacing)
    if control.shape[:-1] != expected:
        raise ValueError(f"control must have shape {expected + (ndim,)} for image {grid_shape} at spacing {spacing}, got {control.shape}")
    out = control
    for axis in range(ndim):
        b = _bspline_matrix(shape[axis], grid_shape[axis], control.shape[axis], spacing[axis], control.dtype)
        out = jnp.moveaxis(jnp.tensordot(b, out, axes=([1], [axis])), 0, axis)
    scale = np.array([s / g for s, g in zip(shape, grid_shape)]).astype(out.dtype)
    return out * scale.reshape((1,) * ndim + (ndim,))


# -------------------------------------------------------------------------------------------------------- inverse
def invert_disp(disp: ArrayLike, *, iterations: int = 30) -> jax.Array:
    """Approximate inverse field by fixed-point iteration ``v(x) = -u(x + v(x))``, ``(*spatial, ndim)`` voxels.

    Converges for fields whose Jacobian stays well away from zero (``|∇u| < 1``); then
    ``spatial.compose(u, v) ≈ 0``. Outside the grid ``u`` is extended by its border values.
    """
    disp = _validate.field(disp, "disp")

    def step(v, _):
        return -warp(disp, v, mode="nearest"), None

    v, _ = jax.lax.scan(step, -disp, None, length=iterations)
    return v


def matrix_about_centre_to_world(matrix: ArrayLike, shape: Sequence[int], fixed_affine: ArrayLike,
                                 moving_affine: ArrayLike) -> np.ndarray:
    """World (mm) ``(4, 4)`` float64 matrix mapping fixed world points to moving world points, from a voxel matrix.

    ``matrix`` ``(ndim+1, ndim+1)`` acts about the grid centre (see module docstring) on voxel indices of the grid
    ``shape`` (2-D or 3-D) shared by fixed and moving (the moving image has been resampled to the fixed grid); a 2-D
    matrix is embedded in 3-D. With voxel-to-world ``fixed_affine`` and ``moving_affine`` ``(4, 4)`` (mm per voxel,
    as in NIfTI), returns ``moving_affine @ T_vox @ inv(fixed_affine)``, computed on the host in NumPy.
    """
    m = np.asarray(matrix, np.float64)
    ndim = m.shape[0] - 1
    c = (np.asarray(shape, np.float64) - 1) / 2
    shift, unshift = np.eye(ndim + 1), np.eye(ndim + 1)
    shift[:ndim, ndim] = -c
    unshift[:ndim, ndim] = c
    t_vox = unshift @ m @ shift
    if ndim == 2:  # embed in 3-D
        t3 = np.eye(4)
        t3[:2, :2], t3[:2, 3] = t_vox[:2, :2], t_vox[:2, 2]
        t_vox = t3
    return np.asarray(moving_affine, np.float64) @ t_vox @ np.linalg.inv(np.asarray(fixed_affine, np.float64))

