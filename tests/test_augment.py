"""On-device augmentation (jaxreg.data.augment) and its use inside the training step.

Small 2-D/3-D shapes; the training tests reuse test_training's tiny 2-D network (encoder (4, 8), decoder (8, 8, 4))
on 32×32 images.
"""
import dataclasses

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from conftest import load_config
from jaxreg import spatial, training
from jaxreg.data import augment, datasets, synthetic
from jaxreg.methods import voxelmorph

SHAPE = (32, 32)
SPATIAL = dict(rotation_deg=10.0, scaling=0.1, translation=3.0, shear=0.05, deform=2.0, deform_spacing=8.0)


def _example(shape, seed=0, num_labels=4):
    p = synthetic.synthetic_pair(seed, shape=shape, num_labels=num_labels)
    return {k: jnp.asarray(p[k]) for k in ("moving", "fixed", "moving_labels", "fixed_labels")}


# ------------------------------------------------------------------------------------------------------ spatial
@pytest.mark.parametrize("ndim", [2, 3])
def test_random_affine_shape_determinism_identity_and_ranges(ndim):
    opts = dict(rotation_deg=10.0, scaling=0.1, translation=4.0, shear=0.05)

    @jax.jit
    def draws(key):  # one compilation per ndim
        return (augment.random_affine(key, ndim, **opts), augment.random_affine(key, ndim),
                augment.random_affine(key, ndim, rotation_deg=30.0), augment.random_affine(key, ndim, scaling=0.2))

    m, identity, rot, scale = draws(jax.random.key(1))
    assert m.shape == (ndim + 1, ndim + 1) and m.dtype == jnp.float32
    np.testing.assert_array_equal(m, draws(jax.random.key(1))[0])
    assert not np.allclose(m, draws(jax.random.key(2))[0])
    np.testing.assert_array_equal(m[ndim], np.eye(ndim + 1)[ndim])
    assert np.all(np.abs(np.asarray(m[:ndim, ndim])) <= 4.0) and np.abs(np.asarray(m[:ndim, ndim])).max() > 0.1
    np.testing.assert_array_equal(identity, np.eye(ndim + 1))  # zero magnitudes: the identity, exactly
    rot = np.asarray(rot, np.float64)[:ndim, :ndim]
    np.testing.assert_allclose(rot @ rot.T, np.eye(ndim), atol=1e-6)  # rotation only: orthogonal, det 1
    assert abs(np.linalg.det(rot) - 1) < 1e-6 and not np.allclose(rot, np.eye(ndim))
    scale = np.asarray(scale)[:ndim, :ndim]
    assert np.allclose(scale, np.diag(np.diag(scale))) and np.all(np.abs(np.diag(scale) - 1) <= 0.2)
    with pytest.raises(ValueError, match="scaling"):
        augment.random_affine(jax.random.key(0), ndim, scaling=1.0)
    with pytest.raises(ValueError, match="rotation_deg"):
        augment.random_affine(jax.random.key(0), ndim, rotation_deg=-1.0)


def test_random_disp_is_the_affine_after_the_deformation():
    shape = (12, 16, 10)
    ndim = len(shape)
    key = jax.random.key(3)
    k_affine, k_deform = jax.random.split(key)
    affine_opts = {k: v for k, v in SPATIAL.items() if k not in ("deform", "deform_spacing")}

    @jax.jit
    def draws(key, k_affine, k_deform):
        matrix = augment.random_affine(k_affine, ndim, **affine_opts)
        return (augment.random_disp(key, shape, **affine_opts), augment.random_disp(key, shape, **SPATIAL), matrix,
                augment.random_smooth_disp(k_deform, shape, spacing=8.0, max_norm=2.0),
                spatial.affine_to_disp(matrix, shape), augment.random_disp(key, shape))

    affine_disp, full, matrix, u, expected_affine, zero = draws(key, k_affine, k_deform)
    assert affine_disp.shape == shape + (ndim,) and affine_disp.dtype == jnp.float32
    # the affine sample's displacement is affine_to_disp of its matrix
    np.testing.assert_allclose(affine_disp, expected_affine, atol=1e-5)
    assert np.abs(np.asarray(affine_disp)).max() > 1.0
    # with a deformation: phi(x) = A (x + u(x) - c) + t + c
    m, u = np.asarray(matrix, np.float64), np.asarray(u, np.float64)
    c = (np.asarray(shape) - 1) / 2
    x = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    expected = (x + u - c) @ m[:ndim, :ndim].T + m[:ndim, ndim] + c - x
    np.testing.assert_allclose(full, expected, atol=1e-4)
    np.testing.assert_array_equal(zero, np.zeros(shape + (ndim,)))  # zero magnitudes: no displacement


def test_random_smooth_disp_norm_smoothness_and_diffeomorphic():
    shape = (32, 24, 8)
    ndim = len(shape)

    @jax.jit
    def draws(key):
        u = augment.random_smooth_disp(key, shape, spacing=8.0, max_norm=2.5)
        lin = augment.random_smooth_disp(key, shape, spacing=8.0, max_norm=2.5, method="linear")
        strong = dict(spacing=4.0, max_norm=6.0)
        folded = spatial.jacobian_determinant(augment.random_smooth_disp(key, shape, **strong))
        diffeo = augment.random_smooth_disp(key, shape, int_steps=7, **strong)
        return u, lin, folded.min(), spatial.jacobian_determinant(diffeo).min(), jnp.linalg.norm(diffeo, axis=-1).max()

    u, lin, folded_min, diffeo_min, diffeo_max = draws(jax.random.key(4))
    assert u.shape == shape + (ndim,) and u.dtype == jnp.float32
    np.testing.assert_array_equal(u, draws(jax.random.key(4))[0])
    norms = np.linalg.norm(np.asarray(u), axis=-1)
    assert abs(norms.max() - 2.5) < 1e-5 and norms.mean() > 0.2
    steps = max(float(np.abs(np.diff(np.asarray(u), axis=a)).max()) for a in range(ndim))
    assert steps < 2.5 / 2  # smooth: a neighbour differs by a small part of the largest vector
    assert not np.allclose(lin, u)
    np.testing.assert_array_equal(augment.random_smooth_disp(jax.random.key(4), shape, max_norm=0.0),
                                  np.zeros(shape + (ndim,)))
    # a strong field folds as a displacement, not when integrated as a velocity by scaling and squaring
    assert float(folded_min) < 0 < float(diffeo_min)
    assert 3.0 < float(diffeo_max) < 9.0


# -------------------------------------------------------------------------------------------------------- pairs
FULL = dict(SPATIAL, gamma=0.3, bias=0.3, noise_std=0.05)
augment_full = jax.jit(lambda k, e: augment.augment_pair(k, e, **FULL))


def test_augment_pair_shapes_determinism_identity_and_labels():
    ex = _example(SHAPE)
    key = jax.random.key(5)
    out = augment_full(key, ex)
    assert set(out) == set(ex)
    for k in ex:
        assert out[k].shape == ex[k].shape and out[k].dtype == ex[k].dtype, k
    again = augment_full(key, ex)
    for k in ex:
        np.testing.assert_array_equal(out[k], again[k])
    assert not np.allclose(augment_full(jax.random.key(6), ex)["moving"], out["moving"])
    assert not np.allclose(out["moving"], ex["moving"]) and not np.allclose(out["fixed"], ex["fixed"])
    np.testing.assert_array_equal(out["fixed_labels"], ex["fixed_labels"])  # fixed_spatial=False
    m = np.asarray(out["moving"])
    assert np.isfinite(m).all() and m.min() >= 0 and abs(m.max() - 1) < 1e-6
    # zero magnitudes: the identity, exactly
    same = augment.augment_pair(key, ex)
    for k in ex:
        np.testing.assert_array_equal(same[k], ex[k])
    # labels: integer-valued and in range, nearest and one-hot; the fixed side moves too with fixed_spatial

    # (nearest-neighbour labels: the next test)
    o = jax.jit(lambda k, e: augment.augment_pair(k, e, **SPATIAL, fixed_spatial=True, labels="onehot",
                                                  num_labels=4))(key, ex)
    for k in ("moving_labels", "fixed_labels"):
        assert o[k].dtype == jnp.int32 and set(np.unique(o[k])) <= {0, 1, 2, 3}, k
        assert np.mean(np.asarray(o[k]) != np.asarray(ex[k])) > 0.05, k
    with pytest.raises(ValueError, match="num_labels"):
        augment.augment_pair(key, ex, labels="onehot")
    with pytest.raises(ValueError, match="integer"):
        augment.augment_pair(key, dict(ex, moving_labels=ex["moving_labels"].astype(jnp.float32)), translation=1.0)


def test_image_and_labels_move_together_and_batch_matches_pairs():
    """The moving image and its labels get the same field: render the labels as the image, compare after."""
    ex = _example((24, 20, 16))
    labels = ex["moving_labels"]
    ex = dict(ex, moving=labels.astype(jnp.float32) / 3.0)
    out = jax.jit(lambda k, e: augment.augment_pair(k, e, **SPATIAL))(jax.random.key(7), ex)
    assert out["moving_labels"].dtype == jnp.int32 and set(np.unique(out["moving_labels"])) <= {0, 1, 2, 3}
    from_image = np.rint(np.asarray(out["moving"]) * 3.0)
    agree = np.mean(from_image == np.asarray(out["moving_labels"]))
    moved = np.mean(np.asarray(out["moving_labels"]) != np.asarray(labels))
    unwarped = np.mean(from_image == np.asarray(labels))  # what the labels would match had they not moved
    assert agree > 0.85 and moved > 0.1 and agree > unwarped + 0.05, (agree, moved, unwarped)
    # a batch: example i is augment_pair with the i-th split key
    batch = {k: jnp.stack([v, v]) for k, v in _example(SHAPE).items()}
    key = jax.random.key(8)
    got = jax.jit(lambda k, b: augment.augment_batch(k, b, **FULL))(key, batch)
    for i, k_i in enumerate(jax.random.split(key, 2)):
        want = augment_full(k_i, {k: v[i] for k, v in batch.items()})
        for k in batch:
            np.testing.assert_allclose(got[k][i], want[k], atol=1e-6)
    assert not np.allclose(got["moving"][0], got["moving"][1])


def test_config_block_round_trip_and_errors():
    cfg = augment.default_config()
    assert augment.from_config(cfg) is None and augment.from_config(None) is None  # off by default
    cfg.enabled, cfg.rotation_deg, cfg.deform = True, 5, 2
    a = augment.from_config(cfg, num_labels=4)
    assert a.rotation_deg == 5.0 and isinstance(a.rotation_deg, float) and a.spatial and a.num_labels == 4
    assert hash(a) == hash(augment.from_config(cfg, num_labels=4))
    cfg.rotaton_deg = 3.0
    with pytest.raises(ValueError, match="unknown fields"):
        augment.from_config(cfg)
    with pytest.raises(ValueError, match="onehot"):
        augment.AugmentConfig(labels="onehot")


# ----------------------------------------------------------------------------------------------------- training
# Both tests train the same config ("atlas from one image": a 2-D folder dataset in atlas mode, moving = fixed,
# augmentation makes the moving image), so they share one compiled step (training caches steps per settings).
def _tiny_config(steps, folder):
    c = load_config("synthetic_2d")
    c.data.kind, c.data.path, c.data.mode, c.data.atlas = "folder", str(folder), "atlas", 0
    c.data.shape = SHAPE
    c.data.fixed_as_moving = True
    c.data.augment = augment.default_config()
    c.data.augment.update(dict(SPATIAL, enabled=True, gamma=0.2))
    c.model.encoder, c.model.decoder = (4, 8), (8, 8, 4)
    c.loss.similarity, c.loss.similarity_options, c.loss.reg_weight = "mse", {}, 0.05
    c.train.steps, c.train.batch_size, c.train.learning_rate = steps, 4, 1e-2
    c.train.log_every, c.train.checkpoint_every = 10, 1000
    return c


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas")
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    for i in range(2):
        p = synthetic.synthetic_pair(20 + i, shape=SHAPE, num_labels=4, bias_scale=0.0, noise_std=0.0)
        nib.save(nib.Nifti1Image(p["fixed"], np.eye(4)), str(folder / "images" / f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(p["fixed_labels"].astype(np.int16), np.eye(4)), str(folder / "labels" / f"s{i}.nii.gz"))
    config = _tiny_config(40, folder)
    train_set = datasets.from_config(config.data, split="train")
    loss = voxelmorph.make_loss(config, train_set)
    step = training.make_train_step(loss, training.optimizer_from_config(config.train))
    plain = dataclasses.replace(loss, augment=None)  # the same loss on a batch as given
    return dict(config=config, train_set=train_set, model=loss.model, step=step, loss=loss,
                batch=datasets.make_batch(train_set, 0, 4),
                loss_terms=jax.jit(lambda params, batch: plain(params, batch, None)),
                augment=jax.jit(loss.augmented))


def test_train_step_augments_deterministically_per_key(atlas):
    model, batch, step = atlas["model"], atlas["batch"], atlas["step"]
    assert np.array_equal(batch["moving"], batch["fixed"]) and "moving_labels" in batch
    tx = training.make_optimizer("adam", 1e-2)  # the config's optimiser (same state structure)
    params = jax.device_get(training.init_params(model, jax.random.key(0), SHAPE))  # host copy: the step donates
    mesh = training.make_mesh()  # every device, as fit: a batch of 4 split over 2 CPU devices

    def run(key):
        state = training.replicate(training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                       opt_state=tx.init(params)), mesh)
        return float(step(state, training.shard_batch(batch, mesh), key)[1]["loss"])

    k0, k1 = jax.random.key(10), jax.random.key(11)
    first = run(k0)
    assert run(k0) == first  # same key, same augmented batch
    assert run(k1) != first
    # the step's loss is the loss of loss.augmented(batch, key): the augmented batch, not the loader's
    augmented = atlas["augment"](batch, k0)
    assert set(augmented) == {"moving", "fixed"}  # no Dice term: the labels are dropped, not warped
    assert not np.allclose(augmented["moving"], batch["moving"])
    np.testing.assert_allclose(first, float(atlas["loss_terms"](params, augmented)[0]), rtol=1e-5)
    assert first > 1e-3  # moving = fixed would give a similarity of 0
    sharded = atlas["augment"](training.shard_batch(batch, mesh), k0)
    for k in augmented:  # a batch split over 2 devices gets the same augmentation
        np.testing.assert_allclose(sharded[k], augmented[k], atol=1e-5)  # float32 rounding only
    with pytest.raises(TypeError, match="AugmentConfig"):
        voxelmorph.Loss(model, augment={"rotation_deg": 1.0})


def test_fit_from_one_image_resumes_exactly_and_lowers_the_loss(tmp_path, atlas, monkeypatch):
    config, train_set, model = atlas["config"], atlas["train_set"], atlas["model"]
    assert train_set.constant and np.array_equal(train_set.pair(3)["moving_labels"], train_set.pair(3)["fixed_labels"])
    assert not isinstance(datasets.from_config(config.data, split="test"), datasets.FixedAsMoving)

    full = voxelmorph.fit(config, str(tmp_path / "full"), progress=False)
    voxelmorph.fit(config, str(tmp_path / "part"), stop_at=15, progress=False)  # "killed" after step 15
    resumed = voxelmorph.fit(config, str(tmp_path / "part"), progress=False)
    assert int(resumed.step) == 40
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)

    # held-out augmented pairs of the template (a key the run never used): lower loss after 40 steps
    held_out = atlas["augment"](atlas["batch"], jax.random.key(999))
    initial = training.init_params(model, jax.random.fold_in(jax.random.key(config.seed), 0), SHAPE)
    before, after = (float(atlas["loss_terms"](p, held_out)[1]["similarity"])
                     for p in (initial, full.params))
    print(f"held-out similarity (MSE) before {before:.5f}, after 40 steps {after:.5f}")
    assert after < 0.6 * before, (before, after)

    # a non-finite step stops the run naming that step (fit checks it while the next step runs), nothing saved
    bad_batch = dict(atlas["batch"], moving=atlas["batch"]["moving"].copy())
    bad_batch["moving"][:, 5, 5] = np.nan
    with monkeypatch.context() as m:
        m.setattr(datasets, "make_batch", lambda *args: bad_batch)
        with pytest.raises(FloatingPointError, match="similarity term .* at step 1;"):
            voxelmorph.fit(config, str(tmp_path / "nan"), progress=False)
    assert training.checkpoint_manager(str(tmp_path / "nan" / "checkpoints")).all_steps() == []

    config = config.copy_and_resolve_references()
    config.data.augment.enabled = False
    with pytest.raises(ValueError, match="fixed_as_moving"):
        voxelmorph.fit(config, str(tmp_path / "bad"), progress=False)
    assert not (tmp_path / "bad").exists()
