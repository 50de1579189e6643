"""Template space (``jaxreg.atlas``, ``jaxreg.data.subjects``): learning sets, model folders, ``--model``.

Subjects are copies of one small template placed in other world positions (known affines), so the learning-set
builder must recover those affines and resample every subject back onto the template, and a model registering two
of them must map one onto the other in native space whatever its field (an untrained network is near identity).
"""
import json
import os

import numpy as np
import pytest
from conftest import load_config

from jaxreg import atlas, cli, metrics, methods
from jaxreg.data import io, subjects


def _rotation_z(deg):
    a = np.deg2rad(deg)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return m


def _template(shape):
    """Three nested ellipsoids (labels 1-3) with distinct intensities, 2 mm voxels, centred at the world origin."""
    x = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"), -1)
    r = np.sqrt(np.sum((x / (np.asarray(shape) * [0.38, 0.3, 0.34][:len(shape)])) ** 2, -1))
    labels = np.select([r < 0.45, r < 0.75, r < 1.0], [3, 2, 1], 0).astype(np.int32)
    labels[(labels == 2) & (x[..., 0] > 0)] = 4  # breaks the symmetry: left/right differ
    image = np.choose(labels, [0.0, 0.3, 0.6, 1.0, 0.8]).astype(np.float32)
    affine = np.diag([2.0] * len(shape) + [1.0] * (4 - len(shape)))
    affine[:len(shape), 3] = -2.0 * (np.asarray(shape) - 1) / 2
    return image, labels, affine


def _placed(folder, name, image, labels, affine, world):
    """Write ``image``/``labels`` as subject ``name`` whose world is ``world @`` the template's (a known affine)."""
    out = {}
    for kind, data in (("t1", image), ("labels", labels)):
        out[kind] = os.path.join(folder, f"{kind}_{name}.nii.gz")
        io.save(out[kind], io.Volume(data, world @ affine))
    return out


@pytest.fixture(scope="module")
def placed3d(tmp_path_factory):
    """A 24×28×24 template and two subjects moved by known rigid world transforms."""
    folder = str(tmp_path_factory.mktemp("subjects3d"))
    image, labels, affine = _template((24, 28, 24))
    shift = np.eye(4)
    shift[:3, 3] = [6.0, -4.0, 2.0]
    worlds = {"a": shift, "b": _rotation_z(6.0) @ np.eye(4)}
    for name, w in worlds.items():
        _placed(folder, name, image, labels, affine, w)
    return folder, io.Volume(image, affine), labels, worlds


def test_learning_set_recovers_each_subjects_world_affine_and_resamples_onto_the_template(placed3d, tmp_path):
    folder, template, labels, worlds = placed3d
    records = [{"name": n, "image": os.path.join(folder, f"t1_{n}.nii.gz"),
                "labels": os.path.join(folder, f"labels_{n}.nii.gz")} for n in worlds]
    out = atlas.build_learning_set(records, tmp_path / "set", template=template, progress=None)
    index = subjects.read_index(out)
    corners = np.array([[x, y, z, 1.0] for x in (-20, 20) for y in (-24, 24) for z in (-20, 20)])
    for entry in index["subjects"]:
        found = np.asarray(entry["matrix"])
        err = np.abs(corners @ (found - worlds[entry["name"]]).T)[:, :3].max()
        assert err < 2.0, (entry["name"], err)  # mm at the corners of the box (one voxel; measured 1.4)
        arrays = subjects.load_subject(out, entry["name"])
        assert arrays["image"].shape == template.shape and arrays["labels"].dtype == np.int32
        dice = metrics.dice(labels, arrays["labels"])
        assert min(dice.values()) > 0.85, dice
    # the cache: a second build reuses the subjects (no alignment), a changed source is redone
    mtime = os.path.getmtime(subjects.subject_path(out, "a"))
    atlas.build_learning_set(records, out, template=template, progress=None)
    assert os.path.getmtime(subjects.subject_path(out, "a")) == mtime


def test_subject_pairs_both_directions_groups_and_clear_errors(placed3d, tmp_path):
    folder, template, _, worlds = placed3d
    out = str(tmp_path / "set")
    os.makedirs(out)
    for n in ("a", "b", "c"):
        subjects.write_subject(out, n, np.full(template.shape, 0.5, np.float32),
                               np.full(template.shape, {"a": 4, "b": 2, "c": 1}[n], np.int32))
    io.save(os.path.join(out, subjects.TEMPLATE), template)
    io.write_json(os.path.join(out, subjects.INDEX), {
        "version": 1, "template": {"shape": list(template.shape), "affine": template.affine.tolist()},
        "subjects": [{"name": n, "matrix": np.eye(4).tolist(), "source": {}} for n in "abc"]})
    ds = subjects.SubjectPairs(out, subjects=["a", "b", "c"], shuffle=False)
    assert len(ds) == 6 and {ds.pair(i)["name"] for i in range(6)} == {f"{m}->{f}" for f in "abc" for m in "abc"
                                                                         if f != m}
    assert ds.num_labels == 4 and list(ds.label_values) == [0, 1, 2, 4]
    grouped = subjects.SubjectPairs(out, label_groups={"big": [4, 2], "small": [1]})
    assert grouped.num_labels == 3 and grouped.label_names == {1: "big", 2: "small"}
    assert {int(grouped.pair(i)["fixed_labels"].max()) for i in range(6)} == {1, 2}
    shuffled = subjects.SubjectPairs(out)
    assert sorted(shuffled.pair(i)["name"] for i in range(6)) == sorted(ds.pair(i)["name"] for i in range(6))
    atlas_pairs = subjects.SubjectPairs(out, mode="atlas", shuffle=False)
    assert len(atlas_pairs) == 3 and atlas_pairs.pair(0)["name"] == "a->template"
    with pytest.raises(ValueError, match=r"subjects \['z'\] are not in the learning set"):
        subjects.SubjectPairs(out, subjects=["a", "z"])
    with pytest.raises(ValueError, match="in two groups"):
        subjects.SubjectPairs(out, label_groups={"x": [1], "y": [1]})
    os.remove(subjects.subject_path(out, "c"))
    with pytest.raises(FileNotFoundError, match="c.npz"):
        subjects.SubjectPairs(out)
    with pytest.raises(FileNotFoundError, match="no learning set"):
        subjects.SubjectPairs(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def trained2d(tmp_path_factory):
    """A tiny 2-D subjects config trained for 2 steps and exported: ``(config, model folder, subjects folder)``."""
    root = tmp_path_factory.mktemp("trained2d")
    folder = str(root / "subjects")
    os.makedirs(folder)
    image, labels, affine = _template((40, 48))
    shift = np.eye(4)
    shift[:2, 3] = [5.0, -3.0]
    for name, w in {"1": np.eye(4), "2": shift, "3": _rotation_z(-5.0)}.items():
        _placed(folder, name, image, labels, affine, w)
    io.save(str(root / "template.nii.gz"), io.Volume(image, affine))
    c = load_config("mindboggle_vxm")
    c.data.source, c.data.path, c.data.template = folder, str(root / "set"), str(root / "template.nii.gz")
    c.data.subjects.train, c.data.subjects.test = ("1", "2"), ("3",)
    c.data.shape = (40, 48)
    c.model.encoder, c.model.decoder, c.model.downsize, c.model.int_steps = (8, 8), (8, 8, 8), 1, 0
    c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.batch_size = 2, 1, 2, 2
    workdir = str(root / "work")
    atlas.prepare(c)
    methods.get("voxelmorph").fit(c, workdir, progress=False)
    model = atlas.export_workdir(c, workdir, str(root / "model"), description="tiny 2-D test model")
    return c, model, folder


def test_train_export_and_register_with_model_from_the_command(trained2d, tmp_path, capsys):
    _, model, folder = trained2d
    meta = json.load(open(os.path.join(model, atlas.MODEL_FILE)))
    assert meta["steps"] == 2 and meta["train_subjects"] == ["1", "2"] and meta["description"]
    assert "tiny 2-D test model" in open(os.path.join(model, atlas.CARD_FILE)).read()
    out = str(tmp_path / "out")
    fixed, fixed_labels = (os.path.join(folder, f"{k}_3.nii.gz") for k in ("t1", "labels"))
    code = cli.main(["register", fixed, os.path.join(folder, "t1_2.nii.gz"), "-o", out, "--model", model,
                     "--refine", "3", "--moving-labels", os.path.join(folder, "labels_2.nii.gz"),
                     "--fixed-labels", fixed_labels, "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["model"]["refine"] == 3 and report["model"]["path"] == os.path.abspath(model)
    # subject 2 is the template shifted, subject 3 rotated: through the template they must overlap again
    assert report["mean_dice"] > 0.85 > report["mean_dice_before"] + 0.1, (report["mean_dice_before"],
                                                                          report["mean_dice"])
    warped = io.load_labels(os.path.join(out, "warped_labels.nii.gz"))
    assert warped.shape == io.load(fixed).shape and np.allclose(warped.affine, io.load(fixed).affine)
    assert set(report["seconds"]["per_level"]) >= {"align", "network", "refine", "map_back"}


@pytest.mark.parametrize("damage, message", [
    ("no_params", "params.msgpack is missing"),
    ("corrupt_params", "corrupt or unreadable parameters"),
    ("other_architecture", "does not fit"),
    ("other_grid", "differs from model.json"),
    ("bad_json", "unreadable model description"),
])
def test_a_damaged_model_folder_is_one_clear_error(trained2d, tmp_path, capsys, damage, message):
    import shutil

    _, model, folder = trained2d
    copy = str(tmp_path / "model")
    shutil.copytree(model, copy)
    meta_path = os.path.join(copy, atlas.MODEL_FILE)
    meta = json.load(open(meta_path))
    if damage == "no_params":
        os.remove(os.path.join(copy, atlas.PARAMS_FILE))
    elif damage == "corrupt_params":
        with open(os.path.join(copy, atlas.PARAMS_FILE), "wb") as fh:
            fh.write(b"\x93not msgpack at all" * 3)
    elif damage == "other_architecture":
        meta["net"]["decoder"] = [8, 8, 8, 8]
        io.write_json(meta_path, meta)
    elif damage == "other_grid":
        io.save(os.path.join(copy, subjects.TEMPLATE), io.Volume(np.zeros((8, 8, 8), np.float32), np.eye(4)))
    else:
        with open(meta_path, "w") as fh:
            fh.write("{not json")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        atlas.load_model(copy)
    code = cli.main(["register", os.path.join(folder, "t1_1.nii.gz"), os.path.join(folder, "t1_2.nii.gz"), "-o",
                     str(tmp_path / "out"), "--model", copy])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_model_errors_before_anything_runs(tmp_path, capsys):
    for argv, message in (
            (["--model", str(tmp_path / "nope")], "no such folder and no packaged model"),
            (["--refine", "2"], "give --model"),
            (["--model", "x", "--refine", "-1"], "--refine must be >= 0"),
            (["--model", "x", "--fixed-mask", "m.nii.gz"], "--fixed-mask is not used by --model")):
        code = cli.main(["register", "f.nii.gz", "m.nii.gz", "-o", str(tmp_path / "o"), *argv])
        assert code == 2 and message in capsys.readouterr().err


def test_models_lists_the_packaged_models_name_first(capsys):
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [m["name"] for m in atlas.available()]
    assert [line.split("\t")[0] for line in lines if line] == names


def test_an_atlas_models_two_fields_compose_through_the_template():
    """``phi_M ∘ phi_F^-1``: the same field for both images is the identity; a field against zero is itself."""
    import jax.numpy as jnp

    x = np.stack(np.meshgrid(np.linspace(0, np.pi, 32), np.linspace(0, np.pi, 32), indexing="ij"), -1)
    u = jnp.asarray(1.5 * np.sin(x[..., ::-1]) * np.cos(x), jnp.float32)
    assert float(jnp.abs(atlas._through_template(u, u)).max()) < 0.05
    assert float(jnp.abs(atlas._through_template(u, jnp.zeros_like(u)) - u).max()) < 1e-6


def test_the_packaged_atlas_model_loads_and_maps_the_template_onto_itself():
    """The model shipped in the package (licence-clean training data) is listed, loads, and leaves its own
    template where it is."""
    from jaxreg.data import preprocess

    assert "mni152_atlas" in [m["name"] for m in atlas.available()]
    model = atlas.load_model("mni152_atlas")
    assert model.meta["mode"] == "atlas" and "mindboggle" not in json.dumps(model.meta).lower()
    t = preprocess.normalize(np.asarray(model.template.data, np.float32))
    u = np.asarray(model.predict(t, t))
    assert u.shape == model.template.shape + (3,) and np.isfinite(u).all()
    assert np.abs(u).mean() < 0.5, np.abs(u).mean()  # voxels
