"""Supervised registration (Cao et al., MICCAI 2017) on real inter-subject brains: the 3-D similarity-steered patch
network learns the classical engine's fields between Mindboggle-101 subjects.

Data: the learning set of ``configs/mindboggle_vxm.py`` (OASIS-TRT-20 subjects with ~100 manual regions, each
affinely aligned to nilearn's MNI152 at 2 mm, 80×96×80, by jaxreg's engine and cached in ``data.path`` on first use
by ``jaxreg.atlas.prepare``). The pairs are already in template space, so there is no pre-alignment
(``prealign = ""``). Needs ``../shared/data`` (non-commercial data: a model trained here is benchmarked, never
shipped in the package) and nilearn.

Split by subject: training pairs among subjects 1-8 only: the first ``data.train_pairs`` (14) of their 56 ordered
pairs shuffled by ``data.seed`` (0), moving->fixed: 5->7, 6->2, 6->3, 5->2, 3->4, 1->5, 6->1, 2->6, 8->5, 8->4,
1->6, 5->4, 1->4, 4->1 (every subject 1-8 appears); test: all 12 ordered pairs of subjects 11-14
(``jaxreg.methods.supervised.subject_pairs``). No setting was chosen on a test subject: the settings are the 3-D
variant of ``configs/supervised.py`` cut to the CPU budget by timing one step and one dense pass on training pair
5->7 (no accuracy was compared); subjects 9-10 were not used.

Targets (``target = "classical"``): the fields of ``optimize.PRESETS["default"]`` (``target_preset``: the engine's
default preset, the ``default`` of ``benchmarks/bench_real.py`` and BENCHMARKS.md; diffeomorphic, LNCC window 5,
regularisation 0.2, with its own affine stage on the already aligned pair) for the 14 training pairs, computed once
and cached in ``WORKDIR/train_pairs.npz``. The network regresses them at patch centres drawn inside the dilated
brain labels with balanced displacement magnitudes, and predicts a whole volume in one fully convolutional pass,
Gaussian-smoothed (sigma 1 voxel).

    nice -n 5 python train.py --config configs/supervised_real.py --workdir runs/sup_real
    nice -n 5 python evaluate.py --config configs/supervised_real.py --workdir runs/sup_real

Evaluation: identity, diffeomorphic Demons, the classical ``default`` (the tool whose fields were learned), the
classical ``diffeo`` and the network (``supervised``: smoothed; ``supervised_raw``: not smoothed); mean Dice over the
manual regions present in the fixed map (as ``configs/mindboggle_vxm.py`` scores them), % folding voxels, SD of
log |J|, wall seconds per pair (after an untimed warm-up pair; every method on the template-space pair, so none pays
an affine alignment to the template), paired tests of the network against each baseline.

Measured (2026-12-01; 2 CPU cores shared with two other trainings, load average ≈ 10; the 14 classical targets
took 290 s including one compilation (16-21 s per pair after it), then 800 steps of batch 64 took ≈ 8.5 min: ≈ 13.5
min in all; checkpoint ``runs/sup_real/checkpoints/800``, 560 KiB, 2 checkpoints kept = 1.2 MiB; evaluation ≈ 15
min). All 12 ordered pairs of the held-out subjects 11-14 in template space, mean ± SD over pairs:

| method | Dice (mean over regions) | % folding | SD log J | s / pair (mean ± SD, median) |
| --- | --- | --- | --- | --- |
| identity (affine alignment to MNI152 only) | 0.410 ± 0.015 | 0 | 0 | 0.002 |
| Demons (diffeomorphic, jaxreg.demons defaults) | 0.515 ± 0.006 | 0 | 0.137 | 18.1 ± 3.8, 19.1 |
| classical ``default`` (the fields learned) | **0.595 ± 0.009** | 0.001 | 0.274 | 12.6 ± 2.1, 12.7 |
| classical ``diffeo`` | 0.575 ± 0.008 | 0 | 0.198 | 12.2 ± 2.3, 12.3 |
| supervised network (smoothed, sigma 1 coarse voxel) | 0.440 ± 0.016 | 0 | 0.123 | **2.00 ± 0.44**, 1.99 |
| supervised network, not smoothed | 0.441 ± 0.016 | 0 | 0.230 | 1.98 ± 0.44, 2.06 |

Paired differences of the network (smoothed) against each baseline in mean Dice, 12 pairs: −0.075 vs Demons,
−0.154 vs ``default``, −0.134 vs ``diffeo``; lower on every pair each time (paired t-test p = 8e-10, 3e-12, 1e-11;
Wilcoxon p = 4.9e-4, the smallest possible with 12 pairs). The network gains +0.030 over no registration.

Goal (within 0.02 Dice of the tool whose fields it learned, at ≥ 20× less time): **missed** on both counts: 0.154
Dice below ``default`` at 6.3× less time (2.0 vs 12.6 s per pair, both on the same loaded CPU, interleaved per
pair). Measured reasons (``runs/sup_real``, test pair 12->11 and training pair 0):

* generalisation: on a training pair the network explains half of the target field (R² 0.50 inside the mask,
  correlation 0.73, end-point error 0.55 vs 0.81 coarse voxels for a zero field), on the held-out pair none of it
  (R² −0.13, correlation 0.30, end-point error 1.52 vs 1.49 full voxels for a zero field): 14 training pairs and
  800 steps are far too few for inter-subject fields;
* the 4 mm working grid itself: the tool's own field carried to 4 mm and back gives 0.560 Dice on that pair
  (tool 0.603; with the sigma-1 smoothing on the coarse grid 0.517), so a network at ``downsize = 2`` cannot come
  within 0.02 of the tool even if it learned the field exactly; at full resolution the 3d variant of
  ``configs/supervised.py`` (dilated convolutions, 2 mm) took 53 s per dense pass here, ≈ 4.5× the tool's time;
* time: the dense pass is ≈ 4.4 GFLOP of 3-D convolutions on 40×48×40, ≈ 2 s on the loaded CPU; ≥ 20× needs
  ≤ 0.6 s here.

For reference (BENCHMARKS.md, "Learned registration on real subjects"; not re-run here): on the same 12 held-out
pairs of Mindboggle subjects 11-14 at 2 mm, but registered in each image's native space (affine alignment
included), ANTsPy ``SyN`` 0.501 and the classical ``default`` 0.597 mean Dice. Those are native-space numbers; the
table above is in template space (both subjects affinely aligned to MNI152 beforehand, the labels resampled by
nearest neighbour), so the two are not directly comparable.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mindboggle_vxm  # noqa: E402  (the learning set and its split)
import supervised  # noqa: E402  (the config this variant overrides)

import ml_collections  # noqa: E402


def get_config():
    c = supervised.get_config("3d")
    c.description = ("supervised patch regression of the classical engine's fields between Mindboggle subjects "
                     "1-8 in MNI152 space at 2 mm; benchmark only (CC BY-NC-SA)")

    vxm = mindboggle_vxm.get_config().data
    c.data = ml_collections.ConfigDict()
    c.data.kind = "subjects"
    c.data.path = vxm.path  # the learning set shared with the VoxelMorph configs (built on first use)
    c.data.source = vxm.source
    c.data.source_image = vxm.source_image
    c.data.source_labels = vxm.source_labels
    c.data.subjects = ml_collections.ConfigDict({"train": tuple(str(i) for i in range(1, 9)),
                                                 "test": tuple(str(i) for i in range(11, 15))})
    c.data.template = "mni"
    c.data.resolution = 2
    c.data.shape = (80, 96, 80)
    c.data.align_preset = "affine"
    c.data.licence = vxm.licence
    c.data.seed = 0  # draws the training pairs among the 56 ordered pairs of subjects 1-8
    c.data.test_seed = 0  # unused: the test pairs are all 12 ordered pairs of subjects 11-14
    c.data.train_pairs = 14

    c.prealign = ""  # the learning set is already affinely aligned to the template
    c.target = "classical"
    c.target_preset = "default"

    # CPU-sized network on a 4 mm grid (downsize 2: 40×48×40): five undilated 3×3×3 convolutions (patch radius 5,
    # 11³ patches, ±20 mm; XLA's CPU convolutions were 4.5× slower per FLOP with dilation 2, so no dilation), the
    # similarity map of ±2 coarse voxels (±8 mm, 5³ offsets, NCC window 3³) flattened into the dense layer
    c.downsize = 2
    c.model.features = (16, 16, 16, 16, 16)
    c.model.dilations = (1, 1, 1, 1, 1)
    c.model.radius = 2
    c.model.window = 1
    c.model.sim_features = ()
    c.model.sim_out = 64
    c.model.head = 64

    c.sampling.mask = "labels"
    c.sampling.mask_dilation = 3

    c.train.steps = 800
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.log_every = 25
    c.train.checkpoint_every = 100

    c.predict.sigma = 1.0
    c.predict.iterations = 1

    c.eval.num_pairs = 12
    c.eval.methods = ("identity", "demons", "classical", "diffeo", "supervised", "supervised_raw")
    c.eval.classical_preset = "diffeo"
    c.eval.demons = ml_collections.ConfigDict({"diffeomorphic": True})
    c.eval.spacing = (2.0, 2.0, 2.0)
    c.eval.figures = 0
    return c
