"""Unsupervised VoxelMorph on real inter-subject brains: Mindboggle-101 (OASIS-TRT-20 subjects 1-14, T1 with ~100
manual regions), every subject affinely aligned to nilearn's MNI152 at 2 mm (80×96×80) by jaxreg's own engine and
cached in ``data.path`` on first use (``jaxreg.atlas.prepare``); pairs in both directions between distinct subjects.

Split by subject: train 1-8 (56 ordered pairs), test 11-14 (12 pairs); 9-10 are kept for choosing settings. The
network is CPU-sized: a 3-level U-Net run at half resolution (``model.downsize = 2``, 4 mm) with a diffeomorphic
head (7 scaling-and-squaring steps), the field applied at 2 mm. Needs ``../shared/data`` (non-commercial data: a model
trained here is benchmarked, never shipped in the package) and nilearn (``pip install ".[data]"``).

    python train.py --config configs/mindboggle_vxm.py --workdir runs/mindboggle_vxm
    python evaluate.py --config configs/mindboggle_vxm.py --workdir runs/mindboggle_vxm

The semi-supervised variant (``configs/mindboggle_semisup.py``) adds a Dice term on 35 coarse structures; its
measured results are in its docstring and BENCHMARKS.md ("Learned registration on real subjects").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_2d  # noqa: E402  (the default config this variant overrides)

import ml_collections  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "mindboggle20")


def _dkt(side: int, *indices) -> list:
    return [side * 1000 + i for i in indices]


def coarse_groups() -> dict:
    """35 structures from Mindboggle's DKT31 cortical (1002-2035) and CMA/FreeSurfer subcortical labels: six
    cortical lobes per hemisphere, ten subcortical structures per side, three midline ones (the scale of Learn2Reg's
    OASIS task). Values in no group (vessels, optic chiasm, basal forebrain, CSF) count as background."""
    groups = {}
    lobes = {"frontal": (3, 12, 14, 17, 18, 19, 20, 24, 27, 28), "parietal": (8, 22, 25, 29, 31),
             "temporal": (6, 7, 9, 15, 16, 30, 34), "occipital": (5, 11, 13, 21), "cingulate": (2, 10, 23, 26),
             "insula": (35,)}
    for side, name in ((1, "left"), (2, "right")):
        for lobe, idx in lobes.items():
            groups[f"{name}_{lobe}"] = _dkt(side, *idx)
    sub = {"ventricle": ((4, 5), (43, 44)), "cerebellum": ((6, 7, 8), (45, 46, 47)), "thalamus": ((10,), (49,)),
           "caudate": ((11,), (50,)), "putamen": ((12,), (51,)), "pallidum": ((13,), (52,)),
           "hippocampus": ((17,), (53,)), "amygdala": ((18,), (54,)), "accumbens": ((26,), (58,)),
           "ventral_dc": ((28,), (60,))}
    for struct, (left, right) in sub.items():
        groups[f"left_{struct}"], groups[f"right_{struct}"] = list(left), list(right)
    groups["ventricles_3_4_5"] = [14, 15, 72]
    groups["brainstem"] = [16]
    groups["vermis"] = [630, 631, 632]
    return groups


def get_config():
    c = synthetic_2d.get_config()
    c.description = ("pairwise brain registration (T1, skull-stripped) through MNI152 at 2 mm; Mindboggle "
                     "subjects 1-8; benchmark only (CC BY-NC-SA)")
    c.data.kind = "subjects"
    c.data.path = "runs/learning_sets/mindboggle_mni_2mm"  # the cached learning set (built on first use)
    c.data.source = os.path.normpath(DATA)
    c.data.source_image = "t1_{}.nii.gz"
    c.data.source_labels = "labels_{}.nii.gz"
    c.data.subjects = ml_collections.ConfigDict({"train": tuple(str(i) for i in range(1, 9)),
                                                 "test": tuple(str(i) for i in range(11, 15))})
    c.data.template = "mni"  # nilearn's MNI152 2009 on data.shape at data.resolution mm, or a NIfTI path
    c.data.resolution = 2
    c.data.shape = (80, 96, 80)
    c.data.align_preset = "affine"
    c.data.licence = "trained on Mindboggle-101 (CC BY-NC-SA 3.0): non-commercial, benchmark only, never in the package"
    c.data.label_groups = None  # {name: [values]}: classes of the Dice training term (semi-supervised)
    c.data.slice_index = None  # an axial slice index: 2-D pairs of matched slices (configs/mindboggle_2d.py)
    c.data.num_labels = 0
    c.data.synthetic = None

    c.model.encoder = (16, 32, 32)
    c.model.decoder = (32, 32, 32, 16, 16)
    c.model.downsize = 2
    c.model.int_steps = 7

    c.loss.similarity_options.window = 7
    c.loss.reg_weight = 1.0

    c.train.steps = 3000
    c.train.batch_size = 1
    c.train.learning_rate = 5e-4
    c.train.schedule = "cosine"
    c.train.grad_clip = 1.0
    c.train.log_every = 25
    c.train.checkpoint_every = 250
    c.train.prefetch = 2

    c.eval.num_pairs = 12
    c.eval.instance_iterations = 20
    c.eval.methods = ("network", "network+io", "affine", "classical")
    c.eval.figures = 1
    c.eval.spacing = (2.0, 2.0, 2.0)
    return c
