"""Synthetic registration pairs with known answers (host-side NumPy, float32 images, int32 labels).

* :func:`synthetic_pair` — SynthMorph-style: a random smooth label map, random contrasts, a random smooth
  deformation plus a small affine, bias field and noise. Any 2-D or 3-D shape. Returns the ground-truth
  displacement in voxels, pull convention: ``fixed[x] ≈ moving[x + disp(x)]``.
* :func:`mni_pair` — realistic brain pairs built from nilearn's packaged MNI152 2009 template (T1 and GM/WM
  probability maps), moved by a random affine + smooth deformation, with the displacement that undoes it (pull
  convention, as above); T1 or T2-like moving contrast. Needs nilearn (``pip install jaxreg[data]``); the template
  is read from nilearn's package folder, offline.
* :func:`mni_slice_pair` — 2-D pairs from axial MNI152 slices with a known displacement (T1 or T2-like moving).

Randomness is NumPy's ``np.random.default_rng``; ``key`` may be an int seed, a ``np.random.Generator`` or a JAX
PRNG key (its key data seed the generator). Same key, same output.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import numpy as np
import scipy.ndimage as ndi
from scipy.interpolate import make_interp_spline

from .io import Volume, load
from .preprocess import _coords, crop_or_pad, downsample, normalize

__all__ = ["synthetic_pair", "mni_pair", "mni_slice_pair", "smooth_random_field"]


def _rng(key) -> np.random.Generator:
    """A NumPy generator from an int seed, a Generator, or a JAX PRNG key."""
    if isinstance(key, np.random.Generator):
        return key
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    try:
        import jax

        data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        words = np.asarray(data).astype(np.uint64).ravel().tolist()
    except Exception as err:
        raise TypeError(f"key must be an int seed, a np.random.Generator or a JAX PRNG key, got {type(key)}") from err
    return np.random.default_rng(words)


def _basis(n: int, spacing: float, x=None) -> np.ndarray:
    """``(len(x), m)`` Gaussian-RBF weights from the ``m`` control points of an ``n``-point axis (``spacing`` voxels
    apart, from ``-spacing``) to positions ``x`` in voxels (default: the grid points ``0 .. n - 1``).

    Rows have unit L2 norm, so i.i.d. unit-variance control values give unit-variance values.
    """
    spacing = max(float(spacing), 1e-3)
    m = int(np.ceil((n - 1) / spacing)) + 3
    centres = (np.arange(m) - 1.0) * spacing
    x = np.arange(n, dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / spacing) ** 2)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def _expand(values: np.ndarray, bases) -> np.ndarray:
    """Control values ``(m_0, .., m_{d-1}, C)`` through one ``(len_a, m_a)`` basis per axis: ``(len_0, .., C)``."""
    for axis, b in enumerate(bases):
        values = np.moveaxis(np.tensordot(b, values, axes=(1, axis)), 0, axis)
    return values


def smooth_random_field(key, shape, channels: int, *, spacing: float = 8.0) -> np.ndarray:
    """Smooth Gaussian random field ``(*shape, channels)`` float64, about unit variance per voxel and channel.

    I.i.d. normal values on a control grid ``spacing`` voxels apart are interpolated with separable Gaussian radial
    basis weights (width ``spacing``): features are about ``spacing`` voxels across.
    """
    rng = _rng(key)
    bases = [_basis(n, spacing) for n in shape]
    return _expand(rng.standard_normal(tuple(b.shape[1] for b in bases) + (channels,)), bases)


def _scaled_field(rng, shape, nd, spacing, max_norm) -> np.ndarray:
    """Smooth vector field ``(*shape, nd)`` whose largest vector length is ``max_norm``."""
    field = smooth_random_field(rng, shape, nd, spacing=spacing)
    peak = np.sqrt((field**2).sum(-1)).max()
    return field * (max_norm / peak) if max_norm > 0 and peak > 0 else np.zeros_like(field)


def _rotation(angles) -> np.ndarray:
    """Rotation matrix from one angle (2-D) or three angles about x, y, z (3-D), radians."""
    if len(angles) == 1:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    return rot


def _random_linear(rng, nd, max_rotation_deg, max_scaling) -> np.ndarray:
    """Random rotation @ anisotropic scaling, ``(nd, nd)``."""
    n_angles = 1 if nd == 2 else 3
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, n_angles))
    scales = 1.0 + rng.uniform(-max_scaling, max_scaling, nd)
    return _rotation(angles) @ np.diag(scales)


def _warp(data, coords, order):
    return ndi.map_coordinates(data, coords, order=order, mode="nearest" if order == 0 else "constant", cval=0.0)


def _render(rng, labels, means, *, blur, bias_scale, bias_spacing, noise_std) -> np.ndarray:
    """Label map -> image: per-label mean, blur, multiplicative smooth bias field, Gaussian noise, [0, 1] scaling."""
    img = means[labels].astype(np.float64)
    if blur > 0:
        img = ndi.gaussian_filter(img, blur, mode="nearest")
    if bias_scale > 0:
        img = img * np.exp(bias_scale * smooth_random_field(rng, labels.shape, 1, spacing=bias_spacing)[..., 0])
    if noise_std > 0:
        img = img + noise_std * rng.standard_normal(labels.shape)
    return normalize(img, lower=0.0, upper=100.0)


def synthetic_pair(
    key,
    *,
    shape=(64, 64),
    num_labels: int = 8,
    label_smoothness: float = 6.0,
    deform_scale: float = 3.0,
    deform_spacing: float = 8.0,
    affine_scale: float = 1.0,
    same_contrast: bool = True,
    blur: float = 0.5,
    bias_scale: float = 0.2,
    noise_std: float = 0.02,
) -> dict:
    """A random 2-D or 3-D pair with a known displacement (SynthMorph-style).

    A label map (argmax of ``num_labels`` smooth noise channels, features ``label_smoothness`` voxels across) is the
    moving anatomy. The fixed anatomy pulls it through ``x + disp(x)``, where ``disp`` combines a small random affine
    about the grid centre (rotation up to 5°, per-axis scaling ±5 %, translation ±2 voxels, all times
    ``affine_scale``) and a smooth random deformation (control spacing ``deform_spacing`` voxels, largest vector
    ``deform_scale`` voxels). Labels are warped nearest-neighbour (edge-replicated), so
    ``fixed_labels[x] == moving_labels[round(x + disp(x))]`` exactly. Each label map is then rendered with one
    random intensity per label (shared unless ``same_contrast=False``), blurred (``blur`` voxels), multiplied by a
    smooth bias field ``exp(bias_scale * field)``, given Gaussian noise (``noise_std``) and scaled to [0, 1].

    Args:
      key: int seed, ``np.random.Generator`` or JAX PRNG key; deterministic given the key.
      shape: spatial shape, 2 or 3 axes.

    Returns:
      dict with ``fixed``, ``moving``: ``shape`` float32 in [0, 1]; ``fixed_labels``, ``moving_labels``: ``shape``
      int32 in ``[0, num_labels)``; ``disp``: ``(*shape, ndim)`` float32 voxels, pull convention
      ``fixed[x] ≈ moving[x + disp(x)]``.
    """
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    if nd not in (2, 3) or min(shape) < 2:
        raise ValueError(f"synthetic_pair: shape must have 2 or 3 axes of size >= 2, got {shape}")
    if num_labels < 2:
        raise ValueError(f"synthetic_pair: num_labels must be >= 2, got {num_labels}")
    rng = _rng(key)

    moving_labels = smooth_random_field(rng, shape, num_labels, spacing=label_smoothness).argmax(-1).astype(np.int32)

    lin = _random_linear(rng, nd, 5.0 * affine_scale, 0.05 * affine_scale)
    shift = rng.uniform(-2.0, 2.0, nd) * affine_scale
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    matrix = np.eye(nd + 1)
    matrix[:nd, :nd] = lin
    matrix[:nd, nd] = centre - lin @ centre + shift
    coords = _coords(matrix, shape, shape)  # (nd, *shape) affine part of x + disp(x)
    coords += np.moveaxis(_scaled_field(rng, shape, nd, deform_spacing, deform_scale), -1, 0)
    disp = coords - np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))

    fixed_labels = _warp(moving_labels, coords, 0).astype(np.int32)

    fixed_means = rng.uniform(0.0, 1.0, num_labels)
    moving_means = fixed_means if same_contrast else rng.uniform(0.0, 1.0, num_labels)
    opts = dict(blur=blur, bias_scale=bias_scale, bias_spacing=max(shape) / 2, noise_std=noise_std)
    fixed = _render(rng, fixed_labels, fixed_means, **opts)
    moving = _render(rng, moving_labels, moving_means, **opts)
    return dict(
        fixed=fixed,
        moving=moving,
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        disp=np.moveaxis(disp, 0, -1).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------------- MNI

_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _nilearn_data_dir() -> str:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ImportError("mni_pair needs nilearn, whose package ships the MNI152 template: pip install jaxreg[data]")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def _crop(arr: np.ndarray, start, stop) -> np.ndarray:
    """``arr[start:stop]`` per axis, zero-padded where the box leaves the array."""
    lo = [max(0, s) for s in start]
    hi = [min(n, e) for n, e in zip(arr.shape, stop)]
    pads = [(lo_i - s, e - hi_i) for s, e, lo_i, hi_i in zip(start, stop, lo, hi)]
    return np.pad(arr[tuple(slice(a, b) for a, b in zip(lo, hi))], pads)


@functools.lru_cache(maxsize=2)
def _mni_template(folder: str, resolution: int, margin_mm: float = 8.0) -> dict:
    """The MNI152 2009 template at ``resolution`` mm, cropped to the brain box + ``margin_mm``; cached in-process.

    Brain mask: voxels where the (skull-stripped) T1 template is non-zero or GM + WM probability exceeds 0.5,
    computed at 1 mm, downsampled as a fraction and thresholded at 0.5, holes filled, largest component kept.
    Labels inside the mask: WM (3) or GM (2) where GM + WM probability >= 0.5, whichever of the two is larger;
    CSF (1) elsewhere inside the mask (neither tissue reaches the threshold); background 0 outside.
    """
    vols = {}
    for name, fname in _MNI_FILES.items():
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"nilearn's packaged MNI152 file is missing: {path} (reinstall nilearn)")
        vols[name] = load(path)
    affine = vols["t1"].affine
    t1, gm, wm = (vols[k].data / np.float32(255.0) for k in ("t1", "gm", "wm"))
    mask = ((t1 > 0) | (gm + wm > 0.5)).astype(np.float32)
    if resolution != 1:
        small = downsample(Volume(np.stack([t1, gm, wm, mask], axis=-1), affine, True), resolution)
        affine = small.affine
        t1, gm, wm, mask = np.moveaxis(small.data, -1, 0)
    mask = ndi.binary_fill_holes(mask > 0.5)
    comp, n = ndi.label(mask)
    if n > 1:
        mask = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
    # crop to the mask's bounding box plus the margin (zero padding where the box leaves the template)
    idx = np.argwhere(mask)
    pad = int(np.ceil(margin_mm / resolution))
    start, stop = idx.min(0) - pad, idx.max(0) + 1 + pad
    t1, gm, wm, mask = (_crop(a, start, stop) for a in (t1, gm, wm, mask))
    shift = np.eye(4)
    shift[:3, 3] = start
    affine = affine @ shift
    mask = mask.astype(np.float32)
    gm, wm = gm * mask, wm * mask
    labels = np.where(mask > 0, np.where(gm + wm >= 0.5, np.where(gm >= wm, 2, 3), 1), 0)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    out = dict(
        t1=normalize(t1 * mask, mask=mask > 0),
        t2=normalize(1.0 * csf + 0.55 * gm + 0.3 * wm, mask=mask > 0),
        labels=labels.astype(np.int32),
        mask=mask > 0,
        affine=affine,
    )
    for v in out.values():
        v.flags.writeable = False
    return out


def _resample_knots(values: np.ndarray, knots, positions) -> np.ndarray:
    """Quintic-spline interpolation (separable, not-a-knot) of ``values`` ``(nd, *len(knots))`` sampled on the
    tensor grid of ``knots`` to the tensor grid of ``positions``: ``(nd, *len(positions))``."""
    mats = [make_interp_spline(k, np.eye(len(k)), k=min(5, len(k) - 1))(p) for k, p in zip(knots, positions)]
    return np.moveaxis(_expand(np.moveaxis(values, 0, -1), mats), -1, 0)


def _invert_map(matrix: np.ndarray, smooth, shape, spacing: float):
    """Displacement ``u`` ``(*shape, nd)`` on the voxel grid with ``phi(x + u(x)) = x``, for the smooth invertible
    map ``phi(y) = A y + b + smooth(y)`` (``matrix = [[A, b], [0, 1]]``; ``smooth(axes)`` gives the smooth part on
    the tensor grid of the per-axis positions ``axes``, ``(*lens, nd)`` voxels; features ``spacing`` voxels across).

    ``smooth`` is sampled ``spacing / 4`` voxels apart on a box that holds every solution and interpolated there by
    cubic B-splines. ``phi^-1(x)`` is solved by Newton's method (Jacobian of the nearest sample, refreshed in the
    first steps) at points ``spacing / 2`` apart, then ``spacing / 4`` apart from the first solution; the
    non-affine part ``phi^-1(x) - A^-1 (x - b)`` is interpolated to every voxel by quintic splines. Returns
    ``(u, residual)``, ``residual`` being the largest ``|phi(y) - x|`` (voxels, interpolated smooth part) at the
    solved points; ``(NaN field, inf)`` when Newton's method left the sampled box (``phi`` folds).
    """
    nd = len(shape)
    a, b = matrix[:nd, :nd], matrix[:nd, nd]
    a_inv = np.linalg.inv(a)
    h = max(spacing / 4, 0.5)
    corners = np.stack(np.meshgrid(*[[0.0, n - 1.0] for n in shape], indexing="ij")).reshape(nd, -1)
    box = np.concatenate([a_inv @ (corners - b[:, None]), corners], axis=1)
    reach = np.abs(a_inv).sum(1).max() * np.abs(smooth([np.arange(0.0, n, h) for n in shape])).max()
    for attempt in range(2):  # grow the sampled box once if a solution came near its edge
        pad = (2.0**attempt) * 2 * reach + 8 * h
        lo, hi = box.min(1) - pad, box.max(1) + pad
        axes = [lo[k] + h * np.arange(int(np.ceil((hi[k] - lo[k]) / h)) + 1) for k in range(nd)]
        values = smooth(axes)
        sizes = np.array([len(v) for v in axes])
        coeffs = [ndi.spline_filter(values[..., c], order=3, mode="mirror") for c in range(nd)]
        # Jacobian of phi at the samples: it only steers Newton, so the nearest sample's is enough
        jac = np.stack([np.stack(np.gradient(values[..., c], h), -1) for c in range(nd)], -2) + a
        rest = knots = None
        # points spacing/2 apart (a start), then spacing/4 apart; tolerances in voxels, Jacobian refreshes
        for level, tol, n_jac in ((2, 1e-4, 2), (4, 1e-6, 1)):
            stride = max(spacing / level, 1.0)
            new_knots = [np.linspace(0, n - 1, max(int(np.ceil((n - 1) / stride)), 5) + 1) for n in shape]
            x = np.stack(np.meshgrid(*new_knots, indexing="ij")).reshape(nd, -1)
            y_affine = a_inv @ (x - b[:, None])
            y = y_affine if rest is None else y_affine + _resample_knots(rest, knots, new_knots).reshape(nd, -1)
            for it in range(60):
                t = (y - lo[:, None]) / h
                inside = bool(np.all((t >= 4) & (t <= sizes[:, None] - 5)))  # False for NaN too
                t = np.clip(np.nan_to_num(t), 0, sizes[:, None] - 1)  # a diverging step (folded phi) stays finite
                r = a @ y + b[:, None] - x + np.stack(
                    [ndi.map_coordinates(c, t, order=3, prefilter=False, mode="nearest") for c in coeffs])
                residual = float(np.abs(r).max()) if inside else np.inf
                if residual < tol or not inside:
                    break
                if it < n_jac:
                    nearest = tuple(np.rint(t[k]).astype(np.intp) for k in range(nd))  # t is clipped
                    j_inv = np.linalg.inv(jac[nearest])
                y = y - np.einsum("pck,kp->cp", j_inv, r)
            if not inside:
                break
            rest, knots = (y - y_affine).reshape((nd,) + tuple(len(k) for k in new_knots)), new_knots
        if inside:
            break
    if not inside:  # no solution in reach: phi is not invertible there (folds)
        return np.full(tuple(shape) + (nd,), np.nan), np.inf
    grid = [np.arange(n, dtype=np.float64) for n in shape]
    mesh = np.stack(np.meshgrid(*grid, indexing="ij"))
    y_full = np.tensordot(a_inv, mesh - b.reshape((nd,) + (1,) * nd), axes=1) + _resample_knots(rest, knots, grid)
    return np.moveaxis(y_full - mesh, 0, -1), residual


def mni_template(resolution: int = 2, shape=(80, 96, 80)) -> tuple[Volume, np.ndarray]:
    """nilearn's MNI152 2009 T1 brain at ``resolution`` mm on a box of ``shape`` voxels centred on the brain's box
    (``_mni_template``'s crop, then centre-cropped or zero-padded), with the affine of that box: ``(Volume t1 in
    [0, 1] float32, mask (*shape) bool)``. The fixed grid of the template-space models (``jaxreg.atlas``).

    Raises:
      ImportError: nilearn is not installed (``pip install jaxreg[data]``).
    """
    tpl = _mni_template(_nilearn_data_dir(), int(resolution))
    shape = tuple(int(n) for n in shape)
    start = [(n - s) // 2 for n, s in zip(tpl["t1"].shape, shape)]  # negative: padding before
    shift = np.eye(4)
    shift[:3, 3] = start
    t1 = _crop(np.asarray(tpl["t1"]), start, [a + s for a, s in zip(start, shape)]).astype(np.float32)
    mask = _crop(np.asarray(tpl["mask"]), start, [a + s for a, s in zip(start, shape)]).astype(bool)
    return Volume(t1, tpl["affine"] @ shift), mask


def mni_pair(
    key,
    *,
    resolution: int = 2,
    contrast: str = "t1",
    affine_scale: float = 1.0,
    deform_scale: float = 4.0,
    deform_spacing_mm: float = 16.0,
    bias_scale: float | None = None,
    noise_std: float | None = None,
    return_disp: bool = False,
) -> dict:
    """A brain registration pair from the MNI152 2009 template (nilearn's packaged copy, read offline).

    Fixed: the T1 template at ``resolution`` mm (1 or 2), skull-stripped, cropped to the brain bounding box plus
    8 mm (2 mm: 80 x 98 x 85 voxels; 1 mm: 161 x 197 x 171), robustly scaled to [0, 1] within the brain.

    Moving: the same anatomy pulled through a seeded random transform, ``moving[y] = fixed[phi(y)]``: an affine in
    world mm about the brain centre (rotation up to 10° per axis, per-axis scaling ±10 %, translation ±8 mm, all
    times ``affine_scale``) plus a smooth random deformation (control spacing ``deform_spacing_mm``, largest vector
    ``deform_scale`` mm). Images are warped linearly, labels nearest-neighbour (scipy). ``contrast="t2"`` renders
    the moving image T2-like from the tissue maps (CSF bright, GM mid, WM dark) before warping, then applies a
    smooth multiplicative bias field ``exp(bias_scale * field)`` and Rician-like noise ``|x + noise_std * n|``
    (defaults 0.2 and 0.03; 0 and 0 for ``"t1"``), and rescales to [0, 1] within the brain.

    Ground truth: ``disp = phi^-1(x) - x`` on the fixed grid, voxels, pull convention ``fixed[x] ≈ moving[x +
    disp(x)]`` (as :func:`synthetic_pair` and :func:`mni_slice_pair`). ``phi`` is known in closed form and inverted
    numerically (Newton's method on a grid a quarter of the deformation's control spacing apart, then quintic-spline
    interpolation): ``|phi(x + disp(x)) - x|`` stayed below 1.1e-3 voxels (2 mm: 5e-4) at 1500 random voxels of
    seeds 0-2. It took 0.8-1.5 s per 2 mm pair and 1-2 s per 1 mm pair (2 shared CPU cores, load 2-3), against
    about 0.3 s for the rest of a 2 mm pair, so it is computed only with ``return_disp=True``. Near the borders
    ``x + disp(x)`` may leave the grid (where ``moving`` is 0). Where the inversion fails (a ``deform_scale`` large
    enough to fold ``phi``) a warning is given and ``disp`` is NaN.

    Labels (both images): 0 background, 1 CSF, 2 GM, 3 WM. Brain mask: T1 template non-zero or GM + WM probability
    above 0.5 (at 1 mm; downsampled as a fraction and thresholded at 0.5), holes filled, largest component. Inside
    it, GM or WM (whichever probability is larger) where GM + WM >= 0.5, CSF elsewhere (neither tissue reaches the
    threshold: ventricles, sulci). The template is cached per process (first call about 1-3 s, then well under a
    second per 2 mm pair).

    Args:
      key: int seed, ``np.random.Generator`` or JAX PRNG key; deterministic given the key.

    Returns:
      dict with ``fixed``, ``moving``: ``(X, Y, Z)`` float32; ``fixed_labels``, ``moving_labels``: int32;
      ``affine``: ``(4, 4)`` float64 voxel -> world (RAS+ mm) of the grid both images share; ``spacing``: ``(3,)``
      float64 mm; ``disp`` (with ``return_disp=True``): ``(X, Y, Z, 3)`` float32 voxels, pull convention
      ``fixed[x] ≈ moving[x + disp(x)]``.

    Raises:
      ImportError: nilearn is not installed (``pip install jaxreg[data]``).
    """
    if resolution not in (1, 2):
        raise ValueError(f"mni_pair: resolution must be 1 or 2 (mm), got {resolution}")
    if contrast not in ("t1", "t2"):
        raise ValueError(f"mni_pair: contrast must be 't1' or 't2', got {contrast!r}")
    tpl = _mni_template(_nilearn_data_dir(), int(resolution))
    rng = _rng(key)
    affine, shape = tpl["affine"], tpl["labels"].shape
    lin_vox = affine[:3, :3]

    # world transform q = c + M (p - c) + t about the brain centre, expressed on voxel indices
    centre = affine[:3, :3] @ np.argwhere(tpl["mask"]).mean(0) + affine[:3, 3]
    lin = _random_linear(rng, 3, 10.0 * affine_scale, 0.10 * affine_scale)
    shift = rng.uniform(-8.0, 8.0, 3) * affine_scale
    world = np.eye(4)
    world[:3, :3] = lin
    world[:3, 3] = centre - lin @ centre + shift
    index_map = np.linalg.solve(affine, world @ affine)
    coords = _coords(index_map, shape, shape)
    # the smooth deformation, kept as control values so that it can be evaluated off the grid (for its inverse)
    spacing = deform_spacing_mm / resolution
    bases = [_basis(n, spacing) for n in shape]
    ctrl = rng.standard_normal(tuple(b.shape[1] for b in bases) + (3,))
    field = _expand(ctrl, bases)
    peak = np.sqrt((field**2).sum(-1)).max()
    scale = deform_scale / peak if deform_scale > 0 and peak > 0 else 0.0
    mm_to_vox = np.linalg.inv(lin_vox).T

    def smooth_vox(axes):  # the deformation in voxels at the tensor grid of per-axis voxel positions ``axes``
        return (_expand(ctrl, [_basis(n, spacing, x) for n, x in zip(shape, axes)]) * scale) @ mm_to_vox

    coords += np.moveaxis((field * scale) @ mm_to_vox, -1, 0)

    moving = ndi.map_coordinates(tpl[contrast], coords, order=1, mode="constant", cval=0.0)
    moving_labels = ndi.map_coordinates(tpl["labels"], coords, order=0, mode="constant", cval=0)
    bias_scale = (0.2 if contrast == "t2" else 0.0) if bias_scale is None else bias_scale
    noise_std = (0.03 if contrast == "t2" else 0.0) if noise_std is None else noise_std
    if bias_scale > 0 or noise_std > 0:
        img = moving.astype(np.float64)
        if bias_scale > 0:
            bias = smooth_random_field(rng, shape, 1, spacing=64.0 / resolution)[..., 0]
            img = img * np.exp(bias_scale * bias)
        if noise_std > 0:
            img = np.abs(img + noise_std * rng.standard_normal(shape))
        moving = normalize(img, mask=moving_labels > 0)
    out = dict(
        fixed=np.array(tpl["t1"]),
        moving=moving.astype(np.float32),
        fixed_labels=np.array(tpl["labels"]),
        moving_labels=moving_labels.astype(np.int32),
        affine=np.array(affine),
        spacing=np.linalg.norm(affine[:3, :3], axis=0),
    )
    if return_disp:  # fixed[x] = moving[phi^-1(x)]: the answer is u(x) = phi^-1(x) - x
        disp, residual = _invert_map(index_map, smooth_vox, shape, max(spacing, 1.0))
        if not residual < 1e-4:
            warnings.warn(f"mni_pair: the random transform could not be inverted accurately (largest |phi(x + disp)"
                          f" - x| = {residual:.2g} voxels); deform_scale={deform_scale} mm may fold it", stacklevel=2)
        out["disp"] = disp.astype(np.float32)
    return out


def mni_slice_pair(
    key,
    *,
    resolution: int = 2,
    shape=(80, 96),
    contrast: str = "t1",
    slice_mm: float = 10.0,
    subject_scale: float = 2.0,
    affine_scale: float = 1.0,
    deform_scale: float = 3.0,
    deform_spacing_mm: float = 16.0,
    bias_scale: float | None = None,
    noise_std: float | None = None,
) -> dict:
    """A 2-D brain pair with a known displacement, from an axial slice of the MNI152 2009 template.

    An axial slice (uniformly within ``slice_mm`` of the brain's centroid) of the template at ``resolution`` mm,
    centre-cropped/padded to ``shape``, becomes a "subject" by a smooth random deformation (largest vector
    ``subject_scale`` voxels, control spacing ``deform_spacing_mm``): ``moving[x] = template_c(x + w(x))`` in
    contrast ``c``. The fixed image is the same subject in T1, pulled through a random affine about the grid centre
    (rotation up to 10°, scaling ±10 %, translation ±8 mm, all times ``affine_scale``) plus a smooth deformation
    (largest vector ``deform_scale`` voxels): ``fixed[x] = moving_anatomy(x + disp(x))``. So ``disp`` is the exact
    answer of registering moving to fixed, pull convention ``fixed[x] ≈ moving[x + disp(x)]``. ``contrast="t2"``
    renders the moving image T2-like (CSF bright, GM mid, WM dark) with a bias field and noise as in
    :func:`mni_pair` (defaults 0.2 and 0.03; none for T1). Images linear, labels nearest (SciPy); the fixed labels
    are the moving labels pulled through ``disp`` (``fixed_labels[x] == moving_labels[round(x + disp(x))]``), so the
    true field scores Dice 1.

    Returns:
      dict with ``fixed``, ``moving``: ``shape`` float32 in [0, 1]; ``fixed_labels``, ``moving_labels``: int32
      (0 background, 1 CSF, 2 GM, 3 WM); ``disp``: ``(*shape, 2)`` float32 voxels; ``spacing``: ``(2,)`` mm;
      ``slice``: the template's axial index used.

    Raises:
      ImportError: nilearn is not installed (``pip install jaxreg[data]``).
    """
    if resolution not in (1, 2):
        raise ValueError(f"mni_slice_pair: resolution must be 1 or 2 (mm), got {resolution}")
    if contrast not in ("t1", "t2"):
        raise ValueError(f"mni_slice_pair: contrast must be 't1' or 't2', got {contrast!r}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or min(shape) < 8:
        raise ValueError(f"mni_slice_pair: shape must be 2-D with sides >= 8, got {shape}")
    tpl = _mni_template(_nilearn_data_dir(), int(resolution))
    rng = _rng(key)
    half = int(round(slice_mm / resolution))
    z = int(round(np.argwhere(tpl["mask"])[:, 2].mean())) + int(rng.integers(-half, half + 1))
    sl = {k: crop_or_pad(tpl[k][:, :, z], shape) for k in ("t1", "t2", "labels")}
    spacing = np.linalg.norm(tpl["affine"][:3, :2], axis=0)

    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    subject = np.moveaxis(_scaled_field(rng, shape, 2, deform_spacing_mm / resolution, subject_scale), -1, 0)
    lin = _random_linear(rng, 2, 10.0 * affine_scale, 0.10 * affine_scale)
    shift = rng.uniform(-8.0, 8.0, 2) / spacing * affine_scale
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    matrix = np.eye(3)
    matrix[:2, :2] = lin
    matrix[:2, 2] = centre - lin @ centre + shift
    y = _coords(matrix, shape, shape) + np.moveaxis(
        _scaled_field(rng, shape, 2, deform_spacing_mm / resolution, deform_scale), -1, 0)
    disp = y - grid
    # the subject's anatomy at y: template(y + w(y)), with w interpolated at y
    w_at_y = np.stack([ndi.map_coordinates(c, y, order=1, mode="nearest") for c in subject])
    fixed_coords, moving_coords = y + w_at_y, grid + subject

    fixed = _warp(sl["t1"], fixed_coords, 1)
    moving = _warp(sl[contrast], moving_coords, 1).astype(np.float64)
    moving_labels = _warp(sl["labels"], moving_coords, 0)
    fixed_labels = _warp(moving_labels, y, 0)  # exact: fixed_labels[x] == moving_labels[round(x + disp(x))]
    bias_scale = (0.2 if contrast == "t2" else 0.0) if bias_scale is None else bias_scale
    noise_std = (0.03 if contrast == "t2" else 0.0) if noise_std is None else noise_std
    if bias_scale > 0:
        moving = moving * np.exp(bias_scale * smooth_random_field(rng, shape, 1, spacing=64.0 / resolution)[..., 0])
    if noise_std > 0:
        moving = np.abs(moving + noise_std * rng.standard_normal(shape))
    return dict(
        fixed=normalize(fixed, mask=fixed_labels > 0).astype(np.float32),
        moving=normalize(moving, mask=moving_labels > 0).astype(np.float32),
        fixed_labels=fixed_labels.astype(np.int32),
        moving_labels=moving_labels.astype(np.int32),
        disp=np.moveaxis(disp, 0, -1).astype(np.float32),
        spacing=spacing,
        slice=z,
    )
