"""Multimodal registration through a translation network (Arar et al., CVPR 2020), and its baselines.

Pairs ``(I_a, I_b)``: ``I_a`` = moving image of modality A (T2-like), ``I_b`` = fixed image of modality B (T1). A
registration network R predicts ``φ`` from ``(I_a, I_b)`` and a translation network T maps A → B
(``jaxreg.models.translation``). ``config.objective`` picks what R is trained with:

* ``"translation"`` (the method): R and T jointly, per example
  ``L = w_tf ‖warp(T(I_a), φ) − I_b‖₁ + w_rf ‖T(warp(I_a, φ)) − I_b‖₁ + λ reg(φ)``
  (translate-first and register-first reconstructions; ‖·‖₁ is the mean absolute difference over voxels). T only
  sees ``I_a``, so it cannot undo the pair's deformation, and the register-first path punishes any fixed geometric
  change T makes: T is pushed to translate intensities and keep geometry, R to register. The paper's adversarial
  term (a discriminator making T's output look like modality B) is not implemented: T's target is the real
  ``I_b`` through the two reconstruction paths. Without it T's output stays blurred while R is inaccurate (an L1
  fit to a target still misaligned by R's error), which limits the method here (``configs/translation.py``).
  ``loss.register_first_updates_r=False`` puts φ under ``stop_gradient`` in the register-first path, so that path
  trains T only.
* any other name of ``losses.SIMILARITIES`` (``"ncc"``, ``"mi"``, ``"lncc"``, ``"nmi"``, ``"ngf"``, ...): the
  baseline, R alone with ``L = sim(I_b, warp(I_a, φ)) + λ reg(φ)`` directly across the two modalities (T's
  parameters exist but are unused).

``reg`` is ``config.loss.regularizer`` on the dense field (the velocity when diffeomorphic); the affine variant of R
needs none. ``λ`` is ``config.loss.reg_weights[objective]`` (the terms' scales differ between objectives).

Data (``config.data.kind``): ``"mni_slice"`` (``synthetic.mni_slice_pair``, 2-D MNI152 slices, moving
``contrast`` T2-like, known field), ``"synthetic"`` (``synthetic.synthetic_pair`` with ``same_contrast=False``:
random contrasts per pair, which leaves T no fixed mapping to learn), ``"mni"`` (3-D ``synthetic.mni_pair``,
``contrast="t2"``; it returns no true field, so TRE is not measured there, Dice only). Training and test pairs come
from ``data.seed`` and ``data.test_seed``.

Evaluation (``evaluate``): on ``eval.num_pairs`` held-out pairs, for R trained in ``workdir`` and the baselines
``eval.baselines`` (trained in ``eval.baseline_dirs[name]``, default ``WORKDIR_<name>``; missing ones are skipped
and listed), plus no registration and, optionally, the classical engine (``optimize.PRESETS[eval.classical_preset]``,
empty to skip): landmark TRE in mm, Dice (labels 1..K-1, mean and per label), % folding voxels, seconds per pair.
Landmarks: ``eval.landmarks`` points drawn (seeded per pair) among the fixed image's label-boundary voxels at
least ``eval.landmark_margin`` voxels from the border; their true moving positions are ``p + disp_true(p)``, and
``TRE = ‖(p + disp_pred(p)) − (p + disp_true(p))‖`` in mm (``metrics.tre``). For the translation run the table also
gives ``T L1``: ``mean |T(warp(I_a, disp_true)) − I_b|`` (how well T maps A to B once the geometry is right).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreg import losses, metrics, optimize, spatial, training
from jaxreg.data import datasets, io, synthetic
from jaxreg.models import translation as tmodels

OBJECTIVES = ("translation",) + tuple(losses.SIMILARITIES)
DATA_KINDS = ("mni_slice", "synthetic", "mni")


# ------------------------------------------------------------------------------------------------------- data
class GeneratedPairs:
    """Generated pairs with a known field: pair ``i`` uses the generator seeded ``(seed, i)``.

    ``pair(i)``: ``fixed``, ``moving`` ``shape`` float32; ``fixed_labels``, ``moving_labels`` int32; ``disp``
    ``(*shape, ndim)`` float32 voxels (pull: ``fixed[x] ≈ moving[x + disp(x)]``); ``spacing`` ``(ndim,)`` mm.
    """

    def __init__(self, kind: str, shape, *, seed: int, num_labels: int = 4, options=None):
        self.kind, self.shape, self.seed = kind, tuple(int(s) for s in shape), int(seed)
        self.options = dict(options or {})
        if kind == "mni_slice":
            if len(self.shape) != 2:
                raise ValueError(f"data.kind='mni_slice' needs a 2-D data.shape, got {self.shape}")
            synthetic._nilearn_data_dir()  # ImportError now when nilearn is missing
            self.num_labels = 4
        elif kind == "synthetic":
            self.num_labels = int(num_labels)
            self.options.setdefault("same_contrast", False)
        else:
            raise ValueError(f"GeneratedPairs: kind must be 'mni_slice' or 'synthetic', got {kind!r}")

    def __len__(self):
        return 2**31 - 1

    def pair(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        if self.kind == "mni_slice":
            p = synthetic.mni_slice_pair(rng, shape=self.shape, **self.options)
            spacing = np.asarray(p["spacing"], np.float64)
        else:
            p = synthetic.synthetic_pair(rng, shape=self.shape, num_labels=self.num_labels, **self.options)
            spacing = np.ones(len(self.shape))
        out = {k: p[k] for k in ("fixed", "moving", "fixed_labels", "moving_labels", "disp")}
        out["spacing"] = spacing
        return out


def make_dataset(cfg, *, split: str = "train"):
    """The dataset of a config's ``data`` block (``kind`` in ``DATA_KINDS``) for ``split`` ("train" or "test")."""
    if cfg.kind not in DATA_KINDS:
        raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {cfg.kind!r}")
    seed = int(cfg.seed if split == "train" else cfg.test_seed)
    options = dict(cfg.get("options") or {})
    if cfg.kind == "mni":
        options.setdefault("contrast", "t2")
        return datasets.MNIPairs(tuple(cfg.shape), seed=seed, resolution=cfg.get("resolution", 2), **options)
    return GeneratedPairs(cfg.kind, cfg.shape, seed=seed, num_labels=cfg.get("num_labels", 4), options=options)


# ------------------------------------------------------------------------------------------------------- model
def build_model(config, ndim: int) -> tmodels.TranslationRegistration:
    """R + T of ``config.model`` (``jaxreg.models.translation.build``) for ``ndim``-D images."""
    m = dict(config.model)
    for k in ("encoder", "decoder", "affine_encoder", "translation_encoder", "translation_decoder"):
        if k in m:
            m[k] = tuple(m[k] or ())
    return tmodels.build(ndim=ndim, **m)


# ------------------------------------------------------------------------------------------------------- loss
@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static loss options (hashable): see the module docstring."""

    objective: str = "translation"
    similarity_options: tuple = ()
    regularizer: str | None = "diffusion"
    reg_weight: float = 0.1
    translate_first_weight: float = 1.0
    register_first_weight: float = 1.0
    register_first_updates_r: bool = True

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"config.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.regularizer is not None and self.regularizer not in losses.REGULARIZERS:
            raise ValueError(f"loss.regularizer must be one of {sorted(losses.REGULARIZERS)} or None, got "
                             f"{self.regularizer!r}")


def loss_spec(config) -> LossSpec:
    """The ``LossSpec`` of a config (``objective`` and its entries in ``loss``)."""
    c = config.loss
    objective = config.get("objective", "translation")
    weights = dict(c.get("reg_weights") or {})
    if objective not in weights:
        raise ValueError(f"loss.reg_weights has no entry for objective {objective!r} (has {sorted(weights)})")
    options = dict((c.get("similarity_options") or {}).get(objective) or {}) if objective != "translation" else {}
    return LossSpec(objective=objective, similarity_options=tuple(sorted(options.items())),
                    regularizer=c.get("regularizer") or None, reg_weight=float(weights[objective]),
                    translate_first_weight=float(c.get("translate_first_weight", 1.0)),
                    register_first_weight=float(c.get("register_first_weight", 1.0)),
                    register_first_updates_r=bool(c.get("register_first_updates_r", True)))


def l1(a, b):
    """Mean absolute difference of two same-shaped images (the paper's ‖·‖₁, normalised by the voxel count)."""
    if a.shape != b.shape:
        raise ValueError(f"l1: shapes differ, {a.shape} and {b.shape}")
    return jnp.mean(jnp.abs(a - b))


def example_terms(params, model, moving, fixed, spec: LossSpec) -> dict:
    """Loss terms of one unbatched pair (``moving`` = ``I_a``, ``fixed`` = ``I_b``, ``(*S)``): ``similarity``
    (weighted reconstruction sum, or the baseline similarity), ``translate_first``, ``register_first`` (0 for
    baselines), ``regularizer`` and ``loss``."""
    zero = jnp.zeros((), moving.dtype)
    if spec.objective == "translation":
        out = model.apply(params, moving, fixed, method=tmodels.TranslationRegistration.register)
        translate = lambda x: model.apply(params, x, method=tmodels.TranslationRegistration.translate)
        disp = out["disp"] if spec.register_first_updates_r else jax.lax.stop_gradient(out["disp"])
        tf = l1(spatial.warp(translate(moving), out["disp"]), fixed)  # translate first: R(T(I_a), φ)
        rf = l1(translate(spatial.warp(moving, disp)), fixed)  # register first: T(R(I_a, φ))
        sim = spec.translate_first_weight * tf + spec.register_first_weight * rf
    else:
        out = model.apply(params, moving, fixed, method=tmodels.TranslationRegistration.register)
        sim = losses.SIMILARITIES[spec.objective](fixed, out["warped"], **dict(spec.similarity_options))
        tf = rf = zero
    field = out.get("velocity")  # dense R only; the affine variant is not regularised
    reg = losses.REGULARIZERS[spec.regularizer](field) if spec.regularizer and field is not None else zero
    return {"similarity": sim, "translate_first": tf, "register_first": rf, "regularizer": reg,
            "loss": sim + spec.reg_weight * reg}


def loss_terms(params, model, batch, spec: LossSpec):
    """Batch-mean loss and terms for a batch ``{"moving", "fixed"}`` of ``(B, *S)`` images."""
    terms = jax.vmap(lambda m, f: example_terms(params, model, m, f, spec))(batch["moving"], batch["fixed"])
    terms = {k: jnp.mean(v) for k, v in terms.items()}
    return terms["loss"], terms


def make_train_step(model, tx, spec: LossSpec):
    """``train_step(state, batch, key) -> (state, metrics)``, jit-compiled with ``state`` donated.

    As ``training.make_train_step``: ``metrics`` holds the terms, ``grad_norm`` and ``finite``; a non-finite loss or
    gradient leaves the state unchanged (``training.check_finite`` turns it into an error). ``key`` is unused.
    """

    def train_step(state, batch, key):
        del key
        (_, terms), grads = jax.value_and_grad(loss_terms, has_aux=True)(state.params, model, batch, spec)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)
        new = training.TrainState(step=state.step + 1, params=jax.tree_util.tree_map(keep, params, state.params),
                                  opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state))
        return new, {**terms, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(train_step, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _cached_step(model, optimizer: str, learning_rate: float, grad_clip: float, spec: LossSpec):
    tx = training.make_optimizer(optimizer, learning_rate, grad_clip=grad_clip or None)
    return tx, make_train_step(model, tx, spec)


# ------------------------------------------------------------------------------------------------------- fit
LOG_COLUMNS = ("loss", "similarity", "translate_first", "register_first", "regularizer", "grad_norm")  # metrics.jsonl


def fit(config, workdir, *, stop_at: int | None = None, progress: bool = True):
    """Train R (and T for ``objective="translation"``) in ``workdir``; resume from its latest checkpoint.

    Writes ``workdir/config.json``, ``workdir/checkpoints/`` (orbax, every ``train.checkpoint_every`` steps and at
    the end) and ``workdir/metrics.jsonl`` (every ``train.log_every`` steps: loss terms, grad_norm, steps_per_s).
    A resumed run sees the batches an uninterrupted one would. ``stop_at`` ends early after that step (saving), as
    a kill would. Returns the final ``TrainState``.
    """
    dataset = make_dataset(config.data, split="train")
    spec = loss_spec(config)
    model = build_model(config, len(dataset.shape))
    t = config.train
    tx, step_fn = _cached_step(model, t.optimizer, float(t.learning_rate), float(t.get("grad_clip") or 0.0), spec)
    mesh = training.make_mesh()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    key = jax.random.key(config.seed)
    state = training.replicate(training.create_state(model, tx, jax.random.fold_in(key, 0), dataset.shape), mesh)
    manager = training.checkpoint_manager(os.path.join(workdir, "checkpoints"), save_every=t.checkpoint_every,
                                          keep=t.get("keep_checkpoints", 3))
    restored = training.restore_checkpoint(manager, state)
    if restored is not None:
        state = restored
    start = int(state.step)
    last = t.steps if stop_at is None else min(stop_at, t.steps)
    step_key = jax.random.fold_in(key, 1)
    loader = datasets.Loader(dataset, batch_size=t.batch_size, start=start, stop=last, prefetch=t.get("prefetch", 2))
    batches = iter(loader)  # yields (step, batch) for start <= step < last, in order

    def one_step(state, step):
        batch = next(batches)[1]
        batch = training.shard_batch({k: batch[k] for k in ("moving", "fixed")}, mesh)
        return step_fn(state, batch, jax.random.fold_in(step_key, step))

    try:
        return training.run_loop(state, one_step, start=start, stop=last, total=t.steps, manager=manager,
                                 log_path=os.path.join(workdir, "metrics.jsonl"), columns=LOG_COLUMNS,
                                 log_every=t.log_every, checkpoint_every=t.checkpoint_every, progress=progress,
                                 desc=f"train ({spec.objective})")
    finally:
        loader.close()


def load_trained(config, workdir, shape, *, step: int | None = None):
    """``(model, params, step)`` from ``workdir/checkpoints`` for images of spatial ``shape``."""
    model = build_model(config, len(shape))
    t = config.train
    tx = training.make_optimizer(t.optimizer, float(t.learning_rate), grad_clip=float(t.get("grad_clip") or 0) or None)
    template = training.create_state(model, tx, jax.random.key(0), shape)
    manager = training.checkpoint_manager(os.path.join(workdir, "checkpoints"))
    try:
        state = training.restore_checkpoint(manager, template, step)
    finally:
        manager.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: run train.py first")
    return model, state.params, int(state.step)


# ------------------------------------------------------------------------------------------------------- evaluation
def landmarks(fixed_labels, *, num: int, seed, margin: int = 4) -> np.ndarray:
    """``(N, ndim)`` int voxel positions: ``num`` label-boundary voxels of ``fixed_labels`` (``(*S)`` int), drawn
    without replacement by ``np.random.default_rng(seed)`` among those at least ``margin`` voxels from the border
    (all of them when there are fewer). A boundary voxel has a face neighbour with another label."""
    lab = np.asarray(fixed_labels)
    if lab.ndim not in (2, 3):
        raise ValueError(f"fixed_labels must be a 2-D or 3-D label map, got shape {lab.shape}")
    edge = np.zeros(lab.shape, bool)
    for axis in range(lab.ndim):
        d = np.diff(lab, axis=axis) != 0
        lo = [slice(None)] * lab.ndim
        hi = [slice(None)] * lab.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        edge[tuple(lo)] |= d
        edge[tuple(hi)] |= d
    inner = np.zeros(lab.shape, bool)
    inner[tuple(slice(margin, n - margin) for n in lab.shape)] = True
    points = np.argwhere(edge & inner)
    if len(points) > num:
        points = points[np.sort(np.random.default_rng(seed).choice(len(points), num, replace=False))]
    return points


def tre(points, disp_pred, disp_true, spacing) -> np.ndarray:
    """Per-landmark TRE in mm: ``‖(p + disp_pred(p)) − (p + disp_true(p))‖`` at voxel positions ``points``."""
    idx = tuple(np.asarray(points).T)
    p = np.asarray(points, np.float64)
    return metrics.tre(p + np.asarray(disp_pred, np.float64)[idx], p + np.asarray(disp_true, np.float64)[idx],
                       spacing=spacing)


def _label(config) -> str:
    return f"R: {config.get('objective', 'translation')} ({config.model.get('registration', 'dense')})"


def _read_config(workdir):
    import ml_collections

    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _runs(config, workdir):
    """``[(label, config, workdir)]`` for the trained run and each baseline found; and the baselines missing."""
    runs, missing = [(_label(config), config, workdir)], []
    seen = {config.get("objective", "translation")}
    dirs = dict(config.eval.get("baseline_dirs") or {})
    for name in config.eval.get("baselines") or ():
        if name in seen:
            continue
        seen.add(name)
        d = dirs.get(name) or f"{os.path.normpath(workdir)}_{name}"
        if not os.path.isfile(os.path.join(d, "config.json")) or not os.path.isdir(os.path.join(d, "checkpoints")):
            missing.append(f"{name} ({d})")
            continue
        c = _read_config(d)
        runs.append((_label(c), c, d))
    return runs, missing


COLUMNS = (("tre", "TRE (mm)"), ("tre_p90", "TRE p90 (mm)"), ("dice_mean", "Dice"), ("folding_pct", "% folding"),
           ("t_l1", "T L1"), ("seconds", "s / pair"))


def markdown(summary, steps) -> str:
    """One row per method: mean ± std over pairs of the ``COLUMNS`` (empty where not measured)."""
    lines = ["| method | steps | " + " | ".join(t for _, t in COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 2)]
    for name, s in summary.items():
        cells = []
        for key, _ in COLUMNS:
            v = s.get(key)
            if v is None or not v["n"] or (key == "folding_pct" and name == "identity"):
                cells.append("–")
                continue
            d = 4 if key == "seconds" else 3
            cells.append(f"{v['mean']:.{d}f} ± {v['std']:.{d}f}")
        lines.append(f"| {name} | {steps.get(name, '–')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(config, workdir, *, out=None, num_pairs: int | None = None) -> dict:
    """Evaluate R of ``workdir`` and the baselines on held-out pairs (see module docstring); write
    ``out`` (default ``workdir/eval``) ``results.csv`` (one row per pair and method), ``results.json`` (rows,
    summary, steps, missing baselines) and ``results.md``, all atomically. Returns ``{"rows", "summary", "steps",
    "missing", "markdown"}``."""
    dataset = make_dataset(config.data, split="test")
    e = config.eval
    n = int(num_pairs or e.num_pairs)
    shape = dataset.shape
    runs, missing = _runs(config, workdir)
    fns, steps, translators = {"identity": None}, {}, {}
    for label, c, d in runs:
        model, params, step = load_trained(c, d, shape)
        steps[label] = step
        reg = jax.jit(functools.partial(model.apply, method=tmodels.TranslationRegistration.register))
        fns[label] = lambda f, m, reg=reg, params=params: reg(params, m, f)["disp"]  # every fn takes (fixed, moving)
        if c.get("objective", "translation") == "translation":
            tr = jax.jit(functools.partial(model.apply, method=tmodels.TranslationRegistration.translate))
            translators[label] = functools.partial(tr, params)
    preset = e.get("classical_preset") or ""
    if preset:
        label = f"classical ({preset} preset)"
        fns[label] = lambda f, m: optimize.register(f, m, **optimize.PRESETS[preset]).disp
    labels = list(range(1, dataset.num_labels))
    rows = []
    out = out or os.path.join(workdir, "eval")
    n_figures = int(e.get("figures", 0))
    for i in range(-1, n):  # -1: warm-up (compilation), not recorded
        p = dataset.pair(max(i, 0))
        f, m = jnp.asarray(p["fixed"]), jnp.asarray(p["moving"])
        spacing = tuple(float(s) for s in p.get("spacing", np.ones(len(shape))))
        pts = landmarks(p["fixed_labels"], num=int(e.landmarks), seed=[int(config.data.test_seed), max(i, 0)],
                        margin=int(e.get("landmark_margin", 4))) if "disp" in p else None
        shown = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            disp = jnp.zeros(shape + (len(shape),), f.dtype) if fn is None else jax.block_until_ready(fn(f, m))
            seconds = time.perf_counter() - t0
            if i < 0:
                continue
            warped = np.asarray(spatial.warp_labels(jnp.asarray(p["moving_labels"]), disp))
            dice = metrics.dice(p["fixed_labels"], warped, labels=labels)
            jac = np.asarray(spatial.jacobian_determinant(disp))
            row = {"pair": i, "method": name, "seconds": seconds,
                   "dice_mean": float(np.nanmean(list(dice.values()))), "dice": dice,
                   "folding_pct": 100.0 * metrics.folding_fraction(jac)}
            if pts is not None:
                err = tre(pts, disp, p["disp"], spacing)
                row.update(tre=float(err.mean()), tre_p90=float(np.percentile(err, 90)), landmarks=len(pts))
            if name in translators and "disp" in p:
                aligned = spatial.warp(m, jnp.asarray(p["disp"]))
                row["t_l1"] = float(jnp.mean(jnp.abs(translators[name](aligned) - f)))
            rows.append(row)
            shown[name] = disp
        if 0 <= i < n_figures:
            _figure(os.path.join(out, "figures", f"pair{i:03d}.png"), f, m, shown, translators)
    summary = {name: metrics.summarize([r for r in rows if r["method"] == name]) for name in fns}
    table = markdown(summary, steps)
    os.makedirs(out, exist_ok=True)
    metrics.write_csv(os.path.join(out, "results.csv"), rows)
    metrics.write_json(os.path.join(out, "results.json"), {"rows": rows, "summary": summary, "steps": steps,
                                                           "missing": missing, "num_pairs": n})
    note = "" if not missing else f"\nbaselines not found (train them first): {', '.join(missing)}\n"

    def write_md(tmp):
        with open(tmp, "w") as fh:
            fh.write(table + note)

    io.atomic_write(os.path.join(out, "results.md"), write_md)
    return {"rows": rows, "summary": summary, "steps": steps, "missing": missing, "markdown": table + note}


def _figure(path, fixed, moving, disps, translators):
    """PNG: fixed, moving, T(moving) of the translation run, and moving warped by each method (2-D; 3-D: middle
    slice of the last axis). Skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cut = (lambda a: np.asarray(a)[..., np.asarray(a).shape[-1] // 2]) if fixed.ndim == 3 else np.asarray
    panels = [("fixed (B)", cut(fixed)), ("moving (A)", cut(moving))]
    for name, tr in translators.items():
        panels.append((f"T(moving), {name}", cut(tr(moving))))
    for name, disp in disps.items():
        if name != "identity":
            panels.append((name, cut(spatial.warp(moving, disp))))
    fig, ax = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3))
    for a, (title, img) in zip(np.atleast_1d(ax), panels):
        a.imshow(img.T, cmap="gray", origin="lower")
        a.set_title(title, fontsize=7)
        a.set_xticks([])
        a.set_yticks([])
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
