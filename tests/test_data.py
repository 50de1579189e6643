"""Tests for jaxreg.data: NIfTI I/O, preprocessing and synthetic pairs (host-side NumPy, no jit)."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg.data import io, preprocess, synthetic
from jaxreg.data.io import Volume


def _oblique_affine():
    """Anisotropic (1.5, 0.8, 3 mm) voxels, rotated about two axes, with an offset."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([1.5, 0.8, 3.0])
    aff[:3, 3] = [-40.0, 12.5, 7.0]
    return aff


def _dice(a, b, labels):
    return np.mean([2 * ((a == k) & (b == k)).sum() / max((a == k).sum() + (b == k).sum(), 1) for k in labels])


# ------------------------------------------------------------------------------------------------------------ io


def test_volume_properties_and_validation():
    vol = Volume(np.zeros((4, 5, 6), np.float32), _oblique_affine())
    assert vol.ndim == 3 and vol.shape == (4, 5, 6)
    np.testing.assert_allclose(vol.spacing, [1.5, 0.8, 3.0])
    field = Volume(np.zeros((4, 5, 2), np.float32), np.eye(4), has_channels=True)
    assert field.ndim == 2 and field.shape == (4, 5)
    with pytest.raises(ValueError, match="affine"):
        Volume(np.zeros((4, 5, 6)), np.eye(3))
    with pytest.raises(ValueError, match="spatial axes"):
        Volume(np.zeros((4, 5, 6, 7)), np.eye(4))


def test_roundtrip_3d_2d_labels(tmp_path, rng):
    aff = _oblique_affine()
    img = rng.standard_normal((7, 8, 9)).astype(np.float32)
    io.save(tmp_path / "a.nii.gz", Volume(img, aff))
    back = io.load(tmp_path / "a.nii.gz")
    assert back.data.dtype == np.float32 and back.shape == (7, 8, 9) and not back.has_channels
    np.testing.assert_array_equal(back.data, img)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert nib.load(tmp_path / "a.nii.gz").header.get_xyzt_units()[0] == "mm"  # spatial units set

    aff2 = np.diag([0.7, 1.3, 1.0, 1.0])
    aff2[:2, 3] = [5.0, -3.0]
    img2 = rng.standard_normal((10, 6)).astype(np.float32)
    io.save(tmp_path / "b.nii", img2, aff2)
    assert nib.load(tmp_path / "b.nii").shape == (10, 6, 1)  # stored 3-D with a singleton z
    back2 = io.load(tmp_path / "b.nii")
    assert back2.ndim == 2 and back2.shape == (10, 6)
    np.testing.assert_array_equal(back2.data, img2)
    np.testing.assert_allclose(back2.affine, aff2, atol=1e-6)
    np.testing.assert_allclose(back2.spacing, [0.7, 1.3], rtol=1e-6)

    labels = rng.integers(0, 5, (6, 5, 4)).astype(np.int64)
    io.save(tmp_path / "l.nii.gz", labels, aff)
    lab = io.load_labels(tmp_path / "l.nii.gz")
    assert lab.data.dtype == np.int32
    np.testing.assert_array_equal(lab.data, labels)


@pytest.mark.parametrize("shape", [(5, 6, 7, 3), (9, 8, 2)])
def test_roundtrip_vector_field(tmp_path, rng, shape):
    aff = _oblique_affine()
    field = rng.standard_normal(shape).astype(np.float32)
    io.save(tmp_path / "v.nii.gz", field, aff, vector=True)
    raw = nib.load(tmp_path / "v.nii.gz")
    nd = shape[-1]
    assert raw.shape == shape[:-1] + (1,) * (4 - nd) + (nd,)
    assert raw.header.get_intent()[0] == "vector"
    back = io.load(tmp_path / "v.nii.gz")
    assert back.has_channels and back.ndim == nd
    np.testing.assert_array_equal(back.data, field)


@pytest.mark.parametrize("nd", [3, 2])
def test_displacement_mm_conversion(tmp_path, rng, nd):
    aff = _oblique_affine()
    if nd == 2:  # a 2-D grid in the world x-y plane, anisotropic and rotated
        aff = np.eye(4)
        aff[:2, :2] = [[1.2 * np.cos(0.4), -0.6 * np.sin(0.4)], [1.2 * np.sin(0.4), 0.6 * np.cos(0.4)]]
        aff[:2, 3] = [3.0, -2.0]
    shape = (4, 5, 6)[:nd] + (nd,)
    disp = rng.standard_normal(shape).astype(np.float32)
    disp[(0,) * nd] = np.eye(nd)[0]  # one voxel moves by exactly +1 voxel along axis 0
    io.save_displacement(tmp_path / "d.nii.gz", disp, aff)
    mm = io.load(tmp_path / "d.nii.gz").data
    # +1 voxel along axis 0 is the affine's first column in mm (RAS)
    np.testing.assert_allclose(mm[(0,) * nd], aff[:nd, 0], rtol=1e-6)
    np.testing.assert_allclose(mm, disp @ aff[:nd, :nd].T, rtol=1e-5, atol=1e-6)
    back = io.load_displacement(tmp_path / "d.nii.gz")
    np.testing.assert_allclose(back.data, disp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    lps = io.ras_to_lps(mm)
    np.testing.assert_array_equal(lps[..., :2], -mm[..., :2])
    np.testing.assert_array_equal(lps[..., 2:], mm[..., 2:])


def test_matrix_json_roundtrip(tmp_path):
    m = _oblique_affine()
    io.save_matrix(tmp_path / "m.json", m)
    np.testing.assert_array_equal(io.load_matrix(tmp_path / "m.json"), m)
    assert os.listdir(tmp_path) == ["m.json"]
    (tmp_path / "bad.json").write_text(json.dumps({"matrix": [[1, 2], [3, 4]]}))
    with pytest.raises(ValueError, match="bad.json"):
        io.load_matrix(tmp_path / "bad.json")


def test_bad_inputs_name_the_file(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        io.load(missing)

    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file" * 10)
    with pytest.raises(ValueError, match="garbage.nii.gz"):
        io.load(garbage)

    good = tmp_path / "trunc.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16), np.float32), np.eye(4)), good)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated gzip stream
    with pytest.raises(ValueError, match="trunc.nii.gz"):
        io.load(good)

    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5, 2), np.float32), np.eye(4)), four)
    with pytest.raises(ValueError, match=r"four.nii.gz.*2-D or 3-D"):
        io.load(four)
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5, 1), np.float32), np.eye(4)), single)
    assert io.load(single).shape == (3, 4, 5)  # singleton 4th axis squeezed

    nan = tmp_path / "nan.nii.gz"
    arr = np.ones((4, 4, 4), np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), nan)
    with pytest.raises(ValueError, match=r"nan.nii.gz.*2 NaN/Inf"):
        io.load(nan)

    frac = tmp_path / "frac.nii.gz"
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 0.5, np.float32), np.eye(4)), frac)
    with pytest.raises(ValueError, match=r"frac.nii.gz.*non-integer"):
        io.load_labels(frac)

    with pytest.raises(ValueError, match="image.png"):
        io.load(tmp_path / "image.png")


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    io.save(target, np.ones((4, 4, 4), np.float32))
    real_save = nib.save

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save(target, np.zeros((4, 4, 4), np.float32))
    with pytest.raises(OSError, match="disk full"):
        io.save(tmp_path / "new.nii.gz", np.zeros((4, 4, 4), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]  # no temp file, no partial new file
    monkeypatch.setattr(nib, "save", real_save)
    np.testing.assert_array_equal(io.load(target).data, 1.0)  # the old file is intact


# ---------------------------------------------------------------------------------------------------- preprocess


def test_resample_flipped_axis_identity_world():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    vol = Volume(data, np.eye(4))
    ref = np.diag([-1.0, 1.0, 1.0, 1.0])
    ref[0, 3] = 3.0  # ref index i sits at world x = 3 - i, i.e. source index 3 - i
    out = preprocess.resample_to(vol, (4, 5, 6), ref)
    np.testing.assert_allclose(out.data, data[::-1], atol=1e-5)
    np.testing.assert_array_equal(out.affine, ref)
    labels = Volume(data.astype(np.int32), np.eye(4))
    out0 = preprocess.resample_to(labels, (4, 5, 6), ref, order=0)
    assert out0.data.dtype == np.int32
    np.testing.assert_array_equal(out0.data, data[::-1].astype(np.int32))


def test_resample_double_voxel_size_hand_case():
    i, j, k = np.meshgrid(np.arange(6.0), np.arange(8.0), np.arange(4.0), indexing="ij")
    src_aff = np.eye(4)
    src_aff[:3, 3] = [10.0, 20.0, 30.0]
    vol = Volume((i + 10 * j + 100 * k).astype(np.float32), src_aff)
    ref = np.diag([2.0, 2.0, 2.0, 1.0])
    ref[:3, 3] = [10.5, 20.5, 30.5]  # 2 mm voxels centred on 2x2x2 source blocks
    out = preprocess.resample_to(vol, (4, 4, 2), ref, cval=-1)
    a, b, c = np.meshgrid(np.arange(4.0), np.arange(4.0), np.arange(2.0), indexing="ij")
    expect = (2 * a + 0.5) + 10 * (2 * b + 0.5) + 100 * (2 * c + 0.5)
    expect[3] = -1  # source index 6.5 is outside the 6-voxel axis: cval
    np.testing.assert_allclose(out.data, expect, atol=1e-4)
    assert out.shape == (4, 4, 2)


def test_resample_2d_and_channels():
    data = np.stack([np.arange(12.0).reshape(3, 4), -np.arange(12.0).reshape(3, 4)], -1).astype(np.float32)
    vol = Volume(data, np.eye(4), has_channels=True)
    ref = np.eye(4)
    ref[1, 1], ref[1, 3] = -1.0, 3.0  # flip the second axis
    out = preprocess.resample_to(vol, (3, 4), ref)
    assert out.data.shape == (3, 4, 2) and out.has_channels
    np.testing.assert_allclose(out.data, data[:, ::-1], atol=1e-5)


def test_reorient_canonical_matches_nibabel(rng):
    aff = np.array([[0.0, -2.0, 0.0, 30.0], [0.0, 0.0, 1.5, -20.0], [-1.0, 0.0, 0.0, 10.0], [0, 0, 0, 1]])
    data = rng.standard_normal((4, 5, 6)).astype(np.float32)
    out = preprocess.reorient_canonical(Volume(data, aff))
    ref = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
    np.testing.assert_array_equal(out.data, np.asarray(ref.dataobj))
    np.testing.assert_allclose(out.affine, ref.affine)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    flip2d = Volume(data[:, :, 0], np.diag([-1.0, 1.0, 1.0, 1.0]))
    out2 = preprocess.reorient_canonical(flip2d)
    np.testing.assert_array_equal(out2.data, data[::-1, :, 0])
    assert out2.affine[0, 0] == 1.0 and out2.affine[0, 3] == -3.0  # voxel 0 is now at world x = -3


def test_normalize(rng):
    x = rng.uniform(10, 20, (20, 20)).astype(np.float32)
    x[0, 0] = 1e6  # outlier clipped
    y = preprocess.normalize(x)
    assert y.dtype == np.float32 and y.min() == 0.0 and y.max() == 1.0
    assert np.median(y) > 0.3
    z = preprocess.normalize(np.full((5, 5), 3.0))
    assert not np.isnan(z).any() and (z == 0).all()
    mask = np.zeros((20, 20), bool)
    mask[5:10] = True
    ym = preprocess.normalize(x, mask=mask, lower=0, upper=100)
    np.testing.assert_allclose([ym[mask].min(), ym[mask].max()], [0.0, 1.0])


def test_crop_pad_and_multiple():
    a = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    out = preprocess.crop_or_pad(a, (3, 8))
    assert out.shape == (3, 8)
    np.testing.assert_array_equal(out[:, 1:7], a[1:4])
    assert (out[:, 0] == 0).all() and (out[:, 7] == 0).all()
    c = preprocess.crop_or_pad(np.ones((4, 4, 2)), (6, 2))  # trailing channel axis untouched
    assert c.shape == (6, 2, 2)
    p, widths = preprocess.pad_to_multiple(np.ones((5, 8, 3)), 4, channels_last=True)
    assert p.shape == (8, 8, 3) and widths == ((0, 3), (0, 0))
    np.testing.assert_array_equal(p[:5], 1.0)


def test_downsample_affine_and_values():
    i, j, k = np.meshgrid(np.arange(16.0), np.arange(12.0), np.arange(10.0), indexing="ij")
    aff = _oblique_affine()
    vol = Volume((i + 2 * j - k).astype(np.float32), aff)
    out = preprocess.downsample(vol, 2)
    assert out.shape == (8, 6, 5)
    np.testing.assert_allclose(out.spacing, 2 * vol.spacing)
    np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], aff @ [0.5, 0.5, 0.5, 1])
    # a linear ramp survives smoothing away from the edges: value at block centres
    a, b, c = np.meshgrid(np.arange(8.0), np.arange(6.0), np.arange(5.0), indexing="ij")
    expect = (2 * a + 0.5) + 2 * (2 * b + 0.5) - (2 * c + 0.5)
    np.testing.assert_allclose(out.data[2:-2, 2:-2, 2:-2], expect[2:-2, 2:-2, 2:-2], atol=1e-3)
    # matches scipy Gaussian smoothing + linear sampling everywhere
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((9, 11)).astype(np.float32)
    got = preprocess.downsample(Volume(noise, np.eye(4)), (3, 2)).data
    smooth = ndi.gaussian_filter(noise.astype(np.float64), [3 / 2.3548, 2 / 2.3548], mode="nearest")
    pts = np.meshgrid(3 * np.arange(3.0) + 1, 2 * np.arange(5.0) + 0.5, indexing="ij")
    np.testing.assert_allclose(got, ndi.map_coordinates(smooth, pts, order=1), atol=2e-4)


# ----------------------------------------------------------------------------------------------------- synthetic


def _pull_nearest(labels, disp):
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in labels.shape], indexing="ij"))
    return ndi.map_coordinates(labels, grid + np.moveaxis(disp, -1, 0), order=0, mode="nearest")


@pytest.mark.parametrize("shape", [(48, 40), (20, 24, 18)])
def test_synthetic_pair_deterministic_and_disp_correct(shape):
    a = synthetic.synthetic_pair(3, shape=shape, num_labels=6)
    b = synthetic.synthetic_pair(3, shape=shape, num_labels=6)
    c = synthetic.synthetic_pair(4, shape=shape, num_labels=6)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["fixed"], c["fixed"])
    nd = len(shape)
    assert a["fixed"].shape == shape and a["fixed"].dtype == np.float32
    assert a["fixed_labels"].dtype == np.int32 and a["disp"].shape == shape + (nd,) and a["disp"].dtype == np.float32
    assert 0.0 <= a["moving"].min() and a["moving"].max() <= 1.0
    assert np.abs(a["disp"]).max() > 1.0  # a real deformation
    warped = _pull_nearest(a["moving_labels"], a["disp"])
    labels = range(6)
    dice_warped = _dice(warped, a["fixed_labels"], labels)
    dice_identity = _dice(a["moving_labels"], a["fixed_labels"], labels)
    assert dice_warped > 0.97, dice_warped
    assert dice_identity < dice_warped - 0.05, (dice_identity, dice_warped)


def test_synthetic_pair_contrast_and_jax_key():
    import jax

    same = synthetic.synthetic_pair(jax.random.key(0), shape=(32, 32), noise_std=0.0, bias_scale=0.0, blur=0.0)
    again = synthetic.synthetic_pair(jax.random.key(0), shape=(32, 32), noise_std=0.0, bias_scale=0.0, blur=0.0)
    np.testing.assert_array_equal(same["moving"], again["moving"])
    # same contrast: each label has one intensity in both images
    for k in np.unique(same["moving_labels"]):
        fk, mk = same["fixed"][same["fixed_labels"] == k], same["moving"][same["moving_labels"] == k]
        if fk.size and mk.size:
            assert np.ptp(fk) < 1e-5 and np.ptp(mk) < 1e-5
    diff = synthetic.synthetic_pair(1, shape=(32, 32), same_contrast=False, noise_std=0.0, bias_scale=0.0, blur=0.0)
    order_f = np.argsort([diff["fixed"][diff["fixed_labels"] == k].mean() for k in range(8)])
    order_m = np.argsort([diff["moving"][diff["moving_labels"] == k].mean() for k in range(8)])
    assert not np.array_equal(order_f, order_m)


def test_mni_pair():
    pytest.importorskip("nilearn", reason="mni_pair needs nilearn (pip install jaxreg[data])")
    p = synthetic.mni_pair(0)
    q = synthetic.mni_pair(0)
    shape = p["fixed"].shape
    assert len(shape) == 3 and all(70 <= n <= 110 for n in shape), shape
    for k in ("fixed", "moving"):
        assert p[k].shape == shape and p[k].dtype == np.float32 and p[k].min() >= 0 and p[k].max() <= 1
    for k in ("fixed_labels", "moving_labels"):
        assert p[k].shape == shape and p[k].dtype == np.int32
        assert set(np.unique(p[k])) == {0, 1, 2, 3}
    np.testing.assert_allclose(p["spacing"], [2.0, 2.0, 2.0])
    assert p["affine"].shape == (4, 4) and nib.aff2axcodes(p["affine"]) == ("R", "A", "S")
    np.testing.assert_array_equal(p["moving"], q["moving"])
    # T1 contrast: CSF < GM < WM; the moving pair is really moved
    means = [p["fixed"][p["fixed_labels"] == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    assert _dice(p["fixed_labels"], p["moving_labels"], (1, 2, 3)) < 0.8
    t2 = synthetic.mni_pair(0, contrast="t2")
    np.testing.assert_array_equal(t2["moving_labels"], p["moving_labels"])
    means = [t2["moving"][t2["moving_labels"] == k].mean() for k in (1, 2, 3)]
    assert means[0] > means[1] > means[2]  # T2-like: CSF bright, WM dark
    still = synthetic.mni_pair(5, affine_scale=0.0, deform_scale=0.0)
    np.testing.assert_array_equal(still["moving_labels"], still["fixed_labels"])


def test_mni_pair_without_nilearn(monkeypatch):
    real = synthetic.importlib.util.find_spec
    monkeypatch.setattr(synthetic.importlib.util, "find_spec", lambda name: None if name == "nilearn" else real(name))
    with pytest.raises(ImportError, match=r"pip install jaxreg\[data\]"):
        synthetic.mni_pair(0)


def test_mni_slice_pair():
    pytest.importorskip("nilearn", reason="mni_slice_pair needs nilearn (pip install jaxreg[data])")
    import scipy.ndimage as ndi

    p = synthetic.mni_slice_pair(0, contrast="t2")
    np.testing.assert_array_equal(p["fixed"], synthetic.mni_slice_pair(0, contrast="t2")["fixed"])
    assert p["fixed"].shape == p["moving"].shape == (80, 96) and p["disp"].shape == (80, 96, 2)
    assert p["fixed"].dtype == p["moving"].dtype == p["disp"].dtype == np.float32
    assert set(np.unique(p["fixed_labels"])) == {0, 1, 2, 3}
    np.testing.assert_allclose(p["spacing"], [2.0, 2.0])
    means = [p["moving"][p["moving_labels"] == k].mean() for k in (1, 2, 3)]
    assert means[0] > means[1] > means[2]  # T2-like moving
    t1 = synthetic.mni_slice_pair(0)
    means = [t1["moving"][t1["moving_labels"] == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    # the returned field is the answer: labels exactly, the image up to interpolation
    coords = np.stack(np.meshgrid(np.arange(80), np.arange(96), indexing="ij")) + np.moveaxis(t1["disp"], -1, 0)
    np.testing.assert_array_equal(ndi.map_coordinates(t1["moving_labels"], coords, order=0, mode="nearest"),
                                  t1["fixed_labels"])
    warped = ndi.map_coordinates(t1["moving"], coords, order=1)
    assert np.abs(warped - t1["fixed"]).mean() < 0.02 < np.abs(t1["moving"] - t1["fixed"]).mean()
    assert _dice(t1["fixed_labels"], t1["moving_labels"], (1, 2, 3)) < 0.8
