"""Learned similarity metric (Simonovsky et al., MICCAI 2016) on real multimodal brains: open_ms T2 (or FLAIR) → T1.

Split by subject: the metric learns from the co-registered T1 and T2 of open_ms patient07 (aligned, 2 mm, patches
of every pyramid level), and is tested on patient19, whose T2 is moved by known random affine + smooth motions
(``jaxreg.data.multimodal.smooth_motion``: exact end-point error in mm, Dice of the tissue classes derived from T1).
Every method runs the same engine: an affine stage by MI, then a dense deformable stage with the compared metric
(the ``multimodal`` preset with its similarity swapped); only the deformable similarity and its regularisation
weight differ. Run (2 CPU cores; variant ``:flair`` for FLAIR → T1):

    nice -n 5 python train.py --config configs/learned_metric_real.py --workdir runs/metric_real_t2
    python evaluate.py --config configs/learned_metric_real.py --workdir runs/metric_real_t2

    python benchmarks/bench_learned_real.py --config configs/learned_metric_real.py \\
        --workdir runs/metric_real_t2 --peers ants_mi --out benchmarks/results/metric_real_t2_2026-12-01.json

Split: train patient07 (aligned T1/T2); validation patient07 moved by seeds 500–501 (each similarity's
``reg_weight`` and the learned metric's ``form``, see ``eval.overrides``); test patient19 moved by seeds 1000–1005.
CPU budget: 1000 steps of 16 patch triples per scale, ≈ 15 min alone on 2 cores (35 min beside other trainings).

Measured (2026-12-01, T2 → T1, 6 test pairs, mean ± std; raw ``benchmarks/results/metric_real_t2_2026-12-01.json``):

| deformable similarity | Dice CSF/GM/WM/lesion | EPE mm | s / pair |
| --- | --- | --- | --- |
| no registration | 0.357 ± 0.041 | 7.90 ± 1.87 | – |
| MI | 0.830 ± 0.009 | 0.71 ± 0.03 | 14.7 |
| NMI | 0.819 ± 0.007 | 0.75 ± 0.02 | 14.3 |
| NGF | 0.853 ± 0.008 | 0.62 ± 0.02 | 9.2 |
| MIND-SSC | 0.756 ± 0.004 | 1.09 ± 0.02 | 21.2 |
| learned | 0.736 ± 0.014 | 1.12 ± 0.05 | 67.8 |
| ANTsPy SyN, Mattes MI | 0.708 ± 0.009 | 1.31 ± 0.02 | 4.5 |

The learned metric is worse than MI on all 6 pairs (Wilcoxon p = 0.031): close to MI on the training patient, it
does not transfer to the held-out one. FLAIR → T1 (``:flair``, the same weights reused; raw
``benchmarks/results/metric_real_flair_2026-12-01.json``, methods identity, MI, NGF, learned, ANTsPy): MI 0.860 /
0.56 mm, NGF 0.876 / 0.51, learned 0.770 / 0.88 (worse than MI on 6/6), ANTsPy MI 0.764 / 1.02. MR → TRUS
(``:prostate``: cases 0–9 train, aligned by their gland masks; 10–19 test; raw
``benchmarks/results/metric_real_prostate_2026-12-01.json``): gland Dice MI 0.445, NGF 0.452, learned 0.430
(p = 0.32 against MI), ANTsPy MI 0.256.

The weights behind the table are committed as ``benchmarks/models/openms_t2_metric`` (CC-BY data), usable as
``jaxreg register T1.nii.gz T2.nii.gz -o out --preset multimodal --metric learned --metric-checkpoint
benchmarks/models/openms_t2_metric --reg-weight 30`` (images at about 2 mm; with 1 mm images add ``--levels 8 4 2``:
measured on patient19's co-registered 1 mm T1/T2, 216 s, mean displacement 0.84 mm where the answer is 0).
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import learned_metric  # noqa: E402  (the config this one adapts)

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "open_ms")


def get_config(variant: str = "t2"):
    c = learned_metric.get_config()
    if variant == "prostate":
        return _prostate(c)
    contrast = {"t2": "T2", "flair": "FLAIR"}.get(variant or "t2")
    if contrast is None:
        raise ValueError(f"unknown config variant {variant!r}; use 't2', 'flair' or 'prostate'")
    c.data = ml_collections.ConfigDict()
    c.data.kind = "open_ms"
    c.data.folder = DATA
    c.data.resolution = 2.0  # mm
    c.data.fixed_contrast = "T1"
    c.data.moving_contrasts = (contrast,)
    c.data.train_patients = ("patient07",)
    c.data.test_patients = ("patient19",)
    c.data.num_train_pairs = 1  # patients x moving contrasts
    c.data.seed = 0
    c.data.test_seed = 1000  # motion of test pair i: smooth_motion(seed=test_seed + i)
    c.data.foreground = "labels"

    c.model.features = (8, 8, 8, 8)  # 13-voxel patches (26 mm at 2 mm); 8 features keep a 3-D iteration ~1 s on CPU
    c.model.hidden = (32,)

    c.train.ks = (1,)
    c.train.steps = 1000  # CPU budget: about 15 minutes alone on 2 cores
    c.train.batch_size = 16  # patch triples per scale and step
    c.train.scales = (1, 2, 4)  # the engine's deformable levels
    c.train.schedule = "cosine"

    c.eval.num_pairs = 6
    c.eval.methods = ("identity", "mi", "nmi", "ngf", "mind", "learned")
    c.eval.form = "nll"  # validation: "score" diverged (EPE 5.95 mm at reg 1) or trailed (1.19 mm at reg 10, masked)
    c.eval.register = ml_collections.ConfigDict(dict(
        transform="affine", affine_metric="mi", affine_metric_options={"bins": 32}, deformable="disp",
        levels=(4, 2, 1), iterations=(100, 80, 40), regularizer="diffusion", reg_weight=0.3))
    # each similarity's regularisation weight, chosen on validation pairs of the training patient (patient07 moved
    # by seeds 500, 501; mean EPE mm) from 0.3 / 1 / 3 / 10: MI 1.21 / 0.87 / 0.68 / 0.60, NMI 0.94 / 0.73 / 0.66 /
    # 0.66, NGF 0.75 / 0.53 / 0.44 / 0.49, MIND 0.92 / 1.00 / 1.05; learned (nll, pair 500 only) 0.67 at 10 and 30
    # (0.76 at 3 with brain masks), MI 0.64 at 30 on that pair
    c.eval.overrides = ml_collections.ConfigDict({"mi": {"reg_weight": 10.0}, "nmi": {"reg_weight": 3.0},
                                                  "ngf": {"reg_weight": 3.0}, "mind": {"reg_weight": 0.3},
                                                  "learned": {"reg_weight": 30.0}})
    return c


def _prostate(c):
    """MR (moving) → TRUS (fixed): ``prostate_mr_trus`` cases 0–9 train (MR aligned to TRUS by their gland masks),
    10–19 test (unregistered, identity world map). 0.4 mm grids of 44×59×41: pyramid scales 1 and 2 only."""
    c.data = ml_collections.ConfigDict()
    c.data.kind = "prostate"
    c.data.folder = os.path.join(os.path.dirname(DATA), "prostate_mr_trus")
    c.data.train_cases = tuple(range(10))
    c.data.test_cases = tuple(range(10, 20))
    c.data.num_train_pairs = 10
    c.data.seed = 0
    c.data.test_seed = 0  # unused: the test pairs are the cases themselves
    c.data.foreground = "labels"  # patch centres near the gland
    c.model.features = (8, 8, 8, 8)
    c.model.hidden = (32,)
    c.train.ks = (10,)
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.scales = (1, 2)
    c.train.schedule = "cosine"
    c.eval.num_pairs = 10
    c.eval.methods = ("identity", "mi", "ngf", "learned")
    c.eval.form = "nll"
    c.eval.register = ml_collections.ConfigDict(dict(
        transform="affine", affine_metric="mi", affine_metric_options={"bins": 32}, affine_levels=(2, 1),
        deformable="disp", levels=(2, 1), iterations=(80, 40), regularizer="diffusion", reg_weight=0.3))
    # the brains' choices (T2 variant), not tuned on these cases
    c.eval.overrides = ml_collections.ConfigDict({"mi": {"reg_weight": 10.0}, "ngf": {"reg_weight": 3.0},
                                                  "learned": {"reg_weight": 30.0}})
    return c
