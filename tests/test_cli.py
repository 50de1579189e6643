"""The jaxreg command end to end on tiny NIfTI files (different grids, non-identity affines) and bad inputs."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import cli
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
    assert sorted(os.listdir(out)) == ["affine.json", "displacement.nii.gz", "report.json", "warped.nii.gz",
                                       "warped_labels.nii.gz"]
    warped = nib.load(os.path.join(out, "warped.nii.gz"))
    np.testing.assert_allclose(warped.affine, case["fixed_affine"])
    assert warped.shape == (20, 22, 18)
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["mean_dice"] > 0.9 and report["jacobian"]["folding_fraction"] == 0.0
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
        (lambda c: ["register", c["fixed"], c["moving"], "--metric", "cosine"], "metric must be one of"),
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


def test_unknown_option_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["register", "a.nii", "b.nii", "-o", "x", "--bogus"])
    assert exc.value.code != 0 and "--bogus" in capsys.readouterr().err


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
    assert opts.get("metric_options") == metric_options
    assert opts.get("affine_metric_options") == affine_metric_options


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
