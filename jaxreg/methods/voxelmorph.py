"""VoxelMorph: a U-Net predicts the field of a pair in one pass (Balakrishnan et al., 2019), unsupervised or
semi-supervised.

Batches are dicts of arrays with a leading batch axis ``B``: ``moving``, ``fixed`` ``(B, *S)`` float32 and, for
semi-supervised training, ``moving_labels``, ``fixed_labels`` ``(B, *S)`` int32 in ``[0, num_labels)`` (class
indices: a dataset read from files numbers the label values present ``0 .. K-1``, ``datasets.VolumePairs``).

Loss per example (averaged over the batch), VoxelMorph's unsupervised objective plus an optional Dice term:
``L = sim(fixed, warped) + reg_weight * reg(velocity) + dice_weight * dice_loss(onehot(fixed_labels)[1:],
warped_onehot(moving_labels)[1:])`` with ``sim`` from ``losses.SIMILARITIES`` (lower is better) and ``reg`` from
``losses.REGULARIZERS``, applied to the network's velocity (the displacement itself when not diffeomorphic).
Background (label 0) is left out of the Dice term. With ``config.data.augment.enabled`` the batch is first
replaced by ``augment.augment_batch(key, batch, ...)`` inside the jitted step (the step's key), so the host loader
is unchanged and a resumed run sees the same augmented batches.

Held-out evaluation (``evaluation``; run by ``evaluate.py``): for each test pair (``config.data`` with
``split="test"``) and each name in ``config.eval.methods`` (``METHODS``):

* ``identity``: no registration (reference);
* ``network``: one forward pass of the trained network (latest checkpoint in ``WORKDIR/checkpoints``);
* ``network+io``: instance optimisation, ``optimize.register(..., initial_disp=<network field>)`` with the classical
  preset's metric, one full-resolution level of ``eval.instance_iterations`` iterations, no affine stage;
* ``affine``: the classical engine's affine stage only (``optimize.PRESETS[eval.affine_preset]``);
* ``classical``: the classical engine (``optimize.PRESETS[eval.classical_preset]``).

Measures: Dice per label (1..K-1) and their mean, HD95 and ASSD (mm), % folding voxels, SD of log |J|, seconds.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxreg import losses, optimize, training
from jaxreg.data import augment as augment_lib
from jaxreg.methods import Evaluation

METHODS = ("identity", "network", "network+io", "affine", "classical")
#: the terms of a log row (metrics.jsonl), between ``step`` and ``steps_per_s``
LOG_COLUMNS = ("loss", "similarity", "regularizer", "dice", "grad_norm")
COLUMNS = (("dice_mean", "Dice", 3), ("hd95_mean", "HD95 (mm)", 3), ("assd_mean", "ASSD (mm)", 3),
           ("folding_pct", "% folding", 3), ("sdlogj", "SDlogJ", 3), ("seconds", "s / pair", 4))


@dataclasses.dataclass(frozen=True)
class Loss:
    """The VoxelMorph loss as a hashable callable ``loss(params, batch, key) -> (value, terms)`` (module
    docstring); ``terms``: ``similarity``, ``regularizer``, ``dice`` (batch means)."""

    model: object
    similarity: str = "lncc"
    similarity_options: tuple = ()
    regularizer: str | None = "diffusion"
    reg_weight: float = 1.0
    dice_weight: float = 0.0
    num_labels: int = 0
    augment: augment_lib.AugmentConfig | None = None

    def __post_init__(self):
        if self.similarity not in losses.SIMILARITIES:
            raise ValueError(f"loss.similarity must be one of {sorted(losses.SIMILARITIES)}, got {self.similarity!r}")
        if self.regularizer is not None and self.regularizer not in losses.REGULARIZERS:
            raise ValueError(f"loss.regularizer must be one of {sorted(losses.REGULARIZERS)} or None, got "
                             f"{self.regularizer!r}")
        if self.dice_weight > 0 and self.num_labels < 2:
            raise ValueError(f"loss.dice_weight > 0 needs label maps with num_labels >= 2, got {self.num_labels}")
        from jaxreg.data.datasets import MAX_LABELS

        if self.dice_weight > 0 and self.num_labels > MAX_LABELS:
            raise ValueError(f"loss.dice_weight > 0 one-hot encodes {self.num_labels} label classes, more than "
                             f"{MAX_LABELS} (datasets.MAX_LABELS)")
        if self.augment is not None and not isinstance(self.augment, augment_lib.AugmentConfig):
            raise TypeError(f"augment must be a jaxreg.data.augment.AugmentConfig or None, got {type(self.augment)}")

    def example(self, params, moving, fixed, moving_labels, fixed_labels) -> dict:
        """The terms of one unbatched pair (``(*S)`` images and label maps)."""
        use_dice = self.dice_weight > 0
        onehot = jax.nn.one_hot(moving_labels, self.num_labels, dtype=moving.dtype) if use_dice else None
        out = self.model.apply(params, moving, fixed, onehot)
        sim = losses.SIMILARITIES[self.similarity](fixed, out["warped"], **dict(self.similarity_options))
        zero = jnp.zeros((), moving.dtype)
        reg = losses.REGULARIZERS[self.regularizer](out["velocity"]) if self.regularizer else zero
        dice = zero
        if use_dice:
            target = jax.nn.one_hot(fixed_labels, self.num_labels, dtype=moving.dtype)
            dice = losses.dice_loss(target[..., 1:], out["warped_labels"][..., 1:])
        return {"similarity": sim, "regularizer": reg, "dice": dice}

    def augmented(self, batch, key):
        """The batch the loss is computed on: ``batch`` augmented with ``key`` (as is without ``augment``). Label
        maps are dropped first when there is no Dice term, which skips their warps."""
        if self.augment is None:
            return batch
        if self.dice_weight <= 0:
            batch = {k: v for k, v in batch.items() if k in ("moving", "fixed")}
        return augment_lib.augment_batch(key, batch, **self.augment.options())

    def __call__(self, params, batch, key):
        batch = self.augmented(batch, key)
        zeros = jnp.zeros(batch["moving"].shape, jnp.int32)
        use_dice = self.dice_weight > 0
        ml = batch.get("moving_labels", zeros) if use_dice else zeros
        fl = batch.get("fixed_labels", zeros) if use_dice else zeros
        per_pair = jax.vmap(lambda m, f, a, b: self.example(params, m, f, a, b))(batch["moving"], batch["fixed"], ml, fl)
        terms = {k: jnp.mean(v) for k, v in per_pair.items()}
        value = terms["similarity"] + self.reg_weight * terms["regularizer"] + self.dice_weight * terms["dice"]
        return value, terms


def build_model(config, ndim: int):
    """The ``RegistrationNet`` of ``config.model`` for ``ndim``-D images."""
    from jaxreg import models

    return models.build(ndim=ndim, **config.model)


def make_loss(config, dataset) -> Loss:
    """The ``Loss`` of a config for ``dataset`` (its dimension and number of labels). Raises ``ValueError``
    before anything is compiled when ``data.fixed_as_moving`` is set without a spatial augmentation."""
    c = config.loss
    augment = augment_lib.from_config(config.data.augment, num_labels=dataset.num_labels)
    if config.data.fixed_as_moving and (augment is None or not augment.spatial):
        raise ValueError("data.fixed_as_moving trains on moving = fixed: it needs data.augment.enabled with a "
                         "non-zero spatial magnitude (rotation_deg, scaling, translation, shear or deform) to make "
                         "the moving image")
    return Loss(model=build_model(config, len(dataset.shape)), similarity=c.similarity,
                similarity_options=tuple(sorted(dict(c.similarity_options).items())),
                regularizer=c.regularizer or None, reg_weight=float(c.reg_weight), dice_weight=float(c.dice_weight),
                num_labels=int(dataset.num_labels or 0), augment=augment)


def fit(config, workdir, *, stop_at: int | None = None, progress: bool = True):
    """Train the network of ``config`` in ``workdir``; resume from its checkpoints (``training.fit``).

    Writes ``workdir/config.json``, ``workdir/checkpoints/`` and ``workdir/metrics.jsonl`` (``LOG_COLUMNS``). The
    dataset is built and checked before anything is compiled. With ``data.fixed_as_moving`` on a dataset whose
    fixed image never changes, one batch is placed on the devices for the whole run (no loader).
    """
    from jaxreg.data import datasets

    dataset = datasets.from_config(config.data, split="train")  # validates files before any compilation
    loss = make_loss(config, dataset)
    t = config.train

    def batches(start, stop):
        if getattr(dataset, "constant", False):  # every batch is the same (FixedAsMoving): place it once
            batch = training.shard_batch(datasets.make_batch(dataset, 0, t.batch_size), training.make_mesh())
            for _ in range(start, stop):
                yield batch
            return
        loader = datasets.Loader(dataset, batch_size=t.batch_size, start=start, stop=stop, prefetch=t.prefetch)
        try:
            for _, batch in loader:
                yield batch
        finally:
            loader.close()

    return training.fit(workdir, model=loss.model, loss=loss, train=t, shape=dataset.shape, batches=batches,
                        key=jax.random.key(config.seed), columns=LOG_COLUMNS, config=config, stop_at=stop_at,
                        progress=progress)


def load(config, workdir, shape, *, step: int | None = None):
    """``(model, params, step)`` of the trained network in ``workdir`` for images of spatial ``shape``."""
    model = build_model(config, len(shape))
    params, step = training.load_params(workdir, model=model, shape=shape, step=step)
    return model, params, step


def make_predict(model):
    """Jitted ``predict(params, moving, fixed) -> {"disp", "velocity", "warped"}`` for one unbatched pair."""
    return jax.jit(lambda params, moving, fixed: model.apply(params, moving, fixed))


def evaluation(config, workdir) -> Evaluation:
    """The held-out evaluation of ``config`` (module docstring) for ``jaxreg.evaluation.evaluate``."""
    from jaxreg.data import datasets

    e = config.eval
    names = tuple(e.methods)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"config.eval.methods: unknown {unknown}; choose from {METHODS}")
    names = ("identity",) + tuple(m for m in names if m != "identity")
    dataset = datasets.from_config(config.data, split="test")
    if not dataset.num_labels:
        raise ValueError("evaluation needs label maps (Dice, HD95, ASSD): the test data have none")
    info = {}
    run = {"identity": lambda p: {"disp": jnp.zeros(p["fixed"].shape + (p["fixed"].ndim,), jnp.float32)}}
    if any(m.startswith("network") for m in names):
        model, params, info["checkpoint_step"] = load(config, workdir, dataset.shape)
        predict = make_predict(model)
        instance = optimize.instance_options(int(e.instance_iterations), e.classical_preset)
        run["network"] = lambda p: {"disp": predict(params, p["moving"], p["fixed"])["disp"]}
        run["network+io"] = lambda p: {"disp": optimize.register(
            p["fixed"], p["moving"], options=instance,
            initial_disp=predict(params, p["moving"], p["fixed"])["disp"]).disp}
    for name, preset in (("affine", e.affine_preset), ("classical", e.classical_preset)):
        run[name] = lambda p, preset=preset: {"disp": optimize.register(
            p["fixed"], p["moving"], options=optimize.PRESETS[preset]).disp}

    def pair(i):
        p = dataset.pair(i)
        return {**p, "fixed": jnp.asarray(p["fixed"]), "moving": jnp.asarray(p["moving"]),
                "spacing": tuple(e.spacing) or tuple(p.get("spacing", (1.0,) * len(dataset.shape)))}

    return Evaluation(pairs=pair, num_pairs=min(int(e.num_pairs), len(dataset)),
                      methods={n: run[n] for n in names},
                      measures=("dice", "hd95", "assd", "jacobian"),
                      label_names=_label_names(dataset), columns=COLUMNS, info=info)


def _label_names(dataset) -> dict:
    """``{class: name}`` of the scored classes ``1 .. K-1``: the label values in the files when the dataset numbered
    them (``label_values``), else the class numbers."""
    values = getattr(dataset, "label_values", None)
    return {k: str(int(values[k]) if values is not None else k) for k in range(1, dataset.num_labels)}
