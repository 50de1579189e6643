"""Semi-supervised VoxelMorph: the default objective plus a soft Dice term on the warped one-hot labels
(labels 1..K-1, weight 1), on the default 2-D synthetic task.

    python train.py --config configs/semisupervised.py --workdir runs/semisupervised
    python evaluate.py --config configs/semisupervised.py --workdir runs/semisupervised

Expected: higher Dice than the unsupervised default (labels guide the boundaries), similar folding.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_2d  # noqa: E402  (the default config this variant overrides)


def get_config():
    c = synthetic_2d.get_config()
    c.loss.dice_weight = 1.0
    return c
