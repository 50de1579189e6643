"""Per-voxel uncertainty of a found registration: how far the map ``T`` could move at each fixed voxel.

    reg = jaxreg.register_images(fixed, moving, preset="default")
    sd = uncertainty.estimate(reg, method="laplace")            # (*S_fixed,) float32, mm
    sd = uncertainty.ensemble(reg, members=8)                    # the same shape and unit, another estimator
    uncertainty.error_auc(sd, warped_labels != fixed_labels, mask=fixed_labels > 0)   # how well it ranks errors

Both estimators return a standard deviation map on the fixed grid, ``(*S_fixed)`` float32 in mm, finite and >= 0:
the square root of the trace of the per-voxel covariance of the displacement, ``sqrt(Σ_d (spacing_d sd_d)²)``,
``sd_d`` the standard deviation of component ``d`` (fixed-grid voxels) of ``Registration.disp`` and ``spacing`` the
fixed voxel size (exact for orthogonal voxel axes, i.e. any NIfTI without shear). Direction: the displacement is
the pull map's, fixed voxel ``x`` to its moving position (``optimize``'s convention).

* ``ensemble``: test-time ensemble of the classical engine. ``members`` instance optimisations at full resolution
  (one compiled ``vmap`` program, ``optimize.register_batch``), each started from the found deformable field plus its
  own random smooth perturbation, with the registration's own similarity, regulariser and step size; the spread of
  where they end. Where the images pin the map down the members return to one answer; where they carry no
  information (flat intensity, no edge) only the regulariser acts and the members keep apart. The scale is that of
  the perturbation (``amplitude``) and of the optimiser's budget (``iterations``).
* ``laplace``: Laplace approximation at the found optimum. The objective, written per voxel (mean-based losses times
  the voxel count ``N``), ``E(u) = N sim(fixed, moving ∘ (M_c (x + u))) + N reg_weight R(u)`` over the deformable part
  ``u`` (fixed voxels; ``M_c`` the parametric stage), is approximated by a Gaussian of precision ``diag(∇²E)``, the
  Hessian's diagonal estimated by Hutchinson's estimator (``probes`` Rademacher vectors ``z``: ``mean(z ⊙ Hz)``, each
  ``Hz`` a forward-over-reverse Hessian-vector product, ``jax.jvp`` of ``jax.grad``, all in one compiled program).
  Variance ``temperature σ²(x) / diag``, with ``σ²(x)`` the likelihood's noise variance estimated per voxel from the
  found registration's residual (``noise="local"``: the smoothed squared difference of the fixed and warped images,
  an empirical-Bayes choice: where the images still disagree the data pin the map down less) or 1 (``noise="none"``:
  the curvature alone). On real Mindboggle pairs the curvature alone ranked label-transfer errors below chance (AUC
  0.43: it is largest in flat regions, where labels are right); with the local noise 0.59–0.65 on the pairs that
  chose ``noise_sigma`` (BENCHMARKS.md). The scale is **relative**: ``E`` is no calibrated negative log-likelihood,
  so compare maps of one registration, rank voxels, or calibrate ``temperature`` on data with known errors. The diagonal (mean-field) precision ignores the correlations the
  regulariser brings: where the similarity is flat it gives the prior's local precision, not the (larger) marginal
  variance of a smooth field.

Inputs are the ``world.Registration`` of ``world.register_images`` (or ``atlas.Model.register``): its images (the
moving one on its own grid through ``Registration.grid``), its field and its ``RegisterOptions``. Masks given to
``register_images`` are not stored there and are not used; the images are normalised as ``register_images`` does by
default (``normalize=False`` when it was called with ``normalize=False``).

``error_auc`` and ``spearman`` score a map against observed errors (host NumPy, float64, rank-based with ties
averaged).
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from jaxreg import losses, optimize, spatial, world
from jaxreg.data import preprocess

METHODS = ("laplace", "ensemble")
#: ``laplace``'s likelihood noise: "local" (estimated per voxel from the residual, ``local_noise``) or "none" (1)
NOISE = ("local", "none")
#: ``laplace``: the per-entry precision is kept above this fraction of its mean (a small positive floor: a voxel with
#: no curvature at all gets a large, finite variance, never an infinite one) ...
PRECISION_FLOOR = 1e-6
#: ... and above this absolute value (every precision 0: no regulariser and no image information anywhere)
PRECISION_MIN = 1e-20


# ------------------------------------------------------------------------------------------------------ checks
def _registration(reg) -> world.Registration:
    if not isinstance(reg, world.Registration):
        raise ValueError(f"reg must be a jaxreg.world.Registration (the result of register_images), got "
                         f"{type(reg).__name__}")
    return reg


def _int(name, value, low) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _real(name, value, low, strict) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or not (value > low if strict else value >= low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------------ shared parts
def _images(reg: world.Registration, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """The fixed and moving arrays as the engine saw them: float32, robustly scaled to [0, 1] with ``normalize``."""
    f, m = (np.asarray(v.data, np.float32) for v in (reg.fixed, reg.moving))
    if normalize:
        f, m = preprocess.normalize(f), preprocess.normalize(m)
    return f, m


def _deformable_part(reg: world.Registration) -> np.ndarray:
    """``u (*S, ndim)`` float32 fixed voxels with ``disp = compose_affine(matrix, u)``:
    ``u = A⁻¹ (x + disp - c - t) + c - x`` (``matrix = [A t]`` about the grid centre ``c``)."""
    nd, shape = reg.fixed.ndim, reg.fixed.shape
    a, t = np.asarray(reg.matrix, np.float64)[:nd, :nd], np.asarray(reg.matrix, np.float64)[:nd, nd]
    c = (np.asarray(shape, np.float64) - 1) / 2
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    y = x + np.asarray(reg.disp, np.float64)
    return ((y - c - t) @ np.linalg.inv(a).T + c - x).astype(np.float32)


def _sd_mm(variance: np.ndarray, spacing) -> np.ndarray:
    """Per-axis variances ``(*S, ndim)`` (fixed voxels²) as ``sqrt(Σ_d spacing_d² var_d)``: ``(*S)`` float32 mm."""
    var = np.maximum(np.nan_to_num(np.asarray(variance, np.float64), nan=0.0, posinf=np.finfo(np.float32).max), 0)
    sd = np.sqrt(np.sum(var * np.square(np.asarray(spacing, np.float64)), axis=-1))
    return np.minimum(sd, np.finfo(np.float32).max).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ ensemble
def perturbations(shape, *, members: int, amplitude: float, smoothness: float, seed: int = 0) -> np.ndarray:
    """``members`` random smooth fields ``(members, *shape, ndim)`` float32 in voxels: white Gaussian noise blurred
    by a Gaussian of sigma ``smoothness`` voxels, each component of each member scaled to an RMS of ``amplitude``
    voxels (NumPy generator seeded by ``seed``)."""
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    noise = np.random.default_rng(seed).standard_normal((members, *shape, nd)).astype(np.float32)
    if smoothness > 0:
        noise = ndimage.gaussian_filter(noise, sigma=(0.0,) + (smoothness,) * nd + (0.0,), mode="reflect")
    rms = np.sqrt(np.mean(np.square(noise, dtype=np.float64), axis=tuple(range(1, nd + 1)), keepdims=True))
    return (noise * (amplitude / np.maximum(rms, 1e-12))).astype(np.float32)


def ensemble(reg: world.Registration, *, members: int = 8, iterations: int = 30, amplitude: float = 1.0,
             smoothness: float = 5.0, seed: int = 0, normalize: bool = True, return_mean: bool = False):
    """Test-time ensemble uncertainty of ``reg``: ``(*S_fixed)`` float32 mm (module docstring), and with
    ``return_mean`` also the members' mean displacement ``(*S_fixed, ndim)`` float32 (fixed voxels, as
    ``Registration.disp``).

    Each of the ``members`` runs ``iterations`` steps of the engine at full resolution (``optimize.instance_options`` of
    ``reg.options``) from ``u + p_k``: ``u`` the found deformable field (before the parametric matrix, which stays
    fixed: ``initial_matrix``), ``p_k`` a random smooth perturbation (``perturbations``: RMS ``amplitude`` voxels per
    component, Gaussian ``smoothness`` sigma in voxels; keep ``amplitude / smoothness`` well below 1 so that the
    starts do not fold). The default amplitude stays within the capture range of a window-5 LNCC: on a fine 2-D
    texture, 2 voxels sent the members into other minima and the textured half came out more uncertain than the
    flat one. All members are one ``optimize.register_batch`` call (one compiled ``vmap`` program; its
    memory grows with ``members``). Returns the per-voxel sample standard deviation (``ddof=1``) of the members'
    final displacements. ``seed`` (int) draws the perturbations; ``normalize``: as ``register_images``'.

    Raises ``ValueError`` naming the argument before anything is compiled (``reg`` not a Registration,
    ``members`` < 2, ``iterations`` < 1, ``amplitude`` <= 0, ``smoothness`` < 0).
    """
    reg = _registration(reg)
    members = _int("members", members, 2)
    iterations = _int("iterations", iterations, 1)
    amplitude = _real("amplitude", amplitude, 0, True)
    smoothness = _real("smoothness", smoothness, 0, False)
    seed = _int("seed", seed, 0)
    opts = optimize.instance_options(iterations, reg.options)
    shape, nd = reg.fixed.shape, reg.fixed.ndim
    f, m = _images(reg, normalize)
    noise = perturbations(shape, members=members, amplitude=amplitude, smoothness=smoothness, seed=seed)
    start = _deformable_part(reg)[None] + noise
    batch = (members,)
    result = optimize.register_batch(
        np.broadcast_to(f, batch + f.shape), np.broadcast_to(m, batch + m.shape), options=opts,
        moving_grid=np.broadcast_to(reg.grid, batch + (nd + 1, nd + 1)), spacing=reg.fixed.spacing,
        initial_disp=start, initial_matrix=np.broadcast_to(np.asarray(reg.matrix, np.float32), batch + (nd + 1,) * 2))
    disp = np.asarray(jax.block_until_ready(result.disp), np.float64)
    sd = _sd_mm(np.var(disp, axis=0, ddof=1), reg.fixed.spacing)
    if return_mean:
        return sd, disp.mean(axis=0).astype(np.float32)
    return sd


# ------------------------------------------------------------------------------------------------------ laplace
@functools.partial(jax.jit, static_argnames=("metric", "metric_options", "regularizer", "probes"))
def _hessian_diagonal(u, fixed, moving, grid, matrix, reg_weight, key, *, metric, metric_options, regularizer,
                      probes):
    """Hutchinson estimates of ``diag ∇²`` of the similarity part and of the regulariser part of ``E`` at ``u``
    (each ``(*S, ndim)``): ``mean_k z_k ⊙ H z_k`` over ``probes`` Rademacher ``z_k``."""
    n = float(np.prod(fixed.shape))
    fn = metric if callable(metric) else losses.SIMILARITIES[metric]

    def similarity(v):
        return n * fn(fixed, optimize.pull(moving, spatial.compose_affine(matrix, v), grid), **dict(metric_options))

    def regulariser(v):
        return n * reg_weight * losses.REGULARIZERS[regularizer](v)

    def z_hz(energy, z):
        return z * jax.jvp(jax.grad(energy), (u,), (z,))[1]

    def body(carry, k):
        z = jax.random.rademacher(k, u.shape, dtype=u.dtype)
        sim, reg = carry
        sim = sim + z_hz(similarity, z)
        if regularizer is not None:
            reg = reg + z_hz(regulariser, z)
        return (sim, reg), None

    zeros = jnp.zeros_like(u)
    (sim, reg), _ = jax.lax.scan(body, (zeros, zeros), jax.random.split(key, probes))
    return sim / probes, reg / probes


def laplace(reg: world.Registration, *, probes: int = 16, seed: int = 0, temperature: float = 1.0,
            noise: str = "local", noise_sigma: float = 2.0, normalize: bool = True, return_precision: bool = False):
    """Laplace-approximation uncertainty of ``reg``: ``(*S_fixed)`` float32 mm (module docstring; a **relative**
    scale unless ``temperature`` is calibrated), and with ``return_precision`` also the per-entry precision of the
    deformable part ``(*S_fixed, ndim)`` float32 (1 / fixed voxels²).

    ``E(u)`` is ``reg.options``' deformable-stage objective written per voxel: ``N`` (the fixed voxel count) times
    ``metric(fixed, warped, **metric_options)`` with ``warped`` the moving image pulled through
    ``compose_affine(reg.matrix, u)`` on ``reg.grid`` (``optimize.pull``), plus ``N reg_weight regularizer(u)``.
    Its Hessian's diagonal at the found ``u`` is estimated from ``probes`` Hessian-vector products (Hutchinson,
    Rademacher probes drawn from ``jax.random.PRNGKey(seed)``; one compiled program), the similarity and the
    regulariser apart: a negative estimate of either (a saddle of the similarity, or probe noise) counts as no
    curvature, ``precision = max(H_sim, 0) + max(H_reg, 0)``, kept above ``PRECISION_FLOOR`` times its mean (and
    ``PRECISION_MIN``). The variance of ``u`` is ``temperature σ² / precision`` per component (``σ²``:
    ``local_noise(reg, ..., noise_sigma)`` voxels of smoothing for ``noise="local"``, 1 for ``"none"``); that of the
    displacement ``disp = A u + ...`` is ``Σ_j A_dj² var(u_j)``.

    Raises ``ValueError`` naming the argument before anything is compiled (``reg`` not a Registration, ``probes`` <
    1, ``temperature`` <= 0, ``noise`` not in ``NOISE``, ``noise_sigma`` < 0).
    """
    reg = _registration(reg)
    probes = _int("probes", probes, 1)
    seed = _int("seed", seed, 0)
    temperature = _real("temperature", temperature, 0, True)
    if noise not in NOISE:
        raise ValueError(f"noise must be one of {list(NOISE)}, got {noise!r}")
    noise_sigma = _real("noise_sigma", noise_sigma, 0, False)
    opts, nd = reg.options, reg.fixed.ndim
    f, m = _images(reg, normalize)
    regularizer = opts.regularizer if opts.reg_weight > 0 else None
    sim, prior = _hessian_diagonal(
        jnp.asarray(_deformable_part(reg), jnp.float32), jnp.asarray(f, jnp.float32), jnp.asarray(m, jnp.float32),
        jnp.asarray(reg.grid, jnp.float32), jnp.asarray(reg.matrix, jnp.float32), jnp.float32(opts.reg_weight),
        jax.random.PRNGKey(seed), metric=opts.metric, metric_options=tuple(sorted((opts.metric_options or {}).items())),
        regularizer=regularizer, probes=probes)
    sim, prior = (np.nan_to_num(np.asarray(v, np.float64), nan=0.0, posinf=0.0, neginf=0.0) for v in (sim, prior))
    precision = np.maximum(sim, 0) + np.maximum(prior, 0)
    precision = np.maximum(precision, max(PRECISION_FLOOR * float(precision.mean()), PRECISION_MIN))
    a2 = np.square(np.asarray(reg.matrix, np.float64)[:nd, :nd])
    scale = temperature * (local_noise(reg, f, m, noise_sigma)[..., None] if noise == "local" else 1.0)
    variance = (scale / precision) @ a2.T
    sd = _sd_mm(variance, reg.fixed.spacing)
    if return_precision:
        return sd, precision.astype(np.float32)
    return sd


def local_noise(reg: world.Registration, fixed: np.ndarray, moving: np.ndarray, sigma: float) -> np.ndarray:
    """The likelihood's noise variance per voxel, estimated from the found registration's residual: the squared
    difference of ``fixed`` and ``moving`` pulled through ``reg`` (both as the engine saw them, ``(*S_fixed)`` and
    ``(*S_moving)``), Gaussian-smoothed with sigma ``sigma`` voxels, kept above 1 % of its mean (and 1e-8):
    ``(*S_fixed)`` float64 (intensity units²)."""
    warped = np.asarray(optimize.pull(jnp.asarray(moving, jnp.float32), jnp.asarray(reg.disp, jnp.float32),
                                      jnp.asarray(reg.grid, jnp.float32)), np.float64)
    r2 = np.square(np.asarray(fixed, np.float64) - warped)
    if sigma > 0:
        r2 = ndimage.gaussian_filter(r2, sigma)
    return np.maximum(r2, max(0.01 * float(r2.mean()), 1e-8))


def estimate(reg: world.Registration, *, method: str = "laplace", **options) -> np.ndarray:
    """Uncertainty of ``reg`` by ``method`` (one of ``METHODS``: ``"laplace"`` or ``"ensemble"``): ``(*S_fixed)``
    float32 mm. ``options`` are that estimator's keywords (``laplace``, ``ensemble``); an unknown ``method`` is a
    ``ValueError`` before anything else."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return {"laplace": laplace, "ensemble": ensemble}[method](reg, **options)


# ------------------------------------------------------------------------------------------------------ scoring
def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given their average rank (float64)."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def _flat(name, value, shape, mask) -> np.ndarray:
    """``value`` as a 1-D array of the voxels of ``mask`` (all when None), checked to have ``shape``."""
    x = np.asarray(value)
    if x.shape != shape:
        raise ValueError(f"{name} must have the shape of the first argument {shape}, got {x.shape}")
    return x[mask] if mask is not None else x.ravel()


def _mask(mask, shape):
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask must have the shape of the first argument {shape}, got {mask.shape}")
    return mask.astype(bool)


def error_auc(uncertainty, error_mask, *, mask=None) -> float:
    """ROC AUC of ``uncertainty`` (any shape, e.g. ``(*S_fixed)``) as a score for ``error_mask`` (bool, the same
    shape; True where the registration is wrong): the probability that a wrong voxel has a higher uncertainty than
    a right one, ties counted half (Mann-Whitney U over average ranks). 1: every error ranked above every correct
    voxel, 0.5: chance, 0: reversed. ``mask`` (bool, the same shape) restricts the voxels (e.g. the fixed brain).
    Raises ``ValueError`` for shape mismatches, non-finite uncertainties, or when the voxels are all errors or all
    correct (the AUC is undefined)."""
    shape = np.shape(uncertainty)
    mask = _mask(mask, shape)
    u = _flat("uncertainty", uncertainty, shape, mask).astype(np.float64)
    err = _flat("error_mask", error_mask, shape, mask).astype(bool)
    if not np.isfinite(u).all():
        raise ValueError("uncertainty contains non-finite values")
    pos = int(err.sum())
    neg = err.size - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"error_mask must hold both errors and correct voxels (inside mask), got {pos} errors of "
                         f"{err.size}")
    return float((_ranks(u)[err].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def spearman(a, b, *, mask=None) -> float:
    """Spearman rank correlation of ``a`` and ``b`` (arrays of one shape, e.g. ``(*S_fixed)``; booleans count as 0/1)
    over the voxels of ``mask`` (bool, the same shape; all when None): Pearson's correlation of their average ranks,
    in [-1, 1]. 0 when either is constant there (no ranking to correlate). Raises ``ValueError`` for shape mismatches
    or non-finite values."""
    shape = np.shape(a)
    mask = _mask(mask, shape)
    x = _flat("a", a, shape, mask).astype(np.float64)
    y = _flat("b", b, shape, mask).astype(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must be finite")
    if x.size < 2:
        raise ValueError(f"spearman needs at least 2 voxels, got {x.size}")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    return float(np.sum(rx * ry) / den) if den > 0 else 0.0
