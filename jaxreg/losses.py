"""Similarity terms and regularisers for registration. Every function returns a 0-d array; lower is better.

Similarities: ``fn(fixed, warped, *, mask=None, **options) -> scalar``.

- ``fixed``, ``warped``: floating-point arrays of the same shape ``(*spatial)`` with 2 or 3 spatial axes, one
  channel (``mse`` also accepts a trailing channel axis ``(*spatial, C)``). ``warped`` is the moving image pulled
  onto the fixed grid. Integer dtypes, NaN/Inf values and shape mismatches raise ``ValueError``.
- ``mask``: optional ``(*spatial)`` bool or float weights in [0, 1]. The per-voxel loss is averaged with these weights,
  so only voxels with ``mask > 0`` count. A mask with no positive voxel gives an empty weighted mean, taken as 0 (the
  loss is then finite, with zero gradient: 0 for most terms, 1 for ``ngf``, 0 for ``dice_loss``).
- The result has the inputs' floating dtype (float32 in, float32 out); everything is differentiable with ``jax.grad``.

Regularisers: ``fn(u) -> scalar`` on a displacement field ``u`` of shape ``(*spatial, ndim)`` in voxel units.

Registries: ``SIMILARITIES`` (image similarities, all with the signature above) and ``REGULARIZERS``. Anything that
takes a similarity name (``optimize.RegisterOptions.metric``) also takes a callable with that signature: a learned
metric plugs in from its own module (``jaxreg.methods.learned_metric.metric``) without this module knowing of it.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxreg import _validate
from jaxreg.spatial import jacobian_determinant


# ------------------------------------------------------------------------------------------------------- helpers
def _images(fixed, warped, mask, *, channels: bool = False):
    """Validate an image pair (and mask); return them in one common floating dtype."""
    fixed = _validate.floating(fixed, "fixed")
    warped = _validate.floating(warped, "warped")
    _validate.same_shape(fixed, warped, "fixed", "warped")
    if not (fixed.ndim in (2, 3) or (channels and fixed.ndim == 4)):
        extra = ", optionally with a trailing channel axis" if channels else ""
        raise ValueError(
            f"fixed and warped must have shape (*spatial) with 2 or 3 spatial axes{extra}, got {fixed.shape}")
    _validate.finite(fixed, "fixed")
    _validate.finite(warped, "warped")
    dtype = jnp.result_type(fixed, warped)
    fixed, warped = fixed.astype(dtype), warped.astype(dtype)
    if mask is not None:
        mask = _mask(mask, fixed.shape, dtype, channels=channels and fixed.ndim > 2)
    return fixed, warped, mask


def _mask(mask, shape, dtype, *, channels: bool = False):
    """Validate a bool/float weight mask of ``shape`` (or ``shape[:-1]`` if ``channels``); return it as ``dtype``."""
    mask = jnp.asarray(mask)
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.floating)):
        raise ValueError(f"mask must be a bool or floating-point array of weights in [0, 1], got dtype {mask.dtype} "
                         f"with shape {mask.shape}")
    if mask.shape != tuple(shape):
        if not (channels and mask.shape == tuple(shape[:-1])):
            raise ValueError(f"mask must have shape {tuple(shape)}"
                             + (f" or {tuple(shape[:-1])}" if channels else "") + f", got {mask.shape}")
        mask = jnp.broadcast_to(mask[..., None], shape)
    _validate.finite(mask, "mask")
    if not isinstance(mask, jax.core.Tracer) and mask.size:
        lo, hi = float(jnp.min(mask)), float(jnp.max(mask))
        if lo < 0 or hi > 1:
            raise ValueError(f"mask values must lie in [0, 1], got range [{lo}, {hi}] with shape {mask.shape}")
    return mask.astype(dtype)


def _safe_div(num, den):
    """``num / den`` where ``den > 0``, else 0, with a zero (not NaN) gradient there."""
    pos = den > 0
    return jnp.where(pos, num / jnp.where(pos, den, 1), 0)


def _wmean(x, mask):
    """Mean of ``x`` weighted by ``mask`` (plain mean without one); 0 when the weights sum to 0."""
    if mask is None:
        return jnp.mean(x)
    return _safe_div(jnp.sum(x * mask), jnp.sum(mask))


def _odd_sizes(size, ndim: int, name: str) -> tuple[int, ...]:
    sizes = (size,) * ndim if np.ndim(size) == 0 else tuple(size)
    if len(sizes) != ndim or any(int(k) != k or k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"{name} must be a positive odd int or {ndim} of them, got {size!r}")
    return tuple(int(k) for k in sizes)


def _box_sum(x, sizes):
    """Sum over a centred box of ``sizes`` on the leading ``len(sizes)`` axes, zeros outside (separable)."""
    for axis, k in enumerate(sizes):
        if k == 1:
            continue
        dims, pad = [1] * x.ndim, [(0, 0)] * x.ndim
        dims[axis], pad[axis] = k, (k // 2, k // 2)
        # a concrete (NumPy) init value keeps reduce_window differentiable when traced inside jit/scan
        x = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, dims, (1,) * x.ndim, pad)
    return x


def _box_count(shape, sizes, dtype):
    """Number of in-image voxels in each box of ``sizes``: ``(*shape)``, built as a broadcast product of small 1-D
    count vectors (a full-size constant array makes XLA:CPU's fused reductions several times slower)."""
    count = None
    for axis, (n, k) in enumerate(zip(shape, sizes)):
        i = np.arange(n)
        c = np.minimum(i + k // 2, n - 1) - np.maximum(i - k // 2, 0) + 1
        c = jnp.asarray(c.reshape([n if a == axis else 1 for a in range(len(shape))]), dtype)
        count = c if count is None else count * c  # exact: integers below 2**24
    return jnp.broadcast_to(count, tuple(shape))


# ---------------------------------------------------------------------------------------------- intensity terms
def mse(fixed: ArrayLike, warped: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
    """Mean squared difference (SSD / number of voxels) between ``fixed`` and ``warped``, in intensity² units.

    Accepts ``(*spatial)`` or ``(*spatial, C)`` images; a ``(*spatial)`` mask then weights every channel.
    """
    fixed, warped, mask = _images(fixed, warped, mask, channels=True)
    return _wmean(jnp.square(fixed - warped), mask)


def ncc(fixed: ArrayLike, warped: ArrayLike, *, mask: ArrayLike | None = None, eps: float = 1e-8) -> jax.Array:
    """Negative global normalised cross-correlation, ``-cov(f, w) / sqrt(var f * var w + eps)``, in [-1, 1].

    ``fixed``, ``warped``: ``(*spatial)`` float (2-D or 3-D), ``mask``: ``(*spatial)`` weights; returns a 0-d array.

    Means, covariance and variances are mask-weighted. ``eps`` (intensity⁴ units) keeps constant images finite
    (value 0, finite gradient).
    """
    f, w, mask = _images(fixed, warped, mask)
    df, dw = f - _wmean(f, mask), w - _wmean(w, mask)
    cov, vf, vw = _wmean(df * dw, mask), _wmean(df * df, mask), _wmean(dw * dw, mask)
    return -cov / jnp.sqrt(vf * vw + eps)


def local_ncc(fixed: ArrayLike, warped: ArrayLike, *, window: int | Sequence[int] = 9, mask: ArrayLike | None = None,
              eps: float = 1e-5) -> jax.Array:
    """Negative mean squared local NCC over cubic windows (VoxelMorph's definition), in [-1, 0].

    ``fixed``, ``warped``: ``(*spatial)`` float (2-D or 3-D), ``mask``: ``(*spatial)`` weights; returns a 0-d array.
    ``window`` is in voxels.

    Per voxel, with sums over the ``window`` box (an odd int or one per axis) around it:
    ``cc = cross² / (var_f * var_w + eps)``, ``cross = Σfw - ΣfΣw/n``, ``var_f = Σf² - (Σf)²/n``; the loss is
    ``-mean(cc)`` (mask-weighted over voxels; windows still see unmasked neighbours). Box sums are separable
    ``lax.reduce_window`` sums of each of the five moments, zero-padded at the borders. Unlike VoxelMorph,
    ``n`` is the number of in-image voxels of each window (the full window size inside), so border windows are
    proper truncated windows and the loss is invariant to ``warped -> a * warped + b`` (a > 0) everywhere.
    Images are centred on their means first (exact, by that invariance) to limit float32 cancellation; variances
    are clamped at 0, so constant patches give cc = 0 with a finite gradient. ``eps`` is in intensity⁴ units.
    """
    f, w, mask = _images(fixed, warped, mask)
    sizes = _odd_sizes(window, f.ndim, "window")
    f, w = f - jnp.mean(f), w - jnp.mean(w)
    # One box sum per moment, each on a plain (*spatial) array: with the moments stacked on a trailing channel axis,
    # XLA:CPU's reduce-window passes ran several times slower (strided, not vectorised), and the backward of a stack
    # also filters the two fixed-only moments, whose cotangents a gradient w.r.t. warped does not need. Measured in
    # benchmarks/bench_losses.py (BENCHMARKS.md); results are unchanged.
    sf, sw, sff, sww, sfw = (_box_sum(x, sizes) for x in (f, w, f * f, w * w, f * w))
    n = _box_count(f.shape, sizes, f.dtype)
    cross = sfw - sf * sw / n
    var_f = jnp.maximum(sff - sf * sf / n, 0)
    var_w = jnp.maximum(sww - sw * sw / n, 0)
    return -_wmean(cross * cross / (var_f * var_w + eps), mask)


# ------------------------------------------------------------------------------------------- mutual information
def _bin_positions(x, mask, value_range, bins: int, name: str):
    """Map intensities to continuous bin coordinates in [0, bins - 1] (range under ``stop_gradient``)."""
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"{name}_range must be (lo, hi) with hi > lo, got {value_range!r}")
        lo, hi = jnp.asarray(lo, x.dtype), jnp.asarray(hi, x.dtype)
    else:
        lo, hi = jnp.min(x), jnp.max(x)
        if mask is not None:  # range within the mask, whole image when the mask is empty
            inside = mask > 0
            any_in = jnp.any(inside)
            lo, hi = (jnp.where(any_in, jnp.min(jnp.where(inside, x, hi)), lo),
                      jnp.where(any_in, jnp.max(jnp.where(inside, x, lo)), hi))
        lo, hi = lax.stop_gradient(lo), lax.stop_gradient(hi)
    span = jnp.where(hi > lo, hi - lo, jnp.ones((), x.dtype))
    t = (x - lo) * ((bins - 1) / span)
    return jnp.where(t < 0, 0, jnp.where(t > bins - 1, bins - 1, t))  # where (not clip): full gradient at the ends


def _parzen(t, bins: int, kernel: str, sigma: float):
    """Parzen weights of positions ``t`` (N,) on bin centres 0..bins-1: (N, bins), each row summing to 1."""
    d = (t[:, None] - jnp.arange(bins, dtype=t.dtype)[None, :]) / sigma
    if kernel == "bspline":
        a = jnp.abs(d)
        k = jnp.where(a < 1, 2 / 3 - a * a + a * a * a / 2, jnp.where(a < 2, (2 - a) ** 3 / 6, 0))
    else:
        k = jnp.exp(-0.5 * d * d)
    return _safe_div(k, jnp.sum(k, axis=1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _histogram_step(bins: int, kernel: str, sigma: float):
    """Scan body adding one chunk's ``Wf^T diag(m) Ww`` (cached, so eager calls reuse the compiled scan)."""

    @jax.checkpoint  # backward recomputes the (chunk, bins) weights instead of storing them for every chunk
    def step(hist, x):
        a, b, m = x
        wa = _parzen(a, bins, kernel, sigma) * m[:, None]
        wb = _parzen(b, bins, kernel, sigma)
        return hist + jnp.matmul(wa.T, wb, precision=lax.Precision.HIGHEST), None

    return step


def _joint_histogram(tf, tw, weights, bins: int, kernel: str, sigma: float, chunk: int):
    """Normalised joint histogram ``sum_i weights_i Wf_i^T Ww_i`` as chunked matrix products (bins, bins)."""
    n = tf.shape[0]
    step = _histogram_step(bins, kernel, sigma)
    zero = jnp.zeros((bins, bins), tf.dtype)
    if n <= chunk:  # one chunk: no loop
        hist, _ = step(zero, (tf, tw, weights))
    else:
        pad = (-n) % chunk
        xs = tuple(jnp.pad(v, (0, pad)).reshape(-1, chunk) for v in (tf, tw, weights))  # padded voxels weigh 0
        hist, _ = lax.scan(step, zero, xs)
    return _safe_div(hist, jnp.sum(hist))


def _entropy(p):
    """Shannon entropy (nats) of probabilities ``p``, with 0 log 0 = 0 and a finite gradient at 0."""
    pos = p > 0
    return -jnp.sum(jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1)), 0))


def mutual_information(fixed: ArrayLike, warped: ArrayLike, *, bins: int = 32, sigma: float | None = None,
                       kernel: str = "bspline", mask: ArrayLike | None = None, normalized: bool = False,
                       fixed_range: tuple[float, float] | None = None,
                       warped_range: tuple[float, float] | None = None, chunk_size: int = 65536) -> jax.Array:
    """Negative Parzen-window mutual information ``-(H(F) + H(W) - H(F, W))`` in nats (``-NMI`` if ``normalized``).

    ``fixed``, ``warped``: ``(*spatial)`` float (2-D or 3-D), ``mask``: ``(*spatial)`` weights; returns a 0-d array.

    Each image is mapped linearly to bin coordinates 0..bins-1 by its min and max (within the mask if given, under
    ``stop_gradient``) or by an explicit ``fixed_range``/``warped_range`` = (lo, hi) (values outside are put in the end
    bins). Each voxel spreads unit mass over the bins with a kernel of width ``sigma`` bins, renormalised over the
    bins: ``kernel="bspline"`` (default, compact) is the cubic B-spline scaled by ``sigma`` (default 1: support ±2 bins,
    standard deviation 0.58 bin); ``"gaussian"`` has standard deviation ``sigma`` (default 0.5). The joint histogram
    is ``W_f^T diag(mask) W_w`` of the (voxels, bins) weight matrices, summed over chunks of ``chunk_size`` voxels in
    a checkpointed ``lax.scan`` so memory stays O(chunk_size * bins) in value and gradient. NMI is
    ``(H(F) + H(W)) / H(F, W)`` in [1, 2]. An empty mask gives 0.
    """
    f, w, mask = _images(fixed, warped, mask)
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    if kernel not in ("bspline", "gaussian"):
        raise ValueError(f"kernel must be 'bspline' or 'gaussian', got {kernel!r}")
    sigma = (1.0 if kernel == "bspline" else 0.5) if sigma is None else float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (in bins), got {sigma!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    bins = int(bins)
    tf = _bin_positions(f, mask, fixed_range, bins, "fixed").ravel()
    tw = _bin_positions(w, mask, warped_range, bins, "warped").ravel()
    weights = jnp.ones_like(tf) if mask is None else mask.ravel()
    p = _joint_histogram(tf, tw, weights, bins, kernel, sigma, int(chunk_size))
    h_f, h_w, h_fw = _entropy(jnp.sum(p, axis=1)), _entropy(jnp.sum(p, axis=0)), _entropy(p)
    if normalized:
        return -_safe_div(h_f + h_w, h_fw)
    return -(h_f + h_w - h_fw)


def nmi(fixed: ArrayLike, warped: ArrayLike, *, bins: int = 32, sigma: float | None = None, kernel: str = "bspline",
        mask: ArrayLike | None = None, fixed_range: tuple[float, float] | None = None,
        warped_range: tuple[float, float] | None = None, chunk_size: int = 65536) -> jax.Array:
    """Negative normalised mutual information ``-(H(F) + H(W)) / H(F, W)``, in [-2, -1]; a 0-d array.

    ``fixed``, ``warped``: ``(*spatial)`` float (2-D or 3-D), ``mask``: ``(*spatial)`` weights; the options are
    ``mutual_information``'s.
    """
    return mutual_information(fixed, warped, normalized=True, bins=bins, sigma=sigma, kernel=kernel, mask=mask,
                              fixed_range=fixed_range, warped_range=warped_range, chunk_size=chunk_size)


# ------------------------------------------------------------------------------------------------ MIND and NGF
def _pair_matrix(ndim: int) -> np.ndarray:
    """MIND-SSC pairs of the 2*ndim neighbour offsets (+e0, -e0, +e1, ...) that are not opposite, as a
    (2*ndim, n_pairs) matrix of +1/-1 so that ``shifted @ A`` gives ``I(x + p) - I(x + q)`` for every pair."""
    pairs = [(i, j) for i, j in itertools.combinations(range(2 * ndim), 2) if i // 2 != j // 2]
    a = np.zeros((2 * ndim, len(pairs)))
    for k, (i, j) in enumerate(pairs):
        a[i, k], a[j, k] = 1, -1
    return a


def _shift_edge(x, axis: int, step: int):
    """``x[i + step]`` along ``axis`` with the edge value repeated beyond the border (same shape)."""
    n = x.shape[axis]
    step = max(-n, min(n, step))  # longer shifts see only the edge value
    if step >= 0:
        parts = [lax.slice_in_dim(x, step, n, axis=axis)] + [lax.slice_in_dim(x, n - 1, n, axis=axis)] * step
    else:
        parts = [lax.slice_in_dim(x, 0, 1, axis=axis)] * -step + [lax.slice_in_dim(x, 0, n + step, axis=axis)]
    return jnp.concatenate(parts, axis=axis)


def mind_ssc(image: ArrayLike, *, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> jax.Array:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013): ``(*spatial, 12)`` in 3-D, ``(*spatial, 4)`` in 2-D.

    The neighbourhood is the 2*ndim offsets ``±dilation`` voxels along each axis. For every pair of neighbours
    ``p, q`` that are not opposite (12 pairs in 3-D, 4 in 2-D; channel order: pairs (i, j), i < j, of the offsets
    listed as +axis0, -axis0, +axis1, ...), ``D_pq(x)`` is the mean of ``(I(y + p) - I(y + q))²`` over the patch
    ``|y - x| <= radius`` (edge-replicated image, patches truncated at the borders). The descriptor is
    ``exp(-(D - min_pairs D) / V)`` with ``V(x) = mean_pairs D`` clamped to [1e-3, 1e3] times its image mean, plus
    ``eps`` (intensity² units; makes constant images give all-ones descriptors). Values lie in (0, 1], same dtype.
    """
    img = _validate.floating(image, "image")
    if img.ndim not in (2, 3):
        raise ValueError(f"image must have shape (*spatial) with 2 or 3 spatial axes, got {img.shape}")
    _validate.finite(img, "image")
    if int(dilation) != dilation or dilation < 1 or int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be an int >= 0 and dilation an int >= 1, got {radius!r}, {dilation!r}")
    nd = img.ndim
    shifted = jnp.stack([_shift_edge(img, axis, sign * int(dilation)) for axis in range(nd) for sign in (1, -1)], -1)
    diff = jnp.tensordot(shifted, jnp.asarray(_pair_matrix(nd), img.dtype), axes=1, precision=lax.Precision.HIGHEST)
    sq = jnp.square(diff)
    sizes = (2 * int(radius) + 1,) * nd
    d = _box_sum(sq, sizes) / _box_count(img.shape, sizes, img.dtype)[..., None]
    v = jnp.mean(d, axis=-1, keepdims=True)
    v_mean = jnp.mean(v)
    v = jnp.clip(v, 1e-3 * v_mean, 1e3 * v_mean) + eps
    return jnp.exp(-(d - jnp.min(d, axis=-1, keepdims=True)) / v)


def mind_loss(fixed: ArrayLike, warped: ArrayLike, *, mask: ArrayLike | None = None, radius: int = 1,
              dilation: int = 2, eps: float = 1e-6) -> jax.Array:
    """Mean squared difference of MIND-SSC descriptors (averaged over the descriptor channels and masked voxels).

    ``fixed``, ``warped``: ``(*spatial)`` float (2-D or 3-D), ``mask``: ``(*spatial)`` weights; returns a 0-d array
    in [0, 1]. ``radius`` and ``dilation`` (voxels) are ``mind_ssc``'s.
    """
    f, w, mask = _images(fixed, warped, mask)
    opts = dict(radius=radius, dilation=dilation, eps=eps)
    return _wmean(jnp.mean(jnp.square(mind_ssc(f, **opts) - mind_ssc(w, **opts)), axis=-1), mask)


def ngf(fixed: ArrayLike, warped: ArrayLike, *, eps: float = 1e-3, mask: ArrayLike | None = None) -> jax.Array:
    """Normalised gradient fields (Haber & Modersitzki 2006): ``1 - mean((∇f·∇w)² / (|∇f|²_eps |∇w|²_eps))``.

    ``fixed``, ``warped``: ``(*spatial)`` float (2-D or 3-D), ``mask``: ``(*spatial)`` weights; returns a 0-d array.

    ``|∇f|²_eps = |∇f|² + eps²``; gradients are ``jnp.gradient`` (central inside, one-sided at the borders), in
    intensity per voxel, so ``eps`` is in those units (the edge level below which gradients count as noise). The
    result lies in [0, 1]; an empty mask gives 1.
    """
    f, w, mask = _images(fixed, warped, mask)
    gf = jnp.stack(jnp.gradient(f), axis=-1)
    gw = jnp.stack(jnp.gradient(w), axis=-1)
    dot = jnp.sum(gf * gw, axis=-1)
    nf, nw = jnp.sum(gf * gf, axis=-1) + eps**2, jnp.sum(gw * gw, axis=-1) + eps**2
    return 1 - _wmean(dot * dot / (nf * nw), mask)


def dice_loss(fixed_onehot: ArrayLike, warped_onehot: ArrayLike, *, mask: ArrayLike | None = None,
              eps: float = 1e-5) -> jax.Array:
    """Soft Dice loss on one-hot (or probabilistic) label maps ``(*spatial, K)``: ``1 - mean_k Dice_k``.

    ``Dice_k = (2 Σ m f_k w_k + eps) / (Σ m f_k + Σ m w_k + eps)``, sums over voxels weighted by ``mask``: a label
    absent from both maps counts as Dice 1 (so an empty mask gives 0). Include or drop the background channel at the
    call site.
    """
    f = _validate.floating(fixed_onehot, "fixed_onehot")
    w = _validate.floating(warped_onehot, "warped_onehot")
    _validate.same_shape(f, w, "fixed_onehot", "warped_onehot")
    if f.ndim not in (3, 4):
        raise ValueError(f"fixed_onehot and warped_onehot must have shape (*spatial, K) with 2 or 3 spatial axes, "
                         f"got {f.shape}")
    _validate.finite(f, "fixed_onehot")
    _validate.finite(w, "warped_onehot")
    dtype = jnp.result_type(f, w)
    f, w = f.astype(dtype), w.astype(dtype)
    axes = tuple(range(f.ndim - 1))
    if mask is not None:
        m = _mask(mask, f.shape, dtype, channels=True)
        f_m = f * m
    else:
        f_m, m = f, None
    inter = jnp.sum(f_m * w, axis=axes)
    total = jnp.sum(f_m, axis=axes) + jnp.sum(w if m is None else w * m, axis=axes)
    return 1 - jnp.mean((2 * inter + eps) / (total + eps))


# -------------------------------------------------------------------------------------------------- regularisers
def _checked_field(u, min_size: int):
    u = _validate.field(u, "u")
    if min(u.shape[:-1]) < min_size:
        raise ValueError(f"u needs at least {min_size} voxels along every spatial axis, got shape {u.shape}")
    return u


def diffusion(u: ArrayLike) -> jax.Array:
    """Diffusion energy ``Σ_axes mean (Σ_components (u[x + e_a] - u[x])²)``: forward differences, valid region.

    ``u``: ``(*spatial, ndim)`` in voxels. Each axis's squared forward differences are averaged over the voxels where
    they exist (no padding). Equals VoxelMorph's ``Grad('l2')`` times ndim² (it averages over axes and components).
    """
    u = _checked_field(u, 2)
    return sum(jnp.mean(jnp.sum(jnp.square(jnp.diff(u, axis=a)), axis=-1)) for a in range(u.ndim - 1))


def bending_energy(u: ArrayLike) -> jax.Array:
    """Bending energy ``mean Σ_c (Σ_a (∂²u_c/∂a²)² + 2 Σ_{a<b} (∂²u_c/∂a∂b)²)`` over interior voxels.

    ``u``: ``(*spatial, ndim)`` in voxels; second derivatives are central differences (``u[x+e] - 2u[x] + u[x-e]``
    and ``(u[x+a+b] - u[x+a-b] - u[x-a+b] + u[x-a-b]) / 4``), evaluated where all neighbours exist.
    """
    u = _checked_field(u, 3)
    nd = u.ndim - 1

    def at(*shift):  # u shifted by ``shift`` voxels, cropped to the interior
        off = [0] * nd
        for axis, s in shift:
            off[axis] += s
        return u[tuple(slice(1 + o, n - 1 + o) for o, n in zip(off, u.shape[:-1]))]

    centre = at()
    total = jnp.zeros(centre.shape[:-1], u.dtype)
    for a in range(nd):
        total = total + jnp.sum(jnp.square(at((a, 1)) - 2 * centre + at((a, -1))), axis=-1)
    for a, b in itertools.combinations(range(nd), 2):
        mixed = (at((a, 1), (b, 1)) - at((a, 1), (b, -1)) - at((a, -1), (b, 1)) + at((a, -1), (b, -1))) / 4
        total = total + 2 * jnp.sum(jnp.square(mixed), axis=-1)
    return jnp.mean(total)


def folding(u: ArrayLike) -> jax.Array:
    """Folding penalty ``mean(relu(-det J))`` with ``J`` the Jacobian of ``x -> x + u(x)``
    (``jaxreg.spatial.jacobian_determinant``); ``u``: ``(*spatial, ndim)`` in voxels. 0 for a fold-free field."""
    u = _checked_field(u, 2)
    return jnp.mean(jax.nn.relu(-jacobian_determinant(u)))


SIMILARITIES = {
    "mse": mse, "ssd": mse, "ncc": ncc, "lncc": local_ncc, "mi": mutual_information, "nmi": nmi,
    "mind": mind_loss, "ngf": ngf,
}
REGULARIZERS = {"diffusion": diffusion, "bending": bending_energy, "folding": folding}
