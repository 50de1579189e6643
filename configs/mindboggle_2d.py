"""The 2-D variant of ``configs/mindboggle_semisup.py``: matched axial slices (index 40 of the 80×96×80 MNI152
grid at 2 mm, through the basal ganglia) of the same affinely aligned Mindboggle subjects, same split (train 1-8,
test 11-14), VoxelMorph-1 at full resolution with a diffeomorphic head, LNCC + diffusion + Dice on the 35 coarse
structures; evaluated on every region present in the held-out slices.

    python train.py --config configs/mindboggle_2d.py --workdir runs/mindboggle_2d
    python evaluate.py --config configs/mindboggle_2d.py --workdir runs/mindboggle_2d

Measured 2026-12-01 (3000 steps of batch 8 in ~15 min on 2 CPU cores beside another training; 12 held-out pairs
of subjects 11-14, Dice over the regions present in the fixed slice, ~60 regions; raw
``benchmarks/results/learned_mindboggle_2d_2026-12-01.json``):

| method | Dice | HD95 mm | % folding | s / pair |
| --- | --- | --- | --- | --- |
| no registration (after the affine to MNI152) | 0.367 | 8.14 | 0 | – |
| network | 0.420 | 8.01 | 0 | 0.007 |
| network + 50 greedy diffeo iterations | **0.494** | **7.73** | 0.001 | 0.075 |
| affine (engine) | 0.376 | 8.34 | 0 | 0.026 |
| classical `default` | 0.492 | 8.01 | 0.033 | 0.133 |
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mindboggle_semisup  # noqa: E402  (the config this variant overrides)


def get_config():
    c = mindboggle_semisup.get_config()
    c.data.slice_index = 40
    c.model.preset = "vxm1"
    c.model.encoder, c.model.decoder = (16, 32, 32, 32), (32, 32, 32, 32, 8, 8)
    c.model.downsize = 1
    c.model.int_steps = 7
    c.train.steps = 3000
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.eval.spacing = (2.0, 2.0)
    c.eval.instance_iterations = 50
    c.eval.figures = 2
    return c
