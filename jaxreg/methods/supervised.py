"""Supervised registration by similarity-steered patch regression (Cao et al., MICCAI 2017).

A CNN (``jaxreg.models.supervised.SimilaritySteeredNet``) learns to regress the displacement at a patch centre
from the fixed patch, the moving patch and the similarity map of the fixed centre against the moving patch. This
module builds its data, trains it and evaluates it against Demons and the classical diffeomorphic engine.

Pipeline (``config`` fields in brackets; ``configs/supervised.py`` documents them all):

1. **Pairs** [``data``]: pair ``i`` of a split comes from ``np.random.default_rng([seed, i])`` with ``data.seed``
   for training and ``data.test_seed`` for testing (``DATA_KINDS``: ``"mni_slice"`` 2-D MNI152 slices with their
   true field, ``"synthetic"`` SynthMorph-style pairs with their true field, ``"mni"`` 3-D MNI152 pairs without one),
   or, for ``"subjects"``, from a learning set of real subjects affinely aligned to a template
   (``jaxreg.data.subjects``, folder ``data.path``, built by ``jaxreg.atlas.prepare``; ``subject_pairs``): training
   pair ``i`` is entry ``i`` of the ordered pairs of distinct ``data.subjects.train`` shuffled by ``data.seed``
   (the first ``data.train_pairs``), test pair ``i`` is entry ``i`` of every ordered pair of
   ``data.subjects.test`` in a fixed order. Images in [0, 1]; labels the learning set's label values numbered
   ``0 .. K-1`` (0 background) over the subjects of the split; no true field.
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

**Working resolution** [``downsize``, default 1]: with ``downsize = f > 1`` (not in the paper; a CPU budget for
3-D volumes) the network works on a grid ``f`` times coarser: the pre-aligned images are ``spatial.downsample``-d
(Gaussian sigma ``f / 2``, then resampled to ``spatial.level_shape(S, f)``), the residual targets
``spatial.resize_disp``-d (vectors in coarse voxels) and the sampling mask is the downsampled mask ``> 0`` (the
Gaussian makes it a little wider than the full-grid one); the dense prediction (and its smoothing, sigma in coarse
voxels) runs on the coarse grid and its field is ``resize_disp``-d back to the full grid before the affine is
composed.

Evaluation (``evaluation``, run by ``evaluate.py``): on ``eval.num_pairs`` test pairs (other seed), every method of ``eval.methods``
(``METHODS``) is run and scored with Dice and ASSD (mm) per label 1..K-1 (for MNI data CSF, GM, WM), the
end-point error against the true field where one is known (mm, mean over the fixed foreground), % folding voxels
and seconds per pair (after an untimed warm-up pair; Demons and the network include their affine stage). Paired
tests (``jaxreg.evaluation.paired_tests``) compare the supervised network with every baseline per measure. For
``data.kind="subjects"`` (~100 manual regions) the table has the mean Dice over the regions present in the fixed
map (``jaxreg.evaluation.measure``), % folding, SD log |J| and seconds; no per-region columns and no ASSD.
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
from jaxreg.methods import Evaluation, classical
from jaxreg.models import supervised as net_lib

#: Evaluated methods: ``identity`` (no registration), ``affine`` (the pre-alignment alone), ``demons``
#: (``jaxreg.demons.demons`` on the pre-aligned pair, options ``eval.demons``), ``diffeo`` (the classical engine,
#: ``optimize.PRESETS[eval.classical_preset]``, its own affine stage included: the SyN stand-in), ``classical``
#: (the classical engine with ``optimize.PRESETS[target_preset]``: the tool whose fields ``target="classical"``
#: learns, its own affine stage included), ``supervised``
#: (the network: ``predict.iterations`` passes, each smoothed by ``predict.sigma``) and ``supervised_raw`` (one pass,
#: not smoothed).
METHODS = ("identity", "affine", "demons", "diffeo", "classical", "supervised", "supervised_raw")

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
#: known, the true ``disp``, pull convention ``fixed[x] ≈ moving[x + disp(x)]``). The further kind ``"subjects"``
#: (real subjects of a learning set, no true field) is drawn by index, not by a generator: ``subject_pairs``.
DATA_KINDS = {"mni_slice": _mni_slice, "synthetic": _synthetic, "mni": _mni}
KINDS = (*DATA_KINDS, "subjects")

_SUBJECT_SETS: dict = {}  # (folder, names, index.json mtime) -> SubjectPairs: each learning set is read once


def _subject_names(cfg, split: str) -> tuple:
    names = {k: tuple(str(n) for n in cfg.subjects[k]) for k in ("train", "test")}
    for k, v in names.items():
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError(f"data.subjects.{k} must list at least 2 distinct subjects, got {list(v)}")
    shared = sorted(set(names["train"]) & set(names["test"]))
    if shared:
        raise ValueError(f"data.subjects: subjects {shared} are in both train and test")
    return names[split]


def subject_pairs(cfg, split: str):
    """``(dataset, order)`` of a ``data.kind == "subjects"`` config's ``split``: the ``SubjectPairs`` of
    ``data.subjects.<split>`` in ``data.path`` (fixed order, labels numbered over the split's subjects) and the
    dataset indices of the split's pairs: for "train" the ordered pairs shuffled by ``np.random.default_rng(
    data.seed)``, the first ``data.train_pairs`` of them; for "test" every ordered pair in the dataset's order."""
    from jaxreg.data import subjects

    names = _subject_names(cfg, split)
    folder = os.fspath(cfg.path)
    index_path = os.path.join(folder, subjects.INDEX)
    key = (os.path.abspath(folder), names, os.path.getmtime(index_path) if os.path.isfile(index_path) else None)
    if key not in _SUBJECT_SETS:
        _SUBJECT_SETS.clear()  # one learning set at a time: they are large
        _SUBJECT_SETS[key] = subjects.SubjectPairs(folder, subjects=names, mode="pairwise", shuffle=False)
    dataset = _SUBJECT_SETS[key]
    if dataset.labels is None:
        raise ValueError(f"data.path {folder!r}: the subjects {list(names)} need label maps (sampling mask, Dice)")
    n = len(dataset)
    if split == "test":
        return dataset, np.arange(n)
    k = int(cfg.train_pairs)
    if not 1 <= k <= n:
        raise ValueError(f"data.train_pairs must be in [1, {n}] (the ordered pairs of data.subjects.train), got {k}")
    return dataset, np.random.default_rng(int(cfg.seed)).permutation(n)[:k]


def num_pairs(config, split: str) -> int | None:
    """How many distinct pairs ``split`` has (``data.kind == "subjects"``), None for the generated kinds (any)."""
    if config.data.kind != "subjects":
        return None
    return len(subject_pairs(config.data, split)[1])


def generate(config, *, split: str, index: int) -> dict:
    """Pair ``index`` of ``split`` ("train": ``data.seed``, "test": ``data.test_seed``; ``"subjects"``:
    ``subject_pairs``), host NumPy arrays: ``fixed``, ``moving`` ``(*S)`` float32, ``fixed_labels``,
    ``moving_labels`` ``(*S)`` int, ``spacing`` ``(nd,)`` mm, ``disp`` ``(*S, nd)`` voxels when known (and, for
    ``"subjects"``, ``name`` "moving->fixed")."""
    cfg = config.data
    if cfg.kind not in KINDS:
        raise ValueError(f"data.kind must be one of {sorted(KINDS)}, got {cfg.kind!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.kind == "subjects":
        dataset, order = subject_pairs(cfg, split)
        if not 0 <= int(index) < len(order):
            raise IndexError(f"{split} pair {index} of data.kind='subjects': there are {len(order)}")
        p = dataset.pair(int(order[int(index)]))
    else:
        seed = int(cfg.seed if split == "train" else cfg.test_seed)
        p = DATA_KINDS[cfg.kind](np.random.default_rng([seed, int(index)]), cfg)
    out = {k: np.asarray(p[k]) for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
    out["fixed"], out["moving"] = out["fixed"].astype(np.float32), out["moving"].astype(np.float32)
    out["spacing"] = np.asarray(p.get("spacing", np.ones(out["fixed"].ndim)), np.float64)
    if p.get("disp") is not None:
        out["disp"] = np.asarray(p["disp"], np.float32)
    if "name" in p:
        out["name"] = str(p["name"])
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


def _downsize(config) -> int:
    """``config.downsize`` (absent: 1), checked."""
    f = config.get("downsize", 1)
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"downsize must be an integer >= 1, got {f!r}")
    return int(f)


def to_working_grid(factor: int, fixed, moving, target=None, mask=None) -> dict:
    """Pair arrays on the network's grid for ``downsize = factor`` (module docstring), host NumPy float32/bool.

    ``fixed``, ``moving``: ``(*S)``; ``target``: ``(*S, nd)`` residual (full-grid voxels); ``mask``: ``(*S)`` bool.
    Returns the given ones on ``spatial.level_shape(S, factor)`` (``target`` in coarse voxels); ``factor`` 1: as
    they are.
    """
    out = {"fixed": fixed, "moving": moving, "target": target, "mask": mask}
    out = {k: v for k, v in out.items() if v is not None}
    if factor == 1:
        return {k: np.asarray(v) for k, v in out.items()}
    nd = np.ndim(fixed)
    coarse = spatial.level_shape(np.shape(fixed), factor)
    res = {k: np.asarray(spatial.downsample(jnp.asarray(out[k], jnp.float32), factor)) for k in ("fixed", "moving")}
    if "target" in out:
        res["target"] = np.asarray(spatial.resize_disp(jnp.asarray(out["target"], jnp.float32), coarse))
    if "mask" in out:
        res["mask"] = np.asarray(spatial.downsample(jnp.asarray(out["mask"], jnp.float32), factor, ndim=nd)) > 0
    return res


def _fingerprint(config) -> str:
    keys = {"data": config.data.to_dict(), "prealign": config.prealign, "target": config.target,
            "target_preset": config.target_preset, "train_pairs": config.data.train_pairs}
    if _downsize(config) != 1:
        keys["downsize"] = _downsize(config)
    return json.dumps(keys, sort_keys=True, default=str)


def prepare_training_pairs(config, *, cache: str | None = None, progress: bool = False) -> dict:
    """The training pairs, pre-aligned, with residual targets; ``dict`` of stacked host arrays.

    Keys: ``fixed``, ``moving`` (pre-aligned) ``(N, *S)`` float32, ``target`` ``(N, *S, nd)`` float32 residual
    (voxels), ``mask`` ``(N, *S)`` bool (``sampling_mask``), all on the network's grid (``downsize``: ``S`` is then
    the coarse grid and the target in its voxels), ``target_seconds`` ``(N,)`` wall seconds of each
    pair's target and pre-alignment (0 for true fields read from the generator). ``N = data.train_pairs``. With
    ``cache`` (an ``.npz`` path) the arrays are read from it when it was made with the same data settings
    (``data``, ``prealign``, ``target``, ``target_preset``), else computed and written there atomically: the
    classical targets of a run are computed once.
    """
    import time

    from jaxreg import optimize
    from jaxreg.data import io

    fp = _fingerprint(config)
    if cache and os.path.isfile(cache):
        with np.load(cache) as z:
            if str(z["fingerprint"]) == fp:
                out = {k: z[k] for k in ("fixed", "moving", "target", "mask")}
                n = len(out["fixed"])
                out["target_seconds"] = z["target_seconds"] if "target_seconds" in z.files else np.zeros(n)
                return out
    if config.target not in ("true", "classical"):
        raise ValueError(f"target must be 'true' or 'classical', got {config.target!r}")
    if config.target == "classical" and config.target_preset not in optimize.PRESETS:
        raise ValueError(f"target_preset must be one of {sorted(optimize.PRESETS)}, got {config.target_preset!r}")
    factor = _downsize(config)
    n = int(config.data.train_pairs)
    if n < 1:
        raise ValueError(f"data.train_pairs must be >= 1, got {n}")
    out = {k: [] for k in ("fixed", "moving", "target", "mask", "target_seconds")}
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="training pairs", unit="pair", leave=False)
    for i in it:
        p = generate(config, split="train", index=i)
        t0 = time.perf_counter()
        if config.target == "true":
            if "disp" not in p:
                raise ValueError(f"target='true' needs a known field, but data.kind={config.data.kind!r} has none; "
                                 f"use target='classical'")
            u = p["disp"]
        else:
            u = optimize.register(jnp.asarray(p["fixed"]), jnp.asarray(p["moving"]),
                                  options=optimize.PRESETS[config.target_preset]).disp
        matrix, a, moving_a = jax.block_until_ready(prealign(config, p["fixed"], p["moving"]))
        u = np.asarray(u)
        out["target_seconds"].append(time.perf_counter() - t0 if config.target == "classical" else 0.0)
        grid = to_working_grid(factor, p["fixed"], np.asarray(moving_a, np.float32), residual(matrix, a, u),
                               sampling_mask(config, p["fixed_labels"]))
        for k, v in grid.items():
            out[k].append(v)
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


def make_predict(model, *, sigma: float, iterations: int = 1, downsize: int = 1):
    """Jitted ``predict(params, moving, fixed) -> (*S, nd)``: the dense residual, Gaussian-smoothed by ``sigma``.

    ``moving`` should be the pre-aligned moving image; the result is in voxels, pull convention, and is to be
    composed with the pre-alignment (``compose_residual``). ``iterations > 1`` repeats the prediction on the moving
    image warped by the field so far and composes the (smoothed) increments, ``r ← compose(r, Δr)`` (an extension:
    Cao et al. predict once). ``downsize = f > 1``: the images are downsampled by ``f`` first, everything above
    happens on the coarse grid (``sigma`` in its voxels) and the field is resized back to ``(*S, nd)`` full-grid
    voxels (``spatial.resize_disp``).
    """
    sigma, iterations, downsize = float(sigma), int(iterations), int(downsize)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if downsize < 1:
        raise ValueError(f"downsize must be >= 1, got {downsize}")

    def one(params, moving, fixed):
        r = model.apply(params, moving, fixed)
        return spatial.gaussian_smooth(r, sigma, ndim=r.ndim - 1) if sigma > 0 else r

    def coarse(params, moving, fixed):
        r = one(params, moving, fixed)
        for _ in range(iterations - 1):
            r = spatial.compose(r, one(params, spatial.warp(moving, r), fixed))
        return r

    def predict(params, moving, fixed):
        if downsize == 1:
            return coarse(params, moving, fixed)
        r = coarse(params, spatial.downsample(moving, downsize), spatial.downsample(fixed, downsize))
        return spatial.resize_disp(r, moving.shape)

    return jax.jit(predict)


# --------------------------------------------------------------------------------------------------- evaluation
def _label_names(config, num_labels):
    if config.data.kind in ("mni_slice", "mni"):
        return dict(TISSUES)
    if config.data.kind == "subjects":  # the label values of the files, numbered over the test subjects
        return dict(subject_pairs(config.data, "test")[0].label_names)
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
    for field, preset, used in (("eval.classical_preset", e.classical_preset, "diffeo"),
                                ("target_preset", config.target_preset, "classical")):
        if used in names and preset not in optimize.PRESETS:
            raise ValueError(f"{field} must be one of {sorted(optimize.PRESETS)}, got {preset!r}")
    first = generate(config, split="test", index=0)
    ndim = first["fixed"].ndim
    info = {}
    if any(m.startswith("supervised") for m in names):
        model, params, info["checkpoint_step"] = load(config, workdir, ndim)
    cache = os.path.join(workdir, "train_pairs.npz")
    if config.target == "classical" and os.path.isfile(cache):  # what the learned tool cost on the training pairs
        with np.load(cache) as z:
            if "target_seconds" in z.files:
                info["target_seconds"] = [float(t) for t in z["target_seconds"]]
    num_labels = int(max(first["fixed_labels"].max(), first["moving_labels"].max())) + 1
    label_names = _label_names(config, max(num_labels, int(config.data.get("num_labels", 0) or 0)))

    def timed(fn):  # methods that start from the pre-alignment: its time is theirs, as a user would pay it
        return lambda p: {"disp": fn(p, *prealign(config, p["fixed"], p["moving"]))}

    run = {"identity": lambda p: {"disp": jnp.zeros(p["fixed"].shape + (ndim,), p["fixed"].dtype)},
           "affine": timed(lambda p, matrix, a, moving_a: a),
           "demons": timed(lambda p, matrix, a, moving_a: compose_residual(
               matrix, a, demons_lib.demons(p["fixed"], moving_a, **dict(e.demons)))),
           "diffeo": classical(e.classical_preset), "classical": classical(config.target_preset)}
    for name, sigma, passes in (("supervised", float(config.predict.sigma), int(config.predict.iterations)),
                                ("supervised_raw", 0.0, 1)):
        if name in names:
            predict = _predictor(model, sigma, passes, _downsize(config))
            run[name] = timed(lambda p, matrix, a, moving_a, predict=predict: compose_residual(
                matrix, a, predict(params, moving_a, p["fixed"])))

    def pair(i):
        p = first if i == 0 else generate(config, split="test", index=i)
        spacing = tuple(e.spacing) or tuple(p["spacing"])
        return {**p, "fixed": jnp.asarray(p["fixed"]), "moving": jnp.asarray(p["moving"]), "spacing": spacing}

    num = int(e.num_pairs)
    if config.data.kind == "subjects":  # ~100 regions: their mean only, no surface distances
        num = min(num, num_pairs(config, "test"))
        columns = [("dice_mean", "Dice (mean over regions)", 3), ("folding_pct", "% folding", 3),
                   ("sdlogj", "SD log J", 3), ("seconds", "s / pair", 3)]
        keys, measures = ["dice_mean"], ("dice", "jacobian")
    else:
        columns = [(f"dice/{v}", f"Dice {v}", 3) for v in label_names.values()] + [("dice_mean", "Dice mean", 3)]
        columns += [(f"assd/{v}", f"ASSD {v} (mm)", 2) for v in label_names.values()]
        keys = ["dice_mean"] + [f"dice/{v}" for v in label_names.values()]
        keys += [f"assd/{v}" for v in label_names.values()]
        if "disp" in first:
            columns.append(("epe_mm", "EPE (mm)", 2))
            keys.append("epe_mm")
        columns += [("folding_pct", "% folding", 2), ("seconds", "s / pair", 3)]
        measures = ("dice", "assd", "jacobian", "epe")
    baselines = [m for m in names if m not in ("identity", "supervised", "supervised_raw")]
    paired = tuple(("supervised", b) for b in baselines) if "supervised" in names else ()
    return Evaluation(pairs=pair, num_pairs=num, methods={n: run[n] for n in names},
                      measures=measures, label_names=label_names,
                      columns=tuple(columns), paired=paired, paired_keys=tuple(keys), info=info)


@functools.lru_cache(maxsize=8)
def _predictor(model, sigma, iterations, downsize=1):
    return make_predict(model, sigma=sigma, iterations=iterations, downsize=downsize)
