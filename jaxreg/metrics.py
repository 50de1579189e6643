"""Evaluation measures for registration results, computed on the host with NumPy in float64.

This module depends on NumPy and ``scipy.ndimage`` only (no JAX, nothing else from jaxreg). Inputs are anything
``np.asarray`` takes (``numpy.typing.ArrayLike``), device arrays included: they are copied to the host. These are
not traceable functions: call them outside ``jit`` and loop over a batch in Python.

Inputs
    Label maps: arrays of shape ``(*spatial)`` with 2 or 3 spatial axes, integer or bool dtype (a floating-point
    map is accepted only when every value is an integer, e.g. the output of a nearest-neighbour warp in float32).
    Spacing: voxel size in mm per axis, a tuple of ``len(spatial)`` positive numbers; ``None`` means 1 mm per axis.
    Landmarks: ``(N, ndim)`` arrays of voxel coordinates on one grid.

Label selection and empty labels (all per-label functions)
    ``labels=None`` evaluates every label present in either map except 0 (background); an explicit ``labels``
    evaluates exactly those (0 included if asked for). Results are ``dict[int, float]`` ordered by label.
    A label absent from *both* maps gives NaN (nothing to compare); ``summarize`` leaves NaN out of means.
    A label present in only one map gives Dice = Jaccard = 0 and HD/HD95/ASSD = +inf (infinite values propagate
    into means: a missing structure is a failure, not a missing value).

Surface distances
    The surface of a binary mask is its boundary voxels: mask voxels with at least one face neighbour outside the
    mask (``mask & ~binary_erosion(mask)`` with the face-connectivity structure; voxels on the image border count
    as boundary). The directed distances from surface A to surface B are, for every voxel of surface A, the
    Euclidean distance in mm to the nearest voxel centre of surface B (``distance_transform_edt`` with
    ``sampling=spacing``). Hausdorff at percentile p is the **maximum of the two directed p-th percentiles**
    (``np.percentile``'s default linear interpolation), the convention of MONAI's ``compute_hausdorff_distance`` and
    of the ``surface_distance`` package used by the Learn2Reg evaluation. ASSD is the mean of the union of both
    directed distance sets (sum of all distances / number of surface voxels in both maps).

Summaries, tables and result files are ``jaxreg.evaluation``'s.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = [
    "dice",
    "jaccard",
    "surface_distances",
    "hausdorff",
    "hd95",
    "assd",
    "tre",
    "mean_tre",
    "folding_fraction",
    "sd_log_jacobian",
]

# Determinants are clipped to this before the log in sd_log_jacobian (the lower clip of the Learn2Reg evaluation).
LOG_JAC_EPS = 1e-9


# ----------------------------------------------------------------------------------------------- input checks
def _label_map(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D or 3-D label map (*spatial), got shape {x.shape}")
    if x.dtype.kind in "biu":
        return x
    if x.dtype.kind == "f":
        if not np.isfinite(x).all() or not np.array_equal(x, np.round(x)):
            raise ValueError(f"{name} is floating-point with non-integer or non-finite values; shape {x.shape}")
        return x.astype(np.int64)
    raise ValueError(f"{name} must hold integer labels, got dtype {x.dtype} with shape {x.shape}")


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _label_map(a, "a"), _label_map(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _spacing(spacing, ndim: int, name: str = "spacing") -> np.ndarray:
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape != (ndim,) or not np.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{name} must be {ndim} positive finite numbers (mm per axis), got {spacing!r}")
    return s


def _labels(a: np.ndarray, b: np.ndarray, labels) -> list[int]:
    if labels is None:
        found = np.union1d(np.unique(a), np.unique(b))
        return [int(v) for v in found if v != 0]
    return [int(v) for v in labels]


def _mask(mask, shape, name: str = "mask") -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {m.shape}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError(f"{name} selects no voxel; shape {m.shape}")
    return m


# ----------------------------------------------------------------------------------------------- overlap
def _overlap(a, b, labels, kind: str) -> dict[int, float]:
    a, b = _pair(a, b)
    out = {}
    for lab in _labels(a, b, labels):
        ma, mb = a == lab, b == lab
        na, nb = int(ma.sum()), int(mb.sum())
        inter = int(np.logical_and(ma, mb).sum())
        if na + nb == 0:
            out[lab] = math.nan
        elif kind == "dice":
            out[lab] = 2.0 * inter / (na + nb)
        else:
            out[lab] = inter / (na + nb - inter)
    return out


def dice(a: npt.ArrayLike, b: npt.ArrayLike, *, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice overlap ``2|A∩B| / (|A|+|B|)`` per label, in [0, 1].

    ``a``, ``b``: label maps of one shape ``(*spatial)``. Returns ``{label: dice}``; NaN for a label absent from
    both maps, 0 for a label absent from one (see the module docstring).
    """
    return _overlap(a, b, labels, "dice")


def jaccard(a: npt.ArrayLike, b: npt.ArrayLike, *, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Jaccard index ``|A∩B| / |A∪B|`` per label, in [0, 1]; same conventions as :func:`dice`.

    ``a``, ``b``: label maps of one shape ``(*spatial)``. Returns ``{label: jaccard}``.
    """
    return _overlap(a, b, labels, "jaccard")


# ----------------------------------------------------------------------------------------------- surfaces
def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(mask_a: npt.ArrayLike, mask_b: npt.ArrayLike, *,
                      spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two non-empty binary masks of one shape ``(*spatial)``.

    Returns ``(d_ab, d_ba)``, float64 vectors: ``d_ab[i]`` is the distance from the i-th boundary voxel of
    ``mask_a`` (C order) to the nearest boundary voxel of ``mask_b``, and vice versa. Raises if a mask is empty.
    """
    ma, mb = np.asarray(mask_a, dtype=bool), np.asarray(mask_b, dtype=bool)
    if ma.shape != mb.shape or ma.ndim not in (2, 3):
        raise ValueError(f"mask_a and mask_b must be 2-D or 3-D of one shape, got {ma.shape} and {mb.shape}")
    if not ma.any() or not mb.any():
        raise ValueError(f"mask_a and mask_b must be non-empty, got {int(ma.sum())} and {int(mb.sum())} voxels")
    s = _spacing(spacing, ma.ndim)
    # Crop to the joint bounding box plus one voxel: exact, since both surfaces lie inside it.
    idx = np.argwhere(ma | mb)
    lo, hi = np.maximum(idx.min(0) - 1, 0), np.minimum(idx.max(0) + 2, ma.shape)
    box = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
    sa, sb = _surface(ma[box]), _surface(mb[box])
    d_ab = ndimage.distance_transform_edt(~sb, sampling=s)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=s)[sb]
    return d_ab.astype(np.float64), d_ba.astype(np.float64)


def _per_label_surface(a, b, labels, spacing, reduce) -> dict[int, float]:
    a, b = _pair(a, b)
    s = _spacing(spacing, a.ndim)
    out = {}
    for lab in _labels(a, b, labels):
        ma, mb = a == lab, b == lab
        has_a, has_b = bool(ma.any()), bool(mb.any())
        if not has_a and not has_b:
            out[lab] = math.nan
        elif not (has_a and has_b):
            out[lab] = math.inf
        else:
            out[lab] = float(reduce(*surface_distances(ma, mb, spacing=s)))
    return out


def hausdorff(
    a: npt.ArrayLike, b: npt.ArrayLike, *, labels: Iterable[int] | None = None,
    spacing: Sequence[float] | None = None, percentile: float = 100.0
) -> dict[int, float]:
    """Symmetric Hausdorff distance in mm per label: max of the two directed ``percentile``-th percentiles.

    ``percentile=100`` is the classical Hausdorff distance; 95 gives HD95. Label maps ``a``, ``b`` of shape
    ``(*spatial)``, ``spacing`` in mm per axis. NaN for a label absent from both maps, +inf if absent from one.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return _per_label_surface(
        a, b, labels, spacing, lambda d1, d2: max(np.percentile(d1, percentile), np.percentile(d2, percentile))
    )


def hd95(a: npt.ArrayLike, b: npt.ArrayLike, *, labels: Iterable[int] | None = None,
         spacing: Sequence[float] | None = None) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance in mm per label (see :func:`hausdorff` and the module notes).

    ``a``, ``b``: label maps of one shape ``(*spatial)``; ``spacing`` in mm per axis. Returns ``{label: hd95}``.
    """
    return hausdorff(a, b, labels=labels, spacing=spacing, percentile=95.0)


def assd(a: npt.ArrayLike, b: npt.ArrayLike, *, labels: Iterable[int] | None = None,
         spacing: Sequence[float] | None = None) -> dict[int, float]:
    """Average symmetric surface distance in mm per label: mean over the union of both directed distance sets.

    ``a``, ``b``: label maps of one shape ``(*spatial)``; ``spacing`` in mm per axis. Returns ``{label: assd}``.

    NaN for a label absent from both maps, +inf if absent from one.
    """
    return _per_label_surface(a, b, labels, spacing, lambda d1, d2: (d1.sum() + d2.sum()) / (d1.size + d2.size))


# ----------------------------------------------------------------------------------------------- landmarks
def tre(fixed_points: npt.ArrayLike, warped_points: npt.ArrayLike, *,
        spacing: Sequence[float] | None = None) -> np.ndarray:
    """Target registration error: per-landmark Euclidean distance in mm, float64 of shape ``(N,)``.

    ``fixed_points`` and ``warped_points``: ``(N, ndim)`` voxel coordinates on one grid of voxel size ``spacing``
    (mm per axis), row i of each being the same landmark, e.g. the fixed landmarks and the moving landmarks
    brought onto the fixed grid (or the fixed landmarks mapped by ``x + u(x)`` and the moving landmarks).
    """
    p = np.asarray(fixed_points, dtype=np.float64)
    q = np.asarray(warped_points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] not in (2, 3) or p.shape != q.shape:
        raise ValueError(
            f"fixed_points and warped_points must both have shape (N, ndim) with ndim in {{2, 3}}, got {p.shape} "
            f"and {q.shape}"
        )
    if not (np.isfinite(p).all() and np.isfinite(q).all()):
        raise ValueError(f"fixed_points and warped_points must be finite; shapes {p.shape}")
    s = _spacing(spacing, p.shape[1])
    return np.sqrt((((p - q) * s.reshape(1, -1)) ** 2).sum(axis=1))


def mean_tre(fixed_points: npt.ArrayLike, warped_points: npt.ArrayLike, *,
             spacing: Sequence[float] | None = None) -> float:
    """Mean of :func:`tre` over the landmarks, in mm; points ``(N, ndim)`` in voxels, ``spacing`` in mm per axis."""
    return float(tre(fixed_points, warped_points, spacing=spacing).mean())


# ----------------------------------------------------------------------------------------------- Jacobian statistics
def _jac(jac_det, mask) -> np.ndarray:
    j = np.asarray(jac_det)
    if j.dtype.kind != "f" or j.ndim not in (2, 3):
        raise ValueError(f"jac_det must be a 2-D or 3-D floating-point map, got dtype {j.dtype}, shape {j.shape}")
    if not np.isfinite(j).all():
        raise ValueError(f"jac_det contains {int((~np.isfinite(j)).sum())} non-finite value(s); shape {j.shape}")
    m = _mask(mask, j.shape)
    j = j.astype(np.float64)
    return j.ravel() if m is None else j[m]


def folding_fraction(jac_det: npt.ArrayLike, *, mask: npt.ArrayLike | None = None) -> float:
    """Fraction (in [0, 1], not %) of voxels whose Jacobian determinant is <= 0.

    ``jac_det``: determinant map ``(*spatial)`` (e.g. from ``jaxreg.spatial``); ``mask``: optional bool map of the
    same shape selecting the voxels counted (must select at least one).
    """
    j = _jac(jac_det, mask)
    return float((j <= 0).mean())


def sd_log_jacobian(jac_det: npt.ArrayLike, *, mask: npt.ArrayLike | None = None, eps: float = LOG_JAC_EPS) -> float:
    """Standard deviation (ddof=0) of ``log(max(det, eps))`` over the voxels (or the ``mask``), unitless.

    ``jac_det``: determinant map ``(*spatial)`` (``jaxreg.spatial.jacobian_determinant``); ``mask``: optional bool
    map of the same shape.

    Determinants are clipped below at ``eps`` (default 1e-9, Learn2Reg's lower clip) so folded voxels count as
    a very large negative log instead of NaN. Note: the Learn2Reg evaluation script we read
    (MDL-UzL/L2R ``evaluation/evaluation.py``) adds 3 to its determinant before clipping; we do not, so its
    SDlogJ values are not directly comparable with ours.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    j = _jac(jac_det, mask)
    return float(np.log(np.maximum(j, eps)).std())
