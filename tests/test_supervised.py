"""Supervised registration (Cao et al. 2017): the similarity-map cue, the network's two modes, the balanced
sampler, the residual targets, a toy training run and a fit/resume/evaluate smoke run."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxreg import evaluation, spatial, training
from jaxreg.data import synthetic
from jaxreg.methods import supervised as S
from jaxreg.models import supervised as M


def _reference_map(fixed, moving, radius, window, eps=M.SIM_EPS):
    """Direct float64 NumPy loops: NCC of the fixed window at x with the moving window at x + d (zero outside)."""
    nd, shape = fixed.ndim, fixed.shape
    fp, mp = np.pad(fixed, window), np.pad(moving, radius + window)
    box = lambda a, start: a[tuple(slice(s, s + 2 * window + 1) for s in start)]
    out = np.zeros(shape + ((2 * radius + 1) ** nd,))
    for x in np.ndindex(*shape):
        a = box(fp, x)
        for k, d in enumerate(M.offsets(radius, nd)):
            b = box(mp, tuple(xi + radius + di for xi, di in zip(x, d)))
            out[x + (k,)] = ((a - a.mean()) * (b - b.mean())).mean() / np.sqrt(a.var() * b.var() + eps)
    return out


@pytest.mark.parametrize("shape, radius, window", [((7, 9), 2, 1), ((6, 7, 6), 1, 1)])
def test_similarity_map_equals_numpy_reference(rng, shape, radius, window):
    fixed = rng.random(shape)
    moving = np.roll(fixed, 1, axis=0) + 0.1 * rng.random(shape)
    moving[..., :2] = 0.5  # a flat region: NCC ~ 0 there, not NaN
    ref = _reference_map(fixed, moving, radius, window)
    smap_fn = jax.jit(lambda f, m: M.similarity_map(f, m, radius=radius, window=window))
    dense = np.asarray(smap_fn(jnp.asarray(fixed), jnp.asarray(moving)))
    assert dense.dtype == np.float64 and dense.shape == ref.shape
    np.testing.assert_allclose(dense, ref, atol=1e-10)
    # the patch form at one voxel, from patches cut out of the zero-padded images
    q = radius + window
    x = tuple(s // 2 for s in shape)
    cut = lambda a: np.pad(a, q)[tuple(slice(c, c + 2 * q + 1) for c in x)]
    patch = np.asarray(jax.jit(lambda f, m: M.patch_similarity_map(f, m, window=window))(cut(fixed), cut(moving)))
    assert patch.shape == (2 * radius + 1,) * len(shape)
    np.testing.assert_allclose(patch.reshape(-1), ref[x], atol=1e-10)
    # the peak of a pure shift sits at the shift: moving[x + d] = fixed[x] for d = (1, 0, ...)
    shifted = np.roll(fixed, 1, axis=0)
    smap = np.asarray(smap_fn(jnp.asarray(fixed), jnp.asarray(shifted)))
    centre = smap[(slice(q, -q),) * len(shape)]
    best = M.offsets(radius, len(shape))[centre.reshape(-1, centre.shape[-1]).argmax(-1)]
    np.testing.assert_array_equal(best, np.eye(len(shape), dtype=int)[0][None].repeat(len(best), 0))


def test_similarity_map_rejects_bad_input():
    with pytest.raises(ValueError, match="fixed and moving"):
        M.similarity_map(jnp.zeros((4, 4)), jnp.zeros((4, 5)), radius=1, window=1)
    with pytest.raises(ValueError, match="radius"):
        M.similarity_map(jnp.zeros((4, 4)), jnp.zeros((4, 4)), radius=-1, window=1)
    with pytest.raises(ValueError, match="odd side"):
        M.patch_similarity_map(jnp.zeros((4, 4)), jnp.zeros((4, 4)), window=1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_model_shapes(ndim):
    net = M.build(ndim=ndim, features=(8, 8, 8), dilations=(1, 2, 1), radius=2, window=1, sim_features=(4,),
                  sim_out=8, head=8)
    assert net.patch_radius == 4
    shape = (12, 10) if ndim == 2 else (8, 10, 6)
    img = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = jax.eval_shape(net.init, jax.random.key(0), img, img)
    kernels = {k: v["kernel"].shape for k, v in params["params"].items()}
    assert kernels["app0"] == (3,) * ndim + (2, 8) and kernels["sim0"] == (3,) * ndim + (1, 4)
    assert kernels["sim_dense"] == (3**ndim * 4, 8) and kernels["flow"] == (8, ndim)
    assert jax.eval_shape(net.apply, params, img, img).shape == shape + (ndim,)
    patch = jax.ShapeDtypeStruct((9,) * ndim, jnp.float32)
    assert jax.eval_shape(lambda p, a, b: net.apply(p, a, b, method=net.patch), params, patch, patch).shape == (ndim,)
    with pytest.raises(ValueError, match="patches must have shape"):
        jax.eval_shape(lambda p, a, b: net.apply(p, a, b, method=net.patch), params, img, img)
    with pytest.raises(ValueError, match="at most radius"):
        M.build(ndim=ndim, radius=1, sim_features=(4, 4)).init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape))


def test_dense_pass_equals_patches_at_every_voxel(rng):
    net = M.build(ndim=2, features=(6, 6), dilations=(1, 2), radius=2, window=1, sim_features=(4,), sim_out=8,
                  head=8)
    params = training.init_params(net, jax.random.key(0), (10, 12))
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * rng.standard_normal(p.shape), params)  # no tiny head
    fixed, moving = rng.random((10, 12)), rng.random((10, 12))
    dense = np.asarray(jax.jit(net.apply)(params, moving, fixed))
    r = net.patch_radius
    coords = np.stack(np.meshgrid(np.arange(10), np.arange(12), indexing="ij"), -1).reshape(-1, 2)
    pair = np.zeros(len(coords), np.int64)
    cut = lambda a: S.extract_patches(np.pad(a, r)[None], pair, coords, r)
    patches = jax.jit(jax.vmap(lambda m, f: net.apply(params, m, f, method=net.patch)))(cut(moving), cut(fixed))
    np.testing.assert_allclose(np.asarray(patches).reshape(10, 12, 2), dense, atol=1e-9)
    assert np.abs(dense).max() > 0.1


def test_extract_patches_match_slices(rng):
    images = rng.random((3, 6, 7))
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2)])
    pair, coords = np.array([0, 2, 1]), np.array([[0, 0], [5, 6], [2, 3]])
    patches = S.extract_patches(padded, pair, coords, 2)
    for p, i, c in zip(patches, pair, coords):
        np.testing.assert_array_equal(p, padded[i, c[0]:c[0] + 5, c[1]:c[1] + 5])


def test_balanced_sampler_flattens_the_magnitude_histogram(rng):
    magnitude = rng.exponential(0.5, (4, 30, 30))  # most voxels move little
    mask = np.ones(magnitude.shape, bool)
    mask[:, :5] = False
    balanced = S.Sampler(magnitude, mask, bins=6)
    pair, coords = balanced.sample(0, 30000)
    assert mask[(pair,) + tuple(coords.T)].all()
    drawn = magnitude[(pair,) + tuple(coords.T)]
    hist = np.bincount(np.clip(np.searchsorted(balanced.edges, drawn, side="right") - 1, 0, 5), minlength=6)
    frac = hist / hist.sum()
    assert np.all(np.abs(frac - 1 / 6) < 0.03), frac  # flat-ish: every bin about 1/6
    uniform = S.Sampler(magnitude, mask, bins=6, strategy="uniform")
    drawn_u = magnitude[(lambda p, c: (p,) + tuple(c.T))(*uniform.sample(0, 30000))]
    frac_u = np.bincount(np.clip(np.searchsorted(balanced.edges, drawn_u, side="right") - 1, 0, 5), minlength=6)
    frac_u = frac_u / frac_u.sum()
    assert frac_u[0] > 0.35 and frac_u[-1] < 0.1  # the skew the balancing removes
    # deterministic per key
    np.testing.assert_array_equal(balanced.sample([0, 7], 50)[1], balanced.sample([0, 7], 50)[1])
    with pytest.raises(ValueError, match="no voxel"):
        S.Sampler(magnitude, np.zeros_like(mask))


def test_residual_composes_with_the_affine_back_to_the_total_field(rng):
    shape = (24, 20)
    matrix = np.array([[1.05, 0.1, 1.5], [-0.08, 0.95, -0.7], [0, 0, 1]])
    a = np.asarray(spatial.affine_to_disp(jnp.asarray(matrix), shape))
    u = a + 0.7 * synthetic.smooth_random_field(rng, shape, 2, spacing=6.0)
    r = S.residual(matrix, a, u)
    np.testing.assert_allclose(np.asarray(S.compose_residual(matrix, a, r)), u, atol=1e-5)
    # moving_a = warp(moving, a); warp(moving_a, r) == warp(moving, u) for a linear image (exact interpolation)
    grid = np.asarray(spatial.identity_grid((40, 40), dtype=jnp.float64))
    moving = jnp.asarray(grid @ np.array([0.3, -0.2]) + 2.0)
    via, direct = jax.jit(lambda m, a, r, u: (spatial.warp(spatial.warp(m, a), r), spatial.warp(m, u)))(
        moving, jnp.asarray(a), jnp.asarray(r, np.float64), jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(via)[4:-4, 4:-4], np.asarray(direct)[4:-4, 4:-4], atol=1e-4)


def _toy_config(**train):
    c = ml_collections.ConfigDict()
    c.method, c.seed = "supervised", 0
    # toy pairs: busy random label maps (8 labels, features ~3 voxels), no affine, noise or bias; true fields
    c.data = ml_collections.ConfigDict(dict(kind="synthetic", shape=(32, 32), num_labels=8, seed=0, test_seed=99,
                                            train_pairs=6, options={"affine_scale": 0.0, "deform_scale": 2.5,
                                                                    "label_smoothness": 3.0, "noise_std": 0.0,
                                                                    "bias_scale": 0.0}))
    c.prealign, c.target, c.target_preset = "", "true", "diffeo"
    c.model = ml_collections.ConfigDict(dict(features=(16, 16, 16), dilations=(1, 2, 1), radius=3, window=1,
                                             sim_features=(8,), sim_out=16, head=32))
    c.sampling = ml_collections.ConfigDict(dict(strategy="balanced", bins=6, mask="all", mask_dilation=0))
    c.train = ml_collections.ConfigDict(dict(steps=150, batch_size=64, optimizer="adam", learning_rate=1e-2,
                                             schedule="constant", grad_clip=1.0, log_every=1, checkpoint_every=1,
                                             keep_checkpoints=2))
    c.train.update(train)
    c.predict = ml_collections.ConfigDict(dict(sigma=1.0, iterations=1))
    c.eval = ml_collections.ConfigDict(dict(num_pairs=2, methods=("identity", "affine", "demons", "supervised"),
                                            classical_preset="diffeo", spacing=(),
                                            demons={"levels": (1,), "iterations": (5,)}, figures=0))
    return c


def test_toy_training_loss_falls_and_field_correlates():
    c = _toy_config()
    pairs = S.prepare_training_pairs(c)
    model = S.build_model(c, 2)
    tx = training.optimizer_from_config(c.train)
    step = training.make_train_step(S.Loss(model), tx)
    state = training.create_state(model, tx, jax.random.key(0), S._patch_shape(model, 2))
    batches = S.Batches(pairs, model, c)
    probe = batches.batch(10**6)  # a fixed batch drawn apart from the training steps
    loss = jax.jit(lambda params, batch: S.Loss(model)(params, batch, None)[0])
    before = float(loss(state.params, probe))
    for i in range(int(c.train.steps)):
        state, m = step(state, batches.batch(i), jax.random.key(i))
        assert bool(m["finite"])
    after = float(loss(state.params, probe))
    assert after < 0.6 * before, (before, after)
    # held-out pair (test seed): the dense predicted field correlates with the true one
    p = S.generate(c, split="test", index=0)
    pred = np.asarray(S.make_predict(model, sigma=1.0)(state.params, jnp.asarray(p["moving"]), jnp.asarray(p["fixed"])))
    inner = (slice(4, -4),) * 2
    corr = np.corrcoef(pred[inner].reshape(-1), p["disp"][inner].reshape(-1))[0, 1]
    assert corr > 0.7, corr


def test_fit_resume_and_evaluate_smoke(tmp_path, monkeypatch):
    c = _toy_config(steps=2, batch_size=4)
    c.data.train_pairs = 2
    c.model.update(features=(4, 4), dilations=(1, 1), radius=1, sim_features=(), sim_out=4, head=4)
    c.predict.iterations = 2  # the re-applied prediction path
    workdir = str(tmp_path / "run")
    state = S.fit(c, workdir, stop_at=1, progress=False)
    assert int(state.step) == 1 and os.path.isfile(os.path.join(workdir, "train_pairs.npz"))

    def fail(*args, **kwargs):
        raise AssertionError("the prepared pairs should come from workdir/train_pairs.npz")

    with monkeypatch.context() as mp:
        mp.setattr(S, "generate", fail)
        state = S.fit(c, workdir, progress=False)  # resumes at step 1 from the checkpoint
    assert int(state.step) == 2
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    result = evaluation.evaluate(c, workdir)
    assert len(result["rows"]) == 2 * 4
    out = os.path.join(workdir, "eval")
    assert sorted(os.listdir(out)) == ["results.csv", "results.json", "results.md"]
    md = open(os.path.join(out, "results.md")).read()
    assert md == result["markdown"] and "supervised vs demons" in md and "Dice label1" in md
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["checkpoint_step"] == 2
    assert saved["summary"]["identity"]["epe_mm"]["mean"] > saved["summary"]["demons"]["epe_mm"]["mean"]
    assert {t["baseline"] for t in result["tests"]} == {"affine", "demons"}


def test_classical_targets_are_residuals_of_the_prealignment():
    """target="classical" with the pre-alignment's own preset: the total field is the affine, the residual 0."""
    c = _toy_config()
    c.data.train_pairs = 1
    c.data.options.update(affine_scale=1.0)
    c.prealign, c.target, c.target_preset = "affine", "classical", "affine"
    pairs = S.prepare_training_pairs(c)
    assert pairs["target"].shape == (1, 32, 32, 2) and pairs["mask"].all()
    np.testing.assert_allclose(pairs["target"], 0.0, atol=1e-4)
    assert not np.allclose(pairs["moving"][0], S.generate(c, split="train", index=0)["moving"])  # it was warped


# ------------------------------------------------------------------------------------- real subjects (data.kind)
def _fake_learning_set(folder, names=("1", "2", "3", "11", "12"), shape=(16, 12, 16)):
    """A tiny learning set (``jaxreg.data.subjects`` layout) of blob 'brains' with label values 0, 3, 17, 1002 on a
    2 mm grid; no real data needed."""
    from jaxreg.data import io, subjects

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    for i, n in enumerate(names):
        centre = np.array(shape) / 2 + rng.normal(0, 0.7, 3)
        r = np.linalg.norm(grid - centre, axis=-1)
        labels = np.where(r < 3, 3, np.where(r < 5, 17 if i % 2 else 1002, 0)).astype(np.int32)
        image = np.clip(np.exp(-(r / 5.0) ** 2) + 0.05 * rng.random(shape), 0, 1)
        subjects.write_subject(folder, n, image, labels)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    io.write_json(os.path.join(folder, subjects.INDEX), {
        "version": subjects.VERSION, "template": {"shape": list(shape), "affine": affine.tolist()},
        "settings": {}, "subjects": [{"name": n, "matrix": np.eye(4).tolist(), "source": {}} for n in names]})
    return folder


def _subjects_config(folder, **data):
    c = _toy_config(steps=1, batch_size=4)
    c.data = ml_collections.ConfigDict(dict(kind="subjects", path=str(folder), seed=0, test_seed=0, train_pairs=4,
                                            shape=(16, 12, 16),
                                            subjects={"train": ("1", "2", "3"), "test": ("11", "12")}))
    c.data.update(data)
    c.prealign, c.target, c.target_preset = "", "classical", "default"
    c.sampling.update(mask="labels", mask_dilation=1)
    c.model.update(features=(4, 4), dilations=(1, 1), radius=1, sim_features=(), sim_out=4, head=4)
    c.eval.update(num_pairs=50, methods=("identity", "supervised"), spacing=())
    return c


def test_subjects_kind_draws_train_pairs_by_seed_and_every_test_pair(tmp_path):
    c = _subjects_config(_fake_learning_set(str(tmp_path / "set")))
    train = [S.generate(c, split="train", index=i) for i in range(4)]
    names = [p["name"] for p in train]
    assert len(set(names)) == 4  # distinct ordered pairs of subjects 1-3 only
    assert all(set(n.split("->")) <= {"1", "2", "3"} and len(set(n.split("->"))) == 2 for n in names)
    assert names == [S.generate(c, split="train", index=i)["name"] for i in range(4)]  # fixed by data.seed
    c2 = _subjects_config(c.data.path, seed=1)
    assert [S.generate(c2, split="train", index=i)["name"] for i in range(4)] != names
    assert S.num_pairs(c, "test") == 2
    test = [S.generate(c, split="test", index=i)["name"] for i in range(2)]
    assert sorted(test) == ["11->12", "12->11"]
    p = train[0]
    assert p["fixed"].dtype == np.float32 and p["fixed"].shape == (16, 12, 16)
    assert 0 <= p["fixed"].min() and p["moving"].max() <= 1
    np.testing.assert_allclose(p["spacing"], 2.0)
    assert set(np.unique(p["fixed_labels"])) <= {0, 1, 2, 3} and p["fixed_labels"].max() > 0  # classes, not values
    assert S._label_names(c, 0) == {1: "3", 2: "17", 3: "1002"}  # the values, numbered over the test subjects
    with pytest.raises(IndexError):
        S.generate(c, split="test", index=2)
    with pytest.raises(ValueError, match="data.train_pairs"):
        S.generate(_subjects_config(c.data.path, train_pairs=7), split="train", index=0)  # 3 subjects: 6 pairs
    with pytest.raises(ValueError, match="data.subjects"):
        S.generate(_subjects_config(c.data.path, subjects={"train": ("1", "11"), "test": ("11", "12")}),
                   split="train", index=0)


def test_subjects_classical_targets_are_cached_and_reused(tmp_path, monkeypatch):
    """The classical engine's fields are computed once per training pair and read back from workdir; the network
    works on the downsized grid; the held-out evaluation scores the mean Dice over the regions."""
    from types import SimpleNamespace

    from jaxreg import optimize

    c = _subjects_config(_fake_learning_set(str(tmp_path / "set")))
    c.downsize = 2
    u = np.array([1.0, -0.5, 0.25], np.float32)  # a constant total field (full-grid voxels)
    calls = []

    def fake_register(fixed, moving, options):
        assert options is optimize.PRESETS["default"]
        calls.append(1)
        return SimpleNamespace(disp=jnp.broadcast_to(jnp.asarray(u), fixed.shape + (3,)))

    monkeypatch.setattr(optimize, "register", fake_register)
    workdir = str(tmp_path / "run")
    S.fit(c, workdir, progress=False)
    assert len(calls) == 4
    cache = os.path.join(workdir, "train_pairs.npz")
    with np.load(cache) as z:
        assert z["target"].shape == (4, 8, 6, 8, 3) and z["fixed"].shape == (4, 8, 6, 8)
        np.testing.assert_allclose(z["target"], np.broadcast_to(u / 2, z["target"].shape), atol=1e-6)  # coarse voxels
        assert z["mask"].any() and z["target_seconds"].shape == (4,)
    pairs = S.prepare_training_pairs(c, cache=cache)  # reused: no engine call
    assert len(calls) == 4 and pairs["target"].shape == (4, 8, 6, 8, 3)
    changed = _subjects_config(c.data.path, train_pairs=3)
    changed.downsize = 2
    assert S.prepare_training_pairs(changed, cache=cache)["fixed"].shape[0] == 3 and len(calls) == 7  # recomputed
    result = evaluation.evaluate(c, workdir)
    assert len(result["rows"]) == 2 * 2 and result["rows"][0]["seconds"] >= 0  # both ordered pairs of 11, 12
    assert "Dice (mean over regions)" in result["markdown"] and "Dice 3" not in result["markdown"]
    saved = json.load(open(os.path.join(workdir, "eval", "results.json")))
    assert len(saved["target_seconds"]) == 3  # the cache as last written
    fields = [S.make_predict(S.build_model(c, 3), sigma=0.0, downsize=2)]
    assert fields[0](S.load(c, workdir, 3)[1], jnp.zeros((16, 12, 16)), jnp.zeros((16, 12, 16))).shape == (16, 12, 16, 3)


def test_bad_downsize_is_rejected():
    for bad in (0, 1.5, True):
        c = _toy_config()
        c.downsize = bad
        with pytest.raises(ValueError, match="downsize"):
            S.prepare_training_pairs(c)


def test_real_config_split_and_targets():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "supervised_real.py")
    spec = importlib.util.spec_from_file_location("supervised_real", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert c.data.kind == "subjects" and c.target == "classical" and c.target_preset == "default"
    assert c.data.subjects.train == tuple(str(i) for i in range(1, 9))
    assert c.data.subjects.test == tuple(str(i) for i in range(11, 15))
    assert "classical" in c.eval.methods and "supervised" in c.eval.methods
    if not os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mindboggle20")):
        pytest.skip("../shared/data/mindboggle20 is absent")
    from jaxreg import atlas

    assert len(atlas.records_from_config(c.data)) == 12  # every subject file of the split is there
