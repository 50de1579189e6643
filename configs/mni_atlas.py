"""A licence-clean 3-D atlas model to nilearn's MNI152 2009 template at 2 mm (80×96×80): the network registers a
brain (moving) onto the template (fixed), so ``jaxreg register FIXED MOVING --model mni152_atlas`` aligns any two
brains through it. Trained only on data that may ship: the MNI152 template itself and the CC-BY ``open_ms``
patients 07 and 19 (skull-stripped T1) plus the Colin27 brain (``../shared/data/antspy/ch2.nii.gz``), each affinely
aligned to the template by jaxreg's engine, with on-device augmentation (random affine and smooth deformation of
the moving image, intensity gamma/bias) making the variety three subjects lack. Mindboggle is used only to measure
it (``benchmarks/bench_learned.py``), never to train it.

    python train.py --config configs/mni_atlas.py --workdir runs/mni_atlas --export jaxreg/pretrained/mni152_atlas

The network is the CPU-sized one of ``configs/mindboggle_vxm.py`` (a 3-level U-Net at half resolution with a
diffeomorphic head). Steps, minutes and the measured results are in ``jaxreg/pretrained/mni152_atlas/README.md`` and
BENCHMARKS.md ("Learned registration on real subjects").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mindboggle_vxm  # noqa: E402  (the network and template of the real-subject configs)

import ml_collections  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def get_config():
    c = mindboggle_vxm.get_config()
    c.description = ("atlas registration of a skull-stripped T1 brain to MNI152 2009 at 2 mm (any pair: through the "
                     "template); trained on open_ms + Colin27 + augmentation")
    c.data.path = "runs/learning_sets/mni_atlas_2mm"
    c.data.source = os.path.normpath(DATA)
    c.data.files = ml_collections.ConfigDict({"open_ms_07": "open_ms/cross_sectional/patient07/T1.nii.gz",
                                              "open_ms_19": "open_ms/cross_sectional/patient19/T1.nii.gz",
                                              "colin27": "antspy/ch2.nii.gz"})
    c.data.source_labels = ""
    c.data.subjects.train = ("open_ms_07", "open_ms_19", "colin27")
    c.data.subjects.test = ()
    c.data.mode = "atlas"
    c.data.licence = ("MNI152 2009 (McConnell Brain Imaging Centre, permissive notice), open_ms (CC-BY 4.0, "
                      "Lesjak et al. 2017), Colin27 (permissive notice): may ship in the package")
    a = c.data.augment
    a.enabled = True
    a.rotation_deg, a.scaling, a.translation, a.shear = 8.0, 0.08, 4.0, 0.04
    a.deform, a.deform_spacing = 3.0, 10.0
    a.gamma, a.bias = 0.2, 0.15
    a.fixed_intensity = False
    c.loss.dice_weight = 0.0
    c.train.steps = 1500
    c.eval.methods = ()
    return c
