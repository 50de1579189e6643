"""The classical engine recovers known transforms (2-D and small 3-D synthetic pairs)."""
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import metrics, optimize, spatial, transforms
from jaxreg.data import synthetic


def _blobs(rng, shape, sigma=3.0):
    img = ndi.gaussian_filter(rng.random(shape), sigma)
    img = (img - img.min()) / np.ptp(img)
    pad = tuple(slice(s // 8, s - s // 8) for s in shape)  # object inside a dark background
    out = np.zeros(shape)
    out[pad] = img[pad]
    return ndi.gaussian_filter(out, 1.0).astype(np.float32)


def _affine_case(rng, shape, params):
    fixed = _blobs(rng, shape)
    truth = np.asarray(transforms.affine(jnp.asarray(params, jnp.float64)))
    moving = spatial.warp(fixed, spatial.affine_to_disp(np.linalg.inv(truth), shape).astype(np.float32))
    return fixed, np.asarray(moving), truth


def _interior_error(disp, truth_disp, margin):
    inner = tuple(slice(margin, -margin) for _ in range(disp.shape[-1]))
    return np.linalg.norm(np.asarray(disp)[inner] - np.asarray(truth_disp)[inner], axis=-1)


def test_recovers_affine_2d(rng):
    shape = (64, 64)
    c, s = np.cos(0.15), np.sin(0.15)
    lin = np.array([[c, -s], [s, c]]) * 1.08
    params = np.concatenate([(lin - np.eye(2)).ravel(), [3.0, -2.0]])
    fixed, moving, truth = _affine_case(rng, shape, params)
    before = _interior_error(np.zeros(shape + (2,)), spatial.affine_to_disp(truth, shape), 8).mean()
    result = optimize.register(fixed, moving, transform="affine", deformable=None, metric="mse",
                               affine_levels=(2, 1), affine_iterations=(150, 100))
    err = _interior_error(result.disp, spatial.affine_to_disp(truth, shape), 8)
    assert before > 3.0
    assert err.max() < 0.5, (err.max(), np.asarray(result.matrix))
    np.testing.assert_allclose(result.warped, spatial.warp(moving, result.disp), atol=1e-6)


def test_recovers_affine_3d(rng):
    shape = (24, 24, 24)
    params = np.zeros(12)
    params[:9] = (transforms.rigid(jnp.array([0.1, -0.05, 0.08, 0, 0, 0]))[:3, :3] * 1.05 - np.eye(3)).ravel()
    params[9:] = [1.5, -1.0, 2.0]
    fixed, moving, truth = _affine_case(rng, shape, params)
    result = optimize.register(fixed, moving, transform="affine", deformable=None, metric="ncc",
                               affine_levels=(2, 1), affine_iterations=(150, 100))
    err = _interior_error(result.disp, spatial.affine_to_disp(truth, shape), 4)
    assert err.max() < 0.5, err.max()


def test_mutual_information_aligns_an_inverted_contrast(rng):
    shape = (64, 64)
    params = np.array([0.0, 0.0, 0.0, 0.0, 4.0, -3.0])  # a pure shift, found through a contrast inversion
    fixed, moving, truth = _affine_case(rng, shape, params)
    moving = np.where(moving > 0, 1.0 - moving, 0.0).astype(np.float32)
    result = optimize.register(fixed, moving, transform="rigid", deformable=None, metric="mi",
                               affine_levels=(2, 1), affine_iterations=(150, 100))
    err = _interior_error(result.disp, spatial.affine_to_disp(truth, shape), 8)
    assert err.max() < 0.5, err.max()


@pytest.mark.parametrize("model", ["svf", "diffeo", "bspline", "disp"])
def test_recovers_a_known_smooth_deformation(model):
    pair = synthetic.synthetic_pair(3, shape=(64, 64), deform_scale=3.0, affine_scale=0.0, noise_std=0.0,
                                    bias_scale=0.0)
    truth = pair["disp"]
    result = optimize.register(pair["fixed"], pair["moving"], transform=None, deformable=model, metric="mse",
                               levels=(2, 1), iterations=(150, 100), reg_weight=0.1, learning_rate=0.3)
    before = _interior_error(np.zeros_like(truth), truth, 6).mean()
    after = _interior_error(result.disp, truth, 6).mean()
    assert after < 0.5 * before, (before, after)  # flat regions carry no signal: only structure is recoverable
    det = np.asarray(spatial.jacobian_determinant(result.disp))
    if model in ("svf", "diffeo"):
        assert det.min() > 0
    assert (det <= 0).mean() < 0.001


def test_register_batch_equals_register_per_pair(rng):
    shape = (32, 32)
    pairs = [_affine_case(rng, shape, np.array([0.05, 0.0, 0.0, -0.05, 1.5 * k, -1.0])) for k in (1, 2)]
    fixed = np.stack([p[0] for p in pairs])
    moving = np.stack([p[1] for p in pairs])
    opts = dict(transform="affine", deformable="disp", metric="mse", affine_levels=(2,), affine_iterations=(40,),
                levels=(2, 1), iterations=(20, 10), tol=0.0)
    batch = optimize.register_batch(fixed, moving, **opts)
    assert batch.disp.shape == (2,) + shape + (2,)
    for i in range(2):
        single = optimize.register(fixed[i], moving[i], **opts)
        np.testing.assert_allclose(batch.disp[i], single.disp, atol=0.02)  # float32 reassociation under vmap
        np.testing.assert_allclose(batch.matrix[i], single.matrix, atol=1e-3)


def _label_dice(pair, disp):
    warped = np.asarray(spatial.warp_labels(pair["moving_labels"], disp))
    return np.mean(list(metrics.dice(pair["fixed_labels"], warped).values()))


def test_instance_optimisation_starts_from_the_given_field():
    pair = synthetic.synthetic_pair(4, shape=(48, 48), deform_scale=3.0, affine_scale=0.0, noise_std=0.0, bias_scale=0.0)
    start = np.asarray(pair["disp"]) * 0.3  # e.g. a network's imperfect guess
    opts = dict(transform=None, deformable="disp", metric="lncc", levels=(1,), initial_disp=start)
    untouched = optimize.register(pair["fixed"], pair["moving"], iterations=(0,), **opts)
    optimize.register(pair["fixed"], pair["moving"], iterations=(3,), **opts)  # fewer iterations than the window
    np.testing.assert_allclose(untouched.disp, start, atol=1e-6)  # zero iterations: the start itself
    refined = optimize.register(pair["fixed"], pair["moving"], iterations=(60,), reg_weight=0.1, learning_rate=0.1, **opts)
    assert _label_dice(pair, refined.disp) > _label_dice(pair, start) + 0.05


@pytest.mark.parametrize(
    "options, message",
    [
        ({"metric": "cosine"}, r"metric must be one of"),
        ({"transform": "shear"}, r"transform must be one of"),
        ({"deformable": "fluid"}, r"deformable must be one of"),
        ({"levels": (2, 1), "iterations": (5, 5, 5)}, r"iterations must be a single value or one per level \(2\)"),
        ({"fixed_mask": np.zeros((16, 16))}, r"fixed_mask is empty"),
        ({"fixed_mask": np.ones((8, 16))}, r"fixed_mask must have the image shape"),
        ({"learning_rte": 0.1}, r"unknown option\(s\) \['learning_rte'\]"),
        ({"initial_disp": np.zeros((16, 16, 3))}, r"initial_disp must have shape \(16, 16, 2\)"),
        ({"affine_metric_options": [("bins", 16)]}, r"affine_metric_options must be a dict"),
    ],
)
def test_bad_options_raise(options, message):
    img = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match=message):
        optimize.register(img, img, **options)


def test_affine_metric_options_none_means_unset_and_empty_means_none(rng, monkeypatch):
    """affine_metric_options=None: the deformable stage's options when the parametric stage uses the same metric,
    the metric's defaults when it names another; {} is an explicit "no options" (it used to fall back)."""
    seen = []

    def level(params, data, cfg):  # records what each parametric level would optimise, without compiling it
        seen.append((cfg.metric, dict(cfg.metric_options)))
        return params, jnp.zeros(cfg.max_iter, params.dtype)

    monkeypatch.setattr(optimize, "_run_level_jit", level)
    img = _blobs(rng, (16, 16))
    quick = dict(transform="translation", deformable=None, affine_levels=(2, 1), metric="lncc",
                 metric_options={"window": 3})
    cases = [  # (affine options, what both parametric levels must use)
        (dict(), ("lncc", {"window": 3})),
        (dict(affine_metric_options=None), ("lncc", {"window": 3})),
        (dict(affine_metric_options={}), ("lncc", {})),
        (dict(affine_metric_options={"window": 5}), ("lncc", {"window": 5})),
        (dict(affine_metric="lncc", affine_metric_options={}), ("lncc", {})),
        (dict(affine_metric="lncc"), ("lncc", {"window": 3})),
        (dict(affine_metric="mi"), ("mi", {})),
        (dict(affine_metric="mi", affine_metric_options={"bins": 16}), ("mi", {"bins": 16})),
    ]
    for affine, expected in cases:
        seen.clear()
        optimize.register(img, img, **quick, **affine)
        assert seen == [expected, expected], (affine, seen)
    monkeypatch.undo()
    # end to end: a preset's deformable options (lncc window) no longer reach another parametric metric (TypeError)
    out = optimize.register(img, img, **{**optimize.PRESETS["affine"], "affine_metric": "mi"}, affine_levels=(1,),
                            affine_iterations=(2,))
    assert np.isfinite(np.asarray(out.history["affine@1"])).all()


def test_mismatched_images_raise():
    with pytest.raises(ValueError, match=r"fixed and moving must have the same shape"):
        optimize.register(np.ones((8, 8), np.float32), np.ones((8, 9), np.float32))


def test_fixed_mask_excludes_an_artefact(rng):
    """A bright artefact in the fixed image pulls an unmasked registration away; masking it out restores accuracy."""
    shape = (64, 64)
    fixed, moving, truth = _affine_case(rng, shape, np.array([0.0, 0.0, 0.0, 0.0, 3.0, -2.0]))
    fixed = fixed.copy()
    fixed[4:20, 40:60] = 3.0  # not present in the moving image
    mask = np.ones(shape, np.float32)
    mask[2:22, 38:62] = 0.0
    opts = dict(transform="translation", deformable=None, metric="mse", affine_levels=(2, 1), affine_iterations=(100, 60))
    masked = optimize.register(fixed, moving, fixed_mask=mask, **opts)
    plain = optimize.register(fixed, moving, **opts)
    err_masked = _interior_error(masked.disp, spatial.affine_to_disp(truth, shape), 8).max()
    err_plain = _interior_error(plain.disp, spatial.affine_to_disp(truth, shape), 8).max()
    assert err_masked < 0.5 < err_plain, (err_masked, err_plain)
