"""Translation-network multimodal registration (Arar et al.): model shapes, the two reconstruction losses against a
direct NumPy computation, the adversarial term's gradients (who gets gradient from what, finite differences), R's
landmark error falls on a toy case, one-step fit + resume + evaluate smoke run, the open_ms slice pairs (skipped
without ``../shared/data``).

Tiny networks on 32×32 images keep compilations few and fast.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from conftest import load_config
from jaxreg import evaluation, losses, metrics, training
from jaxreg.data import multimodal, preprocess, synthetic
from jaxreg.methods import translation as mt
from jaxreg.models import translation as tm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (32, 32)
TINY = dict(preset=None, encoder=(4, 8), decoder=(8, 8, 4), affine_encoder=(4, 8), affine_hidden=8,
            translation_encoder=(4, 8), translation_decoder=(8, 8, 4))


def tiny_config(steps=2):
    c = load_config("translation")
    c.data.shape = SHAPE  # centre crop of the MNI slices
    c.model.update(TINY)
    c.train.steps = steps
    c.train.batch_size = 2
    c.train.learning_rate = 1e-2
    c.train.log_every = 1
    c.train.checkpoint_every = 1
    c.eval.num_pairs = 2
    c.eval.landmarks = 20
    c.eval.classical_preset = ""
    c.eval.figures = 1
    return c


def _init(model, shape=SHAPE):
    return training.init_params(model, jax.random.key(0), shape)


def test_shapes_2d_3d_and_identity_at_init(rng):
    for ndim, shape in ((2, SHAPE), (3, (16, 16, 8))):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        for kind in tm.REGISTRATION_KINDS:
            model = tm.build(ndim=ndim, registration=kind, **TINY)
            params = jax.eval_shape(model.init, jax.random.key(0), x, x)
            out = jax.eval_shape(model.apply, params, x, x)
            assert out["disp"].shape == shape + (ndim,)
            for k in ("warped", "translated", "translate_first", "register_first"):
                assert out[k].shape == shape and out[k].dtype == jnp.float32, k
            assert ("matrix" in out) == (kind == "affine") and ("velocity" in out) == (kind == "dense")
            t = jax.eval_shape(lambda p, a: model.apply(p, a, method=tm.TranslationRegistration.translate), params, x)
            assert t.shape == shape
    # datasets: known fields on the 2-D kinds; split seeds differ
    c = tiny_config()
    train, test = mt.make_dataset(c.data, split="train"), mt.make_dataset(c.data, split="test")
    a, b = train.pair(0), test.pair(0)
    assert a["disp"].shape == SHAPE + (2,) and tuple(a["spacing"]) == (2.0, 2.0) and a["moving"].shape == SHAPE
    assert not np.array_equal(a["moving"], b["moving"])
    c.data.kind, c.data.options = "synthetic", {}
    s = mt.make_dataset(c.data).pair(3)
    assert s["disp"].shape == SHAPE + (2,) and s["fixed_labels"].max() < 4
    c.data.kind = "nifti"
    with pytest.raises(ValueError, match="data.kind"):
        mt.make_dataset(c.data)
    # 3-D config flag
    c3 = load_config("translation", "3d")
    assert c3.data.kind == "mni" and len(c3.data.shape) == 3
    with pytest.raises(ValueError, match="unknown argument"):
        load_config("translation", "4d")
    with pytest.raises(ValueError, match="registration must be one of"):
        tm.build(ndim=2, registration="bspline")
    # the affine R starts at the identity (zero head), the dense R close to it
    f = jnp.asarray(rng.random(SHAPE), jnp.float32)
    m = jnp.asarray(rng.random(SHAPE), jnp.float32)
    affine = tm.build(ndim=2, registration="affine", **TINY)
    out = affine.apply(_init(affine), m, f, method=tm.TranslationRegistration.register)
    np.testing.assert_array_equal(np.asarray(out["disp"]), 0.0)
    np.testing.assert_allclose(np.asarray(out["matrix"]), np.eye(3), atol=0)


def _np_warp(image, disp):
    """NumPy/SciPy pull warp, linear, zero outside (interpolated towards 0 within a voxel of the edge, as
    ``spatial.warp``): out[x] = image[x + disp(x)]."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in image.shape], indexing="ij"))
    coords = grid + np.moveaxis(np.asarray(disp, np.float64), -1, 0)
    return ndimage.map_coordinates(np.asarray(image, np.float64), coords, order=1, mode="grid-constant", cval=0.0)


def test_reconstruction_losses_as_written(rng):
    """translate_first = ‖warp(T(I_a), φ) − I_b‖₁, register_first = ‖T(warp(I_a, φ)) − I_b‖₁ (mean over voxels),
    loss = both + λ diffusion(φ): compared with NumPy on a hand-set affine R and a perturbed dense R."""
    fixed = rng.random(SHAPE)
    moving = ndimage.gaussian_filter(rng.random(SHAPE), 1.5) * 3
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    spec = dict(objective="translation", reg_weight=0.3, translate_first_weight=1.0, register_first_weight=0.5)

    # affine R with a known head: A_n - I and t_n in normalised coordinates
    model = tm.build(ndim=2, registration="affine", **TINY)
    params = _init(model)
    head = np.array([0.05, -0.1, 0.08, -0.04, 0.2, -0.1])
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(head, x.dtype) if "affine_head" in str(path) and "bias" in str(path) else x,
        params)
    terms = mt.Loss(model, **spec).example(params, f32(moving), f32(fixed))
    c, h = (np.array(SHAPE) - 1) / 2, (np.array(SHAPE) - 1) / 2
    a = np.diag(h) @ (np.eye(2) + head[:4].reshape(2, 2)) @ np.diag(1 / h)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)
    disp = (grid - c) @ a.T + h * head[4:] + c - grid
    translate = lambda x: np.asarray(model.apply(params, f32(x), method=tm.TranslationRegistration.translate),
                                     np.float64)
    tf = np.abs(_np_warp(translate(moving), disp) - fixed).mean()
    rf = np.abs(translate(_np_warp(moving, disp)) - fixed).mean()
    np.testing.assert_allclose(float(terms["translate_first"]), tf, rtol=2e-4)
    np.testing.assert_allclose(float(terms["register_first"]), rf, rtol=2e-4)
    np.testing.assert_allclose(float(terms["loss"]), tf + 0.5 * rf, rtol=2e-4)  # affine: no regulariser
    assert set(terms) == {"similarity", "translate_first", "register_first", "regularizer", "adversarial",
                          "discriminator", "loss"}  # no dummy dice
    assert float(terms["adversarial"]) == 0.0 and float(terms["discriminator"]) == 0.0  # off by default
    assert abs(tf - rf) > 1e-3  # the two paths differ: T does not commute with the warp

    # dense R with a non-trivial field: the regulariser enters with its weight
    model = tm.build(ndim=2, registration="dense", **TINY)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 2e4 if "flow" in str(path) and "kernel" in str(path) else x, _init(model))
    terms = mt.Loss(model, **spec).example(params, f32(moving), f32(fixed))
    disp = np.asarray(model.apply(params, f32(moving), f32(fixed))["disp"], np.float64)
    assert np.abs(disp).max() > 0.1
    translate = lambda x: np.asarray(model.apply(params, f32(x), method=tm.TranslationRegistration.translate),
                                     np.float64)
    tf = np.abs(_np_warp(translate(moving), disp) - fixed).mean()
    rf = np.abs(translate(_np_warp(moving, disp)) - fixed).mean()
    reg = sum(np.mean(np.sum(np.diff(disp, axis=a) ** 2, axis=-1)) for a in range(2))
    np.testing.assert_allclose(float(terms["translate_first"]), tf, rtol=2e-4)
    np.testing.assert_allclose(float(terms["register_first"]), rf, rtol=2e-4)
    np.testing.assert_allclose(float(terms["regularizer"]), reg, rtol=2e-4)
    np.testing.assert_allclose(float(terms["loss"]), tf + 0.5 * rf + 0.3 * reg, rtol=2e-4)

    # a baseline objective is the similarity across modalities, T unused
    base = mt.Loss(model, objective="ncc", reg_weight=0.3).example(params, f32(moving), f32(fixed))
    ncc = losses.ncc(f32(fixed), f32(_np_warp(moving, disp)))
    np.testing.assert_allclose(float(base["similarity"]), float(ncc), rtol=1e-3)
    assert float(base["translate_first"]) == 0.0


def test_adversarial_term_gradients(rng):
    """LSGAN term: D's gradient is that of L_D alone (and non-zero); T's includes w_adv ∇L_adv (differs from
    w_adv = 0) and is the derivative of the generator loss ``L = loss − L_D`` (central finite difference in float64
    along a random direction: L_D depends on T's output only under stop_gradient); R gets nothing from L_D. One
    jitted computation on a tiny model."""
    model = tm.build(ndim=2, registration="dense", discriminator=(4, 8), **TINY)
    with pytest.raises(ValueError, match="adversarial_weight"):
        mt.Loss(tm.build(ndim=2, **TINY), adversarial_weight=0.1)  # no discriminator
    with pytest.raises(ValueError, match="adversarial_weight"):
        mt.Loss(model, adversarial_weight=-1.0)
    # float64 (conftest enables x64) for the finite difference
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), _init(model))
    assert set(params["params"]) == {"registration", "translation", "discriminator"}  # init touched D
    batch = {"moving": jnp.asarray(rng.random((2,) + SHAPE)), "fixed": jnp.asarray(rng.random((2,) + SHAPE))}
    direction = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape)),
                                       params["params"]["translation"])
    on, off = mt.Loss(model, adversarial_weight=0.5), mt.Loss(model, adversarial_weight=0.0)
    key = jax.random.key(0)

    def shifted(eps):  # T's params moved along `direction`
        t = jax.tree_util.tree_map(lambda a, d: a + eps * d, params["params"]["translation"], direction)
        return {"params": {**params["params"], "translation": t}}

    @jax.jit
    def check(params):
        total = jax.grad(lambda p: on(p, batch, key)[0])(params)["params"]
        d_only = jax.grad(lambda p: on(p, batch, key)[1]["discriminator"])(params)["params"]
        no_adv = jax.grad(lambda p: off(p, batch, key)[0])(params)["params"]
        h = 1e-7  # small: the L1 terms and LeakyReLUs have kinks

        def generator(p):
            value, terms = on(p, batch, key)
            return value - terms["discriminator"]

        fd = (generator(shifted(h)) - generator(shifted(-h))) / (2 * h)
        return total, d_only, no_adv, fd, on(params, batch, key)[1]

    total, d_only, no_adv, fd, terms = check(params)
    leaves = jax.tree_util.tree_leaves
    # (a) D: gradient of the total loss == gradient of L_D alone, and non-zero
    for a, b in zip(leaves(total["discriminator"]), leaves(d_only["discriminator"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
    assert sum(float(jnp.sum(jnp.abs(a))) for a in leaves(d_only["discriminator"])) > 1e-6
    # (c) R and T get nothing from L_D
    for part in ("registration", "translation"):
        assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in leaves(d_only[part])), part
    # (b) T's gradient includes the adversarial term and matches finite differences along `direction`
    diff = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(leaves(total["translation"]),
                                                               leaves(no_adv["translation"])))
    assert diff > 1e-6
    # with w_adv = 0 the adversarial term and L_D are both off: D gets exactly zero
    assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in leaves(no_adv["discriminator"]))
    directional = sum(float(jnp.sum(a * d)) for a, d in zip(leaves(total["translation"]), leaves(direction)))
    np.testing.assert_allclose(directional, float(fd), rtol=1e-5)
    assert float(terms["adversarial"]) > 0 and float(terms["discriminator"]) > 0


def _toy_pair(index):
    """32×32 synthetic pair (affine up to 15°, ±15 %, ±6 voxels + a 1-voxel smooth deformation), moving in an
    inverted contrast: a fixed A → B mapping that T has to learn."""
    p = synthetic.synthetic_pair(np.random.default_rng([0, index]), shape=SHAPE, num_labels=4, label_smoothness=8.0,
                                 deform_scale=1.0, affine_scale=3.0, noise_std=0.0, bias_scale=0.0)
    p["moving"] = (1.0 - p["moving"]).astype(np.float32)
    return p


def _tre(points, disp_pred, disp_true, spacing):
    """Per-landmark TRE (mm) of a predicted field against the true one at fixed-grid voxels ``points``."""
    idx, p = tuple(np.asarray(points).T), np.asarray(points, np.float64)
    return metrics.tre(p + np.asarray(disp_pred, np.float64)[idx], p + np.asarray(disp_true, np.float64)[idx],
                       spacing=spacing)


def test_joint_training_lowers_landmark_error():
    """100 steps of the joint objective on one batch of 4 pairs bring R's landmark error on them down by > 20 %."""
    model = tm.build(ndim=2, registration="dense", **TINY)
    tx = training.make_optimizer("adam", 1e-2)
    step = training.make_train_step(mt.Loss(model, objective="translation", reg_weight=0.05), tx)
    state = training.create_state(model, tx, jax.random.key(0), SHAPE)
    pairs = [_toy_pair(i) for i in range(4)]
    batch = {k: jnp.stack([jnp.asarray(p[k]) for p in pairs]) for k in ("moving", "fixed")}
    register = jax.jit(lambda p, m, f: model.apply(p, m, f, method=tm.TranslationRegistration.register)["disp"])

    def mean_tre(params):
        errs = []
        for p in pairs:
            pts = mt.landmarks(p["fixed_labels"], num=50, seed=0)
            disp = register(params, jnp.asarray(p["moving"]), jnp.asarray(p["fixed"]))
            errs.append(_tre(pts, disp, p["disp"], (1.0, 1.0)).mean())
        return float(np.mean(errs))

    before = mean_tre(state.params)
    for i in range(100):
        state, metrics = step(state, batch, jax.random.key(i))
        training.check_finite(metrics, i + 1)
    after = mean_tre(state.params)
    assert before > 3.0 and after < 0.8 * before, (before, after)


def test_fit_resume_and_evaluate_smoke(tmp_path):
    config = tiny_config(steps=2)
    work = str(tmp_path / "run")
    part = mt.fit(config, work, stop_at=1, progress=False)
    assert int(part.step) == 1
    full = mt.fit(config, work, progress=False)  # resumes at step 1
    assert int(full.step) == 2
    rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)

    base = tiny_config(steps=1)
    base.objective = "ncc"
    mt.fit(base, work + "_ncc", progress=False)

    result = evaluation.evaluate(config, work)
    names = list(result["summary"])
    assert names == ["identity", "R: translation (dense)", "R: ncc (dense)"], names
    saved = json.load(open(os.path.join(work, "eval", "results.json")))
    assert saved["missing"] and "mi" in saved["missing"][0] and "baselines not found" in result["markdown"]
    assert saved["steps"] == {"R: translation (dense)": 2, "R: ncc (dense)": 1}
    for name in names:
        s = result["summary"][name]
        assert s["tre_mm"]["n"] == 2 and np.isfinite(s["tre_mm"]["mean"]) and 0 <= s["dice_mean"]["mean"] <= 1
    assert "t_l1" in result["summary"]["R: translation (dense)"]
    for f in ("results.csv", "results.json", "results.md", "figures/pair000_R_translation_dense.png"):
        assert os.path.isfile(os.path.join(work, "eval", f)), f
    assert "| identity |" in open(os.path.join(work, "eval", "results.md")).read()
    # identity TRE is the true displacement's length at the landmarks
    ds = mt.make_dataset(config.data, split="test")
    p = ds.pair(0)
    pts = mt.landmarks(p["fixed_labels"], num=20, seed=[config.data.test_seed, 0])
    expected = np.linalg.norm(p["disp"][tuple(pts.T)] * p["spacing"], axis=-1).mean()  # mm
    row = next(r for r in result["rows"] if r["pair"] == 0 and r["method"] == "identity")
    np.testing.assert_allclose(row["tre_mm"], expected, rtol=1e-5)
    # the network row is R applied as (moving, fixed) = (I_a, I_b)
    model, params, step = mt.load(config, work, SHAPE)
    assert step == 2
    disp = model.apply(params, jnp.asarray(p["moving"]), jnp.asarray(p["fixed"]),
                       method=tm.TranslationRegistration.register)["disp"]
    row = next(r for r in result["rows"] if r["pair"] == 0 and r["method"] == "R: translation (dense)")
    np.testing.assert_allclose(row["tre_mm"], _tre(pts, disp, p["disp"], p["spacing"]).mean(), rtol=1e-4)

    with pytest.raises(ValueError, match="objective"):
        bad = tiny_config()
        bad.objective = "nonsense"
        mt.fit(bad, str(tmp_path / "bad"), progress=False)


OPEN_MS = os.path.join(ROOT, "..", "shared", "data", "open_ms")


def test_open_ms_config_without_data():
    c = load_config("translation_real")
    assert c.data.kind == "open_ms" and c.model.discriminator and c.loss.adversarial_weight > 0
    assert set(c.data.train_patients).isdisjoint(c.data.test_patients)  # split by subject
    assert all(n % 16 == 0 for n in c.data.shape)  # the U-Nets' four halvings
    with pytest.raises(ValueError, match="unknown argument"):
        load_config("translation_real", "3d")
    p = load_config("translation_real", "prostate")
    assert p.data.kind == "prostate" and set(p.data.train_cases).isdisjoint(p.data.test_cases)  # split by case
    assert len(p.data.shape) == 3 and all(n % 16 == 0 for n in p.data.shape) and p.loss.adversarial_weight > 0
    with pytest.raises(ValueError, match="model.discriminator"):
        tm.build(ndim=2, discriminator=(4, 0), **TINY)


@pytest.mark.skipif(not os.path.isdir(OPEN_MS), reason="needs ../shared/data/open_ms")
def test_open_ms_slice_pairs():
    """Real T2/FLAIR → T1 slice pairs: split by patient, the true field is exact (labels and T1 intensities pulled
    by it), deterministic per index; bad data fields are ValueErrors naming them."""
    c = load_config("translation_real")
    c.data.folder = OPEN_MS
    train, test = mt.make_dataset(c.data, split="train"), mt.make_dataset(c.data, split="test")
    assert {p for p, _ in train.slices} == {"patient07"} and {p for p, _ in test.slices} == {"patient19"}
    assert len(train.slices) > 20 and train.label_names == {1: "CSF", 2: "GM", 3: "WM"}
    contrasts = set()
    for i in range(4):
        p = test.pair(i)
        contrasts.add(p["contrast"])
        assert p["fixed"].shape == p["moving"].shape == tuple(c.data.shape) and p["fixed"].dtype == np.float32
        assert p["disp"].shape == tuple(c.data.shape) + (2,) and tuple(p["spacing"]) == (2.0, 2.0)
        assert 0 <= p["fixed"].min() and p["fixed"].max() <= 1 and p["moving"].max() > 0.5
        assert np.abs(p["disp"]).max() > 1.0  # something to register
        # the labels are pulled exactly (nearest) through disp; T1 linearly
        shape = p["fixed"].shape
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
        y = grid + p["disp"]
        idx = np.rint(y).astype(int)
        inside = np.all((idx >= 0) & (idx < np.array(shape)), axis=-1)
        np.testing.assert_array_equal(p["fixed_labels"][inside], p["moving_labels"][tuple(idx[inside].T)])
        vols = multimodal.open_ms_volumes_cached(c.data.folder, "patient19", ("T1", "T2", "FLAIR"), 2.0)
        t1 = preprocess.crop_or_pad(vols["T1"][:, :, p["slice"]], shape)
        expected = ndimage.map_coordinates(t1.astype(np.float64), np.moveaxis(y, -1, 0), order=1, cval=0.0)
        np.testing.assert_allclose(p["fixed"], np.clip(expected, 0, 1), atol=1e-5)
    assert contrasts <= {"T2", "FLAIR"}
    np.testing.assert_array_equal(test.pair(2)["moving"], test.pair(2)["moving"])
    assert not np.array_equal(train.pair(0)["disp"], train.pair(1)["disp"])
    for field, value, match in (("moving_contrasts", ("PD",), "data.moving_contrasts"),
                                ("test_patients", (), "test_patients"), ("shape", (32, 32, 32), "data.shape")):
        bad = load_config("translation_real")
        bad.data.folder = OPEN_MS
        bad.data[field] = value
        with pytest.raises(ValueError, match=match):
            mt.make_dataset(bad.data, split="test")


PROSTATE = os.path.join(ROOT, "..", "shared", "data", "prostate_mr_trus")


@pytest.mark.skipif(not os.path.isdir(PROSTATE), reason="needs ../shared/data/prostate_mr_trus")
def test_prostate_pairs():
    """Real MR → TRUS 3-D pairs: test pairs are the held-out cases as they are (gland, landmarks whose zero-field
    TRE is the world distance after the centre start); training pairs are training cases moved at random."""
    c = load_config("translation_real", "prostate")
    c.data.folder = PROSTATE
    c.data.test_cases = (11, 10)  # case 10 has the gland only
    test, train = mt.make_dataset(c.data, split="test"), mt.make_dataset(c.data, split="train")
    p = test.pair(0)
    assert p["case"] == 11 and test.pair(3)["case"] == 10 and len(test) == 2 and "landmarks" not in test.pair(1)
    assert p["fixed"].shape == p["moving"].shape == p["fixed_labels"].shape == tuple(c.data.shape)
    assert 0 <= p["moving"].min() and p["moving"].max() <= 1 and p["fixed_labels"].sum() > 100
    assert "disp" not in p and p["landmarks"].shape == p["moving_landmarks"].shape == (2, 3)
    row = evaluation.measure(p, np.zeros(p["fixed"].shape + (3,)), measures=("dice", "tre"),
                             label_names=test.label_names, spacing=p["spacing"])
    (case,) = multimodal.prostate_cases(PROSTATE, cases=[11])
    shift = multimodal.prostate_arrays(case)["start"][:3, 3]
    world = np.linalg.norm(case.landmarks[:, 0] + shift - case.landmarks[:, 1], axis=-1).mean()
    assert row["tre_mm"] == pytest.approx(world, abs=1e-6) and 0.2 < row["dice"]["gland"] < 0.95
    q0, q1 = train.pair(0), train.pair(1)
    assert {q0["case"], q1["case"]} <= set(range(10)) and not np.array_equal(q0["moving"], q1["moving"])
    assert q0["moving"].dtype == np.float32 and q0["moving_labels"].dtype == np.int32
    np.testing.assert_array_equal(train.pair(0)["moving"], q0["moving"])  # deterministic per index
    assert c.data.augment_fixed and not np.array_equal(q0["fixed"], train.arrays[q0["case"]]["fixed"])
    c.data.augment_fixed = False  # the TRUS as it is, the MR moved by the same motion as before
    still = mt.make_dataset(c.data, split="train").pair(0)
    np.testing.assert_array_equal(still["fixed"], train.arrays[still["case"]]["fixed"])
    np.testing.assert_array_equal(still["moving"], q0["moving"])
    bad = load_config("translation_real", "prostate")
    bad.data.folder = PROSTATE
    bad.data.test_cases = (10, 42)
    with pytest.raises(ValueError, match=r"cases \[42\] not found"):
        mt.make_dataset(bad.data, split="test")
