"""Supervised registration (Cao et al., MICCAI 2017): similarity-steered patch regression on 2-D MNI152 slices.

Training pairs are 80×96 axial slices at 2 mm (``jaxreg.data.synthetic.mni_slice_pair``, T1 fixed and moving, a
known random affine + smooth deformation), pre-aligned by the classical engine's affine stage; the network regresses
the remaining (true) displacement at patch centres drawn with balanced displacement magnitudes, and predicts a whole
image in one fully convolutional pass, Gaussian-smoothed. Test pairs come from another seed. See
``jaxreg.methods.supervised`` for the pipeline and ``jaxreg.models.supervised`` for the network.

    nice -n 10 python train.py --config configs/supervised.py --workdir runs/supervised
    python evaluate.py --config configs/supervised.py --workdir runs/supervised

Measured (these defaults; 2 shared CPU cores under heavy load: training about 18 min, evaluation about 3 min;
20 held-out pairs, mean Dice over CSF/GM/WM, end-point error against the true field):

    affine 0.774, Demons (diffeomorphic) 0.942, diffeo engine 0.953, supervised 0.928 (EPE 0.49 mm against
    Demons 0.37 and diffeo 0.30); the network is below both baselines, significantly (paired t-test and Wilcoxon,
    p < 1e-4 for mean Dice). With --config.predict.iterations=2 (the network re-applied once to the warped image,
    not in the paper): 0.940, no significant difference from Demons in mean Dice (p = 0.39 t-test, 0.55 Wilcoxon),
    still below the diffeo engine (p < 1e-5).

Variants: ``--config.target=classical`` trains on the classical engine's fields (``target_preset``) instead of the
true ones; ``--config.sampling.strategy=uniform`` turns the magnitude balancing off; ``--config.data.contrast=t2``
makes the moving image T2-like (Demons, a mono-modal method, then has no meaningful force). 3-D:
``--config=configs/supervised.py:3d`` uses 3-D MNI152 pairs (``mni_pair``, 2 mm, cropped to 80×96×80), which have
no known field, so the targets are the classical diffeomorphic engine's results, and a lighter 3-D network (the
similarity map flattened into the dense layer). The 3-D code path was checked on CPU only at toy size (3-D synthetic
24³ pairs, 3 training steps, then the evaluation); the full 3-D setting is sized for a GPU and has not been run.
Real inter-subject brains (Mindboggle-101 in MNI152 space, the classical ``default`` preset's fields learned, a
CPU-sized 3-D network at ``downsize = 2``): ``configs/supervised_real.py``, with its measured table.
"""
import ml_collections


def get_config(arg: str = ""):
    """``arg``: "" for 2-D MNI slices, "3d" for 3-D MNI pairs with classical targets."""
    c = ml_collections.ConfigDict()
    c.method = "supervised"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.kind = "mni_slice"  # mni_slice (2-D, true field) | synthetic (2-D/3-D, true field) | mni (3-D; classical-engine targets)
    c.data.shape = (80, 96)
    c.data.resolution = 2  # mm (mni kinds)
    c.data.contrast = "t1"  # moving contrast (mni kinds): t1 | t2
    c.data.num_labels = 4  # synthetic kind: number of random labels
    c.data.options = ml_collections.ConfigDict()  # extra keyword options of the generator
    c.data.seed = 0
    c.data.test_seed = 1_000_000  # held-out pairs come from another seed
    c.data.train_pairs = 200

    c.prealign = "affine"  # optimize.PRESETS key whose parametric stage pre-aligns every pair; "" for none
    c.target = "true"  # true (known simulated field) | classical (the classical engine's result)
    c.target_preset = "diffeo"  # optimize.PRESETS key for target="classical" (and the eval method "classical")
    c.downsize = 1  # the network works on a grid this many times coarser (3-D CPU budget; 1: full resolution)

    c.model = ml_collections.ConfigDict()
    c.model.features = (32, 32, 32, 32, 32)  # appearance stream, VALID 3^nd convolutions
    c.model.dilations = (1, 1, 2, 4, 1)  # patch radius sum(dilations) = 9 (19×19 patches)
    c.model.radius = 4  # similarity map: offsets -4..4 per axis (9×9 map)
    c.model.window = 2  # NCC window 5×5
    c.model.sim_features = (16, 32)  # similarity stream, VALID 3^nd convolutions on the map
    c.model.sim_out = 64
    c.model.head = 64

    c.sampling = ml_collections.ConfigDict()
    c.sampling.strategy = "balanced"  # balanced | uniform
    c.sampling.bins = 8  # |u| bins (equal width up to the 99.5th percentile)
    c.sampling.mask = "labels"  # labels (fixed labels > 0, dilated) | all
    c.sampling.mask_dilation = 3

    c.train = ml_collections.ConfigDict()
    c.train.steps = 3000
    c.train.batch_size = 128  # patch pairs per step
    c.train.optimizer = "adam"
    c.train.learning_rate = 1e-3
    c.train.schedule = "cosine"  # constant | cosine (to 10 %)
    c.train.grad_clip = 1.0  # 0: off
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2

    c.predict = ml_collections.ConfigDict()
    c.predict.sigma = 1.0  # Gaussian smoothing of the predicted field (voxels); 0: off
    c.predict.iterations = 1  # 1: one pass (Cao et al.); k > 1 re-applies the net to the warped image (extension)

    c.eval = ml_collections.ConfigDict()
    c.eval.num_pairs = 20
    c.eval.methods = ("identity", "affine", "demons", "diffeo", "supervised", "supervised_raw")
    c.eval.classical_preset = "diffeo"  # the SyN stand-in (eval method "diffeo")
    c.eval.demons = ml_collections.ConfigDict({"diffeomorphic": True})  # jaxreg.demons.demons options
    c.eval.spacing = ()  # mm per axis; empty: the data's spacing
    c.eval.figures = 0  # pairs with PNG figures per method in WORKDIR/eval/figures (needs matplotlib)

    if arg == "3d":
        c.data.kind = "mni"
        c.data.shape = (80, 96, 80)
        c.data.train_pairs = 8
        c.target = "classical"
        c.model.features = (16, 32, 32, 32)
        c.model.dilations = (1, 2, 2, 1)
        c.model.radius = 2
        c.model.window = 1
        c.model.sim_features = ()  # the 5×5×5 map goes straight into the dense layer
        c.train.batch_size = 64
        c.eval.num_pairs = 5
    elif arg:
        raise ValueError(f"configs/supervised.py: unknown variant {arg!r}; use '' or '3d'")
    return c
