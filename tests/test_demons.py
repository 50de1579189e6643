"""Demons (classic and diffeomorphic) recovers known deformations of synthetic 2-D and 3-D pairs."""
import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import metrics, spatial
from jaxreg.data import synthetic
from jaxreg.demons import demons

SHAPE = (64, 64)
# evaluation helpers compiled once (eager 3-D ops would each compile separately)
_min_jacobian = jax.jit(lambda d: spatial.jacobian_determinant(d).min())
_warp = jax.jit(lambda m, d: spatial.warp(m, d, mode="nearest"))


@pytest.fixture(scope="module")
def pair():
    return synthetic.synthetic_pair(0, shape=SHAPE, deform_scale=4.0, affine_scale=0.0, noise_std=0.0, bias_scale=0.0)


def _mean_dice(a, b):
    return float(np.nanmean(list(metrics.dice(np.asarray(a), np.asarray(b)).values())))


def _interior(field, margin=8):
    return np.asarray(field)[tuple(slice(margin, -margin) for _ in range(field.shape[-1]))]


@pytest.mark.parametrize("diffeomorphic, force", [(False, "symmetric"), (True, "fixed")])
def test_improves_label_dice(pair, diffeomorphic, force):
    before = _mean_dice(pair["fixed_labels"], pair["moving_labels"])
    disp = demons(pair["fixed"], pair["moving"], diffeomorphic=diffeomorphic, force=force)
    assert disp.shape == SHAPE + (2,) and disp.dtype == np.float32
    after = _mean_dice(pair["fixed_labels"], spatial.warp_labels(pair["moving_labels"], disp))
    assert before < 0.88, before
    assert after > 0.95 and after > before + 0.08, (before, after)
    # the field approaches the generating one (pull convention: same sign, same grid)
    epe = np.linalg.norm(_interior(disp) - _interior(pair["disp"]), axis=-1).mean()
    assert epe < 0.4 * np.linalg.norm(_interior(pair["disp"]), axis=-1).mean(), epe
    if diffeomorphic:
        assert float(_min_jacobian(disp)) > 0


def test_diffeomorphic_keeps_jacobian_positive_under_large_steps(pair):
    # weak regularisation and long steps: the additive update folds, the compositive one does not
    options = dict(levels=(2, 1), iterations=(60, 40), sigma_fluid=0.5, sigma_diffusion=0.5, max_step=2.0)
    assert float(_min_jacobian(demons(pair["fixed"], pair["moving"], diffeomorphic=False, **options))) < 0
    assert float(_min_jacobian(demons(pair["fixed"], pair["moving"], diffeomorphic=True, **options))) > 0


def test_recovers_known_smooth_deformation(rng):
    moving = ndi.gaussian_filter(rng.random(SHAPE), 2.5)
    moving = ((moving - moving.min()) / np.ptp(moving)).astype(np.float32)
    truth = synthetic.smooth_random_field(rng, SHAPE, 2, spacing=16.0)
    truth = (truth * (3.0 / np.linalg.norm(truth, axis=-1).max())).astype(np.float32)
    fixed = np.asarray(_warp(moving, truth))  # fixed[x] = moving[x + truth(x)]
    before = np.linalg.norm(_interior(truth), axis=-1).mean()
    disp = demons(fixed, moving)
    err = np.linalg.norm(_interior(disp) - _interior(truth), axis=-1)
    assert before > 1.0
    assert err.mean() < 0.1 * before, (err.mean(), before)
    residual = np.abs(np.asarray(_warp(moving, disp)) - fixed)[8:-8, 8:-8].mean()
    assert residual < 0.2 * np.abs(moving - fixed)[8:-8, 8:-8].mean()


def test_initial_disp_and_zero_iterations(pair):
    truth = pair["disp"]
    out = demons(pair["fixed"], pair["moving"], iterations=0, initial_disp=truth)
    np.testing.assert_array_equal(np.asarray(out), truth)
    # identical images: the zero field is a fixed point
    still = demons(pair["fixed"], pair["fixed"])
    assert float(np.abs(np.asarray(still)).max()) < 1e-3


def test_3d_smoke():
    p = synthetic.synthetic_pair(1, shape=(24, 24, 24), deform_scale=2.5, affine_scale=0.0, noise_std=0.0,
                                 bias_scale=0.0)
    # one level keeps the 3-D compilation short; the pyramid is exercised in 2-D above
    disp = demons(p["fixed"], p["moving"], levels=(1,), iterations=30, diffeomorphic=True)
    assert disp.shape == (24, 24, 24, 3) and disp.dtype == np.float32
    assert np.isfinite(np.asarray(disp)).all()
    assert float(_min_jacobian(disp)) > 0
    before = np.mean((p["fixed"] - p["moving"]) ** 2)
    after = np.mean((p["fixed"] - np.asarray(_warp(p["moving"], disp))) ** 2)
    assert after < 0.4 * before, (before, after)
    dice_before = _mean_dice(p["fixed_labels"], p["moving_labels"])
    dice_after = _mean_dice(p["fixed_labels"], spatial.warp_labels(p["moving_labels"], disp))
    assert dice_after > dice_before + 0.03, (dice_before, dice_after)


_IMG = np.zeros(SHAPE, np.float32)


@pytest.mark.parametrize(
    "fixed, moving, options, match",
    [
        (_IMG, np.zeros((64, 32), np.float32), {}, "fixed and moving"),
        (_IMG.astype(np.int32), _IMG, {}, "fixed"),
        (_IMG, _IMG.astype(np.int32), {}, "moving"),
        (np.zeros(64, np.float32), np.zeros(64, np.float32), {}, "2-D or 3-D"),
        (np.zeros(SHAPE + (2, 1), np.float32), np.zeros(SHAPE + (2, 1), np.float32), {}, "2-D or 3-D"),
        (np.full(SHAPE, np.nan, np.float32), _IMG, {}, "fixed"),
        (_IMG, _IMG, {"initial_disp": np.zeros((32, 32, 2), np.float32)}, "initial_disp"),
        (_IMG, _IMG, {"initial_disp": np.zeros(SHAPE + (3,), np.float32)}, "initial_disp"),
        (_IMG, _IMG, {"levels": (4, 2), "iterations": (1, 2, 3)}, "iterations"),
        (_IMG, _IMG, {"levels": (0, 1)}, "levels"),
        (_IMG, _IMG, {"levels": ()}, "levels"),
        (_IMG, _IMG, {"levels": (64, 1)}, "levels"),
        (_IMG, _IMG, {"iterations": -1}, "iterations"),
        (_IMG, _IMG, {"sigma_fluid": -1.0}, "sigma_fluid"),
        (_IMG, _IMG, {"sigma_diffusion": float("nan")}, "sigma_diffusion"),
        (_IMG, _IMG, {"max_step": 0.0}, "max_step"),
        (_IMG, _IMG, {"force": "moving"}, "force"),
        (_IMG, _IMG, {"diffeomorphic": "yes"}, "diffeomorphic"),
    ],
)
def test_bad_inputs_raise(fixed, moving, options, match):
    with pytest.raises(ValueError, match=match):
        demons(fixed, moving, **options)
