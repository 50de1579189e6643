"""The classical engine recovers known transforms (2-D and small 3-D synthetic pairs); its options are checked."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import losses, metrics, optimize, spatial, transforms
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
    opts = optimize.RegisterOptions(transform="affine", deformable="disp", metric="mse", affine_levels=(2,),
                                    affine_iterations=(40,), levels=(2, 1), iterations=(20, 10), tol=0.0)
    batch = optimize.register_batch(fixed, moving, options=opts)
    assert batch.disp.shape == (2,) + shape + (2,)
    for i in range(2):
        single = optimize.register(fixed[i], moving[i], options=opts)
        np.testing.assert_allclose(batch.disp[i], single.disp, atol=0.02)  # float32 reassociation under vmap
        np.testing.assert_allclose(batch.matrix[i], single.matrix, atol=1e-3)


def _label_dice(pair, disp):
    warped = np.asarray(spatial.warp_labels(pair["moving_labels"], disp))
    return np.mean(list(metrics.dice(pair["fixed_labels"], warped).values()))


def test_instance_optimisation_starts_from_the_given_field():
    pair = synthetic.synthetic_pair(4, shape=(48, 48), deform_scale=3.0, affine_scale=0.0, noise_std=0.0, bias_scale=0.0)
    start = np.asarray(pair["disp"]) * 0.3  # e.g. a network's imperfect guess
    opts = optimize.RegisterOptions(transform=None, deformable="disp", metric="lncc", levels=(1,), iterations=(0,))
    untouched = optimize.register(pair["fixed"], pair["moving"], options=opts, initial_disp=start)
    # fewer iterations than the window
    optimize.register(pair["fixed"], pair["moving"], options=opts, initial_disp=start, iterations=(3,))
    np.testing.assert_allclose(untouched.disp, start, atol=1e-6)  # zero iterations: the start itself
    refined = optimize.register(pair["fixed"], pair["moving"], options=opts, initial_disp=start, iterations=(60,),
                                reg_weight=0.1, learning_rate=0.1)
    assert _label_dice(pair, refined.disp) > _label_dice(pair, start) + 0.05


@pytest.mark.parametrize(
    "options, message",
    [
        ({"metric": "cosine"}, r"metric must be one of \[.*\] or a callable fn\(fixed, warped"),
        ({"affine_metric": 3}, r"affine_metric must be one of .* or None or a callable"),
        ({"transform": "shear"}, r"transform must be one of"),
        ({"deformable": "fluid"}, r"deformable must be one of"),
        ({"init": "moments"}, r"init must be one of \['centre', 'com'\] or None"),
        ({"regularizer": "tv"}, r"regularizer must be one of \['bending', 'diffusion', 'folding'\] or None"),
        ({"levels": (2, 1), "iterations": (5, 5, 5)}, r"iterations must be a single value or one per level \(2\)"),
        ({"iterations": -1}, r"iterations must be an int >= 0 or one per level, got -1"),
        ({"affine_iterations": (10, 2.5)}, r"affine_iterations must be an int >= 0"),
        ({"levels": (0,), "iterations": 5}, r"levels must be a non-empty tuple of pyramid factors .*got \(0,\)"),
        ({"levels": (2, -2), "iterations": 5}, r"levels must be .*ints >= 1.*got \(2, -2\)"),
        ({"affine_levels": ()}, r"affine_levels must be a non-empty tuple"),
        ({"levels": 2}, r"levels must be a non-empty tuple"),
        ({"reg_weight": -0.1}, r"reg_weight must be a number >= 0, got -0.1"),
        ({"learning_rate": 0}, r"learning_rate must be a number > 0, got 0"),
        ({"affine_learning_rate": float("nan")}, r"affine_learning_rate must be a number > 0"),
        ({"tol": -1e-4}, r"tol must be a number >= 0"),
        ({"window": 0}, r"window must be an int >= 1, got 0"),
        ({"steps": -1}, r"steps must be an int >= 0"),
        ({"field_sigma": -1.0}, r"field_sigma must be a number >= 0"),
        ({"bspline_spacing": 0}, r"bspline_spacing must be a number > 0"),
        ({"bspline_spacing": (4, 4, 4)}, r"bspline_spacing must be a single value or one per axis \(2\)"),
        ({"optimizer": "rmsprop"}, r"optimizer must be one of \('adam', 'sgd'\) or an optax.GradientTransformation"),
        ({"metric_options": "window=5"}, r"metric_options must be a dict of keyword options"),
        ({"affine_metric_options": [("bins", 16)]}, r"affine_metric_options must be a dict"),
        ({"fixed_mask": np.zeros((16, 16))}, r"fixed_mask is empty"),
        ({"fixed_mask": np.ones((8, 16))}, r"fixed_mask must have the shape of its image"),
        ({"learning_rte": 0.1}, r"unknown option\(s\) \['learning_rte'\]; valid options .*'learning_rate'"),
        ({"initial_disp": np.zeros((16, 16, 3))}, r"initial_disp must have shape \(16, 16, 2\)"),
    ],
)
def test_bad_options_raise(options, message):
    img = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match=message):
        optimize.register(img, img, **options)


def _no_compiling(monkeypatch):
    """Make any compiled work (a level, the glue between levels) fail the test."""
    def fail(*args, **kwargs):
        raise AssertionError("compiled work started before the options were rejected")
    for name in ("_optimise_level", "_per_pair"):
        monkeypatch.setattr(optimize, name, fail)


@pytest.mark.parametrize(
    "options, message",
    [
        # a typo such as --levels 1000 2 1 must fail at once (a factor-1000 Gaussian would exhaust memory)
        ({"levels": (1000, 2, 1)}, (r"levels=\(1000, 2, 1\): factor 1000 shrinks the \(16, 20\) image to \(1, 1\); "
                                    r"every level needs at least 4 voxels per axis .* factors up to 5 fit")),
        ({"affine_levels": (8, 1)}, r"affine_levels=\(8, 1\): factor 8 shrinks the \(16, 20\) image to \(2, 3\)"),
        ({"levels": (0, 2, 1)}, r"levels must be a non-empty tuple of pyramid factors \(ints >= 1"),
        ({"levels": (-2, 2, 1)}, r"levels must be .* got \(-2, 2, 1\)"),
    ],
)
def test_bad_pyramids_fail_before_compiling(options, message, monkeypatch):
    _no_compiling(monkeypatch)
    img = np.ones((16, 20), np.float32)
    with pytest.raises(ValueError, match=message):
        optimize.register(img, img, **options)
    with pytest.raises(ValueError, match=message):
        optimize.register_batch(img[None], img[None], **options)


def test_pyramid_check_only_applies_to_the_stages_that_run_and_spares_short_axes(monkeypatch):
    seen = []
    monkeypatch.setattr(optimize, "_optimise_level", lambda params, data, cfg, **kw: (
        seen.append((cfg.kind, data["fixed"].shape)) or params, jnp.zeros(cfg.max_iter)))
    img = np.ones((16, 12), np.float32)
    optimize.register(img, img, transform="translation", init=None, deformable=None, affine_levels=(3, 1),
                      levels=(1000, 2, 1))
    assert seen == [("affine", (6, 4)), ("affine", (16, 12))]
    # an axis shorter than 4 voxels is never shrunk below itself (only factor 1 fits it)
    with pytest.raises(ValueError, match=r"factor 2 shrinks the \(16, 12, 3\) image to \(8, 6, 2\)"):
        optimize.register(np.ones((16, 12, 3), np.float32), np.ones((16, 12, 3), np.float32), deformable=None,
                          affine_levels=(2, 1))


def test_register_options_are_frozen_normalised_and_replaceable():
    opts = optimize.RegisterOptions(levels=[2, 1], iterations=[3, 4], metric_options={"window": 5})
    assert opts.levels == (2, 1) and opts.iterations == (3, 4) and opts.window == 10 and opts.reg_weight == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.metric = "mi"
    mine = {"window": 7}
    assert optimize.RegisterOptions(metric_options=mine).metric_options is not mine  # copied, not aliased
    with pytest.raises(TypeError):
        optimize.RegisterOptions("com")  # keyword-only
    assert dataclasses.replace(opts, metric="mi").metric == "mi"
    with pytest.raises(ValueError, match="metric must be one of"):
        dataclasses.replace(opts, metric="cosine")  # replacing validates again
    assert set(optimize.PRESETS) == {"default", "fast", "diffeo", "multimodal", "affine"}
    assert all(isinstance(p, optimize.RegisterOptions) for p in optimize.PRESETS.values())
    assert optimize.PRESETS["multimodal"].affine_similarity() == ("mi", {})
    assert optimize.PRESETS["default"].affine_similarity() == ("lncc", {"window": 5})


def test_overrides_replace_fields_of_the_given_options(monkeypatch):
    seen = []

    def level(params, data, cfg, **kw):  # records what each level would optimise, without compiling it
        seen.append((cfg.model, cfg.metric, dict(cfg.metric_options), cfg.max_iter, data["fixed"].shape))
        return params, jnp.zeros(cfg.max_iter, params.dtype)

    monkeypatch.setattr(optimize, "_optimise_level", level)
    img = np.ones((16, 16), np.float32)
    preset = optimize.PRESETS["affine"]
    optimize.register(img, img, options=preset, transform="rigid", affine_levels=(2,), affine_iterations=7)
    assert seen == [("rigid", "lncc", {"window": 5}, 7, (8, 8))]
    assert preset == optimize.RegisterOptions(deformable=None, metric="lncc", metric_options={"window": 5})
    seen.clear()
    # an override replaces that field only: the preset's lncc options stay unless replaced too
    optimize.register(img, img, options=preset, affine_levels=(1,), affine_iterations=(3,), metric="mi")
    optimize.register(img, img, options=preset, affine_levels=(1,), affine_iterations=(3,), metric="mi",
                      metric_options=None)
    assert seen == [("affine", "mi", {"window": 5}, 3, (16, 16)), ("affine", "mi", {}, 3, (16, 16))]
    with pytest.raises(TypeError, match="options must be a RegisterOptions"):
        optimize.register(img, img, options={"metric": "mi"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus', 'levls'\]; valid options .*'levels'"):
        optimize.register_batch(img[None], img[None], options=preset, levls=(1,), bogus=1)


def test_a_callable_metric_is_used_like_a_registered_one(rng):
    fixed, moving, _ = _affine_case(rng, (32, 32), np.array([0.0, 0.0, 0.0, 0.0, 2.0, -1.0]))
    opts = optimize.RegisterOptions(transform="translation", deformable="disp", affine_levels=(2, 1),
                                    affine_iterations=(20, 10), levels=(2, 1), iterations=(10, 5), tol=0.0)
    by_name = optimize.register(fixed, moving, options=opts, metric="mse")
    by_function = optimize.register(fixed, moving, options=opts, metric=losses.mse)
    np.testing.assert_array_equal(by_function.disp, by_name.disp)
    np.testing.assert_array_equal(by_function.history["disp@1"], by_name.history["disp@1"])

    seen = []

    def scaled_mse(fixed, warped, *, mask=None, scale=1.0):  # its options arrive as keywords, in both stages
        seen.append(scale)
        return scale * losses.mse(fixed, warped, mask=mask)

    out = optimize.register(fixed, moving, options=opts, metric=scaled_mse, metric_options={"scale": 2.0})
    assert seen and set(seen) == {2.0}
    start = {k: float(r.history["translation@2"][0]) for k, r in (("out", out), ("by_name", by_name))}
    assert start["out"] == pytest.approx(2.0 * start["by_name"], rel=1e-5)  # the same starting point, scaled
    seen.clear()
    optimize.register(fixed, moving, options=opts, metric="lncc", affine_metric=scaled_mse, deformable=None)
    assert seen and set(seen) == {1.0}  # another parametric metric: its defaults, not the lncc options


def test_progress_reports_during_each_level_and_changes_nothing(rng):
    """progress runs each compiled level in chunks of PROGRESS_EVERY iterations: the same program, the same result."""
    fixed, moving, _ = _affine_case(rng, (32, 32), np.array([0.0, 0.0, 0.0, 0.0, 2.0, -1.0]))
    opts = optimize.RegisterOptions(transform="translation", deformable="disp", affine_levels=(2, 1),
                                    affine_iterations=(25, 10), levels=(2, 1), iterations=(12, 5), metric="mse")
    levels, calls = [], []
    plain = optimize.register(fixed, moving, options=opts, callback=lambda name, h: levels.append(name))
    shown = optimize.register(fixed, moving, options=opts, progress=lambda *a: calls.append(a))
    np.testing.assert_array_equal(shown.disp, plain.disp)
    for name, history in plain.history.items():
        np.testing.assert_array_equal(shown.history[name], history)
        ran = int(np.sum(~np.isnan(history)))
        mine = [c for c in calls if c[0] == name]
        # every PROGRESS_EVERY iterations, then the last one; the loss is that iteration's
        expected = [*range(optimize.PROGRESS_EVERY, ran, optimize.PROGRESS_EVERY), ran]
        assert [c[1] for c in mine] == expected, (name, mine)
        assert {c[2] for c in mine} == {len(history)}
        assert mine[-1][3] == pytest.approx(float(history[ran - 1]))
    assert levels == list(plain.history) == ["translation@2", "translation@1", "disp@2", "disp@1"]


def test_affine_metric_options_none_means_unset_and_empty_means_none(rng, monkeypatch):
    """affine_metric_options=None: the deformable stage's options when the parametric stage uses the same metric,
    the metric's defaults when it names another; {} is an explicit "no options" (it used to fall back)."""
    seen = []

    def level(params, data, cfg, **kw):  # records what each parametric level would optimise, without compiling it
        seen.append((cfg.metric, dict(cfg.metric_options)))
        return params, jnp.zeros(cfg.max_iter, params.dtype)

    monkeypatch.setattr(optimize, "_optimise_level", level)
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
    out = optimize.register(img, img, options=optimize.PRESETS["affine"], affine_metric="mi", affine_levels=(1,),
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
    opts = optimize.RegisterOptions(transform="translation", deformable=None, metric="mse", affine_levels=(2, 1),
                                    affine_iterations=(100, 60))
    masked = optimize.register(fixed, moving, options=opts, fixed_mask=mask)
    plain = optimize.register(fixed, moving, options=opts)
    err_masked = _interior_error(masked.disp, spatial.affine_to_disp(truth, shape), 8).max()
    err_plain = _interior_error(plain.disp, spatial.affine_to_disp(truth, shape), 8).max()
    assert err_masked < 0.5 < err_plain, (err_masked, err_plain)


# ------------------------------------------------------------------------------------- a moving image on its own grid
def _labels_through(labels, disp, grid):
    """Nearest-neighbour labels of a moving grid pulled to the fixed grid through ``disp`` and ``grid``."""
    return np.asarray(optimize.pull(jnp.asarray(labels, jnp.float32), disp, grid, order=0)).astype(np.int32)


def test_a_moving_image_on_its_own_grid_registers_like_one_on_the_fixed_grid():
    """Shifted header (padded array), flipped axis, moving cropped to its content, oblique anisotropic grid: the
    moving image keeps its grid (``moving_grid``), and Dice is no worse than the shared-grid case (0.005)."""
    p = synthetic.synthetic_pair(3, shape=(48, 48), num_labels=5)
    pad = [(6, 6), (6, 6)]
    f, m = (np.pad(p[k], pad) for k in ("fixed", "moving"))
    fl, ml = (np.pad(p[k], pad) for k in ("fixed_labels", "moving_labels"))
    # dense updates, whole grid (the grid, not the preset, is under test)
    opts = dataclasses.replace(optimize.PRESETS["fast"], deformable="disp", reg_weight=0.3, crop=False)
    dice = lambda w: np.nanmean(list(metrics.dice(fl, w).values()))  # noqa: E731
    eye = np.eye(3)
    plain = optimize.register(f, m, options=opts)
    reference = dice(_labels_through(ml, plain.disp, eye))
    assert reference > 0.95
    cases = {}
    shifted = eye.copy()
    shifted[:2, 2] = (5, 2)  # moving voxel = fixed voxel + (5, 2): the array is padded, its header moved
    cases["shifted header"] = (np.pad(m, [(5, 0), (2, 0)]), np.pad(ml, [(5, 0), (2, 0)]), shifted)
    flipped = eye.copy()
    flipped[0, 0], flipped[0, 2] = -1, f.shape[0] - 1  # an axis stored the other way round (RAS vs LPS)
    cases["flipped axis"] = (m[::-1], ml[::-1], flipped)
    cropped = eye.copy()
    cropped[:2, 2] = -6  # the moving image cropped to its content (the zero border removed)
    cases["cropped"] = (m[6:-6, 6:-6], ml[6:-6, 6:-6], cropped)
    for name, (mi, mli, grid) in cases.items():
        r = optimize.register(f, np.ascontiguousarray(mi), options=opts, moving_grid=grid)
        got = dice(_labels_through(np.ascontiguousarray(mli), r.disp, grid))
        assert got > reference - 0.005, (name, got, reference)  # (the cropped image's pyramid may do better)
        assert r.warped.shape == f.shape
    # oblique, anisotropic (1.5 x 1 voxels, 10 degrees): the moving image is resampled onto that grid, so the
    # reference is the shared-grid field evaluated through the same grid (the resampling costs both alike)
    th = np.deg2rad(10.0)
    to_fixed = np.eye(3)
    to_fixed[:2, :2] = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ np.diag([1.5, 1.0])
    to_fixed[:2, 2] = (8.0, -8.0)
    shape = (48, 72)
    coords = np.moveaxis(np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1) @ to_fixed[:2, :2].T
                         + to_fixed[:2, 2], -1, 0)
    mo = ndi.map_coordinates(m, coords, order=1).astype(np.float32)
    mlo = ndi.map_coordinates(ml, coords, order=0)
    grid = np.linalg.inv(to_fixed)
    r = optimize.register(f, mo, options=opts, moving_grid=grid)
    got, expected = dice(_labels_through(mlo, r.disp, grid)), dice(_labels_through(mlo, plain.disp, grid))
    assert got > expected - 0.005, (got, expected)
    with pytest.raises(ValueError, match="moving_grid must have shape"):
        optimize.register(f, mo, moving_grid=np.eye(4))
    with pytest.raises(ValueError, match="invertible"):
        optimize.register(f, mo, moving_grid=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="moving_mask must have the shape of its image"):
        optimize.register(f, mo, moving_grid=grid, moving_mask=np.ones(f.shape))


def test_init_centre_starts_from_the_grids_centres():
    """Images centred on one object, grids sharing only their first corner (as the prostate MR and TRUS): the
    "centre" start is the shift between the grids' centres (also through an oblique grid, against NumPy), and the
    translation stage from there keeps it, where the centre of mass is pulled off by a bright spot elsewhere."""
    fixed = np.zeros((32, 32), np.float32)
    fixed[10:22, 8:24] = 1.0
    fixed[13:17, 12:15] = 0.3
    moving = np.zeros((48, 56), np.float32)
    moving[8:40, 12:44] = fixed  # the same object at the moving grid's centre: moving voxel = fixed voxel + (8, 12)
    moving[1:5, 48:54] = 3.0  # a bright spot outside the object (pulls the centre of mass)
    grid = np.eye(3)
    np.testing.assert_allclose(optimize.grid_centre_shift(jnp.asarray(fixed), jnp.asarray(moving), grid), (8, 12))
    oblique = np.array([[0.9, -0.3, 4.0], [0.2, 1.1, -2.0], [0.0, 0.0, 1.0]])
    expected = np.linalg.solve(oblique[:2, :2], (np.array([47, 55]) / 2 - oblique[:2, 2])) - np.array([31, 31]) / 2
    np.testing.assert_allclose(optimize.grid_centre_shift(jnp.asarray(fixed), jnp.asarray(moving), oblique),
                               expected, rtol=1e-5)
    np.testing.assert_allclose(optimize.grid_centre_shift(jnp.asarray(fixed), jnp.asarray(fixed)), (0, 0))
    opts = optimize.RegisterOptions(transform="translation", deformable=None, init="centre", affine_levels=(1,),
                                    affine_iterations=(20,), affine_metric="mse")
    r = optimize.register(fixed, moving, options=opts, moving_grid=grid)
    np.testing.assert_allclose(np.asarray(r.matrix)[:2, 2], (8, 12), atol=0.25)
    np.testing.assert_allclose(np.asarray(r.warped), fixed, atol=0.05)
    com = optimize.centre_of_mass_shift(jnp.asarray(fixed), jnp.asarray(moving), grid=grid)
    assert np.abs(np.asarray(com) - (8, 12)).max() > 3  # the engine's default start would be far off
    with pytest.raises(ValueError, match="init must be one of"):
        optimize.RegisterOptions(init="middle")


def test_a_reflected_parametric_transform_is_a_warning():
    img = np.zeros((16, 16), np.float32)
    img[4:10, 5:12] = 1.0
    flip = np.diag([-1.0, 1.0, 1.0])  # about the grid centre
    with pytest.warns(RuntimeWarning, match="reflection or collapse, determinant \\[-1.0\\]"):
        r = optimize.register(img, img[::-1].copy(), transform=None, deformable=None, initial_matrix=flip)
    np.testing.assert_allclose(np.asarray(r.warped), img, atol=1e-5)  # the flip itself is applied as given


def test_crop_runs_the_deformable_stage_on_the_foreground_box(rng):
    """``crop=True``: a small object in a large field of view is registered on a box around both images (rounded
    to ``CROP_MULTIPLE``), as well as on the whole grid, and the field continues its border values outside the box;
    batched pairs share one box; images that fill their field of view keep the whole grid (the same result)."""
    p = synthetic.synthetic_pair(5, shape=(40, 40), num_labels=5)
    pad = [(16, 24), (30, 10)]  # the pair in the corner of an 80 x 80 field of view
    f, m = (np.pad(p[k], pad).astype(np.float32) for k in ("fixed", "moving"))
    fl, ml = (np.pad(p[k], pad) for k in ("fixed_labels", "moving_labels"))
    opts = dataclasses.replace(optimize.PRESETS["fast"], levels=(2, 1), iterations=(40, 30), affine_levels=(2,),
                               affine_iterations=(40,))
    pairs = optimize._checked_pairs(f, m, None, None, None, None, batched=False)
    box = optimize._crop_box(pairs, jnp.eye(3))
    assert all((b.stop - b.start) % optimize.CROP_MULTIPLE == 0 for b in box), box
    assert box[0].start <= 16 and box[0].stop >= 56 and box[1].start <= 30 and box[1].stop >= 70, box
    assert np.prod([b.stop - b.start for b in box]) <= 0.5 * f.size, box
    dice = lambda d: np.nanmean(list(metrics.dice(fl, np.asarray(spatial.warp_labels(ml, d))).values()))  # noqa
    whole = optimize.register(f, m, options=opts, crop=False)
    cropped = optimize.register(f, m, options=opts, crop=True)
    assert dice(cropped.disp) > dice(whole.disp) - 0.01 and dice(cropped.disp) > 0.9
    u = np.asarray(cropped.disp - spatial.affine_to_disp(cropped.matrix, f.shape))
    box = optimize._crop_box(pairs, cropped.matrix)
    np.testing.assert_allclose(u[: box[0].start], np.broadcast_to(u[box[0].start], u[: box[0].start].shape),
                               atol=1e-4)  # the field outside continues the box's face
    assert np.asarray(spatial.jacobian_determinant(cropped.disp)).min() > 0
    batch = optimize.register_batch(np.stack([f, f]), np.stack([m, m]), options=opts, crop=True)
    diff = np.abs(np.asarray(batch.disp[1]) - np.asarray(cropped.disp))
    assert diff.max() < 0.2 and diff.mean() < 0.01, (diff.max(), diff.mean())  # float32 reassociation under vmap
    same = [optimize.register(p["fixed"], p["moving"], options=opts, crop=c).disp for c in (False, True)]
    np.testing.assert_array_equal(same[0], same[1])
    with pytest.raises(ValueError, match="crop must be True or False"):
        optimize.RegisterOptions(crop="yes")
