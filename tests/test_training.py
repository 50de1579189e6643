"""Training (generic, through the VoxelMorph method): the step lowers the loss, a short run improves Dice, sharded =
single device, resume = uninterrupted, non-finite errors, parameters reload (and a wrong model is named), datasets
and loader, and a one-step train.py + evaluate.py smoke run.

All runs use one tiny 2-D network (encoder (4, 8), decoder (8, 8, 4)) on 32×32 synthetic pairs, so the compiled
steps are shared between tests (``training.make_train_step`` is cached per loss and optimiser).
"""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from conftest import load_config
from jaxreg import metrics, models, spatial, training
from jaxreg.data import datasets
from jaxreg.methods import voxelmorph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (32, 32)


def tiny_config(steps=40):
    c = load_config("synthetic_2d")
    c.data.shape = SHAPE
    c.data.num_labels = 4
    c.data.synthetic.deform_scale = 4.0
    c.model.encoder = (4, 8)
    c.model.decoder = (8, 8, 4)
    c.loss.similarity = "mse"
    c.loss.similarity_options = {}
    c.loss.reg_weight = 0.05
    c.train.steps = steps
    c.train.batch_size = 4
    c.train.learning_rate = 1e-2
    c.train.log_every = 10
    c.train.checkpoint_every = 3
    c.eval.num_pairs = 2
    c.eval.instance_iterations = 5
    return c


@pytest.fixture(scope="module")
def setup():
    model = models.build(ndim=2, preset=None, encoder=(4, 8), decoder=(8, 8, 4))
    loss = voxelmorph.Loss(model, similarity="mse", reg_weight=0.05, dice_weight=1.0, num_labels=4)
    tx = training.make_optimizer("adam", 3e-3)
    step = training.make_train_step(loss, tx)
    ds = datasets.SyntheticPairs(SHAPE, seed=0, num_labels=4, deform_scale=4.0)
    batch = datasets.make_batch(ds, 0, 4)
    return model, tx, step, batch


def _fresh(model, tx, mesh):
    return training.replicate(training.create_state(model, tx, jax.random.key(0), SHAPE), mesh)


def test_steps_lower_the_loss_on_a_fixed_batch(setup):
    model, tx, step, batch = setup
    mesh = training.make_mesh(jax.devices()[:1])
    state = _fresh(model, tx, mesh)
    b = training.shard_batch(batch, mesh)
    losses = []
    for i in range(6):
        state, m = step(state, b, jax.random.key(i))
        training.check_finite(m, i + 1)
        losses.append(float(m["loss"]))
        assert float(m["dice"]) > 0 and float(m["grad_norm"]) > 0
    assert int(state.step) == 6
    assert losses[-1] < losses[0] - 1e-4, losses


def test_sharded_step_equals_single_device(setup):
    model, _, _, batch = setup
    assert len(jax.devices()) >= 2, "conftest provides 2 CPU devices"
    # plain SGD, so parameters differ only by the gradients' float32 summation order (Adam's normalised first
    # steps would turn rounding in near-zero gradients into lr-sized differences)
    tx = training.make_optimizer("sgd", 0.5)
    step = training.make_train_step(voxelmorph.Loss(model, similarity="mse", reg_weight=0.05, dice_weight=1.0,
                                                    num_labels=4), tx)
    out = []
    for devices in (jax.devices()[:1], jax.devices()[:2]):
        mesh = training.make_mesh(devices)
        state = _fresh(model, tx, mesh)
        start = jax.device_get(state.params)
        for i in range(2):
            state, m = step(state, training.shard_batch(batch, mesh), jax.random.key(i))
        if len(devices) == 2:
            leaf = jax.tree_util.tree_leaves(state.params)[0]
            assert len(leaf.sharding.device_set) == 2  # replicated on both devices
        out.append(jax.device_get(state.params))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(out[0]), jax.tree_util.tree_leaves(start)))
    assert moved > 1e-4  # the steps did change the parameters
    for a, b in zip(jax.tree_util.tree_leaves(out[0]), jax.tree_util.tree_leaves(out[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # float32 summation order only
    with pytest.raises(ValueError, match="divisible"):
        training.shard_batch({"moving": np.zeros((3, 32, 32), np.float32)}, training.make_mesh(jax.devices()[:2]))


def test_nonfinite_loss_names_step_and_term(setup):
    model, tx, step, batch = setup
    mesh = training.make_mesh(jax.devices()[:1])
    state = _fresh(model, tx, mesh)
    before = jax.device_get(state.params)
    bad = dict(batch, moving=batch["moving"].copy())
    bad["moving"][0, 3, 3] = np.nan
    state, m = step(state, training.shard_batch(bad, mesh), jax.random.key(0))
    with pytest.raises(FloatingPointError, match=r"similarity term .* at step 7"):
        training.check_finite(m, 7, order=voxelmorph.LOG_COLUMNS)
    after = jax.device_get(state.params)  # the bad update was not applied
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))


def _toy_loop(tmp_path, *, start, stop, nan_at=None):
    """``run_loop`` over a toy step (params count the steps; ``nan_at`` reports a non-finite loss), no compilation."""
    manager = training.checkpoint_manager(tmp_path / "ckpt", save_every=3, keep=10)
    state = training.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(2)}, opt_state=())
    state = training.restore_checkpoint(manager, state) or state

    def step_fn(state, step):
        bad = step + 1 == nan_at
        metrics = {"loss": jnp.asarray(np.nan if bad else float(step)), "finite": jnp.asarray(not bad),
                   "grad_norm": jnp.asarray(1.0)}
        return state.replace(step=state.step + 1, params={"w": state.params["w"] + 1}), metrics

    out = training.run_loop(state, step_fn, start=start, stop=stop, total=7, manager=manager,
                            log_path=tmp_path / "log.jsonl", columns=("loss", "grad_norm"), log_every=2,
                            checkpoint_every=3, progress=False)
    return out


def test_run_loop_logs_checkpoints_resumes_and_stops_on_nonfinite(tmp_path):
    assert int(_toy_loop(tmp_path, start=0, stop=5).step) == 5  # as stop_at=5 of 7 steps
    state = _toy_loop(tmp_path, start=5, stop=7)  # resumed from the step-5 checkpoint
    assert int(state.step) == 7 and float(state.params["w"][0]) == 7
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 7]  # every log_every steps and at each stop
    assert list(rows[0]) == ["step", "loss", "grad_norm", "steps_per_s"] and rows[1]["loss"] == 3.0
    assert training.checkpoint_manager(tmp_path / "ckpt").all_steps() == [3, 5, 6, 7]
    # step 5 is not finite: found once step 6 is dispatched, before step 6 (a checkpoint step) is saved
    with pytest.raises(FloatingPointError, match=r"non-finite loss term \(nan\) at step 5;"):
        _toy_loop(tmp_path / "nan", start=0, stop=7, nan_at=5)
    assert training.checkpoint_manager(tmp_path / "nan" / "ckpt").all_steps() == [3]


def _dice(model, params, ds, n):
    predict = voxelmorph.make_predict(model)
    scores = {"identity": [], "network": []}
    for i in range(n):
        p = ds.pair(i)
        disp = predict(params, jnp.asarray(p["moving"]), jnp.asarray(p["fixed"]))["disp"]
        for name, d in (("identity", jnp.zeros_like(disp)), ("network", disp)):
            warped = np.asarray(spatial.warp_labels(jnp.asarray(p["moving_labels"]), d))
            scores[name].append(np.nanmean(list(metrics.dice(p["fixed_labels"], warped).values())))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def test_resume_equals_uninterrupted_and_training_improves_dice(tmp_path):
    config = tiny_config(steps=12)
    full = voxelmorph.fit(config, str(tmp_path / "full"), progress=False)
    part = voxelmorph.fit(config, str(tmp_path / "part"), stop_at=7, progress=False)  # "killed" after step 7
    assert int(part.step) == 7
    assert 7 in training.checkpoint_manager(str(tmp_path / "part" / "checkpoints")).all_steps()
    resumed = voxelmorph.fit(config, str(tmp_path / "part"), progress=False)
    assert int(resumed.step) == 12
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [10, 12] and all(np.isfinite(r["loss"]) for r in rows)
    # 160 steps (same compiled step) already register held-out pairs better than the identity
    trained = voxelmorph.fit(tiny_config(steps=160), str(tmp_path / "long"), progress=False)
    test = datasets.SyntheticPairs(SHAPE, seed=123, num_labels=4, deform_scale=4.0)
    model, params, step = voxelmorph.load(tiny_config(), str(tmp_path / "long"), SHAPE)  # from the checkpoint
    assert step == 160
    for a, b in zip(jax.tree_util.tree_leaves(trained.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scores = _dice(model, params, test, 6)
    assert scores["network"] > scores["identity"] + 0.01, scores
    # a checkpoint of another architecture is refused with the parameter named, before anything is compiled
    other = tiny_config()
    other.model.encoder = (4, 4)
    with pytest.raises(ValueError, match=r"does not fit the config's model: parameter .*dec0.* is \(3, 3, 8, 8\) in"):
        voxelmorph.load(other, str(tmp_path / "long"), SHAPE)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        voxelmorph.load(tiny_config(), str(tmp_path / "nowhere"), SHAPE)
    # resuming that workdir with another model fails the same way, and keeps the config of the run it holds
    saved = (tmp_path / "long" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"does not fit the config's model: parameter .*dec0"):
        voxelmorph.fit(other, str(tmp_path / "long"), progress=False)
    assert (tmp_path / "long" / "config.json").read_text() == saved


def test_loader_is_deterministic_and_resumable():
    ds = datasets.SyntheticPairs((16, 16), seed=5, num_labels=3)
    loader = datasets.Loader(ds, batch_size=2, start=3, stop=5, prefetch=2)
    got = list(loader)
    loader.close()
    assert [s for s, _ in got] == [3, 4]
    ref = datasets.make_batch(ds, 4, 2)
    for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
        np.testing.assert_array_equal(got[1][1][k], ref[k])
    assert got[0][1]["moving"].shape == (2, 16, 16) and got[0][1]["moving_labels"].dtype == np.int32


def _save(path, arr):
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))


def test_folder_and_json_datasets(tmp_path, rng):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(3):
        _save(tmp_path / "images" / f"s{i}.nii.gz", rng.random((20, 24)).astype(np.float32))
        _save(tmp_path / "labels" / f"s{i}.nii.gz", rng.integers(0, 3, (20, 24)).astype(np.int16))
    ds = datasets.from_folder(tmp_path, mode="atlas", atlas=0)
    assert ds.shape == (32, 32) and ds.num_labels == 3 and len(ds) == 2
    p = ds.pair(1)
    assert p["fixed"].shape == (32, 32) and p["moving_labels"].dtype == np.int32
    np.testing.assert_array_equal(p["fixed"], ds.images[0])
    spec = {"training": [{"image": f"./images/s{i}.nii.gz", "label": f"./labels/s{i}.nii.gz"} for i in range(3)],
            "registration_val": [{"fixed": "./images/s0.nii.gz", "moving": "./images/s2.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    test = datasets.from_json(tmp_path / "dataset.json", split="test", shape=(32, 32))
    assert len(test) == 1 and test.pair(0)["name"] == "s2.nii.gz->s0.nii.gz"


def test_bad_datasets_fail_before_training(tmp_path, rng):
    config = tiny_config()
    config.data.kind = "folder"
    # empty folder
    (tmp_path / "empty").mkdir()
    config.data.path = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="no NIfTI images"):
        voxelmorph.fit(config, str(tmp_path / "w1"), progress=False)
    assert not (tmp_path / "w1" / "checkpoints").exists()
    # label map shape different from its image
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "labels").mkdir()
    for i in range(2):
        _save(bad / "images" / f"a{i}.nii.gz", rng.random((16, 16)).astype(np.float32))
        _save(bad / "labels" / f"a{i}.nii.gz", np.zeros((16, 12) if i else (16, 16), np.int16))
    config.data.path = str(bad)
    with pytest.raises(ValueError, match=r"a1.nii.gz: label map shape \(16, 12\) differs"):
        voxelmorph.fit(config, str(tmp_path / "w2"), progress=False)
    # missing file in a JSON list
    spec = {"training": [{"image": "./images/a0.nii.gz"}, {"image": "./images/missing.nii.gz"}]}
    (bad / "dataset.json").write_text(json.dumps(spec))
    config.data.kind, config.data.path = "json", str(bad / "dataset.json")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        voxelmorph.fit(config, str(tmp_path / "w3"), progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        datasets.from_folder(tmp_path / "nowhere")


def test_train_and_evaluate_scripts_smoke(tmp_path):
    work = str(tmp_path / "run")
    overrides = ["--config.data.shape=(32,32)", "--config.data.num_labels=4", "--config.model.encoder=(4,8)", "--config.model.decoder=(8,8,4)", "--config.train.steps=1",
                 "--config.train.batch_size=2", "--config.loss.similarity_options.window=5"]
    cfg = ["--config", os.path.join(ROOT, "configs", "synthetic_2d.py")]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    train = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *cfg, "--workdir", work, "--noprogress",
                            *overrides], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert os.path.isfile(os.path.join(work, "config.json")) and os.path.isfile(os.path.join(work, "metrics.jsonl"))
    ev = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *cfg, "--workdir", work,
                         "--config.eval.num_pairs=1", "--config.eval.instance_iterations=3", "--config.eval.figures=1",
                         "--config.eval.methods=('network','network+io','affine')", *overrides], capture_output=True,
                        text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.load(open(os.path.join(work, "eval", "results.json")))
    assert set(result["summary"]) == {"identity", "network", "network+io", "affine"}  # classical: affine's path
    for row in result["rows"]:
        assert 0 <= row["dice_mean"] <= 1 and row["seconds"] >= 0 and row["folding_pct"] >= 0
    assert "| network+io |" in open(os.path.join(work, "eval", "results.md")).read()
    # the config is locked: a misspelt field is an error, not a silently ignored option
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *cfg, "--workdir", work,
                          "--config.eval.num_pair=1"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "num_pair" in bad.stderr
    if importlib.util.find_spec("matplotlib") is not None:  # figures for the first pair, one per method
        assert len([f for f in os.listdir(os.path.join(work, "eval", "figures")) if f.endswith(".png")]) == 4
