"""Host-side preprocessing (NumPy/SciPy): reorientation, resampling between grids, intensity normalisation,
crop/pad and Gaussian downsampling. Images come out float32; integer label maps keep their dtype where the
operation is nearest-neighbour.

Grids are described by a :class:`~jaxreg.data.io.Volume` (or a shape and a 4x4 voxel -> world affine, RAS+ mm).
Arrays are channels last, ``(*spatial)`` or ``(*spatial, C)``.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from nibabel import orientations as nio

from .io import Volume, as_affine4

__all__ = ["reorient_canonical", "resample_to", "normalize", "crop_or_pad", "pad_to_multiple", "downsample"]


def reorient_canonical(volume: Volume) -> Volume:
    """Permute/flip the voxel axes so they point closest to RAS+ (``nibabel.as_closest_canonical`` semantics).

    Data are only permuted and flipped (no interpolation); the affine is updated so every voxel keeps its world
    position. A 2-D volume is treated as 3-D with a singleton third axis; it must lie (closest) in the world x-y
    plane, otherwise ``ValueError``.
    """
    data = volume.data
    if volume.ndim == 2:
        data = np.expand_dims(data, 2)
    spatial = data.shape[:3]
    ornt = nio.io_orientation(volume.affine)
    target = nio.axcodes2ornt(("R", "A", "S"))
    if np.array_equal(ornt, target):
        return volume
    transform = nio.ornt_transform(ornt, target)
    new = nio.apply_orientation(data, transform)
    affine = volume.affine @ nio.inv_ornt_aff(transform, spatial)
    if volume.ndim == 2:
        if new.shape[2] != 1:
            raise ValueError(
                f"reorient_canonical: the 2-D volume's plane is not the world x-y plane (affine {volume.affine})"
            )
        new = new[:, :, 0]
    return Volume(np.ascontiguousarray(new), affine, volume.has_channels)


def index_map(src_affine: np.ndarray, ref_affine: np.ndarray, nd: int) -> np.ndarray:
    """Homogeneous ``(nd+1, nd+1)`` map from reference voxel indices to source voxel indices."""
    m4 = np.linalg.solve(src_affine, ref_affine)  # inv(A_src) @ A_ref
    keep = list(range(nd)) + [3]
    if nd == 2 and not np.allclose(m4[2, [0, 1, 3]], 0.0, atol=1e-3):
        raise ValueError("resample_to: the 2-D reference grid is not in the plane of the 2-D volume")
    return m4[np.ix_(keep, keep)]


def _coords(matrix: np.ndarray, shape, src_shape) -> np.ndarray:
    """Source index coordinates ``(nd, *shape)`` for every reference voxel; near-edge values snapped inside."""
    nd = len(shape)
    axes = [
        np.arange(n, dtype=np.float64).reshape([-1 if k == j else 1 for k in range(nd)]) for j, n in enumerate(shape)
    ]
    out = np.empty((nd,) + tuple(shape), dtype=np.float64)
    for i in range(nd):
        acc = np.full(tuple(shape), matrix[i, nd])
        for j in range(nd):
            if matrix[i, j] != 0.0:
                acc = acc + matrix[i, j] * axes[j]
        # round-off just outside [0, n-1] would otherwise read as outside (scipy's "constant" mode)
        tol = 1e-6
        acc = np.where((acc < 0) & (acc > -tol), 0.0, acc)
        hi = src_shape[i] - 1
        out[i] = np.where((acc > hi) & (acc < hi + tol), hi, acc)
    return out


def _sample(data: np.ndarray, coords: np.ndarray, has_channels: bool, order: int, cval) -> np.ndarray:
    if data.dtype.kind in "iub" and order == 0:
        work = data
    else:
        work = data.astype(np.float32, copy=False)
    if not has_channels:
        return ndi.map_coordinates(work, coords, order=order, mode="constant", cval=cval)
    channels = [
        ndi.map_coordinates(work[..., c], coords, order=order, mode="constant", cval=cval)
        for c in range(work.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def resample_to(volume: Volume, ref_shape, ref_affine, *, order: int = 1, cval=0) -> Volume:
    """Resample ``volume`` onto the grid ``(ref_shape, ref_affine)`` through world coordinates.

    Reference voxel ``y`` reads the volume at index ``inv(A_vol) @ A_ref @ y`` with
    ``scipy.ndimage.map_coordinates`` (``order=1`` for images, ``order=0`` for label maps, which keep their integer
    dtype); points outside the volume's index range ``[0, n-1]`` get ``cval``. Channels are resampled one by one.

    Args:
      volume: source :class:`Volume`, ``(*spatial)`` or ``(*spatial, C)``.
      ref_shape: spatial shape of the reference grid (same number of axes as the volume).
      ref_affine: ``(4, 4)`` voxel -> world affine of the reference grid (``(3, 3)`` accepted for 2-D).

    Returns:
      A :class:`Volume` with spatial shape ``ref_shape`` and affine ``ref_affine``; float32 unless nearest-neighbour
      on integer data.
    """
    ref_shape = tuple(int(n) for n in ref_shape)
    if len(ref_shape) != volume.ndim:
        raise ValueError(
            f"resample_to: ref_shape {ref_shape} must have {volume.ndim} axes like the volume {volume.shape}"
        )
    if order not in range(6):
        raise ValueError(f"resample_to: order must be 0..5, got {order}")
    ref_affine = as_affine4(ref_affine, volume.ndim)
    matrix = index_map(volume.affine, ref_affine, volume.ndim)
    coords = _coords(matrix, ref_shape, volume.shape)
    out = _sample(volume.data, coords, volume.has_channels, order, cval)
    return Volume(out, ref_affine, volume.has_channels)


def centroid(volume: Volume, weights) -> np.ndarray:
    """World (RAS mm, ``(3,)``) centroid of ``volume``'s grid weighted by ``weights`` (``(*spatial)``, >= 0; e.g. an
    image's intensities or a blob's probabilities); the grid centre's world point when every weight is 0."""
    w = np.asarray(weights, np.float64)
    nd = w.ndim
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in w.shape], indexing="ij"), -1).reshape(-1, nd)
    total = w.sum()
    c = (w.reshape(-1, 1) * idx).sum(0) / total if total > 0 else (np.asarray(w.shape) - 1) / 2
    return (as_affine4(volume.affine, nd) @ np.r_[c, np.zeros(3 - nd), 1.0])[:3]


def normalize(image, *, lower: float = 0.5, upper: float = 99.5, mask=None) -> np.ndarray:
    """Robust intensity scaling to ``[0, 1]``: ``clip((x - p_lower) / (p_upper - p_lower), 0, 1)``, float32.

    Percentiles are taken over all voxels, or over ``mask`` (boolean, same shape as ``image``) when given; the
    scaling applies to the whole image. A constant image (``p_upper == p_lower``) gives zeros, never NaN.
    """
    x = np.asarray(image, dtype=np.float32)
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"normalize: need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    if not np.isfinite(x).all():
        raise ValueError(f"normalize: image contains NaN/Inf values (shape {x.shape})")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != x.shape:
            raise ValueError(f"normalize: mask shape {mask.shape} must equal image shape {x.shape}")
        values = x[mask]
    else:
        values = x.ravel()
    if values.size == 0:
        return np.zeros_like(x)
    lo, hi = np.percentile(values, [lower, upper])
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(x)
    return np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)


def crop_or_pad(array, shape, *, cval=0) -> np.ndarray:
    """Centre-crop or pad (with ``cval``) the leading ``len(shape)`` axes of ``array`` to ``shape``.

    Trailing axes (channels) are untouched. Per axis, an odd difference puts the extra voxel at the end (cropping
    removes it from the end; padding adds it at the end).
    """
    a = np.asarray(array)
    shape = tuple(int(n) for n in shape)
    if len(shape) > a.ndim or any(n < 1 for n in shape):
        raise ValueError(f"crop_or_pad: target shape {shape} does not fit array shape {a.shape}")
    slices, pads = [], []
    for n, s in zip(a.shape, shape):
        if n >= s:
            start = (n - s) // 2
            slices.append(slice(start, start + s))
            pads.append((0, 0))
        else:
            before = (s - n) // 2
            slices.append(slice(None))
            pads.append((before, s - n - before))
    extra = a.ndim - len(shape)
    a = a[tuple(slices)]
    return np.pad(a, pads + [(0, 0)] * extra, mode="constant", constant_values=cval)


def pad_to_multiple(array, multiple, *, channels_last: bool = False, cval=0):
    """Pad spatial axes at their end so each size is a multiple of ``multiple`` (int or one int per axis).

    Padding only at the end keeps the voxel -> world affine valid. With ``channels_last`` the last axis is not
    padded. Returns ``(padded, pad_widths)`` with ``pad_widths`` a tuple of ``(before, after)`` per spatial axis
    (``before`` is always 0), so ``padded[tuple(slice(0, n) for n in original_shape)]`` undoes it.
    """
    a = np.asarray(array)
    nd = a.ndim - int(channels_last)
    mult = (int(multiple),) * nd if np.ndim(multiple) == 0 else tuple(int(m) for m in multiple)
    if len(mult) != nd or any(m < 1 for m in mult):
        raise ValueError(f"pad_to_multiple: multiple {multiple} must be >= 1, one per spatial axis of {a.shape}")
    widths = tuple((0, (-n) % m) for n, m in zip(a.shape[:nd], mult))
    padded = np.pad(a, list(widths) + [(0, 0)] * (a.ndim - nd), mode="constant", constant_values=cval)
    return padded, widths


def _downsample_matrix(n: int, f: float, sigma: float, n_out: int) -> np.ndarray:
    """``(n_out, n)`` float32 matrix: 1-D Gaussian smoothing (edge-replicated, radius ``4 sigma`` like scipy) followed
    by linear sampling at ``f * i + (f - 1) / 2``."""
    smooth = np.eye(n)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel /= kernel.sum()
        smooth = np.zeros((n, n))
        rows = np.arange(n)
        for off, k in zip(offsets, kernel):  # one (row, col) pair per row per offset: no duplicate indices
            smooth[rows, np.clip(rows + off, 0, n - 1)] += k
    pos = f * np.arange(n_out) + (f - 1) / 2
    lo = np.clip(np.floor(pos).astype(int), 0, n - 1)
    t = pos - lo
    interp = np.zeros((n_out, n))
    rows = np.arange(n_out)
    interp[rows, lo] += 1 - t
    interp[rows, np.minimum(lo + 1, n - 1)] += t
    return (interp @ smooth).astype(np.float32)


def downsample(volume: Volume, factor) -> Volume:
    """Downsample by an integer or real ``factor`` per spatial axis (e.g. 2 makes 2 mm from 1 mm).

    Images: Gaussian smoothing with FWHM equal to the factor (``sigma = factor / (2 sqrt(2 ln 2))`` voxels, edge
    replicated; none on axes with factor 1), then linear sampling at the centres of ``factor``-sized blocks: new
    voxel ``i`` reads old index ``factor * i + (factor - 1) / 2``. Both steps are separable and applied as one
    small matrix per axis (fast: a 1 mm brain takes a fraction of a second). New shape ``floor(n / factor)``; the
    affine becomes ``A @ [[diag(factor), (factor - 1) / 2], [0, 1]]``, so the world extent is kept. Integer data
    (label maps) are not smoothed and are sampled nearest-neighbour (scipy ``map_coordinates``, order 0).
    """
    nd = volume.ndim
    if np.ndim(factor) not in (0, 1) or np.size(factor) not in (1, nd):
        raise ValueError(f"downsample: factor must be a scalar or one value per spatial axis ({nd}), got {factor}")
    f = np.broadcast_to(np.asarray(factor, dtype=np.float64), (nd,)).copy()
    if (f < 1).any():
        raise ValueError(f"downsample: factor must be >= 1, got {factor}")
    new_shape = tuple(max(1, int(np.floor(n / fi + 1e-9))) for n, fi in zip(volume.shape, f))
    scale = np.eye(4)
    scale[np.arange(nd), np.arange(nd)] = f
    scale[:nd, 3] = (f - 1) / 2
    affine = volume.affine @ scale
    if volume.data.dtype.kind in "iub":
        matrix = np.eye(nd + 1)
        matrix[:nd, :nd] = scale[:nd, :nd]
        matrix[:nd, nd] = scale[:nd, 3]
        out = _sample(volume.data, _coords(matrix, new_shape, volume.shape), volume.has_channels, 0, 0)
        return Volume(out, affine, volume.has_channels)
    # channels first while filtering, so every spatial axis is contracted by one (batched) matrix product
    out = volume.data.astype(np.float32)
    out = np.ascontiguousarray(np.moveaxis(out, -1, 0) if volume.has_channels else out[None])
    for axis in range(nd):
        if f[axis] == 1:
            continue
        sigma = f[axis] / (2 * np.sqrt(2 * np.log(2)))
        w = _downsample_matrix(volume.shape[axis], f[axis], sigma, new_shape[axis])
        ax = axis + 1
        if ax == out.ndim - 1:
            out = out @ w.T
        else:
            lead, n = int(np.prod(out.shape[:ax])), out.shape[ax]
            out = np.matmul(w, out.reshape(lead, n, -1)).reshape(out.shape[:ax] + (w.shape[0],) + out.shape[ax + 1 :])
    out = np.ascontiguousarray(np.moveaxis(out, 0, -1)) if volume.has_channels else out[0]
    return Volume(out, affine, volume.has_channels)
