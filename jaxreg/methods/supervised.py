"""Supervised registration by similarity-steered patch regression (Cao et al., MICCAI 2017).

A CNN (``jaxreg.models.supervised.SimilaritySteeredNet``) learns to regress the displacement at a patch centre
from the fixed patch, the moving patch and the similarity map of the fixed centre against the moving patch. This
module builds its data, trains it and evaluates it against Demons and the classical diffeomorphic engine.

Pipeline (``config`` fields in brackets; ``configs/supervised.py`` documents them all):

1. **Pairs** [``data``]: pair ``i`` of a split comes from ``np.random.default_rng([seed, i])`` with ``data.seed``
   for training and ``data.test_seed`` for testing (``DATA_KINDS``: ``"mni_slice"`` 2-D MNI152 slices with their
   true field, ``"synthetic"`` SynthMorph-style pairs with their true field, ``"mni"`` 3-D MNI152 pairs without one).
2. **Pre-alignment** [``prealign``]: as Cao et al. start from affinely aligned images, every pair is first
   registered by the classical engine's parametric stage (``optimize.PRESETS[prealign]``, default ``"affine"``):
   matrix ``A`` with field ``a(x)``; the network sees ``fixed`` and ``moving_a = warp(moving, a)``. An empty
   ``prealign`` skips this (``A = I``).
3. **Targets** [``target``]: the total field ``u`` is the true one (``"true"``: known simulated deformation) or the
   classical engine's result (``"classical"``: ``optimize.register(fixed, moving, **PRESETS[target_preset]).disp``).
   The network's target is the residual ``r = A⁻¹ (u - a)`` (linear part of ``A``), the exact field with
   ``moving_a[x + r(x)] = moving[x + u(x)]``; a prediction ``r̂`` gives the total field ``a + A r̂``.
4. **Sampling** [``sampling``]: patch centres are drawn from the voxels of ``mask`` (``"labels"``: fixed labels
   > 0 dilated by ``mask_dilation`` voxels; ``"all"``) so that displacement magnitudes are balanced:
   ``strategy="balanced"`` splits ``|r|`` into ``bins`` equal-width bins from 0 to its 99.5th percentile (the last
   bin open-ended), draws a non-empty bin uniformly, then a voxel uniformly within it; ``"uniform"`` draws voxels
   uniformly. Step ``s`` uses ``np.random.default_rng([seed, s])``, so a resumed run sees the batches an
   uninterrupted one would.
5. **Training** [``train``]: mean squared error of the predicted centre displacement (voxels²), Adam, batches of
   ``batch_size`` patch pairs; pure jitted step with donated state, data parallel over the devices, orbax
   checkpoints with resume, non-finite guard. The prepared pairs are cached in ``workdir/train_pairs.npz``.
6. **Dense prediction** [``predict.sigma``, ``predict.iterations``]: one fully convolutional pass gives the residual
   at every voxel, which is Gaussian-smoothed (``spatial.gaussian_smooth``, sigma in voxels; 0 skips it) and
   composed with the affine. ``iterations > 1`` (not in the paper) re-applies the network to the moving image warped
   by the field so far and composes the increments.

Evaluation (``evaluate``): on ``eval.num_pairs`` test pairs (other seed), every method of ``eval.methods``
(``METHODS``) is run and scored with Dice and ASSD (mm) per label 1..K-1 (for MNI data CSF, GM, WM), the
end-point error against the true field where one is known (mm, mean over the fixed foreground), % folding voxels
and seconds per pair (after an untimed warm-up pair; Demons and the network include their affine stage). Paired
tests (``scipy.stats.ttest_rel`` and ``wilcoxon``) compare the supervised network with every baseline per measure.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from jaxreg import metrics, spatial, training
from jaxreg.models import supervised as net_lib

#: Evaluated methods: ``identity`` (no registration), ``affine`` (the pre-alignment alone), ``demons``
#: (``jaxreg.demons.demons`` on the pre-aligned pair, options ``eval.demons``), ``diffeo`` (the classical engine,
#: ``optimize.PRESETS[eval.classical_preset]``, its own affine stage included: the SyN stand-in), ``supervised``
#: (the network: ``predict.iterations`` passes, each smoothed by ``predict.sigma``) and ``supervised_raw`` (one pass,
#: not smoothed).
METHODS = ("identity", "affine", "demons", "diffeo", "supervised", "supervised_raw")

TISSUES = {1: "CSF", 2: "GM", 3: "WM"}


# ------------------------------------------------------------------------------------------------------- data
def _mni_slice(rng, cfg):
    from jaxreg.data import synthetic

    return synthetic.mni_slice_pair(rng, shape=tuple(cfg.shape), contrast=cfg.get("contrast", "t1"),
                                    resolution=int(cfg.get("resolution", 2)), **dict(cfg.get("options") or {}))


def _synthetic(rng, cfg):
    from jaxreg.data import synthetic

    p = synthetic.synthetic_pair(rng, shape=tuple(cfg.shape), num_labels=int(cfg.get("num_labels", 8)),
                                 **dict(cfg.get("options") or {}))
    return {**p, "spacing": np.ones(len(cfg.shape))}


def _mni(rng, cfg):
    from jaxreg.data import preprocess, synthetic

    p = synthetic.mni_pair(rng, resolution=int(cfg.get("resolution", 2)), contrast=cfg.get("contrast", "t1"),
                           **dict(cfg.get("options") or {}))
    out = {k: preprocess.crop_or_pad(p[k], tuple(cfg.shape)) for k in ("fixed", "moving", "fixed_labels",
                                                                       "moving_labels")}
    return {**out, "spacing": np.asarray(p["spacing"])}


#: ``data.kind`` → ``fn(rng, data_config) -> dict`` (fixed, moving, fixed_labels, moving_labels, spacing and, when
#: known, the true ``disp``, pull convention ``fixed[x] ≈ moving[x + disp(x)]``).
DATA_KINDS = {"mni_slice": _mni_slice, "synthetic": _synthetic, "mni": _mni}


def generate(config, *, split: str, index: int) -> dict:
    """Pair ``index`` of ``split`` ("train": ``data.seed``, "test": ``data.test_seed``), host NumPy arrays."""
    cfg = config.data
    if cfg.kind not in DATA_KINDS:
        raise ValueError(f"data.kind must be one of {sorted(DATA_KINDS)}, got {cfg.kind!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    seed = int(cfg.seed if split == "train" else cfg.test_seed)
    p = DATA_KINDS[cfg.kind](np.random.default_rng([seed, int(index)]), cfg)
    out = {k: np.asarray(p[k]) for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
    out["fixed"], out["moving"] = out["fixed"].astype(np.float32), out["moving"].astype(np.float32)
    out["spacing"] = np.asarray(p.get("spacing", np.ones(out["fixed"].ndim)), np.float64)
    if p.get("disp") is not None:
        out["disp"] = np.asarray(p["disp"], np.float32)
    return out


def prealign(config, fixed, moving):
    """``(matrix (nd+1, nd+1), a (*S, nd), moving_a (*S))``: the classical parametric stage (``config.prealign``).

    ``a`` is the matrix's field (``moving_a[x] = moving[x + a(x)]``); an empty ``config.prealign`` gives the
    identity.
    """
    from jaxreg import optimize

    name = config.get("prealign") or ""
    fixed, moving = jnp.asarray(fixed), jnp.asarray(moving)
    nd = fixed.ndim
    if not name:
        return jnp.eye(nd + 1, dtype=fixed.dtype), jnp.zeros(fixed.shape + (nd,), fixed.dtype), moving
    if name not in optimize.PRESETS:
        raise ValueError(f"prealign must be '' or one of {sorted(optimize.PRESETS)}, got {name!r}")
    opts = {**optimize.PRESETS[name], "deformable": None}
    r = optimize.register(fixed, moving, **opts)
    return r.matrix, r.disp, r.warped


def compose_affine(matrix, a, r):
    """Total field of "residual ``r``, then the affine": ``a(x) + A r(x)`` (``(*S, nd)``, voxels)."""
    nd = r.shape[-1]
    return a + r @ jnp.asarray(matrix)[:nd, :nd].T.astype(r.dtype)


def residual(matrix, a, u):
    """The residual ``r = A⁻¹ (u - a)`` with ``compose_affine(matrix, a, r) == u`` (host NumPy, float32)."""
    u, a = np.asarray(u, np.float64), np.asarray(a, np.float64)
    lin = np.asarray(matrix, np.float64)[: u.shape[-1], : u.shape[-1]]
    return ((u - a) @ np.linalg.inv(lin).T).astype(np.float32)


def sampling_mask(config, fixed_labels) -> np.ndarray:
    """Where patch centres may lie (bool ``(*S)``), from ``config.sampling.mask`` (see module docstring)."""
    s = config.sampling
    kind = s.get("mask", "labels")
    if kind == "all":
        return np.ones(np.shape(fixed_labels), bool)
    if kind != "labels":
        raise ValueError(f"sampling.mask must be 'labels' or 'all', got {kind!r}")
    mask = np.asarray(fixed_labels) > 0
    d = int(s.get("mask_dilation", 0))
    return ndi.binary_dilation(mask, iterations=d) if d > 0 else mask


def _fingerprint(config) -> str:
    keys = {"data": config.data.to_dict(), "prealign": config.get("prealign"), "target": config.target,
            "target_preset": config.get("target_preset"), "train_pairs": config.data.train_pairs}
    return json.dumps(keys, sort_keys=True, default=str)


def prepare_training_pairs(config, *, cache: str | None = None, progress: bool = False) -> dict:
    """The training pairs, pre-aligned, with residual targets; ``dict`` of stacked host arrays.

    Keys: ``fixed``, ``moving`` (pre-aligned) ``(N, *S)`` float32, ``target`` ``(N, *S, nd)`` float32 residual
    (voxels), ``mask`` ``(N, *S)`` bool (``sampling_mask``). ``N = data.train_pairs``. With ``cache`` (an ``.npz``
    path) the arrays are read from it when it was made with the same data settings, else computed and written
    there atomically.
    """
    from jaxreg import optimize
    from jaxreg.data import io

    fp = _fingerprint(config)
    if cache and os.path.isfile(cache):
        with np.load(cache) as z:
            if str(z["fingerprint"]) == fp:
                return {k: z[k] for k in ("fixed", "moving", "target", "mask")}
    if config.target not in ("true", "classical"):
        raise ValueError(f"target must be 'true' or 'classical', got {config.target!r}")
    n = int(config.data.train_pairs)
    if n < 1:
        raise ValueError(f"data.train_pairs must be >= 1, got {n}")
    out = {k: [] for k in ("fixed", "moving", "target", "mask")}
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="training pairs", unit="pair", leave=False)
    for i in it:
        p = generate(config, split="train", index=i)
        if config.target == "true":
            if "disp" not in p:
                raise ValueError(f"target='true' needs a known field, but data.kind={config.data.kind!r} has none; "
                                 f"use target='classical'")
            u = p["disp"]
        else:
            u = optimize.register(jnp.asarray(p["fixed"]), jnp.asarray(p["moving"]),
                                  **optimize.PRESETS[config.target_preset]).disp
        matrix, a, moving_a = prealign(config, p["fixed"], p["moving"])
        out["fixed"].append(p["fixed"])
        out["moving"].append(np.asarray(moving_a, np.float32))
        out["target"].append(residual(matrix, a, u))
        out["mask"].append(sampling_mask(config, p["fixed_labels"]))
    pairs = {k: np.stack(v) for k, v in out.items()}
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        io.atomic_write(cache, lambda tmp: np.savez(tmp, fingerprint=np.asarray(fp), **pairs))
    return pairs


# --------------------------------------------------------------------------------------------------- sampling
class Sampler:
    """Draws patch centres ``(pair, voxel)`` with balanced displacement magnitudes (module docstring, step 4).

    Args:
      magnitude: ``(N, *S)`` displacement lengths (voxels) of the residual targets.
      mask: ``(N, *S)`` bool, the voxels that may be centres (at least one).
      bins: number of magnitude bins (>= 1).
      strategy: ``"balanced"`` (uniform over non-empty bins, then within the bin) or ``"uniform"``.

    Attributes:
      edges: the ``bins + 1`` bin edges (the last is +inf); ``counts``: candidate voxels per bin.
    """

    def __init__(self, magnitude, mask, *, bins: int = 8, strategy: str = "balanced"):
        magnitude, mask = np.asarray(magnitude, np.float64), np.asarray(mask, bool)
        if magnitude.shape != mask.shape:
            raise ValueError(f"magnitude and mask must have one shape, got {magnitude.shape} and {mask.shape}")
        if strategy not in ("balanced", "uniform"):
            raise ValueError(f"strategy must be 'balanced' or 'uniform', got {strategy!r}")
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        flat = np.flatnonzero(mask)
        if flat.size == 0:
            raise ValueError("mask selects no voxel: no patch centre can be drawn")
        self.shape, self.strategy = mask.shape, strategy
        self.candidates = flat
        mags = magnitude.reshape(-1)[flat]
        top = float(np.percentile(mags, 99.5))
        top = top if top > 0 else 1.0
        self.edges = np.concatenate([np.linspace(0.0, top, int(bins) + 1)[:-1], [np.inf]])
        self.bin_of = np.clip(np.searchsorted(self.edges, mags, side="right") - 1, 0, int(bins) - 1)
        self.counts = np.bincount(self.bin_of, minlength=int(bins))
        order = np.argsort(self.bin_of, kind="stable")
        self._sorted = flat[order]
        self._starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._nonempty = np.flatnonzero(self.counts)

    def sample(self, key, n: int):
        """``n`` centres: ``(pair (n,) int, coords (n, ndim) int)``; ``key`` an int seed, sequence or Generator."""
        rng = np.random.default_rng(key)
        if self.strategy == "uniform":
            flat = self.candidates[rng.integers(0, self.candidates.size, n)]
        else:
            b = self._nonempty[rng.integers(0, self._nonempty.size, n)]
            within = np.floor(rng.random(n) * self.counts[b]).astype(np.int64)
            flat = self._sorted[self._starts[b] + within]
        idx = np.unravel_index(flat, self.shape)
        return idx[0].astype(np.int64), np.stack(idx[1:], axis=-1).astype(np.int64)


def extract_patches(padded, pair, coords, radius: int) -> np.ndarray:
    """Patches of side ``2 radius + 1`` centred on ``coords`` of images zero-padded by ``radius``.

    ``padded``: ``(N, *(S + 2 radius))``; ``pair``: ``(B,)``; ``coords``: ``(B, nd)`` voxel indices of the unpadded
    grid. Returns ``(B, *(2 radius + 1,) * nd)``.
    """
    nd = coords.shape[-1]
    ar = np.arange(2 * radius + 1)
    index = [pair.reshape((-1,) + (1,) * nd)]
    for a in range(nd):
        shape = [-1] + [1] * nd
        shape[1 + a] = 2 * radius + 1
        index.append((coords[:, a, None] + ar[None]).reshape(shape))
    return padded[tuple(index)]


# --------------------------------------------------------------------------------------------------- training
def build_model(config, ndim: int):
    """The ``SimilaritySteeredNet`` of ``config.model`` for ``ndim`` spatial axes."""
    return net_lib.build(ndim=ndim, **config.model.to_dict())


def _tx_options(config) -> tuple:
    t = config.train
    return (str(t.optimizer), float(t.learning_rate), str(t.get("schedule", "constant")), int(t.steps),
            float(t.get("grad_clip") or 0.0))


def make_tx(config):
    """The optimiser of ``config.train`` (``schedule``: "constant" or "cosine" decay to 10 % over the steps)."""
    return _make_tx(*_tx_options(config))


def _make_tx(optimizer, learning_rate, schedule, steps, grad_clip):
    lr = learning_rate
    if schedule == "cosine":
        import optax

        lr = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1)
    elif schedule != "constant":
        raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {schedule!r}")
    return training.make_optimizer(optimizer, lr, grad_clip=grad_clip or None)


def patch_loss(params, model, batch):
    """Mean squared end-point error (voxels²) of the patch predictions; ``(loss, {"loss", "epe"})``.

    ``batch``: ``moving``, ``fixed`` ``(B, *(2 patch_radius + 1,) * nd)``, ``target`` ``(B, nd)``.
    """
    pred = jax.vmap(lambda m, f: model.apply(params, m, f, method=model.patch))(batch["moving"], batch["fixed"])
    sq = jnp.sum((pred - batch["target"]) ** 2, axis=-1)
    loss = jnp.mean(sq)
    return loss, {"loss": loss, "epe": jnp.mean(jnp.sqrt(sq + 1e-12))}


def make_train_step(model, tx):
    """Jitted ``train_step(state, batch) -> (state, metrics)`` with ``state`` donated.

    ``metrics``: ``loss``, ``epe`` (mean end-point error, voxels), ``grad_norm``, ``finite``. A non-finite loss or
    gradient leaves the state unchanged (``finite = False``).
    """
    import optax

    def train_step(state, batch):
        (value, terms), grads = jax.value_and_grad(patch_loss, has_aux=True)(state.params, model, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)
        new = training.TrainState(step=state.step + 1, params=jax.tree_util.tree_map(keep, params, state.params),
                                  opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state))
        return new, {**terms, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(train_step, donate_argnums=0)


class Batches:
    """Deterministic patch batches from prepared pairs: ``batch(step)`` draws with ``default_rng([seed, step])``."""

    def __init__(self, pairs, model, config):
        self.radius = model.patch_radius
        r = self.radius
        pad = [(0, 0)] + [(r, r)] * (pairs["fixed"].ndim - 1)
        self.fixed = np.pad(pairs["fixed"], pad)
        self.moving = np.pad(pairs["moving"], pad)
        self.target = pairs["target"]
        s = config.sampling
        self.sampler = Sampler(np.linalg.norm(pairs["target"], axis=-1), pairs["mask"], bins=int(s.bins),
                               strategy=s.strategy)
        self.seed, self.batch_size = int(config.seed), int(config.train.batch_size)

    def batch(self, step: int) -> dict:
        pair, coords = self.sampler.sample([self.seed, int(step)], self.batch_size)
        target = self.target[(pair,) + tuple(coords.T)]
        return {"fixed": extract_patches(self.fixed, pair, coords, self.radius),
                "moving": extract_patches(self.moving, pair, coords, self.radius), "target": target}


@functools.lru_cache(maxsize=8)
def _cached_step(model, tx_options):
    """``(tx, train_step)`` shared by runs with equal settings (their compiled step is reused in-process)."""
    tx = _make_tx(*tx_options)
    return tx, make_train_step(model, tx)


def _template_state(model, tx, config, ndim):
    side = 2 * model.patch_radius + 1
    return training.create_state(model, tx, jax.random.fold_in(jax.random.key(int(config.seed)), 0), (side,) * ndim)


def fit(config, workdir, *, stop_at: int | None = None, progress: bool = True):
    """Train the network of ``config`` in ``workdir``; resume from its checkpoints. Returns the final state.

    Writes ``workdir/config.json``, ``workdir/train_pairs.npz`` (the prepared pairs), ``workdir/checkpoints/``
    (orbax) and ``workdir/metrics.jsonl`` (every ``train.log_every`` steps: loss, epe, grad_norm, steps_per_s).
    ``stop_at`` ends the run after that step (with a checkpoint), as an interruption would.
    """
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    pairs = prepare_training_pairs(config, cache=os.path.join(workdir, "train_pairs.npz"), progress=progress)
    ndim = pairs["fixed"].ndim - 1
    model = build_model(config, ndim)
    tx, step_fn = _cached_step(model, _tx_options(config))
    batches = Batches(pairs, model, config)
    t = config.train
    mesh = training.make_mesh()
    state = training.replicate(_template_state(model, tx, config, ndim), mesh)
    manager = training.checkpoint_manager(os.path.join(workdir, "checkpoints"), save_every=int(t.checkpoint_every),
                                          keep=int(t.get("keep_checkpoints", 3)))
    restored = training.restore_checkpoint(manager, state)
    if restored is not None:
        state = restored
    last = int(t.steps) if stop_at is None else min(int(stop_at), int(t.steps))
    return training.run_loop(state, lambda s, step: step_fn(s, training.shard_batch(batches.batch(step), mesh)),
                             start=int(state.step), stop=last, total=int(t.steps), manager=manager,
                             log_path=os.path.join(workdir, "metrics.jsonl"), columns=("loss", "epe", "grad_norm"),
                             log_every=int(t.log_every), checkpoint_every=int(t.checkpoint_every), progress=progress,
                             postfix=("loss", "epe"))


def load_trained(config, workdir, ndim: int, *, step: int | None = None):
    """``(model, params, step)`` from ``workdir/checkpoints`` (latest unless ``step``)."""
    model = build_model(config, ndim)
    tx = make_tx(config)
    manager = training.checkpoint_manager(os.path.join(workdir, "checkpoints"))
    try:
        state = training.restore_checkpoint(manager, _template_state(model, tx, config, ndim), step)
    finally:
        manager.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: run train.py first")
    return model, state.params, int(state.step)


def make_predict(model, *, sigma: float, iterations: int = 1):
    """Jitted ``predict(params, moving, fixed) -> (*S, nd)``: the dense residual, Gaussian-smoothed by ``sigma``.

    ``moving`` should be the pre-aligned moving image; the result is in voxels, pull convention, and is to be
    composed with the pre-alignment (``compose_affine``). ``iterations > 1`` repeats the prediction on the moving
    image warped by the field so far and composes the (smoothed) increments, ``r ← compose(r, Δr)`` (an extension:
    Cao et al. predict once).
    """
    sigma, iterations = float(sigma), int(iterations)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")

    def one(params, moving, fixed):
        r = model.apply(params, moving, fixed)
        return spatial.gaussian_smooth(r, sigma, ndim=r.ndim - 1) if sigma > 0 else r

    def predict(params, moving, fixed):
        r = one(params, moving, fixed)
        for _ in range(iterations - 1):
            r = spatial.compose(r, one(params, spatial.warp(moving, r), fixed))
        return r

    return jax.jit(predict)


# --------------------------------------------------------------------------------------------------- evaluation
def _label_names(config, num_labels):
    if config.data.kind in ("mni_slice", "mni"):
        return dict(TISSUES)
    return {k: f"label{k}" for k in range(1, num_labels)}


def _measure(p, disp, names, spacing):
    from jaxreg import spatial as sp

    disp = jnp.asarray(disp)
    warped = np.asarray(sp.warp_labels(jnp.asarray(p["moving_labels"]), disp))
    fl = p["fixed_labels"]
    labels = list(names)
    dice = metrics.dice(fl, warped, labels=labels)
    assd = metrics.assd(fl, warped, labels=labels, spacing=spacing)
    row = {f"dice_{names[k]}": dice[k] for k in labels}
    row["dice_mean"] = float(np.nanmean(list(dice.values())))
    row.update({f"assd_{names[k]}": assd[k] for k in labels})
    row["assd_mean"] = float(np.nanmean(list(assd.values())))
    if "disp" in p:
        err = (np.asarray(disp, np.float64) - p["disp"]) * np.asarray(spacing).reshape((1,) * fl.ndim + (-1,))
        row["epe_mm"] = float(np.linalg.norm(err, axis=-1)[fl > 0].mean())
    jac = np.asarray(sp.jacobian_determinant(disp))
    row["folding_pct"] = 100.0 * metrics.folding_fraction(jac)
    return row


def _run_methods(config, methods, model, params, p):
    """``{method: (disp, seconds)}`` for one pair (each result ready before its clock stops)."""
    from jaxreg import demons as demons_lib, optimize

    f, m = jnp.asarray(p["fixed"]), jnp.asarray(p["moving"])
    e = config.eval
    out = {}
    t0 = time.perf_counter()
    matrix, a, moving_a = jax.block_until_ready(prealign(config, f, m))
    t_affine = time.perf_counter() - t0
    if "identity" in methods:
        out["identity"] = (jnp.zeros_like(a), 0.0)
    if "affine" in methods:
        out["affine"] = (a, t_affine)
    if "demons" in methods:
        t0 = time.perf_counter()
        u = demons_lib.demons(f, moving_a, **dict(e.get("demons") or {}))
        disp = jax.block_until_ready(compose_affine(matrix, a, u))
        out["demons"] = (disp, t_affine + time.perf_counter() - t0)
    if "diffeo" in methods:
        t0 = time.perf_counter()
        disp = jax.block_until_ready(optimize.register(f, m, **optimize.PRESETS[e.classical_preset]).disp)
        out["diffeo"] = (disp, time.perf_counter() - t0)
    passes = int(config.predict.get("iterations", 1))
    for name, sigma, iterations in (("supervised", float(config.predict.sigma), passes), ("supervised_raw", 0.0, 1)):
        if name in methods:
            predict = _predictor(model, sigma, iterations)
            t0 = time.perf_counter()
            disp = jax.block_until_ready(compose_affine(matrix, a, predict(params, moving_a, f)))
            out[name] = (disp, t_affine + time.perf_counter() - t0)
    return out


@functools.lru_cache(maxsize=8)
def _predictor(model, sigma, iterations):
    return make_predict(model, sigma=sigma, iterations=iterations)


def paired_tests(rows, *, method: str = "supervised", keys, baselines) -> list[dict]:
    """Per baseline and measure: mean difference ``method - baseline``, paired t-test and Wilcoxon p-values.

    ``rows``: per-pair dicts with ``pair``, ``method`` and the measures. Pairs missing either value (or with a
    non-finite one) are left out; fewer than 2 pairs, or all differences 0, give NaN p-values.
    """
    from scipy import stats

    by = {(r["method"], r["pair"]): r for r in rows}
    pairs = sorted({r["pair"] for r in rows})
    tests = []
    for base in baselines:
        for key in keys:
            x, y = [], []
            for i in pairs:
                a, b = by.get((method, i), {}).get(key), by.get((base, i), {}).get(key)
                if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                    x.append(a)
                    y.append(b)
            x, y = np.asarray(x), np.asarray(y)
            d = x - y
            p_t = p_w = math.nan
            if d.size >= 2 and np.any(d != 0):
                p_t = float(stats.ttest_rel(x, y).pvalue)
                p_w = float(stats.wilcoxon(x, y).pvalue)
            tests.append({"method": method, "baseline": base, "measure": key, "n": int(d.size),
                          "mean_diff": float(d.mean()) if d.size else math.nan, "p_ttest": p_t, "p_wilcoxon": p_w})
    return tests


def _fmt_p(p):
    return "nan" if not math.isfinite(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def markdown(summary, tests, *, names, n_pairs, has_epe) -> str:
    """The two tables: measures per method (mean ± std) and the paired tests."""
    cols = [(f"dice_{v}", f"Dice {v}", 3) for v in names.values()] + [("dice_mean", "Dice mean", 3)]
    cols += [(f"assd_{v}", f"ASSD {v} (mm)", 2) for v in names.values()]
    if has_epe:
        cols.append(("epe_mm", "EPE (mm)", 2))
    cols += [("folding_pct", "% folding", 2), ("seconds", "s / pair", 3)]
    lines = [f"Held-out pairs: {n_pairs}; mean ± std.", "",
             "| method | " + " | ".join(c[1] for c in cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for method, s in summary.items():
        cells = []
        for key, _, digits in cols:
            v = s.get(key)
            cells.append("" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if tests:
        keys = list(dict.fromkeys(t["measure"] for t in tests))
        lines += ["", "Paired tests, supervised − baseline per pair: mean difference (p paired t-test / p Wilcoxon "
                  "signed-rank); Dice higher and ASSD lower is better.", "",
                  "| comparison | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
        for base in dict.fromkeys(t["baseline"] for t in tests):
            cells = []
            for key in keys:
                t = next(t for t in tests if t["baseline"] == base and t["measure"] == key)
                cells.append(f"{t['mean_diff']:+.3f} ({_fmt_p(t['p_ttest'])} / {_fmt_p(t['p_wilcoxon'])})")
            lines.append(f"| supervised vs {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(config, workdir, *, out=None) -> dict:
    """Evaluate the trained network and the baselines on held-out pairs; write and return the tables.

    Writes ``out`` (default ``workdir/eval``): ``results.csv`` (one row per pair and method), ``results.json``
    (rows, summary, tests, config) and ``results.md`` (the tables), each atomically. Returns ``{"rows",
    "summary", "tests", "markdown"}``.
    """
    from jaxreg.data import io

    e = config.eval
    methods = tuple(e.methods)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"eval.methods: unknown {sorted(unknown)}; choose from {METHODS}")
    n = int(e.num_pairs)
    first = generate(config, split="test", index=0)
    ndim = first["fixed"].ndim
    model = params = step = None
    if any(m.startswith("supervised") for m in methods):
        model, params, step = load_trained(config, workdir, ndim)
    num_labels = int(max(first["fixed_labels"].max(), first["moving_labels"].max())) + 1
    names = _label_names(config, max(num_labels, int(config.data.get("num_labels", 4))))
    rows = []
    for i in range(-1, n):  # i = -1: warm-up (compilation), not recorded
        p = first if i <= 0 else generate(config, split="test", index=i)
        spacing = tuple(e.spacing) if e.get("spacing") else tuple(p["spacing"])
        results = _run_methods(config, methods, model, params, p)
        if i < 0:
            continue
        for name in methods:
            disp, seconds = results[name]
            rows.append({"pair": i, "method": name, "seconds": seconds, **_measure(p, disp, names, spacing)})
    summary = {name: metrics.summarize([{k: v for k, v in r.items() if k != "pair"} for r in rows
                                        if r["method"] == name]) for name in methods}
    keys = ["dice_mean"] + [f"dice_{v}" for v in names.values()] + [f"assd_{v}" for v in names.values()]
    if "disp" in first:
        keys.append("epe_mm")
    baselines = [m for m in methods if m not in ("identity", "supervised", "supervised_raw")]
    tests = paired_tests(rows, keys=keys, baselines=baselines) if "supervised" in methods and n >= 2 else []
    table = markdown(summary, tests, names=names, n_pairs=n, has_epe="disp" in first)
    out = out or os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    metrics.write_csv(os.path.join(out, "results.csv"), rows)
    metrics.write_json(os.path.join(out, "results.json"), {"rows": rows, "summary": summary, "tests": tests,
                                                           "num_pairs": n, "methods": list(methods),
                                                           "checkpoint_step": step,
                                                           "config": json.loads(config.to_json())})

    def write_md(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(table)

    io.atomic_write(os.path.join(out, "results.md"), write_md)
    return {"rows": rows, "summary": summary, "tests": tests, "markdown": table}
