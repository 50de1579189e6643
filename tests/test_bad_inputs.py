"""Bad input and faults (issue 14): every case a hostile but realistic user tried against ``jaxreg register``/``apply``,
``train.py`` and ``evaluate.py``, and the good behaviour to keep.

A bad input must give exit status 2 and one line naming the file or option, no traceback, nothing written (an
existing results folder intact), and it must be refused before the engine compiles anything (``no_engine``: the
level optimiser raises when reached; a JAX monitoring listener counts compilations). A header declaring more data
than its file holds must not allocate it (``tracemalloc`` in process, an address-space limit in a subprocess).

Small 3-D images (16 x 18 x 14); the registrations that do run share one compiled program (``FAST`` options, a
fixed mask: ``_good``) and the training runs one tiny 2-D network, so the file stays well under a minute on two
cores.
"""
import errno
import gzip
import json
import os
import subprocess
import sys
import tracemalloc
import types

import jax
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from conftest import load_config
from jaxreg import cli, optimize, training
from jaxreg.data import datasets, io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 18, 14)
FAST = ["--affine-levels", "1", "--affine-iterations", "5", "--levels", "1", "--iterations", "3", "--quiet"]
AFFINE = np.array([[1.0, 0, 0, -8], [0, 1.0, 0, -9], [0, 0, 1.0, -7], [0, 0, 0, 1]])

COMPILED = []  # names of JAX compilation events since the last clear
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: COMPILED.append(name) if name.startswith("/jax/core/compile") else None)


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def _raw_nifti(path, data, *, srows=None, qform=True, extra=b""):
    """An uncompressed NIfTI-1 file written byte by byte: ``srows`` (3 x 4, sform code 1) as given, however bad,
    and no qform when ``qform`` is False (both codes 0 when ``srows`` is None too)."""
    img = nib.Nifti1Image(np.asarray(data), AFFINE)
    hdr = img.header
    hdr.set_qform(AFFINE, code=1 if qform else 0)
    hdr["sform_code"] = 0 if srows is None else 1
    if srows is not None:
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = np.asarray(srows, np.float64)
    hdr.set_data_offset(352)
    with open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + np.asarray(data).tobytes(order="F") + extra)
    return str(path)


def _header_only(path, shape, *, payload=b""):
    """A header declaring ``shape`` float32 followed by ``payload`` only (gzip when the name ends in .gz)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(AFFINE, code=1)
    hdr.set_sform(AFFINE, code=1)
    hdr.set_data_offset(352)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + payload)
    return str(path)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Input files: a good pair with labels, and the bad files of the issue."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    fixed = np.zeros(SHAPE, np.float32)
    fixed[4:12, 5:13, 3:11] = 1.0
    fixed = ndi.gaussian_filter(fixed + 0.2 * rng.random(SHAPE), 1.0).astype(np.float32)
    moving = np.roll(fixed, 1, axis=0)
    p = {"dir": root, "fixed": _save(root / "fixed.nii.gz", fixed), "moving": _save(root / "moving.nii.gz", moving),
         "fixed_labels": _save(root / "fixed_labels.nii.gz", (fixed > 0.5).astype(np.int16)),
         "moving_labels": _save(root / "moving_labels.nii.gz", (moving > 0.5).astype(np.int16))}
    shifted = AFFINE.copy()
    shifted[0, 3] += 3.0
    p["labels_shifted"] = _save(root / "labels_shifted.nii.gz", (fixed > 0.5).astype(np.int16), shifted)
    p["no_orientation"] = _raw_nifti(root / "no_orientation.nii", moving, qform=False)
    p["zero_affine"] = _raw_nifti(root / "zero_affine.nii", fixed, srows=np.zeros((3, 4)), qform=False)
    nan_rows = AFFINE[:3].copy()
    nan_rows[0, 0] = np.nan
    p["nan_affine"] = _raw_nifti(root / "nan_affine.nii", fixed, srows=nan_rows, qform=False)
    flat = AFFINE[:3].copy()
    flat[:, 1] = flat[:, 0]  # two parallel voxel axes
    p["singular_affine"] = _raw_nifti(root / "singular_affine.nii", fixed, srows=flat, qform=False)
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p["rgb"] = _save(root / "rgb.nii.gz", rgb)
    p["vector"] = _save(root / "vector.nii.gz", np.ones(SHAPE + (1, 3), np.float32))
    p["mask_2d"] = _save(root / "mask_2d.nii.gz", np.ones(SHAPE[:2], np.float32))
    one = np.zeros(SHAPE, np.float32)
    one[8, 9, 7] = 1.0
    p["mask_one_voxel"] = _save(root / "mask_one_voxel.nii.gz", one)
    small = np.zeros(SHAPE, np.float32)
    small[6:10, 7:11, 5:9] = 1.0  # 64 voxels: more than 12 parameters, fewer than 10 per parameter
    p["mask_small"] = _save(root / "mask_small.nii.gz", small)
    big = np.zeros(SHAPE, np.float32)
    big[1:-1, 1:-1, 1:-1] = 1.0
    p["mask_big"] = _save(root / "mask_big.nii.gz", big)
    p["huge"] = _header_only(root / "huge.nii", (1024, 1024, 1024))
    p["huge_gz"] = _header_only(root / "huge.nii.gz", (1024, 1024, 1024))  # about 90 bytes
    # within deflate's 1032:1 of its size, but its stream holds 64 KiB of the 8 MiB declared
    p["short_gz"] = _header_only(root / "short.nii.gz", (128, 128, 128), payload=rng.bytes(1 << 16))
    return p


@pytest.fixture
def no_engine(monkeypatch):
    """The registration engine may not run: reaching a level's optimiser fails the test. Compilations are counted
    from here (``COMPILED``)."""
    def reached(*args, **kwargs):
        raise AssertionError("a bad input reached the engine's optimisation loop")

    monkeypatch.setattr(optimize, "_optimise_level", reached)
    COMPILED.clear()


def _run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _refused(capsys, argv, *needles, compiles=False):
    """``argv`` exits 2 with one line holding every needle; nothing compiled (unless ``compiles``: the pyramid check
    stages the images on the device first)."""
    code, _, err = _run(capsys, argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    if not compiles:
        assert not COMPILED, COMPILED
    return err


def _good(d, *args):
    """A registration's options: ``FAST`` with a fixed mask (every run here compiles the same program)."""
    return [*args, *FAST, "--fixed-mask", d["mask_big"]]


def _listing(folder):
    """``{name: bytes}`` of every file in ``folder`` (staging folders included, to be found)."""
    return {n: open(os.path.join(folder, n), "rb").read() if os.path.isfile(os.path.join(folder, n)) else None
            for n in sorted(os.listdir(folder))}


# ------------------------------------------------------------------------------------------------ options, before
@pytest.mark.parametrize("args, needles", [
    (["--levels", "1000", "2", "1"], ["--levels", "factor 1000 shrinks"]),
    (["--levels", "100", "2", "1"], ["--levels", "factor 100 shrinks"]),
    (["--levels", "0", "2", "1"], ["--levels", "(0, 2, 1)"]),
    (["--levels", "-2", "2", "1"], ["--levels", "(-2, 2, 1)"]),
    (["--affine-levels", "0", "2"], ["--affine-levels", "(0, 2)"]),
    (["--learning-rate", "-5"], ["--learning-rate", "> 0", "-5"]),
    (["--learning-rate", "nan"], ["--learning-rate", "nan"]),
    (["--reg-weight", "nan"], ["--reg-weight", ">= 0", "nan"]),
    (["--reg-weight", "-100"], ["--reg-weight", "-100"]),
    (["--tol", "nan"], ["--tol", "nan"]),
    (["--iterations", "-5"], ["--iterations", "-5"]),
    (["--iterations", "50", "40"], ["--iterations", "one per level (3)"]),
])
def test_a_bad_option_is_named_before_anything_runs(d, capsys, no_engine, args, needles):
    out = d["dir"] / "never"
    _refused(capsys, ["register", d["fixed"], d["moving"], "-o", str(out), "--quiet", *args], *needles,
             compiles="shrinks" in needles[-1])
    assert not out.exists()


def test_one_iteration_count_serves_every_level():
    opts = cli._options_from_args(cli._parser().parse_args(
        ["register", "f.nii", "m.nii", "-o", "o", "--levels", "2", "1", "--iterations", "50"]))
    assert opts.levels == (2, 1) and opts.iterations == 50


# ------------------------------------------------------------------------------------------------ headers, files
@pytest.mark.parametrize("which, moving, needles", [
    ("rgb", True, ["rgb.nii.gz", "RGB"]),
    ("vector", True, ["vector.nii.gz", "multichannel"]),
    ("no_orientation", True, ["no_orientation.nii", "qform_code and sform_code are both 0",
                              "--assume-identity-affine"]),
    ("zero_affine", False, ["zero_affine.nii", "singular"]),  # on the fixed image: the fixed file is blamed
    ("zero_affine", True, ["zero_affine.nii", "singular"]),
    ("nan_affine", True, ["nan_affine.nii", "not finite"]),
    ("singular_affine", False, ["singular_affine.nii", "parallel"]),
    ("huge", True, ["huge.nii", "(1024, 1024, 1024)", "only 352 bytes"]),
    ("huge_gz", False, ["huge.nii.gz", "-byte gzip file can hold (at most 1032:1)"]),
    ("short_gz", True, ["short.nii.gz", "holds only 65888 bytes"]),
])
def test_a_bad_header_names_its_file(d, capsys, no_engine, which, moving, needles):
    pair = [d["fixed"], d[which]] if moving else [d[which], d["moving"]]
    err = _refused(capsys, ["register", *pair, "-o", str(d["dir"] / "never"), *FAST], *needles)
    other = os.path.basename(pair[0] if moving else pair[1])
    assert other not in err  # the good file is not blamed
    assert not (d["dir"] / "never").exists()


def test_a_header_cannot_make_the_reader_allocate_what_the_file_does_not_hold(d):
    for name, needle in (("huge", "only 352 bytes"), ("huge_gz", "can hold"), ("short_gz", "holds only")):
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=needle):
                io.load(d[name])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, (name, peak)  # the streamed count keeps 1 MiB chunks at most
    # the same under an address-space limit of 1 GiB above what the process holds: no MemoryError, no abort
    code = (
        "import resource, sys\n"
        "from jaxreg.data import io\n"
        "vm = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')][0]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        io.load(p)\n"
        "    except ValueError as err:\n"
        "        print(err)\n")
    run = subprocess.run([sys.executable, "-c", code, d["huge"], d["huge_gz"], d["short_gz"]], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3 and all("declares (1024, 1024, 1024)" in line for line in lines[:2]), lines
    assert "MemoryError" not in run.stdout


def test_no_orientation_is_accepted_only_when_asked(d):
    with pytest.raises(ValueError, match="no_orientation.nii.*both 0"):
        io.load(d["no_orientation"])
    vol = io.load(d["no_orientation"], assume_identity_affine=True)
    np.testing.assert_array_equal(vol.affine, np.diag([1.0, 1.0, 1.0, 1.0]))  # pixdim 1 mm, origin at voxel 0
    np.testing.assert_array_equal(vol.data, io.load(d["moving"]).data)


# ------------------------------------------------------------------------------------------------ masks, labels
@pytest.mark.parametrize("args, needles", [
    (lambda d: ["--fixed-mask", d["mask_2d"]], ["--fixed-mask", "mask_2d.nii.gz", "(16, 18) vs (16, 18, 14)"]),
    (lambda d: ["--moving-mask", d["mask_one_voxel"]], ["--moving-mask", "mask_one_voxel.nii.gz", "1 voxel(s)",
                                                        "12 parameters"]),
    (lambda d: ["--fixed-labels", d["fixed_labels"]], ["--fixed-labels", "fixed_labels.nii.gz",
                                                       "give --moving-labels too"]),
    (lambda d: ["--fixed-labels", d["labels_shifted"], "--moving-labels", d["moving_labels"]],
     ["--fixed-labels", "labels_shifted.nii.gz", "affines differ by up to 3"]),
])
def test_masks_and_labels_off_their_grid_or_too_small_are_refused(d, capsys, no_engine, args, needles):
    _refused(capsys, ["register", d["fixed"], d["moving"], "-o", str(d["dir"] / "never"), *args(d), *FAST], *needles)
    assert not (d["dir"] / "never").exists()


def test_degenerate_results_are_warned_about():
    nd = 3
    fixed = types.SimpleNamespace(ndim=nd)
    folded = types.SimpleNamespace(fixed=fixed, matrix=np.eye(nd + 1), options=optimize.RegisterOptions())
    assert cli._result_warnings(folded, 0.005) == []
    assert "folds 1.70 % of the voxels" in cli._result_warnings(folded, 0.017)[0]
    shrunk = types.SimpleNamespace(fixed=fixed, matrix=np.diag([0.3, 0.4, 1.0, 1.0]),
                                   options=optimize.RegisterOptions())
    (warning,) = cli._result_warnings(shrunk, 0.0)
    assert "affine stage scales the fixed grid by 0.30 to 1.00" in warning


# ------------------------------------------------------------------------------------------------ output folders
def test_output_location_is_checked_before_registering(d, capsys, no_engine, monkeypatch):
    a_file = d["dir"] / "a_file"
    a_file.write_text("keep")
    _refused(capsys, ["register", d["fixed"], d["moving"], "-o", str(a_file), *FAST], "a_file",
             "existing file, not a folder")
    assert a_file.read_text() == "keep"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli.tempfile, "mkdtemp", read_only)
    _refused(capsys, ["register", d["fixed"], d["moving"], "-o", str(d["dir"] / "ro"), *FAST], "-o",
             "cannot write in", "Read-only file system")
    monkeypatch.undo()
    # an input where a result would go (also the Learn2Reg file, named after the pair)
    folder = d["dir"] / "holds_input"
    folder.mkdir()
    for name, extra in (("warped.nii.gz", []), ("disp_0001_0002.nii.gz", ["--l2r", "0001", "0002"])):
        moving = folder / name
        moving.write_bytes(open(d["moving"], "rb").read())
        _refused(capsys, ["register", d["fixed"], str(moving), "-o", str(folder), *extra, *FAST],
                 "would overwrite the input", name)
        assert moving.read_bytes() == open(d["moving"], "rb").read()
    # apply: a missing folder is named as given, not as a temporary file
    _refused(capsys, ["apply", str(folder), d["moving"], "-o", str(d["dir"] / "missing" / "out.nii.gz")],
             str(d["dir"] / "missing" / "out.nii.gz"), "does not exist")
    _refused(capsys, ["apply", str(folder), d["moving"], "-o", d["moving"]], "would overwrite an input")


@pytest.fixture(scope="module")
def first_run(d):
    """One registration with labels and a Learn2Reg file (the program the other runs here reuse)."""
    out = d["dir"] / "results"
    code = cli.main(["register", d["fixed"], d["moving"], "-o", str(out), *_good(
        d, "--moving-labels", d["moving_labels"], "--fixed-labels", d["fixed_labels"], "--l2r", "0001", "0002")])
    assert code == 0
    return out


def test_results_carry_a_manifest_and_a_rerun_never_leaves_stale_files(d, capsys, first_run):
    capsys.readouterr()
    report = json.loads((first_run / "report.json").read_text())
    assert sorted(report["files"].values()) == sorted(os.listdir(first_run))  # the manifest is the folder
    assert report["warnings"] == [] and report["mean_dice"] > 0.5
    before = _listing(first_run)
    # without --overwrite: refused, the earlier results intact
    COMPILED.clear()
    _refused(capsys, ["register", d["fixed"], d["moving"], "-o", str(first_run), *_good(d)], "earlier run's results",
             "--overwrite")
    assert _listing(first_run) == before
    # a full disk while the new set is written: the earlier results intact, no staging folder left
    real = io.save_matrix

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    io.save_matrix = disk_full
    try:
        code, _, err = _run(capsys, ["register", d["fixed"], d["moving"], "-o", str(first_run),
                                     *_good(d, "--overwrite")])
    finally:
        io.save_matrix = real
    assert code == 2 and "No space left on device" in err
    assert _listing(first_run) == before
    assert not [n for n in os.listdir(d["dir"]) if n.startswith(".jaxreg-")]
    # with --overwrite and no labels: the whole set replaced, no warped_labels or Learn2Reg file of the old run
    code, _, err = _run(capsys, ["register", d["fixed"], d["moving"], "-o", str(first_run), *_good(d, "--overwrite")])
    assert code == 0, err
    names = sorted(os.listdir(first_run))
    assert "warped_labels.nii.gz" not in names and "disp_0001_0002.nii.gz" not in names
    assert sorted(json.loads((first_run / "report.json").read_text())["files"].values()) == names


def test_the_same_run_gives_bitwise_identical_files(d, capsys, first_run):
    outs = [d["dir"] / f"same{i}" for i in range(2)]
    for out in outs:
        code, _, err = _run(capsys, ["register", d["fixed"], d["moving"], "-o", str(out), *_good(d)])
        assert code == 0, err
    a, b = (_listing(out) for out in outs)
    assert a.keys() == b.keys()
    for name in a:
        if name != "report.json":  # it holds the times
            assert a[name] == b[name], name


def test_a_small_mask_is_a_warning_in_stderr_and_the_report(d, capsys, first_run):
    out = d["dir"] / "small_mask"
    code, _, err = _run(capsys, ["register", d["fixed"], d["moving"], "-o", str(out), *FAST, "--fixed-mask",
                                 d["mask_small"]])
    assert code == 0, err
    assert "warning: --fixed-mask" in err and "mask_small.nii.gz: 64 voxels inside" in err
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert len(warnings) == 1 and "fewer than 10 per parameter of the affine transform (120)" in warnings[0]


def test_an_explicitly_unoriented_image_registers(d, capsys, first_run):
    out = d["dir"] / "unoriented"
    code, _, err = _run(capsys, ["register", d["fixed"], d["no_orientation"], "-o", str(out),
                                 *_good(d, "--assume-identity-affine")])
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["moving"].endswith("no_orientation.nii")


# ------------------------------------------------------------------------------------------------ training
def _label_folder(root, values):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        lab = np.zeros((32, 32), np.int32)
        lab[4:16, 4:28], lab[16:28, 4:16], lab[16:28, 16:28] = values[1], values[2], values[3]
        lab = np.roll(lab, i, axis=0)
        image = ndi.gaussian_filter(lab.astype(np.float32) / max(values), 1) + 0.05 * rng.random((32, 32))
        _save(root / "images" / f"s{i}.nii.gz", image.astype(np.float32), np.eye(4))
        _save(root / "labels" / f"s{i}.nii.gz", lab, np.eye(4))
    return root


def _tiny(path, steps):
    c = load_config("synthetic_2d")
    c.data.kind, c.data.path, c.data.shape, c.data.mode = "folder", str(path), (32, 32), "pairwise"
    c.model.encoder, c.model.decoder = (4, 8), (8, 8, 4)
    c.loss.similarity, c.loss.similarity_options, c.loss.reg_weight, c.loss.dice_weight = "mse", {}, 0.05, 1.0
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = steps, 2, 2, 2
    c.train.learning_rate = 1e-2
    return c


def test_freesurfer_labels_train_with_one_class_per_label_present(tmp_path):
    path = _label_folder(tmp_path / "fs", (0, 2, 1035, 2035))
    ds = datasets.from_folder(path)
    assert ds.num_labels == 4 and ds.label_values.tolist() == [0, 2, 1035, 2035]  # not 2036 one-hot channels
    assert sorted(np.unique(ds.pair(0)["fixed_labels"]).tolist()) == [0, 1, 2, 3]
    from jaxreg.methods import voxelmorph

    assert voxelmorph._label_names(ds) == {1: "2", 2: "1035", 3: "2035"}
    config = _tiny(path, steps=4)
    full = voxelmorph.fit(config, str(tmp_path / "full"), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert int(full.step) == 4 and all(np.isfinite(r["dice"]) and 0 <= r["dice"] <= 1 for r in rows)
    # killed after step 2, and again while writing the step-4 checkpoint (a half-written orbax folder): the
    # resumed run ends bitwise where the uninterrupted one did
    voxelmorph.fit(config, str(tmp_path / "part"), stop_at=2, progress=False)
    partial = tmp_path / "part" / "checkpoints" / "4.orbax-checkpoint-tmp-1234567890"
    partial.mkdir()
    (partial / "garbage").write_bytes(b"\0" * 100)
    resumed = voxelmorph.fit(config, str(tmp_path / "part"), progress=False)
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert training.checkpoint_manager(str(tmp_path / "part" / "checkpoints")).latest_step() == 4
    # resuming that workdir with another model: refused naming the parameter, the workdir's config.json kept
    saved = (tmp_path / "part" / "config.json").read_text()
    other = _tiny(path, steps=6)
    other.model.encoder = (4, 4)
    with pytest.raises(ValueError, match=r"does not fit the config's model: parameter .*dec0"):
        voxelmorph.fit(other, str(tmp_path / "part"), progress=False)
    assert (tmp_path / "part" / "config.json").read_text() == saved


def test_too_many_label_classes_is_an_error(tmp_path):
    root = tmp_path / "many"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(2):
        _save(root / "images" / f"s{i}.nii.gz", np.ones((40, 40), np.float32), np.eye(4))
        _save(root / "labels" / f"s{i}.nii.gz", np.arange(1600, dtype=np.int32).reshape(40, 40) * 7, np.eye(4))
    with pytest.raises(ValueError, match=r"many: the label maps hold 1600 distinct labels, more than MAX_LABELS"):
        datasets.from_folder(root)
    from jaxreg import models
    from jaxreg.methods import voxelmorph

    model = models.build(ndim=2, preset=None, encoder=(4, 8), decoder=(8, 8, 4))
    with pytest.raises(ValueError, match="one-hot encodes 1001 label classes, more than 1000"):
        voxelmorph.Loss(model, dice_weight=1.0, num_labels=1001)


@pytest.mark.parametrize("field, value, needle", [
    ("shape", None, "data.shape (data.kind='synthetic') must be a spatial shape"),
    ("shape", (32, 32, None), "data.shape"),
    ("kind", "bogus", "data.kind must be one of 'synthetic', 'mni', 'folder', 'json', 'subjects', got 'bogus'"),
    ("num_labels", 300000, "data.num_labels must be an int in [2, 1000]"),
])
def test_data_config_errors_name_the_field(field, value, needle):
    c = load_config("synthetic_2d")
    c.data[field] = value
    with pytest.raises(ValueError) as err:
        datasets.from_config(c.data)
    assert needle in str(err.value)


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines its absl flags (evaluate.py's are not loaded in this process)
    return module


@pytest.mark.parametrize("field, value, needle", [
    ("steps", -5, "config.train.steps must be an int >= 1, got -5"),
    ("batch_size", 0, "config.train.batch_size must be an int >= 1"),
    ("learning_rate", float("nan"), "config.train.learning_rate must be a finite number > 0, got nan"),
    ("learning_rate", -1e-3, "config.train.learning_rate must be a finite number > 0"),
])
def test_train_config_errors_name_the_field(field, value, needle):
    train = sys.modules.get("train_script") or _train_module()
    sys.modules["train_script"] = train
    c = load_config("synthetic_2d")
    c.train[field] = value
    with pytest.raises(ValueError) as err:
        train.check_train(c)
    assert needle in str(err.value)


def test_train_and_evaluate_scripts_report_errors_in_one_line(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cfg = ["--config", os.path.join(ROOT, "configs", "synthetic_2d.py"), "--workdir", str(tmp_path / "w")]
    train = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *cfg, "--config.data.kind=bogus"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert train.returncode == 2 and "Traceback" not in train.stderr, train.stderr[-2000:]
    assert train.stderr.strip().splitlines()[-1] == ("train.py: error: data.kind must be one of 'synthetic', 'mni', "
                                                     "'folder', 'json', 'subjects', got 'bogus'")
    assert not (tmp_path / "w").exists()  # nothing written
    ev = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *cfg], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ev.returncode == 2 and "Traceback" not in ev.stderr, ev.stderr[-2000:]
    assert ev.stderr.strip().splitlines()[-1].startswith("evaluate.py: error: no checkpoint in")
