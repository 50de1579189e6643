"""``jaxreg register`` on many pairs in one process (``--pairs PAIRS.csv``, or FIXED and a folder of moving
images), and the time split of report.json. Small 2-D images, the same shapes and options in every test, so the
programs are compiled once for the whole file."""
import json
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import cli

FAST = ["--affine-levels", "1", "--affine-iterations", "5", "--levels", "1", "--iterations", "5", "--quiet"]
SPLIT = ("startup", "compile", "compile_cache_load", "register", "optimize", "io", "total")
SHAPE = (32, 30)


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A fixed 2-D image and three moving ones (a square shifted by 1, 2, 3 voxels), each with its label map, in
    ``images/`` and ``labels/`` (same file names); a CSV of the three pairs with relative paths."""
    d = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 1.0, 1.0])
    affine[:2, 3] = [-20.0, -22.0]

    def square(shift):
        a = np.zeros(SHAPE, np.float32)
        a[8 + shift:22 + shift, 9:21] = 1.0
        return ndi.gaussian_filter(a + 0.1 * rng.random(SHAPE), 1.0).astype(np.float32)

    (d / "images").mkdir()
    (d / "labels").mkdir()
    fixed = square(0)
    out = {"dir": d, "fixed": _write(d / "fixed.nii.gz", fixed, affine), "affine": affine,
           "fixed_labels": _write(d / "fixed_labels.nii.gz", (fixed > 0.5).astype(np.int16), affine)}
    for i in (1, 2, 3):
        m = square(i)
        _write(d / "images" / f"sub{i}.nii.gz", m, affine)
        _write(d / "labels" / f"sub{i}.nii.gz", (m > 0.5).astype(np.int16), affine)
    out["csv"] = _csv(d / "pairs.csv", [f"fixed.nii.gz,images/sub{i}.nii.gz,labels/sub{i}.nii.gz,fixed_labels.nii.gz"
                                        for i in (1, 2, 3)], header="fixed,moving,moving_labels,fixed_labels")
    return out


def _csv(path, rows, header="fixed,moving"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def _register(*args):
    return cli.main(["register", *args, *FAST])


def _check_split(seconds):
    for key in SPLIT:
        assert key in seconds, key
        assert key == "startup" and seconds[key] is None or seconds[key] >= 0, (key, seconds[key])
    assert seconds["compile_cache_load"] <= seconds["compile"] + 1e-9
    assert seconds["optimize"] <= seconds["register"]
    assert "per_level" in seconds and seconds["total"] >= seconds["register"]


def test_csv_of_three_pairs_writes_what_single_calls_write_and_pairs_json(data, capsys, tmp_path):
    out = tmp_path / "out"
    code = _register("--pairs", data["csv"], "-o", str(out))
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["pairs.json", "sub1", "sub2", "sub3"]
    # each pair's folder holds what a single call writes: the same files, bitwise the same results
    single = tmp_path / "single"
    d = data["dir"]
    assert _register(data["fixed"], str(d / "images" / "sub2.nii.gz"), "-o", str(single), "--moving-labels",
                     str(d / "labels" / "sub2.nii.gz"), "--fixed-labels", data["fixed_labels"]) == 0
    assert re.search(r"registered in [\d.]+ s \(total [\d.]+ s; start-up ([\d.]+ s|\?), compilation [\d.e-]+ s, "
                     r"optimisation [\d.e-]+ s, I/O [\d.e-]+ s\)", capsys.readouterr().out)
    assert sorted(os.listdir(out / "sub2")) == sorted(os.listdir(single))
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(out / "sub2" / name).dataobj),
                                      np.asarray(nib.load(single / name).dataobj), err_msg=name)
    report, alone = (json.loads((p / "report.json").read_text()) for p in (out / "sub2", single))
    assert report["options"] == alone["options"] and report["mean_dice"] == alone["mean_dice"]
    _check_split(report["seconds"])
    _check_split(alone["seconds"])

    summary = json.loads((out / "pairs.json").read_text())
    assert summary["complete"] and summary["pairs"] == 3 and summary["failed"] == []
    rows = summary["results"]
    assert [r["name"] for r in rows] == ["sub1", "sub2", "sub3"]
    for i, row in enumerate(rows, 1):
        assert row["status"] == "ok" and row["error"] is None
        assert row["moving"] == str(d / "images" / f"sub{i}.nii.gz")  # relative to the CSV's folder
        assert row["fixed_labels"] == data["fixed_labels"] and row["output"] == str(out / f"sub{i}")
        # the moving square is shifted by i voxels: Dice before falls with i, the registration recovers it
        assert row["mean_dice"] > 0.9 and row["mean_dice"] > row["mean_dice_before"]
        assert row["folding_percent"] == 0.0
        assert row["seconds"]["wall"] >= row["seconds"]["total"] >= row["seconds"]["register"] > 0
    assert rows[0]["mean_dice_before"] > rows[1]["mean_dice_before"] > rows[2]["mean_dice_before"]
    secs = summary["seconds"]
    walls = [r["seconds"]["wall"] for r in rows]
    assert secs["total"] >= sum(walls) and secs["per_pair"] == pytest.approx(secs["total"] / 3)
    assert secs["first_pair"] == walls[0] and secs["per_pair_after_first"] == pytest.approx((walls[1] + walls[2]) / 2)
    assert secs["compile"] == pytest.approx(sum(r["seconds"]["compile"] for r in rows))
    # compiled once: the later pairs (same shapes) compile nothing
    assert rows[1]["seconds"]["compile"] == rows[2]["seconds"]["compile"] == 0.0
    lines = stdout.splitlines()
    assert lines[0].startswith("sub1: ") and "mean Dice" in lines[0] and lines[2].startswith("sub3: ")
    assert re.search(r"^registered 3 pairs in [\d.]+ s: [\d.]+ s/pair \(first pair [\d.]+ s incl\. compilation; "
                     r"[\d.e-]+ s/pair after\)$", stdout, re.MULTILINE), stdout

    # a second run into the same OUTDIR is refused before registering (as a single call), --overwrite replaces
    assert _register("--pairs", data["csv"], "-o", str(out)) == 2
    assert "holds an earlier run's pairs.json: pass --overwrite" in capsys.readouterr().err
    assert _register("--pairs", data["csv"], "-o", str(out), "--overwrite") == 0


def test_a_folder_of_moving_images_with_a_folder_of_label_maps(data, capsys, tmp_path):
    d, out = data["dir"], tmp_path / "out"
    code = _register(data["fixed"], str(d / "images"), "-o", str(out), "--moving-labels", str(d / "labels"),
                     "--fixed-labels", data["fixed_labels"])
    assert code == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["pairs.json", "sub1", "sub2", "sub3"]
    assert "warped_labels.nii.gz" in os.listdir(out / "sub3")
    rows = json.loads((out / "pairs.json").read_text())["results"]
    assert [r["moving_labels"] for r in rows] == [str(d / "labels" / f"sub{i}.nii.gz") for i in (1, 2, 3)]
    assert all(r["mean_dice"] > 0.9 for r in rows)

    # FIXED inside the folder is not registered onto itself; other files (not .nii/.nii.gz, hidden) are skipped
    folder = tmp_path / "with_fixed"
    folder.mkdir()
    for name, source in (("fixed.nii.gz", data["fixed"]), ("sub2.nii", d / "images" / "sub2.nii.gz"),
                         ("notes.txt", data["fixed"]), (".sub3.nii.gz", d / "images" / "sub3.nii.gz")):
        if name.endswith(".nii"):
            _write(folder / name, nib.load(source).get_fdata(), data["affine"])
        else:
            (folder / name).write_bytes(Path(source).read_bytes())
    assert _register(str(folder / "fixed.nii.gz"), str(folder), "-o", str(tmp_path / "out3")) == 0
    assert sorted(os.listdir(tmp_path / "out3")) == ["pairs.json", "sub2"]
    capsys.readouterr()

    # a label map missing from the folder is named, before anything runs
    partial = tmp_path / "partial_labels"
    partial.mkdir()
    for i in (1, 3):
        (partial / f"sub{i}.nii.gz").write_bytes((d / "labels" / f"sub{i}.nii.gz").read_bytes())
    code = _register(data["fixed"], str(d / "images"), "-o", str(tmp_path / "out2"), "--moving-labels", str(partial))
    err = capsys.readouterr().err
    assert code == 2 and f"--moving-labels {partial}: no file sub2.nii.gz for MOVING" in err, err
    assert not (tmp_path / "out2").exists()


def test_a_bad_third_row_fails_before_anything_runs(data, capsys, tmp_path):
    d = data["dir"]
    csv = _csv(tmp_path / "bad.csv", [f"{data['fixed']},{d / 'images' / 'sub1.nii.gz'}",
                                      f"{data['fixed']},{d / 'images' / 'sub2.nii.gz'}",
                                      f"{data['fixed']},{d / 'images' / 'missing.nii.gz'}"])
    out = tmp_path / "out"
    mark, t0 = cli._compile_mark(), time.perf_counter()
    code = _register("--pairs", csv, "-o", str(out))
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - t0 < 10, err
    assert f"--pairs {csv} row 3: MOVING {d / 'images' / 'missing.nii.gz'}: no such file" in err, err
    assert not out.exists() and cli._compile_mark() == mark  # nothing written, nothing compiled
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".jaxreg-")]

    # a damaged header, a label map on another grid: the same, naming the row
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    small = _write(tmp_path / "small_labels.nii.gz", np.zeros((8, 8), np.int16), data["affine"])
    good = f"{data['fixed']},{d / 'images' / 'sub1.nii.gz'},{d / 'labels' / 'sub1.nii.gz'}"
    for row, message in ((f"{data['fixed']},{tmp_path / 'broken.nii.gz'},", "row 2: MOVING "),
                         (f"{data['fixed']},{d / 'images' / 'sub2.nii.gz'},{small}",
                          f"row 2: --moving-labels {small}: its grid differs from the moving image")):
        csv = _csv(tmp_path / "bad2.csv", [good, row], header="fixed,moving,moving_labels")
        assert _register("--pairs", csv, "-o", str(out)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()


@pytest.mark.parametrize("how", ["csv", "folder"])
def test_duplicate_names_are_refused(data, capsys, tmp_path, how):
    d = data["dir"]
    if how == "csv":
        args = ["--pairs", _csv(tmp_path / "dup.csv", [f"{data['fixed']},{d / 'images' / 'sub1.nii.gz'},a",
                                                       f"{data['fixed']},{d / 'images' / 'sub2.nii.gz'},b",
                                                       f"{data['fixed']},{d / 'images' / 'sub3.nii.gz'},a"],
                                header="fixed,moving,name")]
        message = "row 3: name 'a' is already taken by --pairs"
    else:  # sub1.nii and sub1.nii.gz: both would write OUTDIR/sub1
        folder = tmp_path / "images"
        folder.mkdir()
        for name in ("sub1.nii.gz", "sub1.nii"):
            _write(folder / name, nib.load(d / "images" / "sub1.nii.gz").get_fdata(), data["affine"])
        args = [data["fixed"], str(folder)]
        message = "name 'sub1' is already taken by MOVING"
    out = tmp_path / "out"
    assert _register(*args, "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_a_pair_the_engine_refuses_is_reported_and_the_others_are_written(data, capsys, tmp_path):
    d = data["dir"]
    constant = _write(tmp_path / "constant.nii.gz", np.full(SHAPE, 3.0, np.float32), data["affine"])
    csv = _csv(tmp_path / "pairs.csv", [f"{data['fixed']},{d / 'images' / 'sub1.nii.gz'}",
                                        f"{data['fixed']},{constant}",
                                        f"{data['fixed']},{d / 'images' / 'sub3.nii.gz'}"])
    out = tmp_path / "out"
    code = _register("--pairs", csv, "-o", str(out))
    stdout, err = capsys.readouterr()
    assert code == 2
    assert "1 of 3 pairs failed: constant" in err, err
    assert sorted(os.listdir(out)) == ["pairs.json", "sub1", "sub3"]  # nothing for the failed pair
    assert "warped.nii.gz" in os.listdir(out / "sub3")
    summary = json.loads((out / "pairs.json").read_text())
    assert summary["complete"] and summary["failed"] == ["constant"]
    failed = summary["results"][1]
    assert failed["status"] == "failed" and "moving: the image is constant" in failed["error"]
    assert [r["status"] for r in summary["results"]] == ["ok", "failed", "ok"]
    assert "constant: failed after" in stdout and "registered 2 of 3 pairs" in stdout
    # the steady state leaves out the failure: the first pair that succeeded, then the ones after it
    secs = summary["seconds"]
    assert secs["per_pair_after_first"] == summary["results"][2]["seconds"]["wall"]


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda c: ["--pairs", c["csv"], c["fixed"]], "replaces FIXED MOVING: give one or the other"),
        (lambda c: [], "give FIXED MOVING (MOVING: an image, or a folder of images) or --pairs PAIRS.csv"),
        (lambda c: [c["fixed"]], "but no MOVING"),
        (lambda c: ["--pairs", c["csv"], "--fixed-labels", c["fixed_labels"]], "give each pair's file in the CSV"),
        (lambda c: [c["fixed"], str(c["dir"] / "images"), "--l2r", "1", "2"], "--l2r is for a single pair"),
        (lambda c: [c["fixed"], str(c["dir"] / "images"), "--moving-labels", c["fixed_labels"]], "is not a folder"),
        (lambda c: [str(c["dir"]), str(c["dir"] / "images")], "is a folder: give one fixed image"),
        (lambda c: ["--pairs", _csv(c["dir"] / "typo.csv", ["a.nii,b.nii,c.nii"], "fixed,moving,labels")],
         "unknown ['labels']"),
    ],
)
def test_misuse_of_the_pair_forms_is_one_clear_error(data, capsys, tmp_path, args, message):
    out = tmp_path / "out"
    assert _register(*args(data), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_time_split_measures_process_age_and_compilation():
    age = cli._process_age()
    if age is None:
        pytest.skip("no /proc (not Linux)")
    time.sleep(0.3)
    assert 0.2 < cli._process_age() - age < 1.0  # it measures real time since the process started
    assert age > 0.1  # pytest had started long before this test
    cli._listen_to_compiles()
    mark = cli._compile_mark()
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.ones((7, 13, 3))).block_until_ready()  # a new program
    compiled, _ = cli._compiled_since(mark)
    assert compiled > 0
    assert cli._union([(0.0, 10.0), (2.0, 3.0), (5.0, 12.0), (20.0, 21.0)]) == 13.0  # nested tracing counted once
