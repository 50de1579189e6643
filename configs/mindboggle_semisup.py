"""Semi-supervised VoxelMorph on real inter-subject brains: ``configs/mindboggle_vxm.py`` plus a soft Dice term
(weight 1) on 35 coarse structures grouped from the ~100 manual regions (``mindboggle_vxm.coarse_groups``);
evaluated on every region of the held-out subjects 11-14.

    python train.py --config configs/mindboggle_semisup.py --workdir runs/mindboggle_semisup \\
        --export benchmarks/models/mindboggle_semisup
    python evaluate.py --config configs/mindboggle_semisup.py --workdir runs/mindboggle_semisup
    python benchmarks/bench_real.py --data ../shared/data --subjects 11,12,13,14 --all-pairs --resolution 2 \\
        --methods identity,default --model benchmarks/models/mindboggle_semisup --refine 20,40,60 --hd95 \\
        --out benchmarks/results/learned_real_2mm_refine2_2026-12-01.json

Measured (2026-12-01; 3000 steps of batch 1 on the 2-core CPU, ≈ 75 min beside another training; subjects 1-8
trained, 11-14 held out; all 12 ordered held-out pairs at 2 mm, each image on its own grid, mean Dice over the
manual regions, median seconds per pair with both affine alignments):

| method | Dice | s / pair |
| --- | --- | --- |
| classical ``default`` | 0.597 | 9.46 |
| network (``jaxreg register --model benchmarks/models/mindboggle_semisup``) | 0.455 | 1.12 |
| network + ``--refine 20`` | 0.570 | 2.40 |
| network + ``--refine 40`` | 0.583 | 3.67 |
| network + ``--refine 60`` | 0.587 | 4.74 |

The goal (network + refinement ≥ ``default`` at ≤ 0.5× its time) is missed by 0.010 Dice (BENCHMARKS.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mindboggle_vxm  # noqa: E402  (the config this variant overrides)


def get_config():
    c = mindboggle_vxm.get_config()
    c.description = c.description.replace("pairwise", "semi-supervised (Dice on 35 structures) pairwise")
    c.data.label_groups = mindboggle_vxm.coarse_groups()
    c.loss.dice_weight = 1.0
    return c
