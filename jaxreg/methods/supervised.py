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
   classical engine's result (``"classical"``: ``optimize.register(fixed, moving, options=PRESETS[target_preset]).disp``).
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

Evaluation (``evaluation``, run by ``evaluate.py``): on ``eval.num_pairs`` test pairs (other seed), every method of ``eval.methods``
(``METHODS``) is run and scored with Dice and ASSD (mm) per label 1..K-1 (for MNI data CSF, GM, WM), the
end-point error against the true field where one is known (mm, mean over the fixed foreground), % folding voxels
and seconds per pair (after an untimed warm-up pair; Demons and the network include their affine stage). Paired
tests (``jaxreg.evaluation.paired_tests``) compare the supervised network with every baseline per measure.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from jaxreg import spatial, training
from jaxreg.methods import Evaluation
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

    return synthetic.mni_slice_pair(rng, shape=tuple(cfg.shape), contrast=cfg.contrast,
                                    resolution=int(cfg.resolution), **dict(cfg.options))


def _synthetic(rng, cfg):
    from jaxreg.data import synthetic

    p = synthetic.synthetic_pair(rng, shape=tuple(cfg.shape), num_labels=int(cfg.num_labels),
                                 **dict(cfg.options))
    return {**p, "spacing": np.ones(len(cfg.shape))}


def _mni(rng, cfg):
    from jaxreg.data import preprocess, synthetic

    p = synthetic.mni_pair(rng, resolution=int(cfg.resolution), contrast=cfg.contrast,
                           **dict(cfg.options))
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

    name = config.prealign
    fixed, moving = jnp.asarray(fixed), jnp.asarray(moving)
    nd = fixed.ndim
    if not name:
        return jnp.eye(nd + 1, dtype=fixed.dtype), jnp.zeros(fixed.shape + (nd,), fixed.dtype), moving
    if name not in optimize.PRESETS:
        raise ValueError(f"prealign must be '' or one of {sorted(optimize.PRESETS)}, got {name!r}")
    r = optimize.register(fixed, moving, options=optimize.PRESETS[name], deformable=None)
    return r.matrix, r.disp, r.warped


def compose_residual(matrix, a, r):
    """Total field of "residual ``r``, then the affine": ``a(x) + A r(x)`` (``(*S, nd)``, voxels)."""
    nd = r.shape[-1]
    return a + r @ jnp.asarray(matrix)[:nd, :nd].T.astype(r.dtype)


def residual(matrix, a, u):
    """The residual ``r = A⁻¹ (u - a)`` with ``compose_residual(matrix, a, r) == u`` (host NumPy, float32)."""
    u, a = np.asarray(u, np.float64), np.asarray(a, np.float64)
    lin = np.asarray(matrix, np.float64)[: u.shape[-1], : u.shape[-1]]
    return ((u - a) @ np.linalg.inv(lin).T).astype(np.float32)


def sampling_mask(config, fixed_labels) -> np.ndarray:
    """Where patch centres may lie (bool ``(*S)``), from ``config.sampling.mask`` (see module docstring)."""
    s = config.sampling
    kind = s.mask
    if kind == "all":
        return np.ones(np.shape(fixed_labels), bool)
    if kind != "labels":
        raise ValueError(f"sampling.mask must be 'labels' or 'all', got {kind!r}")
    mask = np.asarray(fixed_labels) > 0
    d = int(s.mask_dilation)
    return ndi.binary_dilation(mask, iterations=d) if d > 0 else mask


def _fingerprint(config) -> str:
    keys = {"data": config.data.to_dict(), "prealign": config.prealign, "target": config.target,
            "target_preset": config.target_preset, "train_pairs": config.data.train_pairs}
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
                                  options=optimize.PRESETS[config.target_preset]).disp
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


@dataclasses.dataclass(frozen=True)
class Loss:
    """Mean squared end-point error (voxels²) of the patch predictions, ``loss(params, batch, key) -> (value,
    {"epe"})`` (``key`` unused).

    ``batch``: ``moving``, ``fixed`` ``(B, *(2 patch_radius + 1,) * nd)``, ``target`` ``(B, nd)``; ``epe`` is the
    mean end-point error (voxels).
    """

    model: object

    def __call__(self, params, batch, key):
        del key
        pred = jax.vmap(lambda m, f: self.model.apply(params, m, f, method=self.model.patch))(batch["moving"],
                                                                                              batch["fixed"])
        sq = jnp.sum((pred - batch["target"]) ** 2, axis=-1)
        return jnp.mean(sq), {"epe": jnp.mean(jnp.sqrt(sq + 1e-12))}


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


def _patch_shape(model, ndim):
    return (2 * model.patch_radius + 1,) * ndim


def fit(config, workdir, *, stop_at: int | None = None, progress: bool = True):
    """Train the network of ``config`` in ``workdir``; resume from its checkpoints. Returns the final state.

    Writes ``workdir/config.json``, ``workdir/train_pairs.npz`` (the prepared pairs), ``workdir/checkpoints/``
    (orbax) and ``workdir/metrics.jsonl`` (every ``train.log_every`` steps: loss, epe, grad_norm, steps_per_s).
    ``stop_at`` ends the run after that step (with a checkpoint), as an interruption would.
    """
    pairs = prepare_training_pairs(config, cache=os.path.join(workdir, "train_pairs.npz"), progress=progress)
    ndim = pairs["fixed"].ndim - 1
    model = build_model(config, ndim)
    source = Batches(pairs, model, config)

    def batches(start, stop):
        return (source.batch(step) for step in range(start, stop))

    return training.fit(workdir, model=model, loss=Loss(model), train=config.train, shape=_patch_shape(model, ndim),
                        batches=batches, key=jax.random.key(int(config.seed)), columns=("loss", "epe", "grad_norm"),
                        config=config, stop_at=stop_at, progress=progress, postfix=("loss", "epe"))


def load(config, workdir, ndim: int, *, step: int | None = None):
    """``(model, params, step)`` from ``workdir/checkpoints`` (latest unless ``step``)."""
    model = build_model(config, ndim)
    params, step = training.load_params(workdir, model=model, shape=_patch_shape(model, ndim), step=step)
    return model, params, step


def make_predict(model, *, sigma: float, iterations: int = 1):
    """Jitted ``predict(params, moving, fixed) -> (*S, nd)``: the dense residual, Gaussian-smoothed by ``sigma``.

    ``moving`` should be the pre-aligned moving image; the result is in voxels, pull convention, and is to be
    composed with the pre-alignment (``compose_residual``). ``iterations > 1`` repeats the prediction on the moving
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


def evaluation(config, workdir) -> Evaluation:
    """The held-out evaluation (module docstring) for ``jaxreg.evaluation.evaluate``: Dice and ASSD per label,
    end-point error where the true field is known, % folding, seconds; paired tests of the network against
    every baseline."""
    from jaxreg import demons as demons_lib, optimize

    e = config.eval
    names = tuple(e.methods)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"eval.methods: unknown {unknown}; choose from {METHODS}")
    first = generate(config, split="test", index=0)
    ndim = first["fixed"].ndim
    info = {}
    if any(m.startswith("supervised") for m in names):
        model, params, info["checkpoint_step"] = load(config, workdir, ndim)
    num_labels = int(max(first["fixed_labels"].max(), first["moving_labels"].max())) + 1
    label_names = _label_names(config, max(num_labels, int(config.data.num_labels)))

    def timed(fn):  # methods that start from the pre-alignment: its time is theirs, as a user would pay it
        return lambda p: {"disp": fn(p, *prealign(config, p["fixed"], p["moving"]))}

    run = {"identity": lambda p: {"disp": jnp.zeros(p["fixed"].shape + (ndim,), p["fixed"].dtype)},
           "affine": timed(lambda p, matrix, a, moving_a: a),
           "demons": timed(lambda p, matrix, a, moving_a: compose_residual(
               matrix, a, demons_lib.demons(p["fixed"], moving_a, **dict(e.demons)))),
           "diffeo": lambda p: {"disp": optimize.register(p["fixed"], p["moving"],
                                                          options=optimize.PRESETS[e.classical_preset]).disp}}
    for name, sigma, passes in (("supervised", float(config.predict.sigma), int(config.predict.iterations)),
                                ("supervised_raw", 0.0, 1)):
        if name in names:
            predict = _predictor(model, sigma, passes)
            run[name] = timed(lambda p, matrix, a, moving_a, predict=predict: compose_residual(
                matrix, a, predict(params, moving_a, p["fixed"])))

    def pair(i):
        p = first if i == 0 else generate(config, split="test", index=i)
        spacing = tuple(e.spacing) or tuple(p["spacing"])
        return {**p, "fixed": jnp.asarray(p["fixed"]), "moving": jnp.asarray(p["moving"]), "spacing": spacing}

    columns = [(f"dice/{v}", f"Dice {v}", 3) for v in label_names.values()] + [("dice_mean", "Dice mean", 3)]
    columns += [(f"assd/{v}", f"ASSD {v} (mm)", 2) for v in label_names.values()]
    keys = ["dice_mean"] + [f"dice/{v}" for v in label_names.values()] + [f"assd/{v}" for v in label_names.values()]
    if "disp" in first:
        columns.append(("epe_mm", "EPE (mm)", 2))
        keys.append("epe_mm")
    columns += [("folding_pct", "% folding", 2), ("seconds", "s / pair", 3)]
    baselines = [m for m in names if m not in ("identity", "supervised", "supervised_raw")]
    paired = tuple(("supervised", b) for b in baselines) if "supervised" in names else ()
    return Evaluation(pairs=pair, num_pairs=int(e.num_pairs), methods={n: run[n] for n in names},
                      measures=("dice", "assd", "jacobian", "epe"), label_names=label_names,
                      columns=tuple(columns), paired=paired, paired_keys=tuple(keys), info=info)


@functools.lru_cache(maxsize=8)
def _predictor(model, sigma, iterations):
    return make_predict(model, sigma=sigma, iterations=iterations)
