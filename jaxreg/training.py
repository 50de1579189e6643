"""Generic training of any Flax model: state, optimiser, one train step, data parallelism, checkpoints, the loop.

Nothing here knows a model or a method: a method (``jaxreg.methods``) supplies a model, a loss and batches.

* ``loss(params, batch, key) -> (value, terms)``: a scalar loss and a dict of scalar terms to log, for one batch (a
  pytree of arrays, usually with a leading batch axis ``B``); ``key`` is the step's PRNG key (augmentation, patch
  sampling; unused by deterministic losses). The loss must be hashable (a frozen dataclass, a module-level
  function or a ``functools.partial`` kept alive) so that runs with equal settings share one compiled step.
* ``make_train_step(loss, tx)`` returns the pure ``train_step(state, batch, key) -> (state, metrics)``, jit-compiled
  with ``state`` donated: one optax update with a non-finite guard (a step whose loss or gradient is not finite
  leaves params and optimiser state as they were and reports ``finite = False``); ``check_finite`` turns that into
  an error naming the step and the term.
* ``fit(directory, ...)`` runs it: a fresh or restored ``TrainState``, replicated over every device (a 1-D
  ``Mesh``, axis ``"data"``; each batch split along its leading axis, or replicated), the steps through
  ``run_loop`` (JSON-lines log, tqdm, orbax checkpoints, resume).
* ``load_params(directory, model=..., shape=...)`` restores the parameters of a trained model for inference.

Data parallelism: ``make_mesh()`` builds a 1-D ``Mesh`` over every device (axis ``"data"``); ``replicate`` places
the state on all of them, ``shard_batch`` splits the batch axis. The jitted step then runs SPMD and XLA inserts
the gradient all-reduce. For several hosts call ``jax.distributed.initialize()`` first (see README) and give every
process its own slice of the global batch.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxreg.models.registration import FLOW_INIT_STD


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step changes: ``step`` (int32 scalar), ``params`` and the optimiser state."""

    step: jax.Array
    params: Any
    opt_state: Any


# ------------------------------------------------------------------------------------------------ state and step
def init_params(model, key, shape):
    """Parameters of ``model`` for images of spatial ``shape``, initialised on the host with NumPy.

    Same scheme as the modules declare (LeCun normal kernels, zero biases, flow head ~ Normal(0, FLOW_INIT_STD),
    ``AffineNet``'s zero affine head, so an untrained affine network gives the identity),
    drawn with NumPy from ``key``'s data: XLA:CPU compiles every JAX random call site separately, which made
    ``model.init`` take 10-15 s for a small U-Net on 2 cores. Deterministic given ``key``.
    """
    abstract = init_shapes(model, shape)
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


OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}
SCHEDULES = ("constant", "cosine")


@functools.lru_cache(maxsize=32)
def make_optimizer(name: str = "adam", learning_rate: float = 1e-4, *, grad_clip: float = 0.0,
                   schedule: str = "constant", steps: int = 1) -> optax.GradientTransformation:
    """An optax optimiser by name (``OPTIMIZERS``), optionally with global-norm clipping (``grad_clip > 0``).

    ``schedule``: ``"constant"`` or ``"cosine"`` (decay to 10 % of ``learning_rate`` over ``steps``). Cached, so equal
    settings give the same object and share compiled train steps.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    lr = optax.cosine_decay_schedule(learning_rate, int(steps), alpha=0.1) if schedule == "cosine" else learning_rate
    tx = OPTIMIZERS[name](lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx


def optimizer_from_config(train) -> optax.GradientTransformation:
    """``make_optimizer`` of a config's ``train`` block (``optimizer``, ``learning_rate``, ``grad_clip``,
    ``schedule``, ``steps``)."""
    return make_optimizer(str(train.optimizer), float(train.learning_rate), grad_clip=float(train.grad_clip),
                          schedule=str(train.schedule), steps=int(train.steps))


def create_state(model, tx, key, shape) -> TrainState:
    """A fresh ``TrainState`` (step 0) for inputs of spatial ``shape`` (``init_params``)."""
    params = init_params(model, key, shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


@functools.lru_cache(maxsize=16)
def make_train_step(loss: Callable, tx: optax.GradientTransformation):
    """``train_step(state, batch, key) -> (state, metrics)``, jit-compiled, ``state`` donated; cached per
    ``(loss, tx)``.

    ``metrics``: the loss's terms, ``loss``, ``grad_norm`` (global L2 norm of the gradient) and ``finite`` (bool).
    A non-finite loss or gradient leaves params and optimiser state as they were (so the last good state can be
    saved); ``check_finite`` reports it.
    """

    def train_step(state: TrainState, batch, key):
        (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new = TrainState(step=state.step + 1, params=jax.tree_util.tree_map(keep, params, state.params),
                         opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state))
        return new, {**terms, "loss": value, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(train_step, donate_argnums=0)


def check_finite(metrics, step: int, *, order=()) -> None:
    """Raise ``FloatingPointError`` naming ``step`` and the first non-finite term of a step's ``metrics``.

    ``metrics`` holds a boolean ``finite`` and scalar terms. They are checked in ``order`` (a method's log columns;
    a jitted step returns its dict sorted by key), then any other term, with ``loss`` and ``grad_norm`` last, so the
    message names the term that went wrong rather than the sum.
    """
    if bool(metrics["finite"]):
        return
    last = ("loss", "grad_norm")
    names = [n for n in order if n in metrics and n not in last]
    names += [n for n in metrics if n not in names + list(last) + ["finite"] and jnp.ndim(metrics[n]) == 0]
    names += [n for n in last if n in metrics]
    for name in names:
        value = float(metrics[name])
        if not math.isfinite(value):
            what = "gradient (global norm)" if name == "grad_norm" else f"{name} term"
            raise FloatingPointError(f"training stopped: non-finite {what} ({value}) at step {step}; the state was "
                                     f"left at step {step - 1}. Check the data for NaN/constant images, lower the "
                                     f"learning rate or set train.grad_clip")
    raise FloatingPointError(f"training stopped: non-finite loss or gradient at step {step}")


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
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


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
    - ``check_finite(metrics, done, order=columns)`` raises ``FloatingPointError`` on a non-finite step. The host
      reads a step's ``finite`` flag only after dispatching the next step (at once at log and checkpoint steps), so
      it does not wait on the device between steps, and a non-finite step stops the run before any later state is
      saved.

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
                    check_finite(*pending, order=columns)
                done = step + 1
                pending = (metrics, done)
                if done % log_every == 0 or done == stop:
                    check_finite(metrics, done, order=columns)
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
                    check_finite(metrics, done, order=columns)
                    save_checkpoint(manager, state, force=True)
            if pending is not None:
                check_finite(*pending, order=columns)
    finally:
        if bar is not None:
            bar.close()
        manager.close()
    return state


# ------------------------------------------------------------------------------------------------ fit and load
def save_config(config, workdir) -> None:
    """Write ``workdir/config.json`` (the run's locked config) atomically."""
    from jaxreg.data.io import atomic_write

    os.makedirs(workdir, exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(config.to_json(indent=2))

    atomic_write(os.path.join(workdir, "config.json"), write)


def fit(directory, *, model, loss, train, shape, batches: Callable[[int, int], Iterator], key, columns,
        config=None, place: str = "shard", stop_at: int | None = None, progress: bool = True, desc: str = "train",
        postfix=("loss",)) -> TrainState:
    """Train ``model`` on ``loss`` in ``directory``, resuming from its checkpoints; the ``fit`` of every method.

    Args:
      directory: gets ``checkpoints/<step>/`` (orbax) and ``metrics.jsonl`` (``run_loop``'s rows).
      model: a Flax module; its parameters are initialised by ``init_params(model, fold_in(key, 0), shape)``.
      loss: ``loss(params, batch, key) -> (value, terms)`` (module docstring).
      train: the config's ``train`` block: ``optimizer``, ``learning_rate``, ``grad_clip``, ``schedule``, ``steps``,
        ``log_every``, ``checkpoint_every``, ``keep_checkpoints``.
      shape: spatial shape of the inputs ``model.init`` is traced with.
      batches: ``batches(start, stop)`` yields the batches of steps ``start .. stop - 1`` in order (host or device
        arrays); a generator's ``finally`` runs when training ends (closing a prefetching loader).
      key: the run's PRNG key; step ``s`` gets ``fold_in(fold_in(key, 1), s)``, so a resumed run sees the keys (and,
        with deterministic ``batches``, the data) an uninterrupted one would.
      columns: the metric names of a log row (between ``step`` and ``steps_per_s``).
      config: the run's config, written to ``directory/config.json`` once the checkpoints found there (if any)
        are known to fit ``model`` (a resumed run with another model fails naming the parameter, and the config
        of the run that wrote those checkpoints is kept).
      place: ``"shard"`` splits each batch's leading axis over the devices, ``"replicate"`` copies it to all.
      stop_at: end after this step (saving a checkpoint), as an interruption would; rerun to resume.

    Returns the final ``TrainState``. A non-finite step raises ``FloatingPointError`` (``check_finite``) before any
    later state is saved.
    """
    if place not in ("shard", "replicate"):
        raise ValueError(f"place must be 'shard' or 'replicate', got {place!r}")
    tx = optimizer_from_config(train)
    step_fn = make_train_step(loss, tx)
    mesh = make_mesh()
    state = replicate(create_state(model, tx, jax.random.fold_in(key, 0), shape), mesh)
    manager = checkpoint_manager(os.path.join(directory, "checkpoints"), save_every=int(train.checkpoint_every),
                                 keep=int(train.keep_checkpoints))
    latest = manager.latest_step()
    if latest is not None:
        check_params(manager.item_metadata(latest).tree["params"], state.params,
                      os.path.join(directory, "checkpoints", str(latest)))
    if config is not None:
        save_config(config, directory)
    restored = restore_checkpoint(manager, state)
    if restored is not None:
        state = restored
    start = int(state.step)
    last = int(train.steps) if stop_at is None else min(int(stop_at), int(train.steps))
    step_key = jax.random.fold_in(key, 1)
    put = (lambda b: shard_batch(b, mesh)) if place == "shard" else (lambda b: replicate(b, mesh))
    stream = batches(start, last)
    try:
        return run_loop(state, lambda s, step: step_fn(s, put(next(stream)), jax.random.fold_in(step_key, step)),
                        start=start, stop=last, total=int(train.steps), manager=manager,
                        log_path=os.path.join(directory, "metrics.jsonl"), columns=tuple(columns),
                        log_every=int(train.log_every), checkpoint_every=int(train.checkpoint_every),
                        progress=progress, desc=desc, postfix=tuple(postfix))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def load_params(directory, *, model, shape, step: int | None = None):
    """``(params, step)`` of the latest (or ``step``'s) checkpoint in ``directory/checkpoints``, for inference.

    Only the parameters are read (any optimiser's checkpoint loads). They are checked against ``model``'s for inputs
    of spatial ``shape``: a checkpoint of another architecture raises ``ValueError`` saying which parameter differs;
    a folder without checkpoints raises ``FileNotFoundError`` naming it.
    """
    import orbax.checkpoint as ocp

    folder = os.path.join(os.fspath(directory), "checkpoints")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no checkpoint in {folder}: run train.py first")
    abstract = init_shapes(model, shape)
    manager = checkpoint_manager(folder)
    try:
        step = manager.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {folder}: run train.py first")
        tree = manager.item_metadata(step).tree
        if not isinstance(tree, dict) or "params" not in tree:
            raise ValueError(f"{folder}/{step}: not a training checkpoint (no 'params')")
        check_params(tree["params"], abstract, f"{folder}/{step}")
        state = manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()
    return jax.tree_util.tree_map(jnp.asarray, state["params"]), int(step)


def check_params(saved, abstract, where: str) -> None:
    """Raise ``ValueError`` naming the first parameter whose shape differs between the trees ``saved`` and
    ``abstract`` (or that one of them lacks); ``where`` names the file or folder."""
    flat_saved = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    flat_model = {jax.tree_util.keystr(p): tuple(s.shape) for p, s in jax.tree_util.tree_leaves_with_path(abstract)}
    for name in sorted(set(flat_saved) | set(flat_model)):
        a, b = flat_saved.get(name), flat_model.get(name)
        if a != b:
            raise ValueError(f"checkpoint {where} does not fit the config's model: parameter {name} is "
                             f"{'missing' if a is None else a} in the checkpoint and "
                             f"{'absent' if b is None else b} in the model (was it trained with another "
                             f"config.model or image shape?)")


def init_shapes(model, shape):
    """The parameters' ``ShapeDtypeStruct`` tree of ``model`` for inputs of spatial ``shape`` (nothing computed)."""
    x = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, x)
