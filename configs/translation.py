"""Multimodal registration through a translation network (Arar et al., CVPR 2020) on 2-D MNI152 slices, T2 → T1.

R (VoxelMorph-1 U-Net, dense field) and T (U-Net, T2-like → T1) trained jointly with the translate-first and
register-first L1 reconstructions plus diffusion (``jaxreg.methods.translation``); the baselines train the same R
with NCC or MI directly across the modalities. Pairs: ``synthetic.mni_slice_pair(contrast="t2")`` (fixed T1 slice,
moving T2-like slice of the same anatomy deformed, known field), 80×96 at 2 mm; test pairs from another seed.

    python train.py    --config configs/translation.py --workdir runs/translation
    python train.py    --config configs/translation.py --workdir runs/translation_ncc --config.objective=ncc
    python train.py    --config configs/translation.py --workdir runs/translation_mi  --config.objective=mi
    python evaluate.py --config configs/translation.py --workdir runs/translation   # runs/translation/eval/

``--config.model.registration=affine`` trains the affine variant of R; ``configs/translation.py:3d`` scales to 3-D
MNI pairs (``synthetic.mni_pair(contrast="t2")``, 80×96×80 at 2 mm, GPU-sized; no known field there, so Dice only).

Expected result: see RESULTS below (filled from the measured run).
"""
import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.method = "translation"
    c.objective = "translation"  # translation | ncc | mi | lncc | nmi | ngf ... (baselines: a losses.SIMILARITIES name)
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.kind = "mni_slice"  # mni_slice (2-D, known field) | synthetic (random contrasts) | mni (3-D)
    c.data.shape = (80, 96)
    c.data.num_labels = 4  # synthetic only
    c.data.resolution = 2  # mni only (mni_slice: in options)
    c.data.seed = 0
    c.data.test_seed = 1_000_000
    c.data.options = ml_collections.ConfigDict({"contrast": "t2"})

    c.model = ml_collections.ConfigDict()
    c.model.registration = "dense"  # dense | affine
    c.model.preset = "vxm1"
    c.model.encoder = ()
    c.model.decoder = ()
    c.model.int_steps = 0
    c.model.int_downsize = 1
    c.model.affine_encoder = (16, 32, 32, 32)
    c.model.affine_hidden = 64
    c.model.translation_encoder = (16, 32, 32, 32)
    c.model.translation_decoder = (32, 32, 32, 32, 16, 16)

    c.loss = ml_collections.ConfigDict()
    c.loss.translate_first_weight = 1.0
    c.loss.register_first_weight = 1.0
    c.loss.register_first_updates_r = True  # False: the register-first path trains T only (φ under stop_gradient)
    c.loss.regularizer = "diffusion"
    c.loss.reg_weights = ml_collections.ConfigDict({"translation": 1.0, "ncc": 1.0, "mi": 1.0, "lncc": 1.0,
                                                    "nmi": 1.0, "ngf": 1.0, "mse": 0.05})
    c.loss.similarity_options = ml_collections.ConfigDict({"mi": {"bins": 32}, "lncc": {"window": 9}})

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1500
    c.train.batch_size = 4
    c.train.optimizer = "adam"
    c.train.learning_rate = 1e-3
    c.train.grad_clip = 0.0
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.prefetch = 4

    c.eval = ml_collections.ConfigDict()
    c.eval.num_pairs = 20
    c.eval.landmarks = 100  # per pair, on label boundaries of the fixed image
    c.eval.landmark_margin = 4
    c.eval.baselines = ("ncc", "mi")  # evaluated from WORKDIR_<name> (or baseline_dirs[name]) when trained
    c.eval.baseline_dirs = ml_collections.ConfigDict({"ncc": "", "mi": ""})
    c.eval.classical_preset = "multimodal"  # optimize.PRESETS key, "" to skip
    c.eval.figures = 2

    if arg in ("3d", "3D"):
        c.data.kind = "mni"
        c.data.shape = (80, 96, 80)
        c.train.batch_size = 1
        c.train.learning_rate = 1e-4
        c.train.steps = 3000
        c.train.log_every = 10
        c.train.checkpoint_every = 200
        c.eval.num_pairs = 10
    elif arg:
        raise ValueError(f"configs/translation.py: unknown argument {arg!r}; use ':3d' or nothing")
    return c
