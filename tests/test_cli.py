"""The jaxreg command end to end on tiny NIfTI files (different grids, non-identity affines) and bad inputs."""
import dataclasses
import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import cli, losses, optimize, transforms
from jaxreg.data import io

FAST = ["--affine-levels", "1", "--affine-iterations", "30", "--levels", "1", "--iterations", "10", "--quiet"]


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A 3-D fixed image and a moving copy stored on another grid (2 mm voxels, flipped x, shifted origin)."""
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    fixed = np.zeros((20, 22, 18), np.float32)
    fixed[5:15, 6:16, 4:14] = 1.0
    fixed = ndi.gaussian_filter(fixed + 0.2 * ndi.gaussian_filter(rng.random(fixed.shape), 2), 1.0).astype(np.float32)
    labels = (fixed > 0.5).astype(np.int16)
    fixed_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fixed_affine[:3, 3] = [-10.0, -11.0, -9.0]
    # moving grid: every other voxel along x, x axis flipped; the same world content
    moving_affine = np.diag([-2.0, 1.0, 1.0, 1.0])
    moving_affine[:3, 3] = [9.0, -11.0, -9.0]  # index 0 at x = +9 mm (the last fixed voxel along x)
    xs = np.arange(10)
    world_x = 9.0 - 2.0 * xs
    fixed_index = world_x + 10.0  # fixed voxel index along x for each moving voxel
    moving = ndi.map_coordinates(fixed, np.meshgrid(fixed_index, np.arange(22), np.arange(18), indexing="ij"), order=1)
    moving_labels = ndi.map_coordinates(labels, np.meshgrid(fixed_index, np.arange(22), np.arange(18), indexing="ij"), order=0)
    return {
        "dir": d,
        "fixed": _write(d / "fixed.nii.gz", fixed, fixed_affine),
        "moving": _write(d / "moving.nii.gz", moving.astype(np.float32), moving_affine),
        "fixed_labels": _write(d / "fixed_labels.nii.gz", labels, fixed_affine),
        "moving_labels": _write(d / "moving_labels.nii.gz", moving_labels.astype(np.int16), moving_affine),
        "fixed_affine": fixed_affine,
    }


def test_register_round_trip_writes_results_on_the_fixed_grid(case, capsys):
    out = str(case["dir"] / "out")
    code = cli.main(["register", case["fixed"], case["moving"], "-o", out, "--moving-labels", case["moving_labels"],
                     "--fixed-labels", case["fixed_labels"], *FAST])
    assert code == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["0GenericAffine.mat", "1Warp.nii.gz", "affine.json", "affine.txt",
                                       "displacement.nii.gz", "report.json", "warped.nii.gz", "warped_labels.nii.gz"]
    warped = nib.load(os.path.join(out, "warped.nii.gz"))
    np.testing.assert_allclose(warped.affine, case["fixed_affine"])
    assert warped.shape == (20, 22, 18)
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["mean_dice"] > 0.9 and report["jacobian"]["folding_fraction"] == 0.0
    # every engine option, as JSON: the preset's with the flags given replacing its fields
    assert report["options"] == {**json.loads(json.dumps(dataclasses.asdict(optimize.PRESETS["default"]))),
                                 "levels": [1], "iterations": 10, "affine_levels": [1], "affine_iterations": 30}
    fixed = io.load(case["fixed"]).data
    # the moving image was the fixed content on a coarser, flipped grid: after resampling it matches closely
    assert np.corrcoef(np.asarray(warped.dataobj).ravel(), fixed.ravel())[0, 1] > 0.95
    disp = nib.load(os.path.join(out, "displacement.nii.gz"))
    assert disp.shape == (20, 22, 18, 1, 3) and disp.header.get_intent()[0] == "vector"
    assert "mean Dice" in capsys.readouterr().out

    # apply the saved result to the moving labels: the same as the registration's warped labels
    applied = str(case["dir"] / "applied_labels.nii.gz")
    assert cli.main(["apply", out, case["moving_labels"], "-o", applied, "--labels"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(applied).dataobj),
                                  np.asarray(nib.load(os.path.join(out, "warped_labels.nii.gz")).dataobj))


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda c: ["register", str(c["dir"] / "missing.nii.gz"), c["moving"]], "missing.nii.gz"),
        (lambda c: ["register", c["fixed"], _garbage(c)], "garbage.nii.gz"),
        (lambda c: ["register", c["fixed"], _nan_image(c)], "NaN/Inf voxel"),
        (lambda c: ["register", c["fixed"], _four_d(c)], "expected a 2-D or 3-D image"),
        (lambda c: ["register", c["fixed"], c["moving"], "--fixed-mask", _empty_mask(c)], "empty"),
        (lambda c: ["register", c["fixed"], c["moving"], "--window", "4"], "window"),
    ],
)
def test_bad_input_gives_one_clear_message_and_no_output(case, capsys, make_args, message):
    out = case["dir"] / f"bad_{abs(hash(message)) % 10000}"
    code = cli.main(make_args(case) + ["-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in os.listdir(case["dir"]) if p.startswith(".jaxreg-")]  # no staging folder left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "--bogus"),
        (["--metric", "cosine"], "argument --metric: invalid choice: 'cosine'"),
        (["--affine-metric", "none"], "argument --affine-metric: invalid choice: 'none'"),
        (["--preset", "slow"], "argument --preset: invalid choice: 'slow'"),
        (["--levels", "two"], "argument --levels: invalid int value: 'two'"),
    ],
)
def test_unknown_option_or_choice_exits_nonzero(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["register", "a.nii", "b.nii", "-o", "x", *args])
    assert exc.value.code != 0 and message in capsys.readouterr().err


def test_a_pyramid_typo_fails_at_once(case, capsys):
    out = case["dir"] / "typo"
    t0 = time.perf_counter()
    code = cli.main(["register", case["fixed"], case["moving"], "-o", str(out), "--levels", "1000", "2", "1",
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - t0 < 30, err
    assert "levels=(1000, 2, 1): factor 1000 shrinks the (20, 22, 18) image to (1, 1, 1)" in err, err
    assert not out.exists()


def _garbage(c):
    path = c["dir"] / "garbage.nii.gz"
    path.write_bytes(b"not a nifti file at all")
    return str(path)


def _nan_image(c):
    data = np.ones((20, 22, 18), np.float32)
    data[3, 3, 3] = np.nan
    return _write(c["dir"] / "nan.nii.gz", data, np.eye(4))


def _four_d(c):
    return _write(c["dir"] / "four_d.nii.gz", np.ones((6, 6, 6, 3), np.float32), np.eye(4))


def _empty_mask(c):
    return _write(c["dir"] / "empty_mask.nii.gz", np.zeros((20, 22, 18), np.float32), c["fixed_affine"])


def _parse(*args):
    return cli._options_from_args(cli._parser().parse_args(["register", "f.nii", "m.nii", "-o", "o", *args]))


@pytest.mark.parametrize(
    "args, metric_options, affine_metric_options",
    [
        ([], {"window": 5}, None),  # the preset's lncc options, reused by the parametric lncc stage
        (["--window", "7"], {"window": 7}, None),
        # another parametric metric gets its own options only: not the lncc window (a TypeError in MI before)
        (["--affine-metric", "mi"], {"window": 5}, None),
        (["--affine-metric", "mi", "--bins", "16", "--window", "3"], {"window": 3}, {"bins": 16}),
        (["--preset", "multimodal", "--bins", "16"], None, {"bins": 16}),
        (["--metric", "mi", "--bins", "16"], {"bins": 16}, None),
        # the learned metric in one stage only (both stages had to be learned before)
        (["--affine-metric", "learned", "--metric-checkpoint", "ck"], {"window": 5}, {"checkpoint": "ck"}),
        (["--metric", "learned", "--affine-metric", "mi", "--metric-checkpoint", "ck"], {"checkpoint": "ck"}, None),
        (["--metric", "learned", "--metric-checkpoint", "ck"], {"checkpoint": "ck"}, None),
    ],
)
def test_similarity_options_go_to_the_stages_they_apply_to(args, metric_options, affine_metric_options):
    opts = _parse(*args)
    assert opts.metric_options == metric_options
    assert opts.affine_metric_options == affine_metric_options


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metric", "ngf", "--bins", "16"], "--bins applies to a stage using mi or nmi; got --metric ngf"),
        (["--preset", "multimodal", "--window", "3"], "--window applies to a stage using lncc"),
        (["--metric-checkpoint", "ck"], "--metric-checkpoint applies to --metric learned or --affine-metric learned"),
        (["--affine-metric", "learned"], "needs --metric-checkpoint PATH"),
    ],
)
def test_similarity_option_misuse_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        _parse(*args)


def test_flags_come_from_the_options_and_the_registries():
    parser = cli._parser()
    register = parser._subparsers._group_actions[0].choices["register"]
    flags = {a.dest: a for a in register._actions}
    fields = {f.name for f in dataclasses.fields(optimize.RegisterOptions)}
    # the similarity options come from --window, --bins and --metric-checkpoint
    assert fields - set(flags) == {"metric_options", "affine_metric_options"}
    assert flags["metric"].choices == flags["affine_metric"].choices == sorted(losses.SIMILARITIES) + ["learned"]
    assert flags["transform"].choices == sorted(transforms.PARAMETRIC) + ["none"]
    assert flags["deformable"].choices == list(optimize.DEFORMABLE) + ["none"]
    assert flags["regularizer"].choices == sorted(losses.REGULARIZERS) + ["none"]
    assert flags["preset"].choices == list(optimize.PRESETS)
    assert "[100 80 40; fast: 60 40 20]" in flags["iterations"].help  # the default, then the presets that differ
    assert "[lncc; multimodal: ngf]" in flags["metric"].help


@pytest.mark.parametrize("name", list(optimize.PRESETS))
def test_a_preset_without_flags_is_the_preset(name):
    assert _parse("--preset", name) == optimize.PRESETS[name]


def test_flags_replace_fields():
    opts = _parse("--preset", "fast", "--transform", "none", "--deformable", "svf", "--levels", "2", "1",
                  "--iterations", "7", "--tol-window", "5", "--window", "3", "--regularizer", "none",
                  "--bspline-spacing", "4", "6", "--optimizer", "sgd", "--init", "none", "--field-sigma", "0", "--crop")
    assert opts == dataclasses.replace(optimize.PRESETS["fast"], transform=None, deformable="svf", levels=(2, 1),
                                       iterations=7, window=5, metric_options={"window": 3}, regularizer=None,
                                       bspline_spacing=(4, 6), optimizer="sgd", init=None, field_sigma=0.0,
                                       crop=True)
    with pytest.raises(ValueError, match=r"iterations must be a single value or one per level \(2\)"):
        _parse("--levels", "2", "1")
    with pytest.raises(ValueError, match="reg_weight must be a number >= 0"):
        _parse("--reg-weight", "-1")


def test_the_learned_metric_is_named_in_the_report_options():
    from jaxreg.methods import learned_metric

    opts = _parse("--metric", "learned", "--metric-checkpoint", "ck")
    assert opts.metric is learned_metric.metric and opts.metric_options == {"checkpoint": "ck"}
    report = json.loads(json.dumps(cli._options_json(opts)))
    assert report["metric"] == "learned" and report["affine_metric"] is None
    assert report["metric_options"] == {"checkpoint": "ck"} and report["levels"] == [4, 2, 1]
