"""``jaxreg.uncertainty``: both estimators' maps (shape, unit, finiteness), more uncertainty where the images carry no
information, the moving image on its own grid, checks before compiling, and the rank scores against references.

The registrations are built at their known answer (``world.Registration`` with the true field) rather than
registered, so the file compiles only the estimators: one ensemble and two Laplace programs in 2-D, one of each in
3-D.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, stats

from jaxreg import optimize, spatial, uncertainty, world
from jaxreg.data import io

SHAPE = (32, 32)
HALF = SHAPE[1] // 2
TEXTURED = (slice(3, 29), slice(3, HALF - 3))  # away from the borders and from the textured/flat interface
FLAT = (slice(3, 29), slice(HALF + 4, 29))
OPTIONS = optimize.RegisterOptions(transform=None, init=None, deformable="diffeo", levels=(1,), iterations=(30,),
                                   metric="lncc", metric_options={"window": 5}, reg_weight=0.2)


def _registration(shape=SHAPE, *, seed=0, spacing=1.0) -> world.Registration:
    """Moving: smooth texture on the first half of the last axis, constant on the other half; fixed: the moving image
    pulled through a smooth field of up to 1 voxel, which is the registration's ``disp`` (the answer)."""
    rng = np.random.default_rng(seed)
    nd = len(shape)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    moving = np.full(shape, 0.5)
    half = shape[-1] // 2
    moving[..., :half] += 0.5 * texture[..., :half] / np.abs(texture).max()
    true = ndimage.gaussian_filter(rng.standard_normal(shape + (nd,)), (4.0,) * nd + (0.0,))
    true = (true / np.abs(true).max()).astype(np.float32)
    fixed = np.asarray(spatial.warp(jnp.asarray(moving, jnp.float32), jnp.asarray(true)), np.float32)
    affine = np.diag([spacing] * 3 + [1.0])
    return world.Registration(io.Volume(fixed, affine), io.Volume(moving.astype(np.float32), affine), OPTIONS,
                              np.eye(nd + 1), true)


@pytest.fixture(scope="module")
def reg():
    return _registration()


@pytest.fixture(scope="module")
def maps(reg):
    return {"laplace": uncertainty.laplace(reg), "ensemble": uncertainty.ensemble(reg, return_mean=True)}


@pytest.mark.parametrize("method", uncertainty.METHODS)
def test_maps_are_finite_non_negative_on_the_fixed_grid(maps, method):
    sd = maps[method][0] if method == "ensemble" else maps[method]
    assert sd.shape == SHAPE and sd.dtype == np.float32
    assert np.isfinite(sd).all() and (sd >= 0).all() and sd.max() > 0


@pytest.mark.parametrize("method", uncertainty.METHODS)
def test_more_uncertain_where_the_images_are_flat(maps, method):
    sd = maps[method][0] if method == "ensemble" else maps[method]
    assert sd[FLAT].mean() > 1.2 * sd[TEXTURED].mean(), (sd[FLAT].mean(), sd[TEXTURED].mean())


def test_ensemble_mean_returns_to_the_answer_where_textured(reg, maps):
    _, mean = maps["ensemble"]
    assert mean.shape == SHAPE + (2,) and mean.dtype == np.float32
    err = np.linalg.norm(mean - reg.disp, axis=-1)
    assert err[TEXTURED].mean() < 0.3  # the starts are 1 voxel RMS per component away (the default amplitude)


def test_laplace_is_the_prior_where_flat_and_scales_with_temperature_and_spacing(reg, maps):
    """Where the images are flat only the regulariser curves ``E``: diffusion's diagonal is ``2 w`` per neighbour
    (``4 ndim w`` inside), so the sd is ``sqrt(ndim / (4 ndim w))`` voxels; ``temperature`` scales the variance, the
    voxel size the mm; ``estimate`` is the same call."""
    sd = uncertainty.laplace(reg, noise="none")
    expected = np.sqrt(2 / (4 * 2 * OPTIONS.reg_weight))
    assert abs(np.median(sd[FLAT]) - expected) < 0.1 * expected
    np.testing.assert_allclose(uncertainty.laplace(reg, temperature=4.0, noise="none"), 2 * sd, rtol=1e-5)
    sd = maps["laplace"]
    np.testing.assert_allclose(uncertainty.laplace(reg, temperature=4.0), 2 * sd, rtol=1e-5)
    mm2 = np.diag([2.0, 2.0, 2.0, 1.0])  # both images: the same grid map, the same E
    coarse = dataclasses.replace(reg, fixed=io.Volume(reg.fixed.data, mm2), moving=io.Volume(reg.moving.data, mm2))
    np.testing.assert_allclose(uncertainty.laplace(coarse), 2 * sd, rtol=1e-5)
    np.testing.assert_array_equal(uncertainty.estimate(reg, method="laplace"), sd)


def test_moving_image_on_its_own_grid(reg, maps):
    """The moving image padded by 3 zero voxels before axis 0 (its affine shifted to match) samples the same values
    through ``Registration.grid``: the same map. With a parametric matrix the deformable part ``u`` (the variable of
    both estimators) is recovered from ``disp = compose_affine(matrix, u)``."""
    moving = np.pad(reg.moving.data, ((3, 0), (0, 0)))
    affine = np.eye(4)
    affine[0, 3] = -3.0
    padded = dataclasses.replace(reg, moving=io.Volume(moving, affine))
    np.testing.assert_allclose(uncertainty.laplace(padded, normalize=False), uncertainty.laplace(reg, normalize=False),
                               rtol=1e-4, atol=1e-5)
    matrix = np.diag([1.5, 1.0, 1.0])  # x ↦ A (x + u - c) + c: the same u, disp = compose_affine(matrix, u)
    u = uncertainty._deformable_part(reg)
    scaled = dataclasses.replace(reg, matrix=matrix, disp=np.asarray(spatial.compose_affine(matrix, jnp.asarray(u))))
    np.testing.assert_allclose(uncertainty._deformable_part(scaled), u, atol=1e-4)


def test_3d():
    reg = _registration((16, 16, 16), seed=1, spacing=2.0)
    for method in uncertainty.METHODS:
        sd = uncertainty.estimate(reg, method=method, **({"members": 2, "iterations": 3} if method == "ensemble"
                                                         else {"probes": 4}))
        assert sd.shape == (16, 16, 16) and sd.dtype == np.float32, method
        assert np.isfinite(sd).all() and (sd >= 0).all() and sd.max() > 0, method


@pytest.mark.parametrize("call, match", [
    (lambda r: uncertainty.estimate(r, method="mcmc"), "method"),
    (lambda r: uncertainty.estimate(r, method="ensemble", members=1), "members"),
    (lambda r: uncertainty.ensemble(r, members=2.5), "members"),
    (lambda r: uncertainty.ensemble(r, iterations=0), "iterations"),
    (lambda r: uncertainty.ensemble(r, amplitude=0.0), "amplitude"),
    (lambda r: uncertainty.ensemble(r, smoothness=-1.0), "smoothness"),
    (lambda r: uncertainty.laplace(r, probes=0), "probes"),
    (lambda r: uncertainty.laplace(r, temperature=float("nan")), "temperature"),
    (lambda r: uncertainty.laplace(r, seed=-1), "seed"),
    (lambda r: uncertainty.laplace(r, noise="gaussian"), "noise"),
    (lambda r: uncertainty.laplace(r, noise_sigma=-1.0), "noise_sigma"),
    (lambda r: uncertainty.laplace(r.fixed), "reg"),
    (lambda r: uncertainty.estimate(np.zeros(SHAPE), method="ensemble"), "reg"),
])
def test_bad_inputs_raise_before_compiling(monkeypatch, reg, call, match):
    def compiled(*args, **kwargs):
        raise AssertionError("compiled before checking the arguments")

    monkeypatch.setattr(uncertainty.optimize, "register_batch", compiled)
    monkeypatch.setattr(uncertainty, "_hessian_diagonal", compiled)
    with pytest.raises(ValueError, match=match):
        call(reg)


def _auc_reference(score, positive):
    """P(score of an error > score of a correct voxel) + P(equal) / 2, over every pair."""
    pos, neg = score[positive], score[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def test_error_auc(rng):
    score = rng.integers(0, 6, size=(7, 9)).astype(np.float32)  # many ties
    errors = rng.random((7, 9)) < 0.3
    assert uncertainty.error_auc(score, errors) == pytest.approx(_auc_reference(score.ravel(), errors.ravel()))
    mask = rng.random((7, 9)) < 0.7
    assert uncertainty.error_auc(score, errors, mask=mask) == pytest.approx(_auc_reference(score[mask], errors[mask]))
    x = np.arange(10.0)
    assert uncertainty.error_auc(x, x >= 6) == 1.0
    assert uncertainty.error_auc(x, x < 4) == 0.0
    assert uncertainty.error_auc(np.ones(10), x < 4) == 0.5
    for bad, match in (((x, x < 100), "error_mask"), ((x, (x < 4)[:5]), "error_mask"),
                       ((np.full(10, np.nan), x < 4), "non-finite"), ((x, x < 4), "mask")):
        with pytest.raises(ValueError, match=match):
            uncertainty.error_auc(*bad, mask=np.ones(3, bool) if match == "mask" else None)


def test_spearman(rng):
    a = rng.integers(0, 5, size=(6, 8)).astype(np.float64)
    b = a + rng.normal(size=(6, 8))
    assert uncertainty.spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel()).statistic)
    mask = b > 0
    assert uncertainty.spearman(a, b > 1, mask=mask) == pytest.approx(
        stats.spearmanr(a[mask], (b > 1)[mask]).statistic)
    assert uncertainty.spearman(np.arange(5.0), -np.arange(5.0) ** 3) == pytest.approx(-1.0)
    assert uncertainty.spearman(np.ones(5), np.arange(5.0)) == 0.0
    with pytest.raises(ValueError, match="b must have"):
        uncertainty.spearman(a, b[:3])


def test_register_command_writes_the_uncertainty_map(tmp_path, capsys):
    from jaxreg import cli

    reg = _registration()
    paths = {k: str(tmp_path / f"{k}.nii.gz") for k in ("fixed", "moving")}
    io.save(paths["fixed"], reg.fixed)
    io.save(paths["moving"], reg.moving)
    out = tmp_path / "out"
    code = cli.main(["register", paths["fixed"], paths["moving"], "-o", str(out), "--transform", "none",
                     "--init", "none", "--levels", "1", "--iterations", "30", "--uncertainty", "laplace", "--quiet"])
    assert code == 0, capsys.readouterr().err
    sd = io.load(str(out / "uncertainty.nii.gz"))
    assert sd.shape == SHAPE and np.isfinite(sd.data).all() and (sd.data > 0).all()
    assert sd.data[FLAT].mean() > sd.data[TEXTURED].mean()
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["uncertainty"]["method"] == "laplace" and "uncertainty.nii.gz" in report["files"].values()
    assert cli.main(["register", paths["fixed"], paths["moving"], "-o", str(tmp_path / "o2"), "--model", "x",
                     "--uncertainty", "ensemble"]) == 2
    assert "--uncertainty" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_laplace_with_local_noise_is_larger_where_the_images_still_disagree(reg):
    """The same registration with the fixed image changed in one textured patch (the map there is now wrong): the
    local-noise Laplace map grows in that patch against the rest of the textured half; the curvature alone does
    not see it."""
    patch = (slice(8, 16), slice(4, 12))
    fixed = np.array(reg.fixed.data)
    fixed[patch] = np.roll(fixed, 3, axis=0)[patch]
    changed = dataclasses.replace(reg, fixed=io.Volume(fixed, reg.fixed.affine))
    local, plain = uncertainty.laplace(changed), uncertainty.laplace(changed, noise="none")
    rest = np.ones(SHAPE, bool)
    rest[patch] = False
    rest[:, HALF:] = False
    assert local[patch].mean() > 2 * local[rest].mean()
    assert plain[patch].mean() < 1.5 * plain[rest].mean()
