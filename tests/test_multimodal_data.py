"""Real multimodal cases (jaxreg.data.multimodal): the scoring on a case whose answer is known by construction (no
data needed), and the loaders of ../shared/data (skipped cleanly when it is absent)."""
import os

import numpy as np
import pytest
from scipy import ndimage

from jaxreg import world
from jaxreg.data import io, multimodal

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def _registration(case, disp_mm):
    """A ``world.Registration`` of ``case`` whose whole map is ``disp_mm`` (RAS mm on the fixed grid)."""
    vox = np.einsum("ij,...j->...i", np.linalg.inv(case.fixed.affine[:3, :3]), disp_mm).astype(np.float32)
    return world.Registration(case.fixed, case.moving, None, np.eye(4), vox)


def test_the_true_motion_scores_perfectly_and_the_identity_does_not():
    shape, spacing = (24, 28, 20), (2.0, 2.0, 2.0)
    rng = np.random.default_rng(0)
    original = ndimage.gaussian_filter(rng.standard_normal(shape), 2).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    u = multimodal.smooth_motion(shape, spacing, seed=3, deform_mm=2.0)
    assert u.shape == (*shape, 3) and u.dtype == np.float32 and 1.0 < np.abs(u).max() * 2 < 40
    blob = np.zeros(shape, np.uint8)
    blob[8:16, 10:18, 6:14] = 1
    true_mm = np.einsum("ij,...j->...i", affine[:3, :3], u)
    # the moving mask: the fixed blob carried by the motion (moving(T(p)) = fixed(p))
    from jaxreg import transforms

    inv = np.asarray(transforms.invert_disp(u, iterations=50))
    pts = np.moveaxis(np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) + inv, -1, 0)
    moved_blob = ndimage.map_coordinates(blob.astype(np.float32), pts, order=0)
    case = multimodal.Case("synthetic", io.Volume(original + 3, affine), io.Volume(original, affine),
                           {"blob": (io.Volume(blob, affine), io.Volume((moved_blob > 0).astype(np.uint8), affine))},
                           np.array([[[20.0, 24.0, 18.0], [20.0, 24.0, 18.0] + true_mm[10, 12, 9]]]), true_mm)
    good = multimodal.score(case, _registration(case, true_mm))
    assert good["epe_mm"] < 1e-4 and good["tre_mm"] < 1e-3 and good["dice_blob"] > 0.9
    bad = multimodal.score(case, _registration(case, np.zeros_like(true_mm)))
    assert bad["epe_mm"] == pytest.approx(bad["epe_before_mm"]) and bad["epe_mm"] > 1.0
    assert bad["tre_mm"] == pytest.approx(np.linalg.norm(true_mm[10, 12, 9])) and bad["dice_blob"] < good["dice_blob"]


def _box(shape, centre, half):
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(c - h, c + h + 1) for c, h in zip(centre, half))] = 1
    return m


def test_prostate_arrays_put_the_grid_centres_together_and_follow_the_landmarks():
    """A case built by hand: the moving box sits 2, 0, -1 voxels off its grid's centre, so from the "centre" start
    it sits as far off the fixed grid's centre; the landmark positions follow crop/pad and resampling."""
    fixed_aff, moving_aff = np.diag([0.4, 0.4, 0.4, 1.0]), np.diag([0.4, 0.4, 0.4, 1.0])
    fixed_aff[:3, 3], moving_aff[:3, 3] = (10.0, -3.0, 5.0), (-7.0, 2.0, 0.4)
    fixed_shape, moving_shape = (11, 13, 9), (15, 17, 13)  # centres (5, 6, 4) and (7, 8, 6)
    fixed_box, moving_box = _box(fixed_shape, (4, 7, 4), (2, 2, 1)), _box(moving_shape, (9, 8, 5), (2, 3, 2))
    world = lambda aff, v: (aff @ np.r_[v, 1.0])[:3]  # noqa: E731
    marks = np.array([[world(fixed_aff, (4, 7, 4)), world(moving_aff, (9, 8, 5))]])
    case = multimodal.Case("prostate_000099", io.Volume(fixed_box * 200, fixed_aff),
                           io.Volume(moving_box * 90 + 10, moving_aff),
                           {"gland": (io.Volume(fixed_box, fixed_aff), io.Volume(moving_box, moving_aff))}, marks)
    for kwargs, offset, scale in (({}, 0, 1.0), ({"shape": (16, 12, 12)}, np.array([2, 0, 1]), 1.0),
                                  ({"resolution": 0.8, "shape": (8, 8, 8)}, np.array([1, 0, 1]), 0.5)):
        p = multimodal.prostate_arrays(case, **kwargs)
        assert p["fixed"].shape == p["moving_labels"].shape == kwargs.get("shape", fixed_shape)
        assert p["fixed"].dtype == np.float32 and 0 <= p["moving"].min() and p["moving"].max() == 1.0
        np.testing.assert_allclose(p["landmarks"][0], np.array([4, 7, 4]) * scale + offset, atol=1e-9)
        np.testing.assert_allclose(p["moving_landmarks"][0], (np.array([5, 6, 4]) + [2, 0, -1]) * scale + offset,
                                   atol=1e-9)
        np.testing.assert_allclose(p["spacing"], 0.4 / scale)
        if scale == 1.0:  # the resampled masks are where the landmarks say
            np.testing.assert_allclose(np.argwhere(p["fixed_labels"]).mean(0), p["landmarks"][0], atol=1e-9)
            np.testing.assert_allclose(np.argwhere(p["moving_labels"]).mean(0), p["moving_landmarks"][0], atol=1e-9)
    np.testing.assert_allclose(p["start"][:3, 3], world(moving_aff, (7, 8, 6)) - world(fixed_aff, (5, 6, 4)))
    ident = multimodal.prostate_arrays(case, start="identity")
    np.testing.assert_allclose(ident["moving_landmarks"][0], np.linalg.solve(fixed_aff, np.r_[marks[0, 1], 1])[:3])
    with pytest.raises(ValueError, match="start"):
        multimodal.prostate_arrays(case, start="mass")


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "prostate_mr_trus")), reason="no ../shared/data")
def test_prostate_cases_load_with_gland_and_two_landmarks():
    case, gland_only = multimodal.prostate_cases(os.path.join(DATA, "prostate_mr_trus"), cases=[0, 2])
    assert case.name == "prostate_000000" and case.landmarks.shape == (2, 2, 3)
    assert gland_only.landmarks is None and gland_only.masks["gland"][0].data.sum() > 100  # its files hold the gland
    fixed_gland, moving_gland = case.masks["gland"]
    assert fixed_gland.shape == case.fixed.shape and moving_gland.shape == case.moving.shape
    assert fixed_gland.data.sum() > 100 and moving_gland.data.sum() > 100 and np.isfinite(case.landmarks).all()
    with pytest.raises(FileNotFoundError, match="missing"):
        multimodal.prostate_cases(os.path.join(DATA, "no_such_folder"))


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "open_ms")), reason="no ../shared/data")
def test_an_open_ms_case_is_its_contrast_moved_by_the_known_motion():
    case = multimodal.open_ms_case(os.path.join(DATA, "open_ms"), "patient07", moving="FLAIR", resolution=4)
    original = io.load(os.path.join(DATA, "open_ms", "cross_sectional", "patient07", "FLAIR.nii.gz"))
    from jaxreg.data import preprocess

    original = preprocess.resample_to(original, case.fixed.shape, case.fixed.affine).data
    fg = preprocess.normalize(np.asarray(case.fixed.data)) > 0.1
    # the moving contrast pulled through the true map is the original (up to two linear interpolations of 4 mm
    # voxels: compared after a 1-voxel blur), and through the opposite map it is not
    for sign, low, high in ((1, 0.98, 1.0), (-1, -1.0, 0.8)):
        back = np.asarray(_registration(case, sign * case.true_disp).warped.data)
        smooth = [ndimage.gaussian_filter(np.asarray(a, np.float64), 1.0)[fg] for a in (back, original)]
        assert low < np.corrcoef(*smooth)[0, 1] < high
    assert case.masks["lesions"][0].data.sum() > 0 and case.masks["lesions"][1].data.sum() > 0


def test_centroid_is_the_weighted_world_point():
    from jaxreg.data import preprocess

    affine = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -4], [0, 0, 3.0, 1], [0, 0, 0, 1]])
    w = np.zeros((5, 6, 4))
    w[1, 2, 3], w[3, 2, 3] = 1.0, 3.0  # centroid at voxel (2.5, 2, 3)
    vol = io.Volume(w.astype(np.float32), affine)
    np.testing.assert_allclose(preprocess.centroid(vol, w), affine[:3] @ [2.5, 2, 3, 1])
    np.testing.assert_allclose(preprocess.centroid(vol, np.zeros_like(w)), affine[:3] @ [2, 2.5, 1.5, 1])


def test_tissue_classes_order_the_intensities_and_mark_lesions():
    rng = np.random.default_rng(0)
    t1 = np.zeros((20, 20, 8))
    t1[2:18, 2:6], t1[2:18, 6:11], t1[2:18, 11:18] = 0.2, 0.5, 0.9  # CSF < GM < WM
    t1 = np.where(t1 > 0, t1 + 0.02 * rng.standard_normal(t1.shape), 0.0)
    lesions = np.zeros(t1.shape, bool)
    lesions[5:7, 12:14, 3:5] = True
    classes = multimodal.tissue_classes(t1, lesions)
    assert classes.dtype == np.int32 and (classes[t1 <= 0] == 0).all()
    assert (classes[4, 3] == 1).all() and (classes[4, 8] == 2).all() and (classes[4, 15] == 3).all()
    assert (classes[lesions] == 4).all() and set(np.unique(classes)) == {0, 1, 2, 3, 4}
    assert not multimodal.tissue_classes(np.zeros((4, 4, 4))).any()


def test_a_moved_pair_is_undone_by_its_true_field():
    import jax.numpy as jnp

    from jaxreg import metrics, spatial

    shape = (28, 32, 24)
    zz = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    r = np.linalg.norm(zz, axis=-1)
    labels = np.select([r < 0.35, r < 0.6, r < 0.85], [3, 2, 1], 0).astype(np.int32)
    vols = {"T1": (labels / 3.0).astype(np.float32), "T2": np.where(labels > 0, 1 - labels / 3.0, 0).astype(np.float32),
            "labels": labels, "affine": np.diag([2.0, 2.0, 2.0, 1.0])}
    p = multimodal.moved_pair(vols, moving="T2", seed=2, deform_mm=3.0)
    assert p["moving"].shape == shape and p["disp"].shape == (*shape, 3) and np.abs(p["disp"]).max() > 1.0
    np.testing.assert_allclose(p["spacing"], 2.0)
    undone = np.asarray(spatial.warp_labels(jnp.asarray(p["moving_labels"]), jnp.asarray(p["disp"])))
    before = metrics.dice(labels, p["moving_labels"], labels=[1, 2, 3])
    after = metrics.dice(labels, undone, labels=[1, 2, 3])
    assert min(after.values()) > 0.85 and np.mean(list(after.values())) > np.mean(list(before.values())) + 0.1


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "open_ms")), reason="no ../shared/data")
def test_open_ms_volumes_are_co_registered_cropped_and_labelled():
    vols = multimodal.open_ms_volumes(os.path.join(DATA, "open_ms"), "patient19", contrasts=("T2",), resolution=4)
    shape = vols["T1"].shape
    assert set(vols) == {"T1", "T2", "labels", "lesions", "affine"} and vols["T2"].shape == shape == vols["labels"].shape
    assert 30 < shape[0] < 46 and 0.0 <= vols["T2"].min() and vols["T2"].max() <= 1.0
    np.testing.assert_allclose(np.linalg.norm(vols["affine"][:3, :3], axis=0), 4.0)
    counts = np.bincount(vols["labels"].ravel(), minlength=5)
    assert (counts[1:4] > 100).all() and ((vols["T1"] > 0) == (vols["labels"] > 0)).mean() > 0.99
    # T2 is dark where T1 is bright (white matter) and bright where T1 is dark (CSF): a real second contrast
    assert vols["T2"][vols["labels"] == 1].mean() > vols["T2"][vols["labels"] == 3].mean()
    with pytest.raises(FileNotFoundError, match="PD.nii.gz"):
        multimodal.open_ms_volumes(os.path.join(DATA, "open_ms"), "patient19", contrasts=("PD",))
