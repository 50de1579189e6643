"""Training of registration networks: state, loss, a pure jitted step, data parallelism, checkpoints, the loop.

Batches are dicts of arrays with a leading batch axis ``B``: ``moving``, ``fixed`` ``(B, *S)`` float32 and, for
semi-supervised training, ``moving_labels``, ``fixed_labels`` ``(B, *S)`` int32 in ``[0, num_labels)``.

Loss per example (averaged over the batch), VoxelMorph's unsupervised objective plus an optional Dice term:
``L = sim(fixed, warped) + reg_weight * reg(velocity) + dice_weight * dice_loss(onehot(fixed_labels)[1:],
warped_onehot(moving_labels)[1:])`` with ``sim`` from ``losses.SIMILARITIES`` (lower is better) and ``reg`` from
``losses.REGULARIZERS``, applied to the network's velocity (the displacement itself when not diffeomorphic).
Background (label 0) is left out of the Dice term.

``make_train_step(model, tx, loss, augment=None)`` returns a pure ``train_step(state, batch, key) -> (state,
metrics)``, jit-compiled with ``state`` donated. With ``augment`` (a ``data.augment.AugmentConfig``) the step first
replaces the batch by ``augment.augment_batch(key, batch, **augment.options())`` on the device, so the host loader is
unchanged and a resumed run (same key per step) sees the same augmented batches. A step whose loss or gradient is not finite leaves the state unchanged and
reports ``finite = False``; ``check_finite`` turns that into an error naming the step and the term.

Data parallelism: ``make_mesh()`` builds a 1-D ``Mesh`` over every device (axis ``"data"``); ``replicate`` places
the state on all of them, ``shard_batch`` splits the batch axis. The jitted step then runs SPMD and XLA inserts
the gradient all-reduce. For several hosts call ``jax.distributed.initialize()`` first (see README) and give every
process its own slice of the global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxreg import losses
from jaxreg.data import augment as augment_lib
from jaxreg.models.registration import FLOW_INIT_STD


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step changes: ``step`` (int32 scalar), ``params`` and the optimiser state."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss options (hashable). ``similarity_options`` is a tuple of ``(name, value)`` pairs."""

    similarity: str = "lncc"
    similarity_options: tuple = ()
    regularizer: str | None = "diffusion"
    reg_weight: float = 1.0
    dice_weight: float = 0.0
    num_labels: int = 0

    def __post_init__(self):
        if self.similarity not in losses.SIMILARITIES:
            raise ValueError(f"similarity must be one of {sorted(losses.SIMILARITIES)}, got {self.similarity!r}")
        if self.regularizer is not None and self.regularizer not in losses.REGULARIZERS:
            raise ValueError(f"regularizer must be one of {sorted(losses.REGULARIZERS)} or None, got {self.regularizer!r}")
        if self.dice_weight > 0 and self.num_labels < 2:
            raise ValueError(f"dice_weight > 0 needs num_labels >= 2, got {self.num_labels}")


# ------------------------------------------------------------------------------------------------ state and loss
def init_params(model, key, shape):
    """Parameters of ``model`` for images of spatial ``shape``, initialised on the host with NumPy.

    Same scheme as the modules declare (LeCun normal kernels, zero biases, flow head ~ Normal(0, FLOW_INIT_STD),
    ``AffineNet``'s zero affine head, so an untrained affine network gives the identity),
    drawn with NumPy from ``key``'s data: XLA:CPU compiles every JAX random call site separately, which made
    ``model.init`` take 10-15 s for a small U-Net on 2 cores. Deterministic given ``key``.
    """
    x = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, x)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel().tolist())

    def leaf(path, s):
        names = [getattr(p, "key", str(p)) for p in path]
        if names[-1] == "bias" or "affine_head" in names:
            return jnp.zeros(s.shape, s.dtype)
        if "flow" in names:
            return jnp.asarray(FLOW_INIT_STD * rng.standard_normal(s.shape), s.dtype)
        fan_in = int(np.prod(s.shape[:-1]))
        w = rng.standard_normal(s.shape)
        while np.any(np.abs(w) > 2):  # truncated normal as flax's lecun_normal
            bad = np.abs(w) > 2
            w[bad] = rng.standard_normal(int(bad.sum()))
        return jnp.asarray(w * math.sqrt(1.0 / fan_in) / 0.87962566, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def make_optimizer(name: str = "adam", learning_rate: float = 1e-4, *, grad_clip: float | None = None):
    """An optax optimiser by name (``"adam"``, ``"adamw"``, ``"sgd"``), optionally with global-norm clipping."""
    makers = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}
    if name not in makers:
        raise ValueError(f"optimizer must be one of {sorted(makers)}, got {name!r}")
    tx = makers[name](learning_rate)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx


def create_state(model, tx, key, shape) -> TrainState:
    """A fresh ``TrainState`` (step 0) for images of spatial ``shape``."""
    params = init_params(model, key, shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_terms(params, model, batch, loss: LossConfig):
    """Batch-mean loss and its terms ``{"similarity", "regularizer", "dice", "loss"}`` (scalars)."""
    sim = losses.SIMILARITIES[loss.similarity]
    sim_options = dict(loss.similarity_options)
    use_dice = loss.dice_weight > 0

    def one(moving, fixed, moving_labels, fixed_labels):
        onehot = jax.nn.one_hot(moving_labels, loss.num_labels, dtype=moving.dtype) if use_dice else None
        out = model.apply(params, moving, fixed, onehot)
        terms = {"similarity": sim(fixed, out["warped"], **sim_options)}
        terms["regularizer"] = (losses.REGULARIZERS[loss.regularizer](out["velocity"]) if loss.regularizer
                                else jnp.zeros((), moving.dtype))
        if use_dice:
            target = jax.nn.one_hot(fixed_labels, loss.num_labels, dtype=moving.dtype)
            terms["dice"] = losses.dice_loss(target[..., 1:], out["warped_labels"][..., 1:])
        else:
            terms["dice"] = jnp.zeros((), moving.dtype)
        return terms

    zeros = jnp.zeros(batch["moving"].shape, jnp.int32)
    ml = batch.get("moving_labels", zeros) if use_dice else zeros
    fl = batch.get("fixed_labels", zeros) if use_dice else zeros
    terms = {k: jnp.mean(v) for k, v in jax.vmap(one)(batch["moving"], batch["fixed"], ml, fl).items()}
    terms["loss"] = terms["similarity"] + loss.reg_weight * terms["regularizer"] + loss.dice_weight * terms["dice"]
    return terms["loss"], terms


def augment_step_batch(batch, key, augment: augment_lib.AugmentConfig | None, loss: LossConfig):
    """The batch a train step computes its loss on: ``batch`` augmented with ``key`` (or as is when ``augment`` is
    None). Label maps are dropped first when the loss does not use them (no Dice term), which skips their warps."""
    if augment is None:
        return batch
    if loss.dice_weight <= 0:
        batch = {k: v for k, v in batch.items() if k in ("moving", "fixed")}
    return augment_lib.augment_batch(key, batch, **augment.options())


def make_train_step(model, tx, loss: LossConfig, augment: augment_lib.AugmentConfig | None = None):
    """``train_step(state, batch, key) -> (state, metrics)``, jit-compiled, ``state`` donated.

    ``metrics``: the loss terms, ``grad_norm`` (global L2 norm) and ``finite`` (bool). A non-finite loss or
    gradient leaves params and optimiser state as they were (so the last good state can be saved). ``key`` (the
    loop folds the step number into it) drives the on-device augmentation when ``augment`` is given: the loss is
    computed on ``augment_step_batch(batch, key, augment, loss)``; without ``augment`` it is unused.
    """
    if loss.dice_weight > 0 and loss.num_labels < 2:
        raise ValueError("semi-supervised training needs num_labels >= 2")
    if augment is not None and not isinstance(augment, augment_lib.AugmentConfig):
        raise TypeError(f"augment must be a jaxreg.data.augment.AugmentConfig or None, got {type(augment)}")

    def train_step(state: TrainState, batch, key):
        batch = augment_step_batch(batch, key, augment, loss)
        (value, terms), grads = jax.value_and_grad(loss_terms, has_aux=True)(state.params, model, batch, loss)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)
        new = TrainState(step=state.step + 1, params=jax.tree_util.tree_map(keep, params, state.params),
                         opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state))
        return new, {**terms, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(train_step, donate_argnums=0)


def check_finite(metrics, step: int) -> None:
    """Raise ``FloatingPointError`` naming ``step`` and the first non-finite term of a step's ``metrics``.

    ``metrics`` holds a boolean ``finite`` and scalar terms; they are checked in order (the registration loss's
    ``similarity``, ``regularizer``, ``dice`` first when present, then any other term, then ``loss`` and
    ``grad_norm``), so other methods' train steps can use it with their own term names.
    """
    if bool(metrics["finite"]):
        return
    first, last = ("similarity", "regularizer", "dice"), ("loss", "grad_norm")
    names = [n for n in first if n in metrics]
    names += [n for n in metrics if n not in first + last + ("finite",) and jnp.ndim(metrics[n]) == 0]
    names += [n for n in last if n in metrics]
    for name in names:
        value = float(metrics[name])
        if not math.isfinite(value):
            what = "gradient (global norm)" if name == "grad_norm" else f"{name} term"
            raise FloatingPointError(f"training stopped: non-finite {what} ({value}) at step {step}; the state was "
                                     f"left at step {step - 1}. Check the data for NaN/constant images, lower the "
                                     f"learning rate or set train.grad_clip")
    raise FloatingPointError(f"training stopped: non-finite loss or gradient at step {step}")


def make_predict(model):
    """Jitted ``predict(params, moving, fixed) -> {"disp", "velocity", "warped"}`` for one unbatched pair."""
    return jax.jit(lambda params, moving, fixed: model.apply(params, moving, fixed))


# ------------------------------------------------------------------------------------------------ data parallel
def make_mesh(devices=None) -> Mesh:
    """A 1-D device mesh with axis ``"data"`` over ``devices`` (default: every device JAX sees)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def replicate(tree, mesh: Mesh):
    """Place every array of ``tree`` on all devices of ``mesh`` (``PartitionSpec()``: replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch, mesh: Mesh):
    """Split the leading batch axis of every array of ``batch`` across the ``"data"`` axis of ``mesh``."""
    n = mesh.shape["data"]
    for name, x in batch.items():
        if np.shape(x)[0] % n:
            raise ValueError(f"batch size {np.shape(x)[0]} of {name!r} must be divisible by the {n} devices of the "
                             f"mesh")
    return jax.device_put(batch, NamedSharding(mesh, P("data")))


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_manager(directory, *, save_every: int = 1000, keep: int = 3):
    """An orbax ``CheckpointManager`` in ``directory`` saving every ``save_every`` steps, keeping ``keep``."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def save_checkpoint(manager, state: TrainState, *, force: bool = False) -> bool:
    """Save ``state`` at its step (if the interval says so, or ``force``); returns whether it saved."""
    import orbax.checkpoint as ocp

    step = int(state.step)
    if step in manager.all_steps():
        return False
    saved = manager.save(step, args=ocp.args.StandardSave(state), force=force)
    manager.wait_until_finished()
    return bool(saved)


def restore_checkpoint(manager, template: TrainState, step: int | None = None) -> TrainState | None:
    """Restore the latest (or ``step``'s) state shaped and placed like ``template``; None if there is none."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


# ------------------------------------------------------------------------------------------------ the loop
def run_loop(state, step_fn, *, start: int, stop: int, total: int, manager, log_path, columns, log_every: int,
             checkpoint_every: int, progress: bool = True, desc: str = "train", postfix=("loss",)):
    """Run steps ``start <= step < stop`` as ``state, metrics = step_fn(state, step)``; the loop of every ``fit``.

    After a step (``done = step + 1`` steps done; ``state.step == done``):

    - every ``log_every`` steps and at ``stop``, a row ``{"step": done, <each name in columns>: float,
      "steps_per_s": float}`` is appended to ``log_path`` (JSON lines) and the ``postfix`` terms shown on a tqdm bar
      of ``total`` steps (when ``progress``);
    - every ``checkpoint_every`` steps and at ``stop``, ``state`` is saved to ``manager`` (orbax, forced);
    - ``check_finite(metrics, done)`` raises ``FloatingPointError`` on a non-finite step. The host reads a step's
      ``finite`` flag only after dispatching the next step (at once at log and checkpoint steps), so it does not
      wait on the device between steps, and a non-finite step stops the run before any later state is saved.

    ``metrics`` must hold ``finite`` and the ``columns`` terms. Closes ``manager`` and the bar, also on error.
    Returns the final state.
    """
    bar = None
    if progress and start < stop:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=desc, unit="step", leave=False)
    tick, since = time.perf_counter(), start
    pending = None  # (metrics, done) of the last step, checked once the next one has been dispatched
    try:
        with open(log_path, "a") as log:
            for step in range(start, stop):
                state, metrics = step_fn(state, step)
                if pending is not None:
                    check_finite(*pending)
                done = step + 1
                pending = (metrics, done)
                if done % log_every == 0 or done == stop:
                    check_finite(metrics, done)
                    now = time.perf_counter()
                    row = {"step": done, **{n: float(metrics[n]) for n in columns},
                           "steps_per_s": (done - since) / max(now - tick, 1e-9)}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    tick, since = now, done
                    if bar is not None:
                        bar.set_postfix({n: f"{row[n]:.4f}" for n in postfix})
                if bar is not None:
                    bar.update(1)
                if done % checkpoint_every == 0 or done == stop:
                    check_finite(metrics, done)
                    save_checkpoint(manager, state, force=True)
            if pending is not None:
                check_finite(*pending)
    finally:
        if bar is not None:
            bar.close()
        manager.close()
    return state


# the terms of a ``fit`` log row (metrics.jsonl), between ``step`` and ``steps_per_s``
LOG_COLUMNS = ("loss", "similarity", "regularizer", "dice", "grad_norm")


def fit(config, workdir, *, stop_at: int | None = None, progress: bool = True):
    """Train the network described by an ml_collections ``config`` in ``workdir``; resume from its checkpoints.

    Writes ``workdir/config.json``, ``workdir/checkpoints/<step>/`` (orbax) and ``workdir/metrics.jsonl`` (one row
    per ``train.log_every`` steps: loss terms, grad_norm, steps_per_s). The dataset is built and checked before
    anything is compiled. ``stop_at`` ends the run early after that step (saving a checkpoint), as a kill would.
    ``config.data.augment`` (optional; ``jaxreg.data.augment.default_config()``) with ``enabled`` augments every
    batch inside the jitted step with the step's key; with ``config.data.fixed_as_moving`` on a dataset whose fixed
    image never changes, one batch is placed on the devices for the whole run (no loader). The loop is
    ``run_loop``: a non-finite step raises ``FloatingPointError`` naming it before any later state is saved.
    Returns the final ``TrainState``.
    """
    from jaxreg.data import datasets

    dataset = datasets.from_config(config.data, split="train")  # validates files before any compilation
    model, tx, step_fn = step_for_config(config, dataset)
    t = config.train
    mesh = make_mesh()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))

    key = jax.random.key(config.seed)
    state = replicate(create_state(model, tx, jax.random.fold_in(key, 0), dataset.shape), mesh)
    manager = checkpoint_manager(os.path.join(workdir, "checkpoints"), save_every=t.checkpoint_every,
                                 keep=t.get("keep_checkpoints", 3))
    restored = restore_checkpoint(manager, state)
    if restored is not None:
        state = restored
    start = int(state.step)
    last = t.steps if stop_at is None else min(stop_at, t.steps)
    step_key = jax.random.fold_in(key, 1)
    loader = None
    if getattr(dataset, "constant", False):  # every batch is the same (FixedAsMoving): place it once
        device_batch = shard_batch(datasets.make_batch(dataset, 0, t.batch_size), mesh)
        next_batch = lambda: device_batch
    else:
        loader = datasets.Loader(dataset, batch_size=t.batch_size, seed=config.seed, start=start, stop=last,
                                 prefetch=t.get("prefetch", 2))
        batches = iter(loader)  # yields (step, batch) for start <= step < last, in order
        next_batch = lambda: shard_batch(next(batches)[1], mesh)
    try:
        return run_loop(state, lambda s, step: step_fn(s, next_batch(), jax.random.fold_in(step_key, step)),
                        start=start, stop=last, total=t.steps, manager=manager,
                        log_path=os.path.join(workdir, "metrics.jsonl"), columns=LOG_COLUMNS,
                        log_every=t.log_every, checkpoint_every=t.checkpoint_every, progress=progress)
    finally:
        if loader is not None:
            loader.close()


@functools.lru_cache(maxsize=8)
def _cached_step(model, optimizer: str, learning_rate: float, grad_clip: float, loss: LossConfig,
                 augment: augment_lib.AugmentConfig | None = None):
    """``(tx, train_step)`` shared by runs with equal settings, so their compiled steps are reused in-process."""
    tx = make_optimizer(optimizer, learning_rate, grad_clip=grad_clip or None)
    return tx, make_train_step(model, tx, loss, augment)


def step_for_config(config, dataset):
    """``(model, tx, train_step)`` of a config for ``dataset`` (its shape and number of labels), as ``fit`` uses.

    Steps are cached per settings (model, optimiser, loss, augmentation), so calls with equal settings share one
    compiled step in a process. Raises ``ValueError`` before anything is compiled when ``data.fixed_as_moving`` is
    set without a spatial augmentation (every pair would be the identity).
    """
    from jaxreg import models

    model = models.build(ndim=len(dataset.shape), **config.model)
    loss = loss_config(config, dataset)
    augment = augment_config(config, dataset)
    if config.data.get("fixed_as_moving", False) and (augment is None or not augment.spatial):
        raise ValueError("data.fixed_as_moving trains on moving = fixed: it needs data.augment.enabled with a "
                         "non-zero spatial magnitude (rotation_deg, scaling, translation, shear or deform) to make "
                         "the moving image")
    t = config.train
    tx, step_fn = _cached_step(model, t.optimizer, float(t.learning_rate), float(t.get("grad_clip") or 0.0), loss,
                               augment)
    return model, tx, step_fn


def augment_config(config, dataset) -> augment_lib.AugmentConfig | None:
    """The ``AugmentConfig`` of ``config.data.augment`` (None when absent or not enabled); ``num_labels`` from
    the dataset (for one-hot label warping)."""
    return augment_lib.from_config(config.data.get("augment"), num_labels=dataset.num_labels)


def loss_config(config, dataset) -> LossConfig:
    """The ``LossConfig`` of a config's ``loss`` block (``num_labels`` from the dataset)."""
    c = config.loss
    options = tuple(sorted(dict(c.get("similarity_options") or {}).items()))
    return LossConfig(similarity=c.similarity, similarity_options=options, regularizer=c.regularizer,
                      reg_weight=float(c.reg_weight), dice_weight=float(c.get("dice_weight", 0.0)),
                      num_labels=int(dataset.num_labels or 0))


def load_trained(config, workdir, shape, *, step: int | None = None):
    """``(model, params, step)`` restored from ``workdir/checkpoints`` for images of spatial ``shape``."""
    from jaxreg import models

    model = models.build(ndim=len(shape), **config.model)
    tx = make_optimizer(config.train.optimizer, config.train.learning_rate, grad_clip=config.train.get("grad_clip"))
    template = create_state(model, tx, jax.random.key(0), shape)
    manager = checkpoint_manager(os.path.join(workdir, "checkpoints"))
    try:
        state = restore_checkpoint(manager, template, step)
    finally:
        manager.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: run train.py first")
    return model, state.params, int(state.step)
