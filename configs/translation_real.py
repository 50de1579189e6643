"""Translation-network registration (Arar et al., CVPR 2020) on real images: open_ms T2 / FLAIR → T1 and MR → TRUS.

2-D axial slices of the ``open_ms`` cross-sectional patients (``../shared/data/open_ms``, relative to the repository
root; co-registered T1, T2, FLAIR at 2 mm, brain-cropped, [0, 1]; tissue labels CSF / GM / WM by k-means of T1).
Pair ``i``: a slice whose brain area is at least 25 % of the largest slice's, the moving image its T2 or FLAIR
slice (drawn), the fixed image its T1 slice pulled through a known random affine (±10°, ±10 %, ±8 mm) + smooth
deformation (up to 3 voxels): ``jaxreg.methods.translation.OpenMSSlices``. Slices centre-cropped/padded to 80×96
(divisible by the U-Nets' 16).

Split by subject: training pairs from patient07 only (49 usable slices × {T2, FLAIR} × random motions), test pairs
from patient19 only (51 usable slices; ``eval.num_pairs`` = 40 pairs from ``data.test_seed``, 100 label-boundary
landmarks each). No validation split: no model selection or early stopping; the last checkpoint of a fixed step
budget is evaluated, and every hyper-parameter (shape, weights, learning rate, steps) was set before the first
evaluation on patient19.

R: VoxelMorph-1 U-Net (dense field, diffusion regulariser); T: U-Net (T2/FLAIR → T1); D: patch discriminator
(16, 32, 64), LSGAN, ``loss.adversarial_weight`` 0.01 (pix2pix's ratio of the GAN term to the mean L1). The
baselines train the same R with MI (32 bins) or NGF directly across the modalities.

    nice -n 5 python train.py --config configs/translation_real.py --workdir runs/tr_real
    nice -n 5 python train.py --config configs/translation_real.py --workdir runs/tr_real_mi  --config.objective=mi
    nice -n 5 python train.py --config configs/translation_real.py --workdir runs/tr_real_ngf --config.objective=ngf \\
        --config.train.steps=800   # as measured (NGF did not learn; not continued)
    nice -n 5 python train.py --config configs/translation_real.py --workdir runs/tr_real_noadv \\
        --config.loss.adversarial_weight=0
    python evaluate.py --config configs/translation_real.py --workdir runs/tr_real     # runs/tr_real/eval/
    python evaluate.py --config configs/translation_real.py --workdir runs/tr_real_noadv \\
        --config.loss.adversarial_weight=0 --config.eval.baselines='("mi",)' \\
        --config.eval.baseline_dirs.mi=runs/tr_real_mi --config.eval.classical_preset=""

CPU budget (2 cores shared with another user's trainings; ``nice -n 5``): batch 8 at 80×96. The four trainings ran
at once to 800 steps (24 min wall for the slowest; translation + D about 0.44 s per step alone, MI / NGF about
0.15), then translation, translation without D and MI were resumed to 1200 steps (``train.steps``; 13 min wall,
the three at once; a resumed run sees the batches an uninterrupted one would). NGF stayed at 800 steps.
``evaluate.py``: 97 s for the table below (40 pairs; the classical engine 0.3 s per pair).

Measured on patient19 (40 pairs, 100 landmarks each; mean ± std over pairs; s / pair on the shared CPU after a
warm-up pair; the translation row's seconds include computing T L1, R alone is about as fast as MI's):

| R trained with (steps) | TRE (mm) | TRE p90 (mm) | Dice CSF/GM/WM | EPE (mm) | % folding | T L1 | s / pair |
| --- | --- | --- | --- | --- | --- | --- | --- |
| no registration | 8.30 ± 2.23 | 12.61 | 0.364 ± 0.063 | 8.25 ± 2.27 | 0 | | 0.001 |
| translation + adversarial (1200) | 4.91 ± 1.37 | 8.39 | 0.472 ± 0.063 | 4.81 ± 1.34 | 0 | 0.055 | 0.041 |
| translation, no adversarial (1200) | 5.09 ± 1.43 | 8.63 | 0.462 ± 0.063 | 4.98 ± 1.38 | 0 | 0.059 | 0.031 |
| MI (1200) | 4.44 ± 1.54 | 7.90 | 0.515 ± 0.069 | 4.29 ± 1.46 | 0 | | 0.008 |
| NGF (800) | 8.23 ± 2.23 | 12.52 | 0.367 ± 0.063 | 8.17 ± 2.27 | 0 | | 0.008 |
| classical engine (``multimodal`` preset) | 1.68 ± 0.45 | 3.40 | 0.721 ± 0.039 | 1.71 ± 0.53 | 0.007 | | 0.30 |

Paired per-pair differences (method − baseline; pairs where higher / 40; p paired t-test / Wilcoxon):

| comparison | TRE (mm) | EPE (mm) | Dice |
| --- | --- | --- | --- |
| translation + adv vs MI, 1200 steps | +0.466 (30/40; 0.003 / 8.4e-4) | +0.522 (32/40; 0.002 / 7.6e-4) | −0.042 (6/40; 5e-5 / 2e-5) |
| translation + adv vs MI, 800 steps | −0.036 (18/40; 0.67 / 0.68) | −0.053 (20/40; 0.52 / 0.53) | −0.003 (17/40; 0.59 / 0.45) |
| translation + adv vs no adv, 1200 steps | −0.183 (13/40; 0.004 / 0.006) | −0.165 (13/40; 0.011 / 0.024) | +0.010 (26/40; 0.02 / 0.008) |
| translation + adv vs no adv, 800 steps | −0.327 (3/40; 2e-7 / 7e-10) | −0.323 (5/40; 9e-7 / 4e-9) | +0.019 (33/40; 7e-6 / 1e-6) |

(800 steps: translation + adv 4.81 ± 1.63 mm, no adv 5.13 ± 1.65, MI 4.84 ± 1.67.)
The translation network does not beat the MI-trained network here: tied at 800 steps, and MI is significantly
better at 1200 (MI kept improving, 4.84 → 4.44 mm; translation + adv 4.81 → 4.91, i.e. it stalled). The
adversarial term helps the method itself (significantly lower TRE than without it at both budgets). NGF did not
train (its loss rose; R stays near the identity). Every network is far behind the classical engine on these
pairs. Caveats: one training and one test patient, short CPU budgets, no tuning of ``adversarial_weight`` (D's
loss falls from 0.23 to 0.15 and the generator's term rises, so D is winning by 1200 steps).

``:prostate`` — real 3-D MR (moving, modality A) → transrectal ultrasound (fixed, B), ``prostate_mr_trus``
(``../shared/data/prostate_mr_trus``; DeepReg's test data, Apache-2.0 repository): each TRUS on its own field of view
at 0.8 mm (22×30×21 voxels, padded to 32×32×32), the MR resampled onto it from the grids' centres
(``multimodal.prostate_arrays``; the images are centred on the gland, so this start is already good: gland Dice
0.61 over the 20 cases against 0.32 from the world identity). No reference alignment exists: R learns from the
unaligned pairs. Split by case: cases 0–9 train (each pair's MR and TRUS moved by independent random affine +
smooth motions, ``data.options``, ``data.augment_fixed``), cases 10–19 test as they are (10 pairs; gland Dice;
landmark TRE in mm on the 8 with landmark blobs: ``|p + disp(p) − q|`` with ``p`` the fixed blob centroid and ``q``
the moving one through the start map). No validation split; every setting was fixed before the first test
evaluation, except ``augment_fixed`` (below).

    nice -n 5 python train.py --config configs/translation_real.py:prostate --workdir runs/tr_prostate
    nice -n 5 python train.py --config configs/translation_real.py:prostate --workdir runs/tr_prostate_mi \\
        --config.objective=mi
    nice -n 5 python train.py --config configs/translation_real.py:prostate --workdir runs/tr_prostate_ngf \\
        --config.objective=ngf
    python evaluate.py --config configs/translation_real.py:prostate --workdir runs/tr_prostate

CPU budget: 1200 steps of batch 2, the three trainings at once (translation + D 33 min wall, about 1 s per step
alone; MI / NGF 22 min). Measured on cases 10–19 (``benchmarks/bench_learned_real.py --peers ants_mi``; mean ± std
over pairs; TRE over 8 pairs):

| method | TRE (mm) | gland Dice | % folding | s / pair |
| --- | --- | --- | --- | --- |
| no registration (grids' centres) | 2.89 ± 1.69 | 0.595 ± 0.189 | 0 | |
| R: translation + adversarial | 2.86 ± 1.69 | 0.595 ± 0.189 | 0 | 0.034 |
| R: MI | 3.03 ± 1.88 | 0.590 ± 0.206 | 0 | 0.035 |
| R: NGF | 2.87 ± 1.84 | 0.593 ± 0.188 | 0 | 0.033 |
| classical engine (``multimodal`` preset) | 4.64 ± 2.03 | 0.489 ± 0.201 | 0.089 | 0.62 |
| ANTsPy SyN (Mattes MI) | 8.35 ± 10.86 | 0.421 ± 0.201 | 0 | 0.84 |

Paired: translation vs MI −0.17 mm TRE (lower on 4 of 8; p = 0.38 t-test / 0.55 Wilcoxon), Dice +0.004 (p = 0.85):
level; translation vs no registration −0.03 mm (p = 0.34). The goal (beat the MI-trained network) is missed: no
network moves the glands much (mean field over the gland 0.17 mm for translation, 0.85 MI, 0.48 NGF) and none
improves on the start, while the classical engine and ANTsPy make it worse (BENCHMARKS.md: from the grids' centres
every similarity moves MR and TRUS apart). With ``--config.data.augment_fixed=False`` (only the MR moved in
training; the first run) T learned the ten training TRUS images by heart (L1 0.014 with R at the identity, mean
field 0.06 mm) and R did nothing: TRE 2.905 mm, which is "better" than MI's 3.254 there (p = 0.009) only because
MI-trained R made things worse; raw ``benchmarks/results/translation_prostate_fixed_unaugmented_2026-12-01.json``.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import translation  # noqa: E402  (the config this one adapts)

#: the open_ms folder: ``<repository>/../shared/data/open_ms``
DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                     "open_ms"))


#: the prostate MR ↔ TRUS folder: ``<repository>/../shared/data/prostate_mr_trus``
PROSTATE = os.path.join(os.path.dirname(DATA), "prostate_mr_trus")


def get_config(arg: str = ""):
    if arg not in ("", "prostate"):
        raise ValueError(f"configs/translation_real.py: unknown argument {arg!r}; use ':prostate' or nothing")
    c = translation.get_config()
    c.data = ml_collections.ConfigDict()
    c.data.kind = "open_ms"
    c.data.folder = DATA
    c.data.train_patients = ("patient07",)
    c.data.test_patients = ("patient19",)
    c.data.fixed_contrast = "T1"
    c.data.moving_contrasts = ("T2", "FLAIR")
    c.data.min_brain_fraction = 0.25  # of the largest axial slice's brain area
    c.data.shape = (80, 96)
    c.data.resolution = 2.0  # mm
    c.data.num_labels = 5  # unused by open_ms (0 bg, CSF, GM, WM, lesion)
    c.data.seed = 0
    c.data.test_seed = 1_000_000
    c.data.options = ml_collections.ConfigDict({"affine_scale": 1.0, "deform_scale": 3.0,
                                                "deform_spacing_mm": 16.0})

    c.model.discriminator = (16, 32, 64)  # () for none
    c.loss.adversarial_weight = 0.01  # 0: no adversarial term (D then idle); ignored by the baselines

    c.train.steps = 1200
    c.train.batch_size = 8
    c.train.checkpoint_every = 200

    c.eval.num_pairs = 40
    c.eval.baselines = ("mi", "ngf")
    c.eval.baseline_dirs = ml_collections.ConfigDict({"mi": "", "ngf": ""})  # default WORKDIR_mi, WORKDIR_ngf
    if arg == "prostate":
        c.data = ml_collections.ConfigDict()
        c.data.kind = "prostate"
        c.data.folder = PROSTATE
        c.data.train_cases = tuple(range(10))
        c.data.test_cases = tuple(range(10, 20))
        c.data.resolution = 0.8  # mm: the TRUS field of view (44×59×41 at 0.4 mm) on 22×30×21 voxels
        c.data.shape = (32, 32, 32)  # padded for the U-Nets' four halvings
        c.data.seed = 0
        c.data.test_seed = 1_000_000
        c.data.augment_fixed = True  # the TRUS moved at random too (False: T learns the ten TRUS images by heart)
        c.data.options = ml_collections.ConfigDict({"rotation_deg": 5.0, "shift_mm": 1.5, "scale": 0.05,
                                                    "deform_mm": 1.0, "sigma_mm": 6.0})  # training augmentation
        c.train.batch_size = 2
        c.train.steps = 1200
        c.train.log_every = 20
        c.eval.num_pairs = 10
    return c
