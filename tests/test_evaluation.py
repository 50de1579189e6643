"""Evaluation: the per-pair measures against direct NumPy computations, paired tests, tables."""
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
