"""Semi-supervised VoxelMorph on real inter-subject brains: ``configs/mindboggle_vxm.py`` plus a soft Dice term
(weight 1) on 35 coarse structures grouped from the ~100 manual regions (``mindboggle_vxm.coarse_groups``);
evaluated on every region of the held-out subjects 11-14.

    python train.py --config configs/mindboggle_semisup.py --workdir runs/mindboggle_semisup
    python evaluate.py --config configs/mindboggle_semisup.py --workdir runs/mindboggle_semisup
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
