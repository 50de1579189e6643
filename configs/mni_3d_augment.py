"""3-D atlas registration to the MNI152 template at 2 mm, trained from the template alone with on-device augmentation.

Variant of ``configs/mni_3d.py`` (VoxelMorph-1, local NCC, 80×96×80). Training pairs: fixed = the T1 template,
moving = the same template (``data.fixed_as_moving``) warped on the device inside the jitted step by a random
affine about the grid centre (±10° per axis, ±10 % scaling per axis, ±4 voxels = ±8 mm translation) followed by a
smooth random deformation (largest vector 2 voxels = 4 mm, control points every 8 voxels = 16 mm, cubic
interpolation): ``jaxreg.data.augment``, the same magnitudes as ``mni_pair``'s test pairs. The template batch is
placed on the device once; no host work per step besides dispatch. Test pairs (``evaluate.py``) are the usual
``mni_pair`` ones (seed ``data.test_seed``). Needs nilearn (``pip install ".[data]"``).

    python train.py --config configs/mni_3d_augment.py --workdir runs/mni_3d_augment
    python evaluate.py --config configs/mni_3d_augment.py --workdir runs/mni_3d_augment

Checked on 2 CPU cores with ``--config.train.steps=2``, then ``evaluate.py ... --config.eval.num_pairs=1
--config.eval.methods="('network',)"``
(both run; after 2 steps the network is still the identity, Dice 0.405 on that pair). The 3000 steps here are a
GPU-sized run; accuracy after training with this config not yet measured.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mni_3d  # noqa: E402  (the config this variant overrides)

from jaxreg.data import augment  # noqa: E402


def get_config():
    c = mni_3d.get_config()
    c.data.fixed_as_moving = True  # training split only: moving = fixed = template, augmentation makes the moving
    c.data.augment = augment.default_config()
    a = c.data.augment
    a.enabled = True
    a.rotation_deg = 10.0
    a.scaling = 0.10
    a.translation = 4.0  # voxels (2 mm)
    a.deform = 2.0  # voxels, largest vector
    a.deform_spacing = 8.0  # voxels between control points
    a.deform_method = "cubic"
    c.train.prefetch = 1  # no loader: one batch lives on the device
    return c
