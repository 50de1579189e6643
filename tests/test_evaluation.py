"""Evaluation: the per-pair measures against direct NumPy computations, paired tests, tables, atomic files."""
import csv
import json
import math
import os

import numpy as np
import pytest

from jaxreg import evaluation


def test_measure_against_numpy(rng):
    fl = np.zeros((16, 16), np.int32)
    fl[2:8, 2:10], fl[9:14, 4:12] = 1, 2
    ml = np.roll(fl, 1, axis=0)
    true = np.zeros((16, 16, 2))
    true[..., 0] = 1.0  # ml[x] = fl[x - e0], so fixed[x] = moving[x + e0]
    pair = {"fixed_labels": fl, "moving_labels": ml, "disp": true, "landmarks": np.array([[4, 4], [10, 6]])}
    names = {1: "a", 2: "b"}
    row = evaluation.measure(pair, true.astype(np.float32), measures=evaluation.MEASURES, label_names=names,
                             spacing=(2.0, 1.0))
    assert row["dice"] == {"a": 1.0, "b": 1.0} and row["dice_mean"] == 1.0 and row["jaccard_mean"] == 1.0
    assert row["hd95_mean"] == 0.0 and row["assd_mean"] == 0.0
    assert row["folding_pct"] == 0.0 and row["sdlogj"] == pytest.approx(0.0, abs=1e-6)
    assert row["epe_mm"] == 0.0 and row["tre_mm"] == 0.0 and row["landmarks"] == 2
    zero = evaluation.measure(pair, np.zeros((16, 16, 2), np.float32), measures=("dice", "epe", "tre"),
                              label_names=names, spacing=(2.0, 1.0))
    inter = {k: np.sum((fl == k) & (ml == k)) for k in (1, 2)}
    dice = {names[k]: 2 * inter[k] / (np.sum(fl == k) + np.sum(ml == k)) for k in (1, 2)}
    assert zero["dice"] == pytest.approx(dice)
    assert zero["epe_mm"] == pytest.approx(2.0) and zero["tre_mm"] == pytest.approx(2.0)  # 1 voxel of 2 mm
    with pytest.raises(ValueError, match="unknown measures"):
        evaluation.measure(pair, true, measures=("dice", "nonsense"), label_names=names, spacing=(1, 1))


def test_tre_of_corresponding_landmarks_interpolates_the_field():
    """A real case's landmarks: fixed points and their moving counterparts (no true field); off-grid points read
    the field by linear interpolation."""
    fl = np.zeros((8, 10), np.int32)
    fl[2:6, 3:8] = 1
    p = np.array([[2.5, 3.0], [4.0, 6.25]])
    q = p + np.array([[1.0, -2.0], [0.5, 0.5]])
    pair = {"fixed_labels": fl, "moving_labels": fl, "landmarks": p, "moving_landmarks": q}
    zero = evaluation.measure(pair, np.zeros((8, 10, 2), np.float32), measures=("tre",), label_names={1: "a"},
                              spacing=(2.0, 1.0))
    expected = np.mean([np.hypot(2.0 * 1.0, 1.0 * 2.0), np.hypot(2.0 * 0.5, 0.5)])
    assert zero["tre_mm"] == pytest.approx(expected) and zero["landmarks"] == 2 and "epe_mm" not in zero
    ramp = np.zeros((8, 10, 2), np.float32)  # disp(x) = (0.5 x0, 0): at x0 = 2.5 it is 1.25, between voxels
    ramp[..., 0] = 0.5 * np.arange(8)[:, None]
    row = evaluation.measure(pair, ramp, measures=("tre",), label_names={1: "a"}, spacing=(2.0, 1.0))
    err = [np.hypot(2.0 * (0.5 * x0 - d0), d1) for (x0, _), (d0, d1) in zip(p, q - p)]
    assert row["tre_mm"] == pytest.approx(np.mean(err))
    with pytest.raises(ValueError, match="moving_landmarks"):
        evaluation.measure({**pair, "moving_landmarks": q[:1]}, ramp, measures=("tre",), label_names={1: "a"},
                           spacing=(1.0, 1.0))


def test_paired_tests_and_markdown():
    rows = []
    for i in range(8):
        rows.append({"pair": i, "method": "net", "dice_mean": 0.8 + 0.01 * i, "assd": {"a": 1.0}})
        rows.append({"pair": i, "method": "demons", "dice_mean": 0.7 + 0.012 * i, "assd": {"a": 1.0}})
    tests = evaluation.paired_tests(rows, pairs=[("net", "demons")], keys=["dice_mean", "assd/a"])
    dice, assd = tests
    assert dice["n"] == 8 and dice["wins"] == 8 and dice["mean_diff"] == pytest.approx(0.1 - 0.002 * 3.5)
    assert dice["p_ttest"] < 1e-6 and dice["p_wilcoxon"] < 0.01
    assert np.isnan(assd["p_ttest"]) and np.isnan(assd["p_wilcoxon"])  # no difference at all
    summary = {m: evaluation.summarize([r for r in rows if r["method"] == m]) for m in ("net", "demons")}
    md = evaluation.markdown(summary, (("dice_mean", "Dice", 3), ("hd95_mean", "HD95", 2)), tests=tests,
                             num_pairs=8)
    assert "| net | 0.835 ± 0.023 | – |" in md and "| net vs demons | +0.093 (8/8;" in md


# ----------------------------------------------------------------------------------------------- tables and files
def test_summarize():
    rows = [
        {"pair": "p0", "dice": {1: 0.8, 2: 0.4}, "hd95": 2.0, "time_s": np.float32(1.5)},
        {"pair": "p1", "dice": {1: 0.6, 2: 0.6}, "hd95": math.inf, "time_s": 2},
    ]
    s = evaluation.summarize(rows)
    assert list(s) == ["dice/1", "dice/2", "hd95", "time_s"]  # non-numeric "pair" skipped, order kept
    assert s["dice/1"]["mean"] == pytest.approx(0.7) and s["dice/1"]["std"] == pytest.approx(0.1)
    assert s["dice/1"]["n"] == 2
    assert s["time_s"]["mean"] == pytest.approx(1.75)
    assert s["hd95"]["mean"] == math.inf
    assert evaluation.summarize(rows, ddof=1)["dice/1"]["std"] == pytest.approx(0.1 * math.sqrt(2))


def test_write_csv_and_json_roundtrip(tmp_path):
    rows = [{"pair": "p0", "dice": {1: 0.8}, "hd95": math.nan}, {"pair": "p1", "dice": {1: 0.5}, "extra": 3}]
    path = tmp_path / "results.csv"
    evaluation.write_csv(path, rows)
    with open(path, newline="") as f:
        got = list(csv.reader(f))
    assert got == [["pair", "dice/1", "hd95", "extra"], ["p0", "0.8", "nan", ""], ["p1", "0.5", "", "3"]]
    obj = {"dice": {1: np.float64(0.8), 2: math.nan}, "hd": math.inf, "n": np.int64(3), "v": np.arange(3)}
    jpath = tmp_path / "results.json"
    evaluation.write_json(jpath, obj)
    assert json.loads(jpath.read_text()) == {"dice": {"1": 0.8, "2": None}, "hd": None, "n": 3, "v": [0, 1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json"]  # no temporary files left


class _Unprintable:
    def __str__(self):
        raise RuntimeError("cannot format")


def test_atomic_writes_do_not_clobber_on_error(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old contents\n")
    # The header and first row are written before the bad value: the error happens mid-file.
    rows = [{"a": 1.0}, {"a": _Unprintable()}]
    with pytest.raises(RuntimeError, match="cannot format"):
        evaluation.write_csv(path, rows)
    assert path.read_text() == "old contents\n"
    jpath = tmp_path / "obj.json"
    jpath.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        evaluation.write_json(jpath, {"ok": [1, 2, 3], "bad": object()})
    assert jpath.read_text() == '{"old": true}\n'
    assert sorted(os.listdir(tmp_path)) == ["obj.json", "table.csv"]
    # A successful write replaces the target.
    evaluation.write_json(jpath, {"new": 1})
    assert json.loads(jpath.read_text()) == {"new": 1}
    assert sorted(os.listdir(tmp_path)) == ["obj.json", "table.csv"]
