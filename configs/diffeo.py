"""Diffeomorphic VoxelMorph: the head predicts a stationary velocity field, integrated by scaling and squaring
(7 steps at half resolution), on the default 2-D synthetic task.

    python train.py --config configs/diffeo.py --workdir runs/diffeo
    python evaluate.py --config configs/diffeo.py --workdir runs/diffeo

Expected: Dice close to the default (slightly lower), folding ≈ 0 %.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_2d  # noqa: E402  (the default config this variant overrides)


def get_config():
    c = synthetic_2d.get_config()
    c.model.int_steps = 7
    c.model.int_downsize = 2
    c.loss.reg_weight = 0.25
    return c
