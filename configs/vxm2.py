"""VoxelMorph-2 (decoder 32,32,32,32,32,16,16) on the default 2-D synthetic task.

    python train.py --config configs/vxm2.py --workdir runs/vxm2
    python evaluate.py --config configs/vxm2.py --workdir runs/vxm2

Expected: about the default's Dice (VoxelMorph-2 is slightly better in the paper), somewhat slower per step.
Not yet measured on this project's machines.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_2d  # noqa: E402  (the default config this variant overrides)


def get_config():
    c = synthetic_2d.get_config()
    c.model.preset = "vxm2"
    return c
