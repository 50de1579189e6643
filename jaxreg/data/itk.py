"""ITK / ANTs / Learn2Reg transform files: affines, displacement fields and challenge submissions (host NumPy).

jaxreg's world conventions (NIfTI): world points are RAS+ millimetres, ``world = affine @ [i, j, k, 1]`` with
``affine`` a grid's ``(4, 4)`` voxel -> world matrix. A registration result is written in the pull direction, from
the FIXED image's world to the MOVING image's world, as two parts:

* ``matrix`` -- ``(4, 4)`` float64 homogeneous world matrix ``M``: a fixed world point ``p`` (RAS mm) maps to the
  moving world point ``M @ [p, 1]``.
* ``disp_ras_mm`` -- ``(X, Y, Z, 3)`` deformable world displacement ``w`` on the fixed image's grid (RAS mm,
  ``w[i, j, k]`` is the displacement at the world point ``affine @ [i, j, k, 1]``).

The full map, fixed world -> moving world, is **the field first, then the affine**::

    p  |->  M (p + w(p))                                                           (RAS mm)

This is the order of ``antsApplyTransforms -r fixed -i moving -t 1Warp.nii.gz -t 0GenericAffine.mat`` (and of
``ants.apply_transforms(fixed, moving, transformlist=[warp, affine])``): ANTs pushes the ``-t`` list onto an
ITK ``CompositeTransform`` from the last to the first, so the affine is added first and the warp second, and an ITK
``CompositeTransform`` applies the transform added LAST first (``T0(T1(x))`` for ``[T0, T1]``). In SimpleITK::

    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform("0GenericAffine.mat"))              # added first, applied second
    composite.AddTransform(sitk.DisplacementFieldTransform(field_image))          # added second, applied first

``tests/test_itk.py`` checks this order against SimpleITK (points and ``sitk.Resample``) and, where ANTsPy is
installed, against ``ants.apply_transforms``.

ITK and ANTs use LPS+ world axes. With ``S = diag(-1, -1, 1, 1)`` (its own inverse):

* an ITK matrix is ``S M S`` (:func:`ras_lps_matrix`), acting on LPS points;
* an ITK displacement vector is the RAS vector with its x and y components negated.

Files
-----
* ITK text transforms (``.txt``, ``.tfm``; ``#Insight Transform File V1.0``): blocks of ``Transform: NAME``,
  ``Parameters: ...``, ``FixedParameters: ...``, in LPS mm. For the matrix transforms (``AffineTransform``,
  ``MatrixOffsetTransformBase``, ...) ``Parameters`` are the 3x3 matrix ``A`` row by row then the translation
  ``t``, ``FixedParameters`` the centre ``c``; the map is ``x |-> A (x - c) + c + t`` from the fixed (reference)
  image's physical space to the moving one's.
* ANTs ``.mat`` (e.g. ``0GenericAffine.mat``): what ITK's ``MatlabTransformIO`` writes through ``vnl_matlab_write``,
  a MATLAB level-4 file of two column vectors of float64, little-endian: the parameters, named after the
  transform type (``AffineTransform_double_3_3``, 12 x 1, the same 12 numbers as the text file), then ``fixed``
  (3 x 1, the centre). Each variable is a 20-byte header of five int32 (type ``0`` = little-endian float64 full
  matrix, ``10`` for float32; rows; cols = 1; imaginary flag 0; length of the name including its NUL), the
  name, then the ``rows`` values. Readers also meet ``AffineTransform_float_3_3`` with float32 data (type ``10``;
  ANTsPy 0.6 writes that) and big-endian files (type ``1000``/``1010``); :func:`read_affine` reads all of them.
* ITK/ANTs displacement fields (``.nii``/``.nii.gz``, e.g. ``1Warp.nii.gz``): a NIfTI vector image, 5-D
  ``(X, Y, Z, 1, 3)``, intent ``VECTOR`` (1007), on the fixed image's grid (sform and qform = its RAS affine;
  ITK converts the geometry to LPS itself), whose vectors are LPS millimetres, NOT converted by ITK: for an LPS
  point ``x`` of the grid the field maps ``x |-> x + u_lps(x)`` (linear interpolation in between, zero outside).
  ITK >= 5.4 reads a 3-component ``DISPVECT`` (1006) file as RAS vectors (it flips x and y on reading and
  writing); :func:`read_displacement` follows that.
* Learn2Reg submissions (``disp_FFFF_MMMM.nii.gz`` or ``.npz``): see :func:`write_l2r_displacement`.

Supported ITK transform types (``_double_3_3`` and ``_float_3_3``): ``AffineTransform``,
``MatrixOffsetTransformBase``, ``CenteredAffineTransform``, ``Euler3DTransform``, ``VersorTransform``,
``VersorRigid3DTransform``, ``Similarity3DTransform``, ``ScaleVersor3DTransform``, ``ScaleTransform``,
``TranslationTransform``, ``IdentityTransform``, and a text ``CompositeTransform`` made only of these (composed
into one matrix). Not supported: other dimensions (``_2_2``), non-linear transforms (B-splines, displacement
fields inside transform files), ``ScaleSkewVersor3DTransform``, HDF5 (``.h5``) composite files, and several
transforms listed one after another outside a ``CompositeTransform``.

All writes are atomic (a temporary file in the destination folder, then :func:`os.replace`): a failed write
leaves no partial file. Every error names the file.
"""
from __future__ import annotations

import os
import re
import struct

import nibabel as nib
import numpy as np

from jaxreg.data.io import atomic_write

__all__ = [
    "ras_lps_matrix",
    "write_affine",
    "read_affine",
    "write_displacement",
    "read_displacement",
    "write_l2r_displacement",
    "read_l2r_displacement",
    "l2r_name",
    "compose_world",
    "SUPPORTED_TRANSFORMS",
]

_S = np.diag([-1.0, -1.0, 1.0, 1.0])
_TEXT_SUFFIXES = (".txt", ".tfm")
_MAT_SUFFIX = ".mat"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_INTENT_DISPVECT = 1006
_INTENT_VECTOR = 1007
_HEADER_LINE = "#Insight Transform File V1.0"


# ------------------------------------------------------------------------------------------------- matrix helpers
def ras_lps_matrix(matrix) -> np.ndarray:
    """``S @ matrix @ S`` with ``S = diag(-1, -1, 1, 1)``: a ``(4, 4)`` world matrix from RAS+ to LPS+ axes (and back).

    A map of RAS points ``p -> M p`` is the map of LPS points ``x -> (S M S) x``. Returns float64 ``(4, 4)``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"matrix must be (4, 4), got shape {m.shape}")
    return _S @ m @ _S


def _check_matrix(matrix, what: str = "matrix") -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"{what} must be a (4, 4) homogeneous matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{what} contains non-finite values")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], rtol=0.0, atol=1e-12):
        raise ValueError(f"{what}'s last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    if _singular(m[:3, :3]):
        raise ValueError(f"{what}'s 3x3 linear part is singular (or nearly so): {m[:3, :3].tolist()}")
    return m


def _singular(a: np.ndarray) -> bool:
    s = np.linalg.svd(a, compute_uv=False)
    return not (s[-1] > 1e-12 * max(s[0], 1.0))


def _homogeneous(a: np.ndarray, offset: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = offset
    return out


def _centred(a, centre, translation) -> np.ndarray:
    """ITK's ``x |-> A (x - c) + c + t`` as a homogeneous matrix (offset ``c + t - A c``)."""
    a = np.asarray(a, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64)
    return _homogeneous(a, c + np.asarray(translation, dtype=np.float64) - a @ c)


def _versor_matrix(v) -> np.ndarray:
    """Rotation matrix of ITK's versor (the vector part ``(x, y, z)`` of a unit quaternion, ``w >= 0``)."""
    x, y, z = (float(e) for e in v)
    n2 = x * x + y * y + z * z
    if n2 > 1.0 + 1e-9:
        raise ValueError(f"versor ({x}, {y}, {z}) has norm > 1")
    w = np.sqrt(max(0.0, 1.0 - n2))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _euler_matrix(ax, ay, az, zyx: bool) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx if zyx else rz @ rx @ ry


# Each entry: (allowed parameter counts, allowed fixed-parameter counts, builder(params, fixed) -> LPS 4x4).
def _affine_like(p, f):
    return _centred(p[:9].reshape(3, 3), f if len(f) else np.zeros(3), p[9:12])


def _centered_affine(p, f):  # ITK CenteredAffineTransform: matrix (9), centre (3), translation (3); fixed ignored
    return _centred(p[:9].reshape(3, 3), p[9:12], p[12:15])


def _euler(p, f):
    zyx = len(f) == 4 and f[3] != 0
    return _centred(_euler_matrix(p[0], p[1], p[2], zyx), f[:3], p[3:6])


def _versor(p, f):
    return _centred(_versor_matrix(p[:3]), f, np.zeros(3))


def _versor_rigid(p, f):
    return _centred(_versor_matrix(p[:3]), f, p[3:6])


def _similarity(p, f):
    return _centred(p[6] * _versor_matrix(p[:3]), f, p[3:6])


def _scale_versor(p, f):  # ITK's ScaleVersor3DTransform matrix is R + diag(s - 1) (checked against SimpleITK)
    return _centred(_versor_matrix(p[:3]) + np.diag(p[6:9] - 1.0), f, p[3:6])


def _scale(p, f):
    return _centred(np.diag(p[:3]), f if len(f) else np.zeros(3), np.zeros(3))


def _translation(p, f):
    return _homogeneous(np.eye(3), p[:3])


def _identity(p, f):
    return np.eye(4)


SUPPORTED_TRANSFORMS = {
    "AffineTransform": ((12,), (0, 3), _affine_like),
    "MatrixOffsetTransformBase": ((12,), (0, 3), _affine_like),
    "CenteredAffineTransform": ((15,), (0, 3), _centered_affine),
    "Euler3DTransform": ((6,), (3, 4), _euler),
    "VersorTransform": ((3,), (3,), _versor),
    "VersorRigid3DTransform": ((6,), (3,), _versor_rigid),
    "Similarity3DTransform": ((7,), (3,), _similarity),
    "ScaleVersor3DTransform": ((9,), (3,), _scale_versor),
    "ScaleTransform": ((3,), (0, 3), _scale),
    "TranslationTransform": ((3,), (0,), _translation),
    "IdentityTransform": ((0,), (0,), _identity),
}
"""ITK transform class names (without ``_double_3_3``) that :func:`read_affine` reads, with their parameter counts."""

_TYPE_RE = re.compile(r"^(?P<cls>[A-Za-z0-9]+?)_(?P<prec>double|float)_(?P<din>\d+)_(?P<dout>\d+)$")


def _lps_matrix(path: str, name: str, params: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Build the LPS 4x4 matrix of one ITK transform, with errors naming ``path``."""
    m = _TYPE_RE.match(name)
    if m is None:
        raise ValueError(f"{path}: unrecognised ITK transform type {name!r} (expected e.g. AffineTransform_double_3_3)")
    cls, din, dout = m.group("cls"), int(m.group("din")), int(m.group("dout"))
    if (din, dout) != (3, 3):
        raise ValueError(f"{path}: transform {name!r} is {din}-D -> {dout}-D; only 3-D (_3_3) transforms are supported")
    if cls not in SUPPORTED_TRANSFORMS:
        raise ValueError(
            f"{path}: unsupported ITK transform type {name!r}; supported: {', '.join(sorted(SUPPORTED_TRANSFORMS))}"
        )
    n_params, n_fixed, build = SUPPORTED_TRANSFORMS[cls]
    if len(params) not in n_params:
        raise ValueError(f"{path}: {name} needs {' or '.join(map(str, n_params))} Parameters, got {len(params)}")
    if len(fixed) not in n_fixed:
        raise ValueError(f"{path}: {name} needs {' or '.join(map(str, n_fixed))} FixedParameters, got {len(fixed)}")
    if not (np.isfinite(params).all() and np.isfinite(fixed).all()):
        raise ValueError(f"{path}: {name} has non-finite (NaN/Inf) parameters")
    try:
        return build(params, fixed)
    except ValueError as err:
        raise ValueError(f"{path}: {name}: {err}") from err


# ------------------------------------------------------------------------------------------------------ ITK text
def _parse_numbers(path: str, key: str, text: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in text.split()], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: could not parse the numbers of {key!r}: {text.strip()[:80]!r}") from err


def _read_text(path: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(type name, Parameters, FixedParameters)]`` of an ITK text transform file, in file order."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        raise ValueError(f"{path}: not an ITK text transform file (binary content)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not an ITK text transform file (not valid text: {err})") from err
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise ValueError(f"{path}: not an ITK text transform file (first line must be {_HEADER_LINE!r})")
    blocks: list[dict] = []
    for ln in lines:
        if ln.startswith("#"):
            continue
        key, sep, value = ln.partition(":")
        key = key.strip()
        if not sep or key not in ("Transform", "Parameters", "FixedParameters"):
            raise ValueError(f"{path}: unexpected line in ITK transform file: {ln[:80]!r}")
        if key == "Transform":
            blocks.append({"name": value.strip()})
            continue
        if not blocks:
            raise ValueError(f"{path}: {key!r} appears before any 'Transform:' line")
        if key in blocks[-1]:
            raise ValueError(f"{path}: transform {blocks[-1]['name']!r} has two {key!r} lines")
        blocks[-1][key] = _parse_numbers(path, key, value)
    if not blocks:
        raise ValueError(f"{path}: no 'Transform:' line found")
    out = []
    for b in blocks:
        if b["name"].startswith("CompositeTransform"):
            out.append((b["name"], b.get("Parameters", np.zeros(0)), b.get("FixedParameters", np.zeros(0))))
            continue
        for key in ("Parameters", "FixedParameters"):
            if key not in b:
                raise ValueError(f"{path}: transform {b['name']!r} has no {key!r} line")
        out.append((b["name"], b["Parameters"], b["FixedParameters"]))
    return out


# ---------------------------------------------------------------------------------------------- MATLAB v4 (.mat)
def _mat4_variable(name: str, values: np.ndarray) -> bytes:
    """One MATLAB level-4 column vector of little-endian float64, as ``vnl_matlab_write`` writes it."""
    values = np.ascontiguousarray(values, dtype="<f8").ravel()
    encoded = name.encode("ascii") + b"\x00"
    header = struct.pack("<5i", 0, values.size, 1, 0, len(encoded))
    return header + encoded + values.tobytes()


def _read_mat4(path: str) -> list[tuple[str, np.ndarray]]:
    """Variables ``[(name, column vector float64)]`` of a MATLAB level-4 file of real column vectors."""
    with open(path, "rb") as f:
        raw = f.read()
    out, pos = [], 0
    while pos < len(raw):
        if len(raw) - pos < 20:
            raise ValueError(f"{path}: truncated MATLAB v4 header at byte {pos} (not an ITK/ANTs .mat transform?)")
        head = None
        for endian in ("<", ">"):
            mopt, rows, cols, imagf, namlen = struct.unpack(endian + "5i", raw[pos: pos + 20])
            m, o, p, t = mopt // 1000, mopt // 100 % 10, mopt // 10 % 10, mopt % 10
            if 0 <= mopt < 5000 and m == (0 if endian == "<" else 1) and o == 0 and rows >= 0 and cols >= 0 \
                    and 0 < namlen <= 1024:
                head = (endian, p, t, rows, cols, imagf, namlen)
                break
        if head is None:
            raise ValueError(
                f"{path}: not a MATLAB v4 file as ITK/ANTs write them (bad header at byte {pos}; MATLAB v5/HDF5 "
                "files are not ITK transforms)"
            )
        endian, p, t, rows, cols, imagf, namlen = head
        if t != 0 or p not in (0, 1) or imagf:
            raise ValueError(f"{path}: MATLAB v4 variable at byte {pos} is not a real float64/float32 matrix")
        if cols != 1:
            raise ValueError(f"{path}: MATLAB v4 variable at byte {pos} has {cols} columns; ITK expects column vectors")
        pos += 20
        name_raw = raw[pos: pos + namlen]
        if len(name_raw) < namlen:
            raise ValueError(f"{path}: truncated MATLAB v4 variable name at byte {pos}")
        name = name_raw.rstrip(b"\x00").decode("ascii", errors="replace")
        pos += namlen
        dtype = np.dtype(endian + ("f8" if p == 0 else "f4"))
        nbytes = rows * cols * dtype.itemsize
        if len(raw) - pos < nbytes:
            raise ValueError(f"{path}: truncated data of MATLAB v4 variable {name!r} (need {nbytes} bytes)")
        out.append((name, np.frombuffer(raw[pos: pos + nbytes], dtype=dtype).astype(np.float64)))
        pos += nbytes
    if not out:
        raise ValueError(f"{path}: empty file (not an ITK/ANTs .mat transform)")
    return out


def _mat_transforms(path: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    variables = _read_mat4(path)
    if len(variables) % 2:
        raise ValueError(f"{path}: expected (parameters, 'fixed') pairs of variables, got {[n for n, _ in variables]}")
    out = []
    for (name, params), (fname, fixed) in zip(variables[::2], variables[1::2]):
        if fname != "fixed":
            raise ValueError(f"{path}: variable after {name!r} must be 'fixed' (the fixed parameters), got {fname!r}")
        out.append((name, params, fixed))
    return out


# ------------------------------------------------------------------------------------------------------- affines
def _suffix_kind(path: str) -> str:
    low = path.lower()
    if low.endswith(_TEXT_SUFFIXES):
        return "text"
    if low.endswith(_MAT_SUFFIX):
        return "mat"
    raise ValueError(f"{path}: unsupported transform file suffix; use .txt or .tfm (ITK text) or .mat (ANTs/ITK MATLAB)")


def _format_numbers(values) -> str:
    """Shortest text that reads back to the same float64 (``repr``), without ``-0.0``."""
    return " ".join(repr(float(v) + 0.0) for v in values)


def write_affine(path, matrix, *, center=None) -> None:
    """Write a world affine as an ITK/ANTs transform file (atomically).

    Args:
      path: ``.txt``/``.tfm`` -> ITK text (``#Insight Transform File V1.0``, ``AffineTransform_double_3_3``);
        ``.mat`` -> ANTs' MATLAB v4 binary (as ``antsRegistration``'s ``0GenericAffine.mat``: variables
        ``AffineTransform_double_3_3`` 12 x 1 float64 and ``fixed`` 3 x 1).
      matrix: ``(4, 4)`` world matrix mapping FIXED world points to MOVING world points (RAS+ mm, the pull
        direction), last row ``[0, 0, 0, 1]``, non-singular.
      center: optional ``(3,)`` centre of the ITK transform, RAS+ mm (stored in LPS as ``FixedParameters``);
        default the origin. The map is the same whatever the centre: ITK's ``x |-> A (x - c) + c + t`` with
        ``t = o - c + A c`` for the LPS matrix ``[A | o] = S M S``.

    Raises ``ValueError`` for a bad matrix/centre or suffix (nothing written).
    """
    path = os.fspath(path)
    kind = _suffix_kind(path)
    m = ras_lps_matrix(_check_matrix(matrix))
    c = np.zeros(3) if center is None else np.asarray(center, dtype=np.float64)
    if c.shape != (3,) or not np.isfinite(c).all():
        raise ValueError(f"center must be a finite (3,) point in RAS mm, got {c!r}")
    c = c * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
    a, offset = m[:3, :3], m[:3, 3]
    params = np.concatenate([a.ravel(), offset - c + a @ c])
    name = "AffineTransform_double_3_3"
    if kind == "mat":
        data = _mat4_variable(name, params) + _mat4_variable("fixed", c)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
    else:
        text = (f"{_HEADER_LINE}\n#Transform 0\nTransform: {name}\nParameters: {_format_numbers(params)}\n"
                f"FixedParameters: {_format_numbers(c)}\n")

        def write(tmp):
            with open(tmp, "w", encoding="ascii") as f:
                f.write(text)

    atomic_write(path, write)


def read_affine(path) -> np.ndarray:
    """Read an ITK text (``.txt``/``.tfm``) or ANTs/ITK MATLAB (``.mat``) linear transform as a RAS world matrix.

    Returns the ``(4, 4)`` float64 matrix ``M`` mapping FIXED (reference) world points to MOVING world points in
    RAS+ mm (``M = S N S`` for ITK's LPS map ``N``; see the module docstring). Supported types: the keys of
    :data:`SUPPORTED_TRANSFORMS` (double or float, 3-D), and, in text files, a ``CompositeTransform`` of them,
    composed as ITK applies it (``T1(T2(...(x)))`` for its transforms ``#1, #2, ...``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: (naming the file) unknown suffix; unreadable/garbled content; unsupported transform type or
        dimension (e.g. ``_2_2``); wrong number of (fixed) parameters; non-finite values; a singular matrix;
        several transforms not inside a ``CompositeTransform``; an empty composite.
    """
    path = os.fspath(path)
    kind = _suffix_kind(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"transform file not found: {path}")
    transforms = _read_text(path) if kind == "text" else _mat_transforms(path)
    if transforms[0][0].startswith("CompositeTransform"):
        head = transforms[0][0]
        m = _TYPE_RE.match(head)
        if m is None or (int(m.group("din")), int(m.group("dout"))) != (3, 3):
            raise ValueError(f"{path}: {head!r}: only 3-D (_3_3) composite transforms are supported")
        inner = transforms[1:]
        if not inner:
            raise ValueError(f"{path}: {head} holds no transforms")
        if any(name.startswith("CompositeTransform") for name, _, _ in inner):
            raise ValueError(f"{path}: nested CompositeTransforms are not supported")
        lps = np.eye(4)
        for name, params, fixed in inner:  # ITK's queue [T1, T2, ...] maps x to T1(T2(...(x)))
            lps = lps @ _lps_matrix(path, name, params, fixed)
    else:
        if len(transforms) != 1:
            raise ValueError(
                f"{path}: holds {len(transforms)} transforms ({', '.join(t[0] for t in transforms)}) outside a "
                "CompositeTransform; expected exactly one"
            )
        lps = _lps_matrix(path, *transforms[0])
    if not np.isfinite(lps).all():
        raise ValueError(f"{path}: the transform's matrix is not finite")
    if _singular(lps[:3, :3]):
        raise ValueError(f"{path}: the transform's 3x3 matrix is singular: {lps[:3, :3].tolist()}")
    return ras_lps_matrix(lps)


# -------------------------------------------------------------------------------------------- displacement fields
def _check_nifti_path(path: str) -> str:
    if not path.endswith(_NIFTI_SUFFIXES):
        raise ValueError(f"{path}: expected a NIfTI file name ending in .nii or .nii.gz")
    return path


def _check_grid_affine(affine, what="affine") -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ValueError(f"{what} must be a finite (4, 4) voxel -> world matrix, got shape {a.shape}")
    if not np.allclose(a[3], [0, 0, 0, 1], rtol=0, atol=1e-12) or _singular(a[:3, :3]):
        raise ValueError(f"{what} must have last row [0, 0, 0, 1] and a non-singular 3x3 part, got {a.tolist()}")
    return a


def _check_field(disp, name: str) -> np.ndarray:
    d = np.asarray(disp)
    if d.ndim != 4 or d.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (X, Y, Z, 3), got {d.shape}")
    if not np.issubdtype(d.dtype, np.floating) and not np.issubdtype(d.dtype, np.integer):
        raise ValueError(f"{name} must be a real array, got dtype {d.dtype}")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(d)).sum())} non-finite value(s)")
    return d


def write_displacement(path, disp_ras_mm, affine, *, dtype=np.float32) -> None:
    """Write a deformable world displacement as an ITK/ANTs displacement field (``1Warp.nii.gz``-style), atomically.

    Args:
      path: ``.nii.gz`` or ``.nii``.
      disp_ras_mm: ``(X, Y, Z, 3)`` displacement ``w`` on the fixed image's grid, RAS+ mm, pull direction: the fixed
        world point ``p = affine @ [i, j, k, 1]`` maps to ``p + w[i, j, k]`` (before the affine: see the module
        docstring for the chain ``M (p + w(p))``).
      affine: the fixed image's ``(4, 4)`` voxel -> RAS world affine. Must be free of shear (ITK's image geometry
        is origin + spacing + orthonormal direction; it would read a sheared grid differently).
      dtype: stored float type, ``float32`` (default, as ANTs writes) or ``float64``.

    The file: 5-D ``(X, Y, Z, 1, 3)``, intent ``VECTOR`` (1007), vectors in LPS mm (x and y of ``w`` negated), sform
    and qform both ``affine`` (code 1, scanner), spatial units mm. SimpleITK/ITK read it as a vector image usable
    as ``sitk.DisplacementFieldTransform`` (cast to ``sitkVectorFloat64``) and ANTs as a warp.
    """
    path = _check_nifti_path(os.fspath(path))
    d = _check_field(disp_ras_mm, "disp_ras_mm").astype(np.float64)
    a = _check_grid_affine(affine)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    lin = a[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    gram = (lin / spacing).T @ (lin / spacing)
    if not np.allclose(gram, np.eye(3), atol=1e-6):
        raise ValueError(
            "affine has shear (its columns are not orthogonal): ITK/ANTs images cannot represent that grid; "
            "resample the field to a shear-free grid first"
        )
    lps = d * np.array([-1.0, -1.0, 1.0])
    data = lps.astype(dtype)[:, :, :, None, :]
    img = nib.Nifti1Image(data, a)
    img.set_sform(a, code=1)
    img.set_qform(a, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_intent("vector", ())
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def read_displacement(path, *, frame: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK/ANTs displacement field NIfTI as a RAS world displacement on its grid.

    Args:
      path: ``.nii``/``.nii.gz`` holding a 5-D ``(X, Y, Z, 1, 3)`` vector image (as :func:`write_displacement`,
        ITK and ANTs write them).
      frame: the axes of the stored vectors, ``"lps"`` or ``"ras"``. ``None`` (default) takes it from the intent:
        ``VECTOR`` (1007, what ITK/ANTs write) -> LPS; ``DISPVECT`` (1006) -> RAS (as ITK >= 5.4 reads it); any
        other intent raises unless ``frame`` is given.

    Returns:
      ``(disp_ras_mm, affine)``: ``(X, Y, Z, 3)`` float64 displacement in RAS+ mm (pull direction, ``p -> p + w(p)``
      at ``p = affine @ [i, j, k, 1]``) and the ``(4, 4)`` float64 voxel -> RAS world affine of the grid.

    Raises:
      FileNotFoundError: no such file.
      ValueError: (naming the file) unreadable file, wrong shape, unknown vector frame, non-finite values.
    """
    path = _check_nifti_path(os.fspath(path))
    if frame not in (None, "lps", "ras"):
        raise ValueError(f"frame must be None, 'lps' or 'ras', got {frame!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"displacement field not found: {path}")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float64)
        affine = np.asarray(img.affine, dtype=np.float64)
        intent = int(img.header["intent_code"])
    except Exception as err:  # nibabel raises many types
        raise ValueError(f"could not read NIfTI file {path}: {type(err).__name__}: {err}") from err
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != 3:
        raise ValueError(f"{path}: expected a 3-D displacement field stored (X, Y, Z, 1, 3), got shape {data.shape}")
    if frame is None:
        if intent == _INTENT_VECTOR:
            frame = "lps"
        elif intent == _INTENT_DISPVECT:
            frame = "ras"
        else:
            raise ValueError(
                f"{path}: intent code {intent} does not say whether the vectors are LPS (ITK's VECTOR, 1007) or RAS "
                "(DISPVECT, 1006); pass frame='lps' or frame='ras'"
            )
    disp = data[:, :, :, 0, :]
    if not np.isfinite(disp).all():
        raise ValueError(f"{path}: contains {int((~np.isfinite(disp)).sum())} non-finite value(s)")
    if frame == "lps":
        disp = disp * np.array([-1.0, -1.0, 1.0])
    return disp, affine


def compose_world(matrix, disp_ras_mm, affine) -> np.ndarray:
    """Displacement of the full map ``p -> M (p + w(p))`` on the fixed grid: ``M (p + w(p)) - p``, RAS mm.

    Args:
      matrix: ``(4, 4)`` RAS world matrix ``M``, fixed -> moving.
      disp_ras_mm: ``(X, Y, Z, 3)`` deformable displacement ``w`` on the fixed grid, RAS mm (applied first).
      affine: the fixed grid's ``(4, 4)`` voxel -> RAS world affine (``p = affine @ [i, j, k, 1]``).

    Returns ``(X, Y, Z, 3)`` float64 NumPy: the one displacement field equivalent to the chain (e.g. for
    :func:`write_displacement` with no affine file, or to compare chains).
    """
    m = _check_matrix(matrix)
    d = _check_field(disp_ras_mm, "disp_ras_mm").astype(np.float64)
    a = _check_grid_affine(affine)
    p = _world_points(a, d.shape[:3])
    q = p + d
    return q @ m[:3, :3].T + m[:3, 3] - p


def _world_points(affine: np.ndarray, shape) -> np.ndarray:
    """``(X, Y, Z, 3)`` float64 world coordinates ``affine @ [i, j, k, 1]`` of a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


# ------------------------------------------------------------------------------------------------------ Learn2Reg
def _l2r_id(value, what: str) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= int(value) <= 9999:
            raise ValueError(f"{what} must lie in 0..9999, got {value}")
        return f"{int(value):04d}"
    if isinstance(value, str) and re.fullmatch(r"\d{4}", value):
        return value
    raise ValueError(f"{what} must be an int 0..9999 or a 4-digit string, got {value!r}")


def l2r_name(fixed_id, moving_id, *, fixed_modality=None, moving_modality=None, suffix: str = ".nii.gz") -> str:
    """File name Learn2Reg's evaluation looks for: ``disp_FFFF_MMMM.nii.gz`` or ``disp_FFFF_fmod_MMMM_mmod.nii.gz``.

    Args:
      fixed_id, moving_id: case numbers (int 0..9999 or 4-digit strings): the ``NNNN`` of ``Task_NNNN_MMMM.nii.gz``
        image names (the evaluation takes characters ``[-16:-12]`` of the image file names).
      fixed_modality, moving_modality: the ``MMMM`` modality numbers (``[-11:-7]``). When both are given the long
        name ``disp_FFFF_fmod_MMMM_mmod`` is returned, which the evaluation always accepts; when both are omitted,
        the short name ``disp_FFFF_MMMM``, which the current evaluation accepts only for pairs whose fixed modality
        is ``0000`` and moving modality ``0001`` (intra-patient tasks such as LungCT/NLST); give the modalities
        for other pairs.
      suffix: ``".nii.gz"`` or ``".npz"`` (the only two the evaluation reads).
    """
    if suffix not in (".nii.gz", ".npz"):
        raise ValueError(f"suffix must be '.nii.gz' or '.npz' (what the Learn2Reg evaluation reads), got {suffix!r}")
    f, m = _l2r_id(fixed_id, "fixed_id"), _l2r_id(moving_id, "moving_id")
    if (fixed_modality is None) != (moving_modality is None):
        raise ValueError("give both fixed_modality and moving_modality, or neither")
    if fixed_modality is None:
        return f"disp_{f}_{m}{suffix}"
    fm, mm = _l2r_id(fixed_modality, "fixed_modality"), _l2r_id(moving_modality, "moving_modality")
    return f"disp_{f}_{fm}_{m}_{mm}{suffix}"


def write_l2r_displacement(path, disp_vox, *, affine=None, dtype=np.float32) -> None:
    """Write a voxel displacement in the format of Learn2Reg's evaluation script (``MDL-UzL/L2R``), atomically.

    The evaluation (``evaluation/evaluation.py``) loads ``disp = nib.load(f).get_fdata()`` (or the single array of
    an ``.npz``, cast to float32), checks ``disp.shape == expected_shape`` = ``(H, W, D, 3)`` of the fixed image,
    then warps the moving label map by nearest neighbour in voxel coordinates::

        identity = np.meshgrid(np.arange(H), np.arange(W), np.arange(D), indexing="ij")
        warped_seg = scipy.ndimage.map_coordinates(moving_seg, identity + disp.transpose(3, 0, 1, 2), order=0)

    i.e. ``warped[x] = moving[x + disp[x]]``: jaxreg's voxel pull convention, component ``k`` along array axis ``k``
    of the NIfTI arrays as nibabel loads them (no reorientation), on the fixed grid, in voxels (not mm). TRE is
    ``|x_fix + disp(x_fix) - x_mov| * spacing_mov`` per landmark (``disp`` sampled by cubic spline at the fixed
    landmarks, voxel coordinates) and SDlogJ uses the central-difference Jacobian of ``disp``. One border
    difference: SciPy's order-0 ``map_coordinates`` (mode ``constant``) returns 0 for any sample point outside
    ``[0, n - 1]`` on an axis, even by less than half a voxel, where ``jaxreg.spatial.warp_labels`` takes the
    nearest voxel; label maps warped by the two can differ in that outermost half-voxel strip.

    Args:
      path: ``.nii.gz`` (stored 4-D ``(H, W, D, 3)``, NOT the 5-D vector layout, which would fail the shape check)
        or ``.npz`` (one array, key ``arr_0``). Use :func:`l2r_name` for the file name.
      disp_vox: ``(H, W, D, 3)`` displacement in voxels of the fixed grid (jaxreg's ``disp``).
      affine: the fixed image's ``(4, 4)`` affine written to the NIfTI header (the evaluation ignores it;
        viewers use it). Identity when omitted. Not allowed with ``.npz``.
      dtype: ``float32`` (default) or ``float64``; ``.npz`` also allows ``float16`` (half the size; the
        evaluation casts to float32).
    """
    path = os.fspath(path)
    d = _check_field(disp_vox, "disp_vox")
    dtype = np.dtype(dtype)
    if path.endswith(".nii.gz"):
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float32 or float64 for .nii.gz, got {dtype}")
        a = np.eye(4) if affine is None else _check_grid_affine(affine)
        img = nib.Nifti1Image(d.astype(dtype), a)
        img.set_sform(a, code=1)
        img.set_qform(a, code=1)
        img.header.set_xyzt_units("mm")
        atomic_write(path, lambda tmp: nib.save(img, tmp))
    elif path.endswith(".npz"):
        if dtype not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float16, float32 or float64 for .npz, got {dtype}")
        if affine is not None:
            raise ValueError(".npz holds the displacement array only: affine must be omitted")
        arr = d.astype(dtype)
        atomic_write(path, lambda tmp: np.savez_compressed(tmp, arr))
    else:
        raise ValueError(f"{path}: Learn2Reg displacement files end in .nii.gz or .npz")


def read_l2r_displacement(path) -> np.ndarray:
    """Read a Learn2Reg displacement file as the evaluation does: ``(H, W, D, 3)`` float64 voxels (``.nii.gz``)
    or float32 (``.npz``). Raises ``FileNotFoundError``/``ValueError`` naming the file."""
    path = os.fspath(path)
    if not path.endswith((".nii.gz", ".npz")):
        raise ValueError(f"{path}: Learn2Reg displacement files end in .nii.gz or .npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Learn2Reg displacement file not found: {path}")
    try:
        if path.endswith(".nii.gz"):
            disp = np.asarray(nib.load(path).get_fdata())
        else:
            with np.load(path, allow_pickle=False) as z:
                if len(z.files) != 1:
                    raise ValueError(f"expected one array, found {len(z.files)}")
                disp = z[z.files[0]].astype(np.float32)
    except Exception as err:
        raise ValueError(f"could not read Learn2Reg displacement {path}: {type(err).__name__}: {err}") from err
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise ValueError(f"{path}: expected shape (H, W, D, 3), got {disp.shape}")
    return disp
