"""NIfTI input/output with world affines kept (nibabel); host-side NumPy.

A :class:`Volume` pairs a voxel array with its 4x4 voxel -> world affine (RAS+ millimetres, the NIfTI convention:
``world = affine @ [i, j, k, 1]``). Its data are ``(*spatial)`` or ``(*spatial, C)`` (channels last) with 2 or 3
spatial axes. A 2-D image is stored in NIfTI as 3-D with a singleton third axis; its affine stays 4x4 and only the
first two columns (and the translation) concern its in-plane axes.

Vector images (displacement fields, multichannel images) are stored the NIfTI way, 5-D with shape
``(X, Y, Z, 1, C)`` and intent ``VECTOR`` when ``C`` equals the number of spatial axes.

Displacement files: jaxreg's fields are in voxel units of their grid (``(*spatial, ndim)``, pull convention
``warped[x] = moving[x + u(x)]``). :func:`save_displacement` writes them in world millimetres in RAS+ axes (the
voxel vector multiplied by the affine's linear part). ITK, ANTs and SimpleITK use LPS+ world axes: a RAS
displacement becomes LPS by negating its x and y components (:func:`ras_to_lps`); ITK additionally expects the
field to map fixed-image points to moving-image points, which is the same pull direction as jaxreg.

All writes are atomic: the file is written to a temporary name in the destination folder (same suffix, so
nibabel picks the same format) and moved into place with :func:`os.replace`; a failed write leaves no partial file.

Reading checks the header before any voxel is read (:func:`check_header`), each failure a ``ValueError`` naming the
file: the data the header declares must fit in the file (an uncompressed file must be at least ``vox_offset +
voxels * itemsize`` bytes; a gzip file cannot hold more than ``MAX_GZIP_RATIO`` times its size, deflate's limit,
and its stream is then read through, without keeping it, to see that it really holds that many bytes), so a
corrupt or hostile header cannot make the reader allocate more than the file holds; the voxel type must be one
number per voxel (no RGB, complex or structured types); the file must say where it lies in the world (a qform or
sform code > 0: nibabel's fallback for neither is a guess, mirrored and shifted) unless ``assume_identity_affine``
says to place it on axis-aligned voxels; its affine must be finite and invertible.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import uuid
from dataclasses import dataclass

import nibabel as nib
import numpy as np

__all__ = [
    "Volume",
    "as_affine4",
    "check_header",
    "load",
    "load_labels",
    "from_nibabel",
    "save",
    "save_displacement",
    "load_displacement",
    "ras_to_lps",
    "save_matrix",
    "load_matrix",
    "write_json",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Volume:
    """A voxel array with its voxel -> world affine.

    Attributes:
      data: ``(*spatial)`` or ``(*spatial, C)`` array (float32 images, int32 label maps), 2 or 3 spatial axes.
      affine: ``(4, 4)`` float64 voxel -> world matrix (RAS+ mm). For a 2-D volume, columns 0 and 1 give the
        in-plane axes and column 3 the origin.
      has_channels: whether the last axis of ``data`` is a channel axis (vector fields, multichannel images).
    """

    data: np.ndarray
    affine: np.ndarray
    has_channels: bool = False

    def __post_init__(self):
        data = np.asarray(self.data)
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise ValueError(f"Volume affine must be a finite (4, 4) matrix, got shape {affine.shape}")
        nd = data.ndim - int(self.has_channels)
        if nd not in (2, 3):
            raise ValueError(
                f"Volume data must be (*spatial) or (*spatial, C) with 2 or 3 spatial axes, got shape {data.shape}"
                f" (has_channels={self.has_channels})"
            )
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.data.ndim - int(self.has_channels)

    @property
    def shape(self) -> tuple:
        """Spatial shape (without the channel axis)."""
        return tuple(self.data.shape[: self.ndim])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm per spatial axis, ``(ndim,)`` float64: lengths of the affine's first ``ndim`` columns."""
        return np.linalg.norm(self.affine[:3, : self.ndim], axis=0)


def _check_path(path) -> str:
    path = os.fspath(path)
    if not path.endswith(_NIFTI_SUFFIXES):
        raise ValueError(f"{path}: expected a NIfTI file name ending in .nii or .nii.gz")
    return path


def _suffix(path: str) -> str:
    return ".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]


def atomic_write(path: str, write):
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` (same suffix), then move it into place.

    Raises ``FileNotFoundError`` naming ``path`` when its folder does not exist (not the temporary name)."""
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {os.fspath(path)}: its folder {folder} does not exist")
    suffix = _suffix(name)
    tmp = os.path.join(folder, f".{name[: len(name) - len(suffix)]}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def as_affine4(affine, ndim: int) -> np.ndarray:
    """Return a ``(4, 4)`` float64 affine; a ``(3, 3)`` homogeneous 2-D affine is embedded (z axis unit, z = 0)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (3, 3) and ndim == 2:
        out = np.eye(4)
        out[:2, :2] = a[:2, :2]
        out[:2, 3] = a[:2, 2]
        return out
    if a.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4) (or (3, 3) for a 2-D image), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("affine contains non-finite values")
    return a


#: the most a gzip (deflate) stream can expand: a run of one byte, 258-byte matches coded in about 2 bits, is 1032:1;
#: a ``.nii.gz`` file whose header declares more than this times the file's size cannot hold its data
MAX_GZIP_RATIO = 1032


class _Refused(ValueError):
    """A header check failed (the message names the file already)."""


def _gzip_holds(path: str, need: int) -> int:
    """How many bytes the gzip stream of ``path`` holds, reading at most ``need`` of them (1 MiB at a time, none
    kept)."""
    got = 0
    with gzip.open(path, "rb") as f:
        while got < need:
            chunk = f.read(min(1 << 20, need - got))
            if not chunk:
                break
            got += len(chunk)
    return got


def _spatial_ndim(shape) -> int:
    """Spatial axes of a NIfTI storage shape under ``_to_volume``'s rules (2 when stored with a singleton z)."""
    shape = tuple(shape)
    if len(shape) == 5 and shape[3] == 1 or len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return 2 if len(shape) == 2 or len(shape) == 3 and shape[2] == 1 else min(len(shape), 3)


def check_header(path, img=None, *, assume_identity_affine: bool = False) -> np.ndarray:
    """Check a NIfTI file's header before its voxels are read; return its ``(4, 4)`` voxel -> world affine.

    ``img``: the file's nibabel image (loaded lazily by ``nib.load``; read here when None). Raises ``ValueError``
    naming the file when the declared data do not fit in the file (module docstring: no allocation beyond what
    the file holds), the voxel type is not one number per voxel (RGB, complex, structured), neither qform nor
    sform says where the image lies (both codes 0; with ``assume_identity_affine`` the affine is then
    ``diag(voxel sizes from pixdim, 1)``: voxel axes along the world axes, origin at voxel 0), or the affine is not
    finite and invertible.
    """
    path = os.fspath(path)
    img = nib.load(path) if img is None else img
    hdr = img.header
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise _Refused(f"{path}: voxel type {dtype} (RGB, complex or structured) is not supported: jaxreg reads one "
                       f"number per voxel (convert the image to a single grey channel)")
    shape = tuple(int(n) for n in hdr.get_data_shape())
    offset = getattr(img.dataobj, "offset", None)  # where the reader starts (a loaded header may say 0)
    need = int(hdr.get_data_offset() if offset is None else offset) + math.prod(shape) * dtype.itemsize
    size = os.path.getsize(path)
    declared = f"its header declares {shape} {dtype} ({need} bytes with the header)"
    if path.endswith(".gz"):
        if need > MAX_GZIP_RATIO * size:
            raise _Refused(f"{path}: {declared}, more than a {size}-byte gzip file can hold (at most "
                           f"{MAX_GZIP_RATIO}:1); the header or the file is damaged")
        held = _gzip_holds(path, need)
        if held < need:
            raise _Refused(f"{path}: {declared}, but its gzip stream holds only {held} bytes; the file is truncated "
                           f"or its header is damaged")
    elif size < need:
        raise _Refused(f"{path}: {declared}, but the file has only {size} bytes; the file is truncated or its header "
                       f"is damaged")
    if int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        if not assume_identity_affine:
            raise _Refused(f"{path}: the header says nothing about where the image lies (qform_code and sform_code "
                           f"are both 0); fix the header, or pass --assume-identity-affine (io.load(..., "
                           f"assume_identity_affine=True)) to place it on axis-aligned voxels of its pixdim size, "
                           f"origin at voxel 0")
        zooms = [float(z) for z in hdr.get_zooms()[:3]]
        affine = np.diag(zooms + [1.0] * (4 - len(zooms)))
    else:
        affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise _Refused(f"{path}: the header's voxel -> world affine (sform/qform) is not finite: "
                       f"{np.array2string(affine[:3], separator=', ').replace(chr(10), '')}")
    nd = _spatial_ndim(shape)
    sv = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if not sv[-1] > 1e-6 * sv[0]:
        lengths = ", ".join(f"{v:g}" for v in np.linalg.norm(affine[:3, :nd], axis=0))
        raise _Refused(f"{path}: the header's voxel -> world affine (sform/qform) is singular (voxel axis lengths "
                       f"{lengths} mm; an axis of length 0, or two parallel axes): fix the header")
    return affine


def _read(path: str, *, assume_identity_affine: bool = False):
    """Load a NIfTI image and its (scaled) voxel array; raise clear errors naming ``path``. The header is checked
    (``check_header``) before any voxel is read."""
    path = _check_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"not a NIfTI image ({type(img).__name__})")
        affine = check_header(path, img, assume_identity_affine=assume_identity_affine)
        raw = np.asanyarray(img.dataobj)
    except _Refused:
        raise
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError...)
        raise ValueError(f"could not read NIfTI file {path}: {type(err).__name__}: {err}") from err
    return img, np.asarray(raw), affine


def _to_volume(path: str, raw: np.ndarray, affine: np.ndarray) -> Volume:
    """Squeeze the NIfTI storage layout to (*spatial[, C]) with 2 or 3 spatial axes."""
    shape = raw.shape
    has_channels = False
    if raw.ndim == 5 and shape[3] == 1:  # NIfTI vector image (X, Y, Z, 1, C)
        raw = raw[:, :, :, 0, :]
        has_channels = True
    elif raw.ndim == 4 and shape[3] == 1:  # 4-D with a singleton last axis
        raw = raw[..., 0]
    elif raw.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2-D or 3-D image (or a vector image), got shape {shape}")
    if raw.ndim - has_channels == 3 and raw.shape[2] == 1:  # 2-D stored with a singleton z
        raw = raw[:, :, 0]
    return Volume(raw, affine, has_channels)


def load(path, *, dtype=np.float32, assume_identity_affine: bool = False) -> Volume:
    """Load a ``.nii``/``.nii.gz`` file as a :class:`Volume` with data cast to ``dtype`` (float32 default).

    Storage layouts accepted: 2-D; 3-D (a singleton third axis makes it 2-D); 4-D with a singleton last axis;
    5-D vector images ``(X, Y, Z, 1, C)`` (returned with ``has_channels=True``). Scaling (``scl_slope``) is applied.
    ``assume_identity_affine``: accept a file whose header gives no orientation (qform and sform codes 0) and
    place it on axis-aligned voxels (``check_header``); without it such a file is an error.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: wrong suffix, unreadable/corrupt file, a header that declares more data than the file holds, an
        RGB/complex voxel type, no orientation, a non-finite or singular affine, unsupported dimensionality,
        NaN/Inf voxels, or non-integer values when ``dtype`` is an integer type. Every message names the file.
    """
    path = os.fspath(path)
    _, raw, affine = _read(path, assume_identity_affine=assume_identity_affine)
    vol = _to_volume(path, raw, affine)
    data = vol.data
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise ValueError(f"{path}: contains {bad} NaN/Inf voxel(s)")
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" and data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: expected integer values (a label map), found non-integer voxels")
    if dtype.kind in "iu" and data.size:
        info = np.iinfo(dtype)
        if data.min() < info.min or data.max() > info.max:
            raise ValueError(f"{path}: values out of the range of {dtype}")
    return Volume(data.astype(dtype, copy=False), vol.affine, vol.has_channels)


def from_nibabel(image, *, name: str = "image", dtype=np.float32) -> Volume:
    """A nibabel NIfTI image (in memory) as a :class:`Volume` with data cast to ``dtype``; layouts as :func:`load`.
    ``name`` goes into error messages."""
    vol = _to_volume(name, np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64))
    if np.asarray(vol.data).dtype.kind == "f" and not np.isfinite(vol.data).all():
        raise ValueError(f"{name}: contains NaN/Inf voxels")
    return Volume(np.asarray(vol.data).astype(dtype, copy=False), vol.affine, vol.has_channels)


def load_labels(path, *, assume_identity_affine: bool = False) -> Volume:
    """Load a label map as an int32 :class:`Volume`; raise ``ValueError`` naming the file on non-integer values
    (and as :func:`load`)."""
    return load(path, dtype=np.int32, assume_identity_affine=assume_identity_affine)


def _storage_dtype(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype == np.float64:
        return data  # kept: the caller chose float64
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError("integer data does not fit in int32")
        return data.astype(np.int32)
    return data


def save(path, volume_or_array, affine=None, *, vector: bool | None = None) -> None:
    """Write a :class:`Volume` or array to ``path`` (``.nii``/``.nii.gz``) atomically.

    Args:
      path: destination file name.
      volume_or_array: a :class:`Volume` (its affine and channel flag are used) or an array ``(*spatial)`` /
        ``(*spatial, C)``.
      affine: ``(4, 4)`` (or ``(3, 3)`` for 2-D) voxel -> world matrix for an array; identity when omitted. Must be
        omitted for a :class:`Volume`.
      vector: for an array, whether its last axis holds channels/vector components. ``None`` infers it only for a
        4-D array whose last axis has length 3 (a 3-D vector field); pass ``True`` for a 2-D field ``(X, Y, 2)``.

    A 2-D image is stored as 3-D with a singleton third axis; a channel image as 5-D ``(X, Y, Z, 1, C)``, with intent
    ``VECTOR`` when ``C`` equals the number of spatial axes. sform and qform are both set to the affine.
    """
    path = _check_path(path)
    if isinstance(volume_or_array, Volume):
        if affine is not None or vector is not None:
            raise ValueError("save: pass `affine`/`vector` only with a plain array, not with a Volume")
        vol = volume_or_array
    else:
        data = np.asarray(volume_or_array)
        if vector is None:
            vector = data.ndim == 4 and data.shape[-1] == 3
        nd = data.ndim - int(vector)
        vol = Volume(data, np.eye(4) if affine is None else as_affine4(affine, nd), bool(vector))
    data = _storage_dtype(vol.data)
    if vol.has_channels:
        spatial = vol.shape + (1,) * (3 - vol.ndim)
        data = data.reshape(spatial + (1, data.shape[-1]))
    elif vol.ndim == 2:
        data = data[:, :, None]
    img = nib.Nifti1Image(data, vol.affine)
    img.set_sform(vol.affine, code=1)
    img.set_qform(vol.affine, code=1)
    img.header.set_xyzt_units("mm")  # the affine is in millimetres
    if vol.has_channels and vol.data.shape[-1] == vol.ndim:
        img.header.set_intent("vector", (), name="displacement")
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def _linear(affine: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(affine, dtype=np.float64)[:ndim, :ndim]


def save_displacement(path, disp_vox, affine) -> None:
    """Save a voxel-unit displacement ``(*spatial, ndim)`` as a world-unit (mm, RAS+) NIfTI vector image.

    ``disp_mm[x] = L @ disp_vox[x]`` with ``L`` the affine's linear part (3x3, or the in-plane 2x2 block for 2-D,
    which assumes the 2-D grid lies in the world x-y plane). The file is 5-D ``(X, Y, Z, 1, ndim)``, intent VECTOR,
    float32. For ITK/ANTs (LPS+ world), convert with :func:`ras_to_lps` before writing.
    """
    disp = np.asarray(disp_vox)
    if disp.ndim not in (3, 4) or disp.shape[-1] != disp.ndim - 1:
        raise ValueError(f"disp_vox must have shape (*spatial, ndim) with ndim in {{2, 3}}, got {disp.shape}")
    nd = disp.shape[-1]
    aff = as_affine4(affine, nd)
    disp_mm = np.einsum("ij,...j->...i", _linear(aff, nd), disp.astype(np.float64)).astype(np.float32)
    save(path, Volume(disp_mm, aff, True))


def load_displacement(path) -> Volume:
    """Load a mm (RAS+) displacement written by :func:`save_displacement` back to voxel units of its grid.

    Returns a :class:`Volume` with ``data`` ``(*spatial, ndim)`` float32 in voxels (``L^-1 @ disp_mm``) and the
    file's affine. Raises ``ValueError`` naming the file if it does not hold an ``ndim``-component vector field.
    """
    path = os.fspath(path)
    vol = load(path)
    if not vol.has_channels or vol.data.shape[-1] != vol.ndim:
        raise ValueError(f"{path}: expected a displacement field (*spatial, ndim), got shape {vol.data.shape}")
    lin = _linear(vol.affine, vol.ndim)
    if abs(np.linalg.det(lin)) < 1e-12:
        raise ValueError(f"{path}: the affine's linear part is singular; cannot convert mm to voxels")
    disp = np.einsum("ij,...j->...i", np.linalg.inv(lin), vol.data.astype(np.float64)).astype(np.float32)
    return Volume(disp, vol.affine, True)


def ras_to_lps(disp_mm) -> np.ndarray:
    """Convert world vectors ``(..., ndim)`` from RAS+ (NIfTI) to LPS+ (ITK/ANTs): negate x and y. Also LPS -> RAS."""
    out = np.array(disp_mm, copy=True)
    if out.shape[-1] not in (2, 3):
        raise ValueError(f"disp_mm must have a last axis of 2 or 3 components, got {out.shape}")
    out[..., :2] *= -1
    return out


def save_matrix(path, matrix) -> None:
    """Write a homogeneous matrix (``(4, 4)`` world, or ``(3, 3)`` for 2-D) atomically as JSON ``{"matrix": [[...]]}``.

    Matrices keep whatever direction the caller gives them; jaxreg's world matrices map fixed-image world points to
    moving-image world points (the pull direction), in RAS+ mm.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((4, 4), (3, 3)) or not np.isfinite(m).all():
        raise ValueError(f"matrix must be a finite (4, 4) or (3, 3) array, got shape {m.shape}")
    path = os.fspath(path)
    text = json.dumps({"matrix": m.tolist()}, indent=1)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(path, write)


def load_matrix(path) -> np.ndarray:
    """Read a matrix written by :func:`save_matrix`; returns ``(4, 4)`` or ``(3, 3)`` float64."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"matrix file not found: {path}")
    try:
        with open(path) as f:
            m = np.asarray(json.load(f)["matrix"], dtype=np.float64)
    except Exception as err:
        raise ValueError(f"could not read matrix JSON {path}: {type(err).__name__}: {err}") from err
    if m.shape not in ((4, 4), (3, 3)) or not np.isfinite(m).all():
        raise ValueError(f"{path}: expected a finite (4, 4) or (3, 3) matrix, got shape {m.shape}")
    return m


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path, obj) -> None:
    """Write ``obj`` as strict JSON atomically (indent 2).

    NumPy scalars and arrays become numbers and lists, dict keys become strings, and non-finite floats (NaN, inf)
    become ``null`` since JSON has no such numbers (``jaxreg.evaluation.write_csv`` keeps them distinguishable).
    """
    data = _jsonable(obj)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(os.fspath(path), write)
