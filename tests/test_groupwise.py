"""Group-wise registration (jaxreg.groupwise, ``jaxreg template``): tiny 2-D populations whose right template is
known by construction: smooth deformations of one shape that average to zero, placed at different world positions."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxreg import cli, groupwise, optimize, spatial
from jaxreg.data import io, preprocess

N = 40
SCALES = (1.0, -1.0, 0.5, -0.5)  # the deformations' mean is zero: the population's centre is the base shape
SHIFTS = ((0.0, 0.0), (6.0, -4.0), (-3.0, 5.0), (2.0, 3.0))  # world positions (mm) of the copies
FAST = dict(affine_options=dataclasses.replace(groupwise.AFFINE_OPTIONS, affine_iterations=(40, 20)),
            deformable_options=dataclasses.replace(groupwise.DEFORMABLE_OPTIONS, levels=(2, 1), iterations=(40, 20)))


def _base():
    y, x = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    img = ((((y - 20) / 12.0) ** 2 + ((x - 20) / 9.0) ** 2) < 1).astype(np.float32)
    img += 0.6 * ((((y - 16) / 4.0) ** 2 + ((x - 23) / 3.0) ** 2) < 1)
    lab = img.round().astype(np.int32) + (img > 1.2)
    return ndimage.gaussian_filter(img, 1.0).astype(np.float32), lab


def _field():
    y, x = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    d = np.zeros((N, N, 2), np.float32)
    d[..., 0] = 2.5 * np.sin(2 * np.pi * x / N)
    d[..., 1] = 2.0 * np.cos(2 * np.pi * y / N)
    return d


@pytest.fixture(scope="module")
def population():
    base, lab = _base()
    d = _field()
    images, labels = [], []
    for s, shift in zip(SCALES, SHIFTS):
        aff = np.eye(4)
        aff[:2, 3] = shift
        images.append(io.Volume(np.asarray(spatial.warp(jnp.asarray(base), jnp.asarray(s * d))), aff))
        labels.append(io.Volume(np.asarray(spatial.warp_labels(jnp.asarray(lab), jnp.asarray(s * d))), aff))
    return base, lab, images, labels


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def built(population):
    _, _, images, _ = population
    return groupwise.build_template(images, affine_rounds=1, deformable_rounds=2, progress=None, **FAST)


def _best_ncc(image, tpl, volume):
    """NCC of ``image`` (on the template grid) with ``volume`` resampled there, at the best of sub-voxel shifts (the
    template keeps the population's mean rigid position, which need not be image 0's)."""
    best = -1.0
    for dy in np.arange(-3, 3.01, 0.5):
        for dx in np.arange(-3, 3.01, 0.5):
            aff = volume.affine.copy()
            aff[:2, 3] += (dy, dx)
            ref = preprocess.resample_to(io.Volume(volume.data, aff), tpl.shape, tpl.affine).data
            best = max(best, _ncc(np.asarray(image), ref))
    return best


def test_the_template_of_zero_mean_deformations_is_the_base_shape(population, built):
    base, _, images, _ = population
    tpl = built.template
    ref = io.Volume(base, images[0].affine)
    made = _best_ncc(tpl.data, tpl, ref)
    inputs = [_best_ncc(preprocess.resample_to(io.Volume(im.data, images[0].affine), tpl.shape, tpl.affine).data,
                        tpl, ref) for im in images]
    assert made > 0.99 and made > max(inputs) + 0.003, (made, inputs)
    # correspondence: a template voxel lands, in every subject, on the same point of the base shape (subject i's
    # world point w is the base's voxel z + s_i d(z), z = w - shift_i), and the fields have zero mean
    d = _field()
    fg = np.argwhere(np.asarray(tpl.data) > 0.3)
    found = []
    for i, (s, shift) in enumerate(zip(SCALES, SHIFTS)):
        x = fg + built.fields[i][tuple(fg.T)]
        world = (built.matrices[i] @ tpl.affine @ np.c_[x, np.zeros(len(x)), np.ones(len(x))].T).T
        z = world[:, :2] - np.asarray(shift)
        found.append(z + s * np.stack([ndimage.map_coordinates(d[..., k], z.T, order=1) for k in range(2)], -1))
    spread = np.linalg.norm(np.asarray(found) - np.mean(found, 0), axis=-1)
    assert np.median(spread) < 0.4 and np.percentile(spread, 90) < 1.0, np.percentile(spread, [50, 90])  # voxels
    assert np.abs(built.fields.mean(0)).max() < 0.1
    assert np.abs(built.fields).max() > 1.0
    assert built.sharpness[-1] > built.sharpness[0] and len(built.seconds) == 3


def test_a_stopped_build_resumes_from_its_last_round(population, built, tmp_path):
    """Batched rounds (one register_batch program, the 4 subjects split over the 2 test devices): a build stopped
    after its first round resumes from the checkpoint and ends where an uninterrupted one does."""
    _, _, images, _ = population
    kw = dict(affine_rounds=1, deformable_rounds=2, batch=True, **FAST)
    whole = groupwise.build_template(images, progress=None, **kw)
    # batched and one-by-one rounds agree (the batch only runs each level until its slowest pair stops)
    assert _ncc(np.asarray(whole.template.data), np.asarray(built.template.data)) > 0.999

    class Stop(Exception):
        pass

    def stop_after_first(message):
        if "round 1/" in message:
            raise Stop

    with pytest.raises(Stop):
        groupwise.build_template(images, checkpoint=tmp_path, progress=stop_after_first, **kw)
    with np.load(tmp_path / groupwise.STATE_FILE) as z:
        assert int(z["round"]) == 1
    said = []
    again = groupwise.build_template(images, checkpoint=tmp_path, progress=said.append, **kw)
    assert "resuming after round 1" in said[0] and len(said) == 3
    np.testing.assert_allclose(np.asarray(again.template.data), np.asarray(whole.template.data), atol=1e-5)
    np.testing.assert_allclose(again.fields, whole.fields, atol=1e-4)
    with pytest.raises(ValueError, match="other images or settings"):
        groupwise.build_template(images[:3], checkpoint=tmp_path, progress=None, **kw)


def test_joint_mode_keeps_the_fields_mean_free_and_sharpens(population):
    base, _, images, _ = population
    tpl = groupwise.build_template(images, affine_rounds=1, deformable_rounds=1, mode="joint", progress=None, **FAST)
    assert np.abs(tpl.fields.mean(0)).max() < 1e-3
    assert tpl.sharpness[1] > tpl.sharpness[0]
    assert _best_ncc(tpl.template.data, tpl.template, io.Volume(base, images[0].affine)) > 0.99


def test_labels_fused_in_template_space_segment_a_new_subject(population, built):
    base, lab, images, labels = population
    fused = groupwise.template_labels(built, images, labels)
    assert fused.shape == built.template.shape and fused.dtype == np.int32
    target = io.Volume(base, images[0].affine)
    options = dataclasses.replace(optimize.PRESETS["default"], levels=(2, 1), iterations=(40, 20),
                                  affine_iterations=(40, 20))
    reg = groupwise.propagate_labels(built, fused, target, options=options)
    seg = np.asarray(reg.warped_labels.data)
    fg = seg > 0
    dice = 2 * (fg & (lab > 0)).sum() / (fg.sum() + (lab > 0).sum())
    assert dice > 0.9


def test_majority_vote_matches_a_direct_count():
    maps = np.array([[[1, 2], [3, 3]], [[1, 2], [2, 0]], [[2, 5], [2, 0]]])
    np.testing.assert_array_equal(groupwise.majority_vote(maps), [[1, 2], [2, 0]])


def test_bad_inputs_fail_before_anything_compiles(population, tmp_path):
    _, _, images, _ = population
    with pytest.raises(ValueError, match="at least 2"):
        groupwise.build_template(images[:1])
    with pytest.raises(ValueError, match="mode"):
        groupwise.build_template(images, mode="mean")
    with pytest.raises(ValueError, match="both 0"):
        groupwise.build_template(images, affine_rounds=0, deformable_rounds=0)
    with pytest.raises(ValueError, match=r"images\[1\].*3-D"):
        groupwise.build_template([images[0], io.Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / groupwise.STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the template checkpoint"):
        groupwise.build_template(images, checkpoint=tmp_path / "broken")


def test_template_command_writes_the_template_and_fused_labels(population, tmp_path, capsys):
    _, _, images, labels = population
    paths, lpaths = [], []
    for i, (im, lab) in enumerate(zip(images, labels)):
        paths.append(str(tmp_path / f"s{i}.nii.gz"))
        lpaths.append(str(tmp_path / f"s{i}_labels.nii.gz"))
        io.save(paths[-1], im)
        io.save(lpaths[-1], lab)
    out = tmp_path / "tpl"
    # bad input: one error line naming the argument, nothing written
    assert cli.main(["template", *paths, "-o", str(out), "--labels", *lpaths[:2]]) == 2
    assert "--labels: one label map per image (4), got 2" in capsys.readouterr().err and not out.exists()
    assert cli.main(["template", paths[0], str(tmp_path / "missing.nii.gz"), "-o", str(out)]) == 2
    assert "missing.nii.gz" in capsys.readouterr().err
    rc = cli.main(["template", *paths, "-o", str(out), "--labels", *lpaths, "--affine-rounds", "1", "--rounds", "1",
                   "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "sharpness" in capsys.readouterr().out
    info = json.loads((out / "template.json").read_text())
    assert info["names"] == [f"s{i}" for i in range(4)] and len(info["sharpness"]) == 2
    tpl = io.load(str(out / "template.nii.gz"))
    fused = io.load_labels(str(out / "labels.nii.gz"))
    assert tpl.shape == fused.shape and set(np.unique(fused.data)) == set(np.unique(labels[0].data)) == {0, 1, 3}
    assert all(os.path.exists(out / f"s{i}_disp.nii.gz") for i in range(4))
