"""ITK / ANTs / Learn2Reg transform files (``jaxreg.data.itk``): round trips, the real open_ms files, and the
conventions checked against SimpleITK (and ANTsPy where it is installed).

The chain under test: a fixed world point ``p`` (RAS mm) maps to ``M (p + w(p))`` -- the displacement field first,
then the affine -- which is ITK's ``CompositeTransform`` with the affine added first and the field second, and
``antsApplyTransforms -t warp -t affine``.
"""
import glob
import os
import struct

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from jaxreg.data import itk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN_MS = os.path.join(ROOT, "..", "shared", "data", "open_ms", "longitudinal", "patient01")
S3 = np.array([-1.0, -1.0, 1.0])
FIXED_SHAPE = (12, 14, 10)
MOVING_SHAPE = (15, 13, 11)


# --------------------------------------------------------------------------------------------------------- helpers
def _grid_affine(rotvec, spacing, origin, *, shape=None, float32=False):
    """Oblique, anisotropic voxel -> RAS affine (rotation @ diag(spacing), then origin); with ``shape``, ``origin``
    is the world position of the grid's centre instead of voxel 0's."""
    a = np.eye(4)
    a[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    if shape is not None:
        a[:3, 3] -= a[:3, :3] @ ((np.array(shape) - 1) / 2)
    return a.astype(np.float32).astype(np.float64) if float32 else a


def _world_matrix(rng):
    """A random fixed -> moving RAS world matrix: a few degrees, some scaling and shear, several mm."""
    m = np.eye(4)
    shear = np.eye(3) + rng.uniform(-0.05, 0.05, (3, 3))
    m[:3, :3] = Rotation.from_rotvec(rng.uniform(-0.15, 0.15, 3)).as_matrix() @ shear
    m[:3, 3] = rng.uniform(-5, 5, 3)
    return m


def _smooth_field(rng, shape, amplitude):
    w = ndimage.gaussian_filter(rng.normal(size=shape + (3,)), sigma=(2, 2, 2, 0))
    return amplitude * w / np.abs(w).max()


def _apply(m, pts):
    return pts @ m[:3, :3].T + m[:3, 3]


def _world(affine, shape):
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    return _apply(affine, idx)


def _moving_image(shape):
    """Smooth blobs (float32), so linear interpolation is well conditioned."""
    x = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    img = np.exp(-8 * ((x - [0.2, -0.1, 0.1]) ** 2).sum(-1)) + 0.5 * np.exp(-5 * ((x + [0.3, 0.2, -0.2]) ** 2).sum(-1))
    return (img + 0.3 * x[..., 0] * x[..., 1]).astype(np.float32)


def _resample_reference(moving, moving_affine, matrix, w, fixed_affine):
    """Resample ``moving`` on the fixed grid through ``p -> M (p + w(p))`` with scipy (order 1); also returns the
    mask of fixed voxels whose moving index lies in ``[0, n - 1]`` on every axis (no boundary conventions)."""
    p = _world(fixed_affine, w.shape[:3])
    q = _apply(matrix, p + w)
    idx = _apply(np.linalg.inv(moving_affine), q)
    inside = np.all((idx >= 0) & (idx <= np.array(moving.shape) - 1), axis=-1)
    out = ndimage.map_coordinates(moving.astype(np.float64), np.moveaxis(idx, -1, 0), order=1, mode="nearest")
    return out, inside


@pytest.fixture(params=["right_handed", "left_handed"])
def scene(request, tmp_path, rng):
    """An oblique, anisotropic fixed/moving pair of grids, a world matrix, a smooth field, and their files. The
    left-handed variant flips the fixed grid's first voxel axis (negative determinant, as in LAS/radiological
    images; NIfTI's qform stores it through qfac)."""
    centre = np.array([1.0, -2.0, 3.0])  # both grids about the same world point; the moving one is larger
    spacing = [1.5, 0.9, 2.2] if request.param == "right_handed" else [-1.5, 0.9, 2.2]
    fixed_affine = _grid_affine([0.3, -0.2, 0.25], spacing, centre, shape=FIXED_SHAPE, float32=True)
    moving_affine = _grid_affine([-0.2, 0.15, -0.3], [2.0, 2.2, 2.8], centre, shape=MOVING_SHAPE, float32=True)
    matrix = _world_matrix(rng)
    w = _smooth_field(rng, FIXED_SHAPE, 3.0).astype(np.float32).astype(np.float64)
    moving = _moving_image(MOVING_SHAPE)
    files = {
        "txt": tmp_path / "0GenericAffine.txt",
        "mat": tmp_path / "0GenericAffine.mat",
        "warp": tmp_path / "1Warp.nii.gz",
        "fixed_path": tmp_path / "fixed.nii.gz",
        "moving_path": tmp_path / "moving.nii.gz",
    }
    itk.write_affine(files["txt"], matrix, center=[4.0, -3.0, 2.0])
    itk.write_affine(files["mat"], matrix)
    itk.write_displacement(files["warp"], w, fixed_affine)
    nib.save(nib.Nifti1Image(np.zeros(FIXED_SHAPE, np.float32), fixed_affine), files["fixed_path"])
    nib.save(nib.Nifti1Image(moving, moving_affine), files["moving_path"])
    return dict(fixed_affine=fixed_affine, moving_affine=moving_affine, matrix=matrix, w=w, moving=moving, **files)


# ---------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".txt", ".tfm", ".mat"])
@pytest.mark.parametrize("center", [None, [12.5, -30.25, 7.0]])
def test_affine_round_trip(tmp_path, rng, suffix, center):
    for _ in range(3):
        m = _world_matrix(rng)
        path = tmp_path / f"affine{suffix}"
        itk.write_affine(path, m, center=center)
        back = itk.read_affine(path)
        assert back.dtype == np.float64 and back.shape == (4, 4)
        np.testing.assert_allclose(back, m, rtol=0, atol=1e-12)
        if center is None:
            np.testing.assert_array_equal(back, m)  # exact: no centre arithmetic, all digits kept
    assert [p.name for p in tmp_path.iterdir()] == [f"affine{suffix}"]  # no temporary files left


def test_text_file_layout(tmp_path):
    m = np.eye(4)
    m[:3, :3] = [[1.0, 0.1, 0.2], [0.0, 0.9, 0.3], [-0.1, 0.05, 1.2]]
    m[:3, 3] = [1.0, 2.0, 3.0]
    itk.write_affine(tmp_path / "a.txt", m)
    lines = (tmp_path / "a.txt").read_text().splitlines()
    assert lines[0] == "#Insight Transform File V1.0"
    assert lines[2] == "Transform: AffineTransform_double_3_3"
    params = np.array(lines[3].split(":")[1].split(), dtype=float)
    lps = S3[:, None] * m[:3, :3] * S3[None, :]  # S M S
    np.testing.assert_array_equal(params[:9], lps.ravel())  # matrix row by row ...
    np.testing.assert_array_equal(params[9:], S3 * m[:3, 3])  # ... then the translation (LPS)
    assert lines[4].split(":")[1].split() == ["0.0", "0.0", "0.0"]


def test_mat_layout_matches_what_itk_writes(tmp_path, rng):
    """Byte for byte what SimpleITK (ITK's MatlabTransformIO, as ANTs uses it) writes for the same transform."""
    sitk = pytest.importorskip("SimpleITK")
    m = _world_matrix(rng)
    itk.write_affine(tmp_path / "ours.mat", m, center=[1.0, 2.0, 3.0])
    lps = itk.ras_lps_matrix(m)
    c = S3 * [1.0, 2.0, 3.0]
    ref = sitk.AffineTransform(lps[:3, :3].ravel().tolist(), (lps[:3, 3] - c + lps[:3, :3] @ c).tolist(), c.tolist())
    sitk.WriteTransform(ref, str(tmp_path / "itk.mat"))
    ours = (tmp_path / "ours.mat").read_bytes()
    theirs = (tmp_path / "itk.mat").read_bytes()
    assert struct.unpack("<5i", ours[:20]) == (0, 12, 1, 0, len("AffineTransform_double_3_3") + 1)
    assert ours[20:47] == b"AffineTransform_double_3_3\x00"
    assert ours[47 + 96: 47 + 96 + 26] == struct.pack("<5i", 0, 3, 1, 0, 6) + b"fixed\x00"
    assert len(ours) == len(theirs) == 20 + 27 + 96 + 20 + 6 + 24
    assert ours[:47] == theirs[:47] and ours[143:169] == theirs[143:169]  # headers and names identical
    np.testing.assert_allclose(np.frombuffer(ours[47:143], "<f8"), np.frombuffer(theirs[47:143], "<f8"), atol=1e-12)
    np.testing.assert_allclose(itk.read_affine(tmp_path / "itk.mat"), m, atol=1e-12)


def test_displacement_round_trip(tmp_path, rng):
    affine = _grid_affine([0.4, 0.1, -0.3], [0.7, 1.3, 2.5], [10.0, -20.0, 5.0], float32=True)
    w = _smooth_field(rng, FIXED_SHAPE, 4.0)
    itk.write_displacement(tmp_path / "w64.nii.gz", w, affine, dtype=np.float64)
    back, back_affine = itk.read_displacement(tmp_path / "w64.nii.gz")
    assert back.dtype == np.float64 and back.shape == FIXED_SHAPE + (3,)
    np.testing.assert_array_equal(back, w)  # float64 storage: exact
    np.testing.assert_allclose(back_affine, affine, rtol=0, atol=1e-12)
    itk.write_displacement(tmp_path / "w32.nii", w, affine)
    back32, _ = itk.read_displacement(tmp_path / "w32.nii")
    np.testing.assert_array_equal(back32, w.astype(np.float32))  # float32 storage: exact to float32

    img = nib.load(tmp_path / "w32.nii")
    hdr = img.header
    assert img.shape == FIXED_SHAPE + (1, 3) and img.get_data_dtype() == np.float32
    assert int(hdr["intent_code"]) == 1007
    assert hdr.get_xyzt_units()[0] == "mm"
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    stored = np.asarray(img.dataobj)[:, :, :, 0, :]
    np.testing.assert_array_equal(stored, (w * S3).astype(np.float32))  # LPS vectors on disk


def test_displacement_dispvect_is_read_as_ras(tmp_path, rng):
    """A DISPVECT (1006) file holds RAS vectors (as ITK >= 5.4 reads it); other intents need ``frame``."""
    affine = _grid_affine([0.0, 0.0, 0.2], [1.0, 1.0, 2.0], [0.0, 0.0, 0.0])
    w = rng.normal(size=(4, 5, 3, 3))
    img = nib.Nifti1Image(w[:, :, :, None, :], affine)
    img.header.set_intent(1006, ())
    nib.save(img, tmp_path / "d.nii.gz")
    np.testing.assert_allclose(itk.read_displacement(tmp_path / "d.nii.gz")[0], w, atol=1e-12)
    np.testing.assert_allclose(itk.read_displacement(tmp_path / "d.nii.gz", frame="lps")[0], w * S3, atol=1e-12)
    img.header.set_intent("none", ())
    nib.save(img, tmp_path / "n.nii.gz")
    with pytest.raises(ValueError, match=r"n\.nii\.gz.*frame="):
        itk.read_displacement(tmp_path / "n.nii.gz")
    np.testing.assert_allclose(itk.read_displacement(tmp_path / "n.nii.gz", frame="ras")[0], w, atol=1e-12)


def test_compose_world(rng):
    affine = _grid_affine([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    m = _world_matrix(rng)
    w = rng.normal(size=(3, 4, 5, 3))
    out = itk.compose_world(m, w, affine)
    i, j, k = 2, 1, 3
    p = affine[:3, :3] @ [i, j, k] + affine[:3, 3]
    np.testing.assert_allclose(out[i, j, k], m[:3, :3] @ (p + w[i, j, k]) + m[:3, 3] - p, atol=1e-12)
    np.testing.assert_allclose(itk.compose_world(np.eye(4), w, affine), w, atol=1e-12)


# ----------------------------------------------------------------------------------------------- real open_ms files
def _parse_itk_text(path):
    with open(path) as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return fields["Transform"].strip(), np.array(fields["Parameters"].split(), float), np.array(
        fields["FixedParameters"].split(), float)


def _rotation_deg(a):
    u, _, vt = np.linalg.svd(a)
    return np.degrees(Rotation.from_matrix(u @ vt).magnitude())


@pytest.mark.skipif(not os.path.isdir(OPEN_MS), reason="../shared/data (open_ms) is absent")
def test_reads_real_open_ms_transforms(tmp_path):
    paths = sorted(glob.glob(os.path.join(OPEN_MS, "*_FLAIR_to_common_space.txt"))) + sorted(
        glob.glob(os.path.join(OPEN_MS, "*_intrastudy_to_FLAIR.txt")))
    assert len(paths) == 6
    for path in paths:
        name, params, centre = _parse_itk_text(path)
        assert name == "MatrixOffsetTransformBase_double_3_3" and params.shape == (12,) and centre.shape == (3,)
        a, t = params[:9].reshape(3, 3), params[9:]
        m = itk.read_affine(path)
        # notes.md: LPS mm, x |-> A (x - c) + c + t from the fixed (reference) space to the moving one.
        x_lps = np.array([[0.0, 0.0, 0.0], [30.0, -40.0, 20.0], [-55.0, 10.0, 65.0]])
        expected_lps = (x_lps - centre) @ a.T + centre + t
        np.testing.assert_allclose(S3 * _apply(m, S3 * x_lps), expected_lps, atol=1e-9)
        angle = _rotation_deg(m[:3, :3])
        if "intrastudy" in path:  # T1W/T2W -> FLAIR within a visit: close to identity
            assert angle < 1.5 and np.abs(m[:3, :3] - np.eye(3)).max() < 0.03 and np.abs(t).max() < 1.0
        else:  # visits to the common space: a few degrees
            assert 1.0 < angle < 10.0
        # and back out through both writers
        for suffix in (".txt", ".mat"):
            itk.write_affine(tmp_path / f"back{suffix}", m, center=S3 * centre)
            np.testing.assert_allclose(itk.read_affine(tmp_path / f"back{suffix}"), m, atol=1e-12)
    # The two visits' FLAIRs meet in the common space: visit 1 -> visit 2 differs by a few degrees and mm.
    m1 = itk.read_affine(os.path.join(OPEN_MS, "study1_FLAIR_to_common_space.txt"))
    m2 = itk.read_affine(os.path.join(OPEN_MS, "study2_FLAIR_to_common_space.txt"))
    between = np.linalg.inv(m2) @ m1
    assert 2.0 < _rotation_deg(between[:3, :3]) < 15.0


@pytest.mark.skipif(not os.path.isdir(OPEN_MS), reason="../shared/data (open_ms) is absent")
def test_open_ms_transforms_match_simpleitk():
    sitk = pytest.importorskip("SimpleITK")
    x_lps = np.random.default_rng(1).uniform(-80, 80, (20, 3))
    for path in sorted(glob.glob(os.path.join(OPEN_MS, "*.txt"))):
        t = sitk.ReadTransform(path)
        m = itk.read_affine(path)
        got = np.array([t.TransformPoint(x.tolist()) for x in x_lps])
        np.testing.assert_allclose(S3 * _apply(m, S3 * x_lps), got, atol=1e-9)


# --------------------------------------------------------------------------------------------- against SimpleITK
def _sitk_transforms(sitk):
    ts = {
        "affine": sitk.AffineTransform([1.1, 0.1, 0.2, 0.0, 0.9, 0.3, -0.1, 0.05, 1.2], [1, 2, 3], [4, 5, 6]),
        "euler": sitk.Euler3DTransform([1, 2, 3], 0.1, -0.2, 0.3, [4, 5, 6]),
        "similarity": sitk.Similarity3DTransform(1.3, [0.2, 0.3, 0.4], 0.5, [1, 2, 3], [4, 5, 6]),
        "versor_rigid": sitk.VersorRigid3DTransform([0.2, -0.3, 0.4], 0.5, [1, 2, 3], [4, 5, 6]),
        "versor": sitk.VersorTransform([0.2, -0.3, 0.4], 0.5, [4, 5, 6]),
        "scale_versor": sitk.ScaleVersor3DTransform([1.1, 1.2, 0.9], [0.2, 0.3, 0.4], 0.5, [1, 2, 3], [4, 5, 6]),
        "scale": sitk.ScaleTransform(3, [1.1, 1.2, 1.3]),
        "translation": sitk.TranslationTransform(3, [1, 2, 3]),
        "identity": sitk.Transform(3, sitk.sitkIdentity),
    }
    ts["scale"].SetCenter([3.0, -1.0, 2.0])
    zyx = sitk.Euler3DTransform([1, 2, 3], 0.1, -0.2, 0.3, [4, 5, 6])
    zyx.SetComputeZYX(True)
    ts["euler_zyx"] = zyx
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(ts["affine"])
    comp.AddTransform(ts["euler"])
    comp.AddTransform(ts["similarity"])
    ts["composite"] = comp
    return ts


@pytest.mark.parametrize("suffix", [".txt", ".mat"])
def test_reads_transform_types_as_simpleitk_applies_them(tmp_path, suffix):
    sitk = pytest.importorskip("SimpleITK")
    x_lps = np.random.default_rng(2).uniform(-50, 50, (10, 3))
    for name, t in _sitk_transforms(sitk).items():
        if suffix == ".mat" and name == "composite":
            continue  # ITK writes composites to .txt/.h5 only
        path = tmp_path / f"{name}{suffix}"
        sitk.WriteTransform(t, str(path))
        m = itk.read_affine(path)
        got = np.array([t.TransformPoint(x.tolist()) for x in x_lps])
        np.testing.assert_allclose(S3 * _apply(m, S3 * x_lps), got, atol=1e-9, err_msg=name)


def test_reads_centered_affine_transform(tmp_path):
    """CenteredAffineTransform: matrix, centre, translation all in ``Parameters`` (SimpleITK reads it only inside a
    composite)."""
    sitk = pytest.importorskip("SimpleITK")
    body = ("Transform: CenteredAffineTransform_double_3_3\n"
            "Parameters: 1.1 0.1 0 0 0.9 0.2 0.05 0 1 1 2 3 4 5 6\nFixedParameters: 7 8 9\n")
    (tmp_path / "c.txt").write_text("#Insight Transform File V1.0\n#Transform 0\n" + body)
    (tmp_path / "comp.txt").write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: CompositeTransform_double_3_3\n#Transform 1\n" + body)
    t = sitk.ReadTransform(str(tmp_path / "comp.txt"))
    x_lps = np.random.default_rng(3).uniform(-50, 50, (10, 3))
    got = np.array([t.TransformPoint(x.tolist()) for x in x_lps])
    for f in ("c.txt", "comp.txt"):
        np.testing.assert_allclose(S3 * _apply(itk.read_affine(tmp_path / f), S3 * x_lps), got, atol=1e-9)


@pytest.mark.parametrize("kind", ["txt", "mat"])
def test_simpleitk_reads_our_affine(scene, kind):
    sitk = pytest.importorskip("SimpleITK")
    t = sitk.ReadTransform(str(scene[kind]))
    lps = itk.ras_lps_matrix(scene["matrix"])
    x = np.random.default_rng(4).uniform(-60, 60, (10, 3))
    got = np.array([t.TransformPoint(p.tolist()) for p in x])
    np.testing.assert_allclose(got, _apply(lps, x), atol=1e-9)


def _sitk_chain(sitk, affine_path, warp_path, *, field_first=True):
    field = sitk.Cast(sitk.ReadImage(str(warp_path)), sitk.sitkVectorFloat64)
    affine = sitk.ReadTransform(str(affine_path))
    comp = sitk.CompositeTransform(3)
    parts = [affine, sitk.DisplacementFieldTransform(field)]  # affine added first: applied second
    for t in parts if field_first else parts[::-1]:
        comp.AddTransform(t)
    return comp


def test_simpleitk_reads_our_field_geometry(scene):
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.ReadImage(str(scene["warp"]))
    assert img.GetSize() == FIXED_SHAPE and img.GetNumberOfComponentsPerPixel() == 3
    lin = scene["fixed_affine"][:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    np.testing.assert_allclose(img.GetSpacing(), spacing, rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), S3 * scene["fixed_affine"][:3, 3], atol=1e-5)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), S3[:, None] * lin / spacing, atol=1e-6)
    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X, 3): ITK keeps the vectors as stored, LPS
    np.testing.assert_allclose(arr.transpose(2, 1, 0, 3), scene["w"] * S3, atol=1e-6)


@pytest.mark.parametrize("kind", ["txt", "mat"])
def test_chain_order_against_simpleitk_points(scene, kind):
    """ITK's CompositeTransform [affine, field] maps the LPS point S p to S M (p + w(p))."""
    sitk = pytest.importorskip("SimpleITK")
    fa, m, w = scene["fixed_affine"], scene["matrix"], scene["w"]
    p = _world(fa, FIXED_SHAPE).reshape(-1, 3)
    expected = _apply(m, p + w.reshape(-1, 3))
    chain = _sitk_chain(sitk, scene[kind], scene["warp"])
    got = S3 * np.array([chain.TransformPoint((S3 * x).tolist()) for x in p])
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 geometry of the NIfTI header
    np.testing.assert_allclose(
        itk.compose_world(m, w, fa).reshape(-1, 3) + p, got, atol=2e-4)
    # The other order is measurably different (the test can tell them apart).
    other = _sitk_chain(sitk, scene[kind], scene["warp"], field_first=False)
    got_other = S3 * np.array([other.TransformPoint((S3 * x).tolist()) for x in p])
    assert np.abs(got_other - expected).max() > 0.5


def test_resample_matches_simpleitk(scene):
    """sitk.Resample(moving, fixed, CompositeTransform[affine, field], linear) equals resampling through
    M (p + w(p)) with scipy on an oblique, anisotropic pair of grids."""
    sitk = pytest.importorskip("SimpleITK")
    chain = _sitk_chain(sitk, scene["mat"], scene["warp"])
    moving = sitk.ReadImage(str(scene["moving_path"]))
    fixed = sitk.ReadImage(str(scene["fixed_path"]))
    out = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, chain, sitk.sitkLinear, 0.0, sitk.sitkFloat64))
    out = out.transpose(2, 1, 0)  # ITK arrays are (z, y, x)
    ref, inside = _resample_reference(scene["moving"], scene["moving_affine"], scene["matrix"], scene["w"],
                                      scene["fixed_affine"])
    assert inside.mean() > 0.5
    assert np.abs(out - ref)[inside].max() < 1e-4
    assert np.corrcoef(out[inside], ref[inside])[0, 1] > 0.9999


def test_resample_matches_ants(scene):
    """ANTsPy (antsApplyTransforms): transformlist=[warp, affine] is p -> M (p + w(p))."""
    ants = pytest.importorskip("ants")
    fixed = ants.image_read(str(scene["fixed_path"]))
    moving = ants.image_read(str(scene["moving_path"]))
    ref, inside = _resample_reference(scene["moving"], scene["moving_affine"], scene["matrix"], scene["w"],
                                      scene["fixed_affine"])
    for kind in ("mat", "txt"):
        out = ants.apply_transforms(fixed, moving, transformlist=[str(scene["warp"]), str(scene[kind])],
                                    interpolator="linear").numpy()
        assert out.shape == FIXED_SHAPE
        assert np.abs(out - ref)[inside].max() < 1e-4, kind
    swapped = ants.apply_transforms(fixed, moving, transformlist=[str(scene["mat"]), str(scene["warp"])],
                                    interpolator="linear").numpy()
    assert np.abs(swapped - ref)[inside].max() > 1e-2  # the order matters and is the one documented


def test_reads_what_ants_registration_writes(scene, tmp_path):
    """ANTsPy's own 0GenericAffine.mat (AffineTransform_float_3_3, float32) and 1Warp.nii.gz, read back by jaxreg and
    resampled through M (p + w(p)), reproduce ants.apply_transforms."""
    ants = pytest.importorskip("ants")
    ref, _ = _resample_reference(scene["moving"], scene["moving_affine"], scene["matrix"], scene["w"],
                                 scene["fixed_affine"])
    nib.save(nib.Nifti1Image(ref.astype(np.float32), scene["fixed_affine"]), tmp_path / "target.nii.gz")
    fixed = ants.image_read(str(tmp_path / "target.nii.gz"))
    moving = ants.image_read(str(scene["moving_path"]))
    reg = ants.registration(fixed, moving, type_of_transform="SyN", reg_iterations=(10, 5, 2),
                            outprefix=str(tmp_path / "reg_"))
    warp_path, affine_path = reg["fwdtransforms"]
    assert warp_path.endswith("1Warp.nii.gz") and affine_path.endswith("0GenericAffine.mat")
    matrix = itk.read_affine(affine_path)
    w, grid = itk.read_displacement(warp_path)
    np.testing.assert_allclose(grid, scene["fixed_affine"], atol=1e-5)
    out = ants.apply_transforms(fixed, moving, transformlist=reg["fwdtransforms"], interpolator="linear").numpy()
    ours, inside = _resample_reference(scene["moving"], scene["moving_affine"], matrix, w, grid)
    assert inside.mean() > 0.3
    assert np.abs(out - ours)[inside].max() < 1e-4


# --------------------------------------------------------------------------------------------------------- Learn2Reg
def test_l2r_name():
    assert itk.l2r_name(1, 2) == "disp_0001_0002.nii.gz"
    assert itk.l2r_name("0395", 396, suffix=".npz") == "disp_0395_0396.npz"
    assert itk.l2r_name(11, 11, fixed_modality=0, moving_modality=1) == "disp_0011_0000_0011_0001.nii.gz"
    for bad_fixed in (10000, -1, "12", "abcd", 1.0, True):
        with pytest.raises(ValueError, match="fixed_id"):
            itk.l2r_name(bad_fixed, 1)
    with pytest.raises(ValueError, match="both"):
        itk.l2r_name(1, 2, fixed_modality=0)
    with pytest.raises(ValueError, match="suffix"):
        itk.l2r_name(1, 2, suffix=".nii")


@pytest.mark.parametrize("suffix", [".nii.gz", ".npz"])
def test_l2r_displacement_as_the_evaluation_applies_it(tmp_path, rng, suffix):
    """Written with write_l2r_displacement, loaded and applied as MDL-UzL/L2R's evaluation.py does, a voxel field
    warps a label map exactly as jaxreg.spatial.warp_labels does."""
    from jaxreg import spatial

    shape = (12, 14, 10)
    labels = ndimage.zoom(rng.integers(0, 5, (4, 4, 3)), np.array(shape) / (4, 4, 3), order=0).astype(np.int32)
    assert labels.shape == shape
    disp = _smooth_field(rng, shape, 3.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    disp = np.clip(grid + disp, 0, np.array(shape) - 1) - grid  # stay inside: no boundary conventions involved
    frac = (grid + disp) % 1.0
    disp = np.where(np.abs(frac - 0.5) < 1e-3, disp + 0.01, disp)  # no rounding ties either
    disp = disp.astype(np.float32)
    path = tmp_path / itk.l2r_name(1, 2, suffix=suffix)
    itk.write_l2r_displacement(path, disp)
    # --- the evaluation's code path (evaluation.py / utils.load_disp) ---
    if suffix == ".nii.gz":
        disp_field = nib.load(path).get_fdata()
    else:
        z = np.load(path, allow_pickle=True)
        assert len(z.files) == 1
        disp_field = z[z.files[0]].astype(np.float32)
    assert np.all(np.array(disp_field.shape) == np.array([*shape, 3]))  # expected_shape check
    d, h, w = labels.shape
    identity = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    warped_seg = ndimage.map_coordinates(labels.astype(np.float64), identity + disp_field.transpose(3, 0, 1, 2),
                                         order=0)
    # --- jaxreg ---
    ours = np.asarray(spatial.warp_labels(labels, disp))
    np.testing.assert_array_equal(ours, warped_seg.astype(np.int32))
    np.testing.assert_array_equal(itk.read_l2r_displacement(path), disp)


def test_l2r_nifti_header(tmp_path, rng):
    affine = _grid_affine([0.0, 0.0, 0.1], [1.5, 1.5, 1.5], [1.0, 2.0, 3.0])
    disp = rng.normal(size=(4, 5, 6, 3))
    itk.write_l2r_displacement(tmp_path / "d.nii.gz", disp, affine=affine)
    img = nib.load(tmp_path / "d.nii.gz")
    assert img.shape == (4, 5, 6, 3) and img.get_data_dtype() == np.float32  # 4-D, not the 5-D vector layout
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    with pytest.raises(ValueError, match="float16"):
        itk.write_l2r_displacement(tmp_path / "e.nii.gz", disp, dtype=np.float16)
    itk.write_l2r_displacement(tmp_path / "h.npz", disp, dtype=np.float16)
    assert np.load(tmp_path / "h.npz")["arr_0"].dtype == np.float16
    with pytest.raises(ValueError, match=r"\.nii\.gz or \.npz"):
        itk.write_l2r_displacement(tmp_path / "d.nii", disp)
    with pytest.raises(ValueError, match=r"\(H, W, D, 3\)|\(X, Y, Z, 3\)"):
        itk.write_l2r_displacement(tmp_path / "f.nii.gz", disp[..., :2])


# -------------------------------------------------------------------------------------------------------- bad input
_GOOD_PARAMS = "1 0 0 0 1 0 0 0 1 0 0 0"
_HEAD = "#Insight Transform File V1.0\n#Transform 0\n"


def _block(name="AffineTransform_double_3_3", params=_GOOD_PARAMS, fixed="0 0 0"):
    return f"Transform: {name}\nParameters: {params}\nFixedParameters: {fixed}\n"


BAD_TEXT = {
    "garbled": (b"\x89PNG\r\n\x1a\n\x00\x00garbage", "binary content"),
    "not_utf8": (b"#Insight Transform File V1.0\n\xff\xfe\n", "not valid text"),
    "no_header": ((_block()).encode(), "first line"),
    "empty": (b"", "first line"),
    "unknown_line": ((_HEAD + _block() + "Foo: 1\n").encode(), "unexpected line"),
    "unsupported": ((_HEAD + _block("BSplineTransform_double_3_3")).encode(), "unsupported ITK transform type"),
    "two_d": ((_HEAD + _block("AffineTransform_double_2_2", "1 0 0 1 0 0", "0 0")).encode(), "only 3-D"),
    "singular": ((_HEAD + _block(params="1 0 0 2 0 0 0 0 1 0 0 0")).encode(), "singular"),
    "zero_scale": ((_HEAD + _block("ScaleTransform_double_3_3", "1 0 1", "0 0 0")).encode(), "singular"),
    "param_count": ((_HEAD + _block(params="1 0 0 0 1 0 0 0 1 0 0")).encode(), "needs 12 Parameters, got 11"),
    "fixed_count": ((_HEAD + _block(fixed="0 0")).encode(), "FixedParameters, got 2"),
    "several": ((_HEAD + _block() + "#Transform 1\n" + _block()).encode(), "2 transforms"),
    "nan": ((_HEAD + _block(params="1 0 0 0 1 0 0 0 1 nan 0 0")).encode(), "non-finite"),
    "inf_fixed": ((_HEAD + _block(fixed="0 inf 0")).encode(), "non-finite"),
    "not_numbers": ((_HEAD + _block(params="1 0 0 0 one 0 0 0 1 0 0 0")).encode(), "could not parse"),
    "no_fixed": ((_HEAD + "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 0\n").encode(),
                 "no 'FixedParameters'"),
    "no_transform": ((_HEAD + "Parameters: 1\n").encode(), "before any 'Transform:'"),
    "empty_composite": ((_HEAD + "Transform: CompositeTransform_double_3_3\n").encode(), "holds no transforms"),
    "bad_versor": ((_HEAD + _block("VersorRigid3DTransform_double_3_3", "0.9 0.9 0 0 0 0", "0 0 0")).encode(),
                   "norm > 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_bad_text_transform_files(tmp_path, case):
    content, message = BAD_TEXT[case]
    path = tmp_path / f"{case}.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        itk.read_affine(path)
    assert str(path) in str(err.value)


def _mat_var(name, values, *, mopt=0, cols=1, endian="<"):
    values = np.asarray(values, dtype=endian + ("f8" if mopt % 100 // 10 == 0 else "f4"))
    enc = name.encode() + b"\x00"
    return struct.pack(endian + "5i", mopt, values.size // cols, cols, 0, len(enc)) + enc + values.tobytes()


_EYE12 = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
BAD_MAT = {
    "garbage": (b"this is not a matlab file at all....", "not a MATLAB v4 file"),
    "truncated": (_mat_var("AffineTransform_double_3_3", _EYE12)[:60], "truncated"),
    "no_fixed": (_mat_var("AffineTransform_double_3_3", _EYE12), "pairs"),
    "wrong_fixed_name": (_mat_var("AffineTransform_double_3_3", _EYE12) + _mat_var("center", [0, 0, 0]), "'fixed'"),
    "two_d": (_mat_var("AffineTransform_double_2_2", [1, 0, 0, 1, 0, 0]) + _mat_var("fixed", [0, 0]), "only 3-D"),
    "singular": (_mat_var("AffineTransform_double_3_3", [0] * 12) + _mat_var("fixed", [0, 0, 0]), "singular"),
    "count": (_mat_var("AffineTransform_double_3_3", _EYE12[:9]) + _mat_var("fixed", [0, 0, 0]), "needs 12"),
    "matrix_var": (_mat_var("AffineTransform_double_3_3", _EYE12, cols=2) + _mat_var("fixed", [0, 0, 0]),
                   "column vectors"),
    "several": ((_mat_var("AffineTransform_double_3_3", _EYE12) + _mat_var("fixed", [0, 0, 0])) * 2, "2 transforms"),
    "nan": (_mat_var("AffineTransform_double_3_3", [np.nan] + _EYE12[1:]) + _mat_var("fixed", [0, 0, 0]),
            "non-finite"),
    "empty": (b"", "empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD_MAT))
def test_bad_mat_transform_files(tmp_path, case):
    content, message = BAD_MAT[case]
    path = tmp_path / f"{case}.mat"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        itk.read_affine(path)
    assert str(path) in str(err.value)


def test_mat_variants_are_read(tmp_path):
    """float32 and big-endian MATLAB v4 variables, and the older MatrixOffsetTransformBase name."""
    m = np.array(_EYE12, float)
    m[9:] = [1.0, 2.0, 3.0]
    for i, (name, mopt, endian) in enumerate([("AffineTransform_float_3_3", 10, "<"),
                                              ("AffineTransform_double_3_3", 1000, ">"),
                                              ("MatrixOffsetTransformBase_double_3_3", 0, "<")]):
        path = tmp_path / f"v{i}.mat"
        path.write_bytes(_mat_var(name, m, mopt=mopt, endian=endian) +
                         _mat_var("fixed", [0, 0, 0], mopt=mopt, endian=endian))
        np.testing.assert_allclose(itk.read_affine(path)[:3, 3], [-1.0, -2.0, 3.0])


def test_matlab_v5_file_is_rejected(tmp_path):
    from scipy.io import savemat

    path = tmp_path / "v5.mat"
    savemat(path, {"AffineTransform_double_3_3": np.eye(4)[:3].ravel(), "fixed": np.zeros(3)})
    with pytest.raises(ValueError, match="not a MATLAB v4 file") as err:
        itk.read_affine(path)
    assert str(path) in str(err.value)


def test_missing_and_unknown_files(tmp_path):
    for name in ("missing.txt", "missing.mat"):
        with pytest.raises(FileNotFoundError, match="missing"):
            itk.read_affine(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        itk.read_displacement(tmp_path / "missing.nii.gz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        itk.read_l2r_displacement(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"a\.h5.*suffix"):
        itk.read_affine(tmp_path / "a.h5")
    with pytest.raises(ValueError, match=r"a\.json.*suffix"):
        itk.write_affine(tmp_path / "a.json", np.eye(4))


def test_bad_displacement_files(tmp_path, rng):
    nib.save(nib.Nifti1Image(rng.normal(size=(4, 5, 6, 3)).astype(np.float32), np.eye(4)), tmp_path / "four_d.nii.gz")
    with pytest.raises(ValueError, match=r"four_d\.nii\.gz.*\(X, Y, Z, 1, 3\)"):
        itk.read_displacement(tmp_path / "four_d.nii.gz")
    (tmp_path / "garbled.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=r"garbled\.nii\.gz"):
        itk.read_displacement(tmp_path / "garbled.nii.gz")
    bad = np.zeros((4, 5, 6, 1, 3), np.float32)
    bad[1, 1, 1, 0, 1] = np.nan
    img = nib.Nifti1Image(bad, np.eye(4))
    img.header.set_intent("vector", ())
    nib.save(img, tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match=r"nan\.nii\.gz.*non-finite"):
        itk.read_displacement(tmp_path / "nan.nii.gz")


def test_bad_arguments_write_nothing(tmp_path, rng):
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    w = rng.normal(size=(4, 5, 6, 3))
    for bad in (np.zeros((4, 4)), np.eye(3), np.full((4, 4), np.nan), np.diag([1.0, 1.0, 1.0, 2.0])):
        with pytest.raises(ValueError, match="matrix"):
            itk.write_affine(tmp_path / "a.txt", bad)
    with pytest.raises(ValueError, match="center"):
        itk.write_affine(tmp_path / "a.mat", np.eye(4), center=[1.0, 2.0])
    with pytest.raises(ValueError, match="shear"):
        sheared = affine.copy()
        sheared[0, 1] = 0.5
        itk.write_displacement(tmp_path / "w.nii.gz", w, sheared)
    with pytest.raises(ValueError, match=r"\(X, Y, Z, 3\)"):
        itk.write_displacement(tmp_path / "w.nii.gz", w[..., :2], affine)
    with pytest.raises(ValueError, match="non-finite"):
        itk.write_displacement(tmp_path / "w.nii.gz", np.where(w > 2, np.inf, w), affine)
    with pytest.raises(ValueError, match="float32 or float64"):
        itk.write_displacement(tmp_path / "w.nii.gz", w, affine, dtype=np.float16)
    with pytest.raises(ValueError, match="NIfTI"):
        itk.write_displacement(tmp_path / "w.mha", w, affine)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tmp_path, rng, monkeypatch):
    # the destination cannot be replaced (a folder is in the way): the temporary file is removed
    (tmp_path / "a.mat").mkdir()
    with pytest.raises(OSError):
        itk.write_affine(tmp_path / "a.mat", np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mat"]
    # a writer that dies half way: no partial file, and an existing file is left as it was
    itk.write_displacement(tmp_path / "w.nii.gz", np.zeros((3, 4, 5, 3)), np.eye(4))
    before = (tmp_path / "w.nii.gz").read_bytes()

    def dying_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(itk.nib, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        itk.write_displacement(tmp_path / "w.nii.gz", np.ones((3, 4, 5, 3)), np.eye(4))
    with pytest.raises(OSError, match="disk full"):
        itk.write_l2r_displacement(tmp_path / "d.nii.gz", np.ones((3, 4, 5, 3)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mat", "w.nii.gz"]
    assert (tmp_path / "w.nii.gz").read_bytes() == before
