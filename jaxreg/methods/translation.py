"""Multimodal registration through a translation network (Arar et al., CVPR 2020), and its baselines.

Pairs ``(I_a, I_b)``: ``I_a`` = moving image of modality A (T2-like), ``I_b`` = fixed image of modality B (T1). A
registration network R predicts ``φ`` from ``(I_a, I_b)`` and a translation network T maps A → B
(``jaxreg.models.translation``). ``config.objective`` picks what R is trained with:

* ``"translation"`` (the method): R and T jointly, per example
  ``L = w_tf ‖warp(T(I_a), φ) − I_b‖₁ + w_rf ‖T(warp(I_a, φ)) − I_b‖₁ + λ reg(φ)``
  (translate-first and register-first reconstructions; ‖·‖₁ is the mean absolute difference over voxels). T only
  sees ``I_a``, so it cannot undo the pair's deformation, and the register-first path punishes any fixed geometric
  change T makes: T is pushed to translate intensities and keep geometry, R to register. Without more, T's output
  stays blurred while R is inaccurate (an L1 fit to a target still misaligned by R's error).
  The paper's adversarial term (``loss.adversarial_weight`` ``w_adv`` > 0, needs ``model.discriminator``): a
  patch discriminator D (``models.translation.PatchDiscriminator``) tells real modality-B images from ``T(I_a)``.
  Least-squares GAN (LSGAN, Mao et al. 2017) losses, each the mean over D's patch logits:
  generator ``L_adv = mean (D(T(I_a)) − 1)²`` (added to L as ``w_adv L_adv``, with D's parameters under
  ``stop_gradient``) and discriminator ``L_D = ½ mean (D(I_b) − 1)² + ½ mean D(sg(T(I_a)))²`` (T's output under
  ``stop_gradient``). The step minimises ``L + L_D`` with one optimiser (``training.fit`` is unchanged): R and T
  get gradient from ``L`` only, D from ``L_D`` only, so one step is simultaneous gradient descent of both players.
  The logged ``loss`` is that sum; ``adversarial`` is ``L_adv`` (unweighted), ``discriminator`` ``L_D``.
  ``loss.register_first_updates_r=False`` puts φ under ``stop_gradient`` in the register-first path, so that path
  trains T only.
* any other name of ``losses.SIMILARITIES`` (``"ncc"``, ``"mi"``, ``"lncc"``, ``"nmi"``, ``"ngf"``, ...): the
  baseline, R alone with ``L = sim(I_b, warp(I_a, φ)) + λ reg(φ)`` directly across the two modalities (T's
  parameters exist but are unused; ``loss.adversarial_weight`` is ignored).

``reg`` is ``config.loss.regularizer`` on the dense field (the velocity when diffeomorphic); the affine variant of R
needs none. ``λ`` is ``config.loss.reg_weights[objective]`` (the terms' scales differ between objectives).

Data (``config.data.kind``): ``"open_ms"`` (:class:`OpenMSSlices`: real T1 / T2 / FLAIR axial slices of
``open_ms`` patients, split by patient, known field; ``configs/translation_real.py``), ``"mni_slice"``
(``synthetic.mni_slice_pair``, 2-D MNI152 slices, moving ``contrast`` T2-like, known field), ``"synthetic"``
(``synthetic.synthetic_pair`` with ``same_contrast=False``: random contrasts per pair, which leaves T no fixed
mapping to learn), ``"mni"`` (3-D ``synthetic.mni_pair``,
``contrast="t2"``; it returns no true field, so TRE is not measured there, Dice only). Training and test pairs come
from ``data.seed`` and ``data.test_seed``.

Evaluation (``evaluation``, run by ``evaluate.py``): on ``eval.num_pairs`` held-out pairs, for R trained in
``workdir`` and the baselines ``eval.baselines`` (trained in ``eval.baseline_dirs[name]``, default
``WORKDIR_<name>``; missing ones are skipped and listed), plus no registration and, optionally, the classical
engine (``optimize.PRESETS[eval.classical_preset]``, empty to skip): landmark TRE in mm, Dice (labels 1..K-1, or the
dataset's ``label_names``; mean and per label), % folding voxels, seconds per pair (for the translation run this
includes computing ``T L1``).
Landmarks: ``eval.landmarks`` points drawn (seeded per pair) among the fixed image's label-boundary voxels at
least ``eval.landmark_margin`` voxels from the border; their true moving positions are ``p + disp_true(p)``, and
``TRE = ‖(p + disp_pred(p)) − (p + disp_true(p))‖`` in mm (``metrics.tre``). For the translation run the table also
gives ``T L1``: ``mean |T(warp(I_a, disp_true)) − I_b|`` (how well T maps A to B once the geometry is right).
Where the true field is known, ``EPE (mm)`` is the mean end-point error ``‖disp_pred(x) − disp_true(x)‖`` (mm) over
the fixed image's labelled (brain) voxels. The paired tests compare the trained R with each baseline found (TRE,
EPE, Dice).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from jaxreg import losses, spatial, training
from jaxreg.data import datasets, multimodal, preprocess, synthetic
from jaxreg.methods import Evaluation, classical
from jaxreg.models import translation as tmodels

OBJECTIVES = ("translation",) + tuple(losses.SIMILARITIES)
DATA_KINDS = ("mni_slice", "synthetic", "mni", "open_ms", "prostate")


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


class OpenMSSlices:
    """2-D multimodal pairs from axial slices of real ``open_ms`` brains, with a known field.

    The volumes: ``multimodal.open_ms_volumes(folder, patient, resolution=resolution)`` of each of ``patients``
    (co-registered contrasts in [0, 1], tissue labels 0 bg, 1 CSF, 2 GM, 3 WM, 4 lesion), cached per process.
    Usable slices: axial ``vol[:, :, z]`` whose brain area (labels > 0) is at least ``min_brain_fraction`` of the
    patient's largest slice's. Pair ``i`` (generator ``np.random.default_rng([seed, i])``) draws a usable slice (of
    any patient of the split), a moving contrast among ``moving_contrasts`` and a motion as
    ``synthetic.mni_slice_pair`` does: a random affine about the grid centre (rotation up to 10°, scaling ±10 %,
    translation ±8 mm, all times ``affine_scale``) plus a smooth deformation (largest vector ``deform_scale``
    voxels, control spacing ``deform_spacing_mm``), a map ``y(x) = x + disp(x)``. Slices are centre-cropped/padded
    to ``shape`` first. The moving image is the ``moving_contrast`` slice as stored; the fixed image is the
    ``fixed_contrast`` slice pulled through the map (``fixed[x] = T1(x + disp(x))``, linear; labels nearest), so
    ``disp`` is the exact pull field of the pair, ``fixed[x] ≈ moving[x + disp(x)]`` up to the contrast, with no
    field inversion. (Equivalently the moving anatomy is displaced by the inverse map relative to the fixed one.)

    ``pair(i)``: ``fixed``, ``moving`` ``shape`` float32 in [0, 1]; ``fixed_labels``, ``moving_labels`` int32;
    ``disp`` ``(*shape, 2)`` float32 voxels; ``spacing`` ``(2,)`` mm; ``patient``, ``slice``, ``contrast``.
    ``label_names``: the tissues scored (CSF, GM, WM; lesions are too small and sparse on 2-D slices).
    """

    label_names = {1: "CSF", 2: "GM", 3: "WM"}
    num_labels = 5
    CONTRASTS = ("T1", "T2", "FLAIR", "T1POST")

    def __init__(self, folder, patients, shape, *, seed: int, fixed_contrast: str = "T1",
                 moving_contrasts=("T2", "FLAIR"), resolution: float = 2.0, min_brain_fraction: float = 0.25,
                 affine_scale: float = 1.0, deform_scale: float = 3.0, deform_spacing_mm: float = 16.0):
        self.shape, self.seed = tuple(int(s) for s in shape), int(seed)
        if len(self.shape) != 2 or min(self.shape) < 8:
            raise ValueError(f"data.shape must be 2-D with sides >= 8 for data.kind='open_ms', got {self.shape}")
        self.patients = tuple(str(p) for p in (patients or ()))
        if not self.patients:
            raise ValueError("data.train_patients / data.test_patients: no patient given for data.kind='open_ms'")
        self.moving_contrasts = tuple(str(c) for c in (moving_contrasts or ()))
        for name, values in (("data.fixed_contrast", (fixed_contrast,)), ("data.moving_contrasts",
                                                                          self.moving_contrasts)):
            if not values or any(v not in self.CONTRASTS for v in values):
                raise ValueError(f"{name} must name contrasts among {self.CONTRASTS}, got {values}")
        if not 0.0 <= float(min_brain_fraction) <= 1.0:
            raise ValueError(f"data.min_brain_fraction must be in [0, 1], got {min_brain_fraction}")
        if not float(resolution) > 0:
            raise ValueError(f"data.resolution must be > 0 (mm), got {resolution}")
        self.folder, self.fixed_contrast, self.resolution = str(folder), str(fixed_contrast), float(resolution)
        self.motion = dict(affine_scale=float(affine_scale), deform_scale=float(deform_scale),
                           deform_spacing_mm=float(deform_spacing_mm))
        self.slices = []  # (patient, z)
        for p in self.patients:
            labels = self._volumes(p)["labels"]
            area = (labels > 0).sum(axis=(0, 1))
            self.slices += [(p, int(z)) for z in np.flatnonzero(area >= float(min_brain_fraction) * area.max())]

    def _volumes(self, patient):
        contrasts = tuple(dict.fromkeys((self.fixed_contrast,) + self.moving_contrasts))
        return multimodal.open_ms_volumes_cached(self.folder, patient, contrasts, self.resolution)

    def __len__(self):
        return 2**31 - 1

    def pair(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        patient, z = self.slices[int(rng.integers(len(self.slices)))]
        contrast = self.moving_contrasts[int(rng.integers(len(self.moving_contrasts)))]
        vols = self._volumes(patient)
        spacing = np.linalg.norm(np.asarray(vols["affine"])[:3, :2], axis=0)
        sl = {k: preprocess.crop_or_pad(vols[k][:, :, z], self.shape)
              for k in (self.fixed_contrast, contrast, "labels")}
        shape, m = self.shape, self.motion
        lin = synthetic._random_linear(rng, 2, 10.0 * m["affine_scale"], 0.10 * m["affine_scale"])
        shift = rng.uniform(-8.0, 8.0, 2) / spacing * m["affine_scale"]
        centre = (np.asarray(shape, np.float64) - 1) / 2
        matrix = np.eye(3)
        matrix[:2, :2] = lin
        matrix[:2, 2] = centre - lin @ centre + shift
        field = synthetic._scaled_field(rng, shape, 2, m["deform_spacing_mm"] / spacing.mean(), m["deform_scale"])
        y = preprocess._coords(matrix, shape, shape) + np.moveaxis(field, -1, 0)
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
        fixed = synthetic._warp(sl[self.fixed_contrast].astype(np.float64), y, 1)
        fixed_labels = synthetic._warp(sl["labels"], y, 0)
        return {"fixed": np.clip(fixed, 0.0, 1.0).astype(np.float32),
                "moving": sl[contrast].astype(np.float32),
                "fixed_labels": fixed_labels.astype(np.int32), "moving_labels": sl["labels"].astype(np.int32),
                "disp": np.moveaxis(y - grid, 0, -1).astype(np.float32), "spacing": spacing,
                "patient": patient, "slice": z, "contrast": contrast}


class ProstatePairs:
    """Real 3-D MR (modality A, moving) ↔ TRUS (B, fixed) pairs of ``prostate_mr_trus`` on the TRUS field of view.

    Case pair: ``multimodal.prostate_arrays(start="centre", resolution=resolution, shape=shape)`` (the MR resampled
    onto the TRUS field of view, at 0.4 mm or ``resolution`` mm, with the two grids' centres together, both in
    [0, 1], centre-cropped/padded to ``shape``); no reference alignment exists. ``motion=False`` (test): pair ``i``
    is case ``cases[i % len(cases)]`` as it is, with its gland labels and, where the case has them, ``landmarks`` /
    ``moving_landmarks`` (blob centroids, voxels). ``motion=True`` (training): pair ``i`` is a case drawn by
    ``np.random.default_rng([seed, i])`` whose MR (and gland) is pulled through a random
    ``multimodal.smooth_motion`` of ``motion_options`` (augmentation of the ten-odd cases; the pair's own
    misalignment stays, unknown), and with ``augment_fixed`` the TRUS too, through another one (otherwise T can
    learn each training case's one TRUS image by heart and R has nothing to do). ``pair(i)``: ``fixed``,
    ``moving`` ``shape`` float32, ``fixed_labels``, ``moving_labels`` int32, ``spacing`` ``(3,)`` mm, ``case``.
    """

    label_names = {1: "gland"}
    num_labels = 2

    def __init__(self, folder, cases, shape, *, seed: int, motion: bool, resolution: float | None = None,
                 augment_fixed: bool = False, motion_options=None):
        self.shape, self.seed, self.motion = tuple(int(s) for s in shape), int(seed), bool(motion)
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"data.shape must be 3-D with sides >= 8 for data.kind='prostate', got {self.shape}")
        self.cases = tuple(int(c) for c in (cases or ()))
        if not self.cases:
            raise ValueError("data.train_cases / data.test_cases: no case given for data.kind='prostate'")
        self.motion_options, self.augment_fixed = dict(motion_options or {}), bool(augment_fixed)
        loaded = {int(c.name.rsplit("_", 1)[1]): c for c in multimodal.prostate_cases(folder, cases=self.cases)}
        missing = sorted(set(self.cases) - set(loaded))
        if missing:
            raise ValueError(f"data.folder {folder}: cases {missing} not found")
        self.arrays = {k: multimodal.prostate_arrays(c, start="centre", resolution=resolution, shape=self.shape)
                       for k, c in loaded.items()}

    def __len__(self):
        return 2**31 - 1 if self.motion else len(self.cases)

    def pair(self, index: int) -> dict:
        if not self.motion:
            case = self.cases[int(index) % len(self.cases)]
            keys = ("fixed", "moving", "fixed_labels", "moving_labels", "spacing", "landmarks", "moving_landmarks")
            return {**{k: v for k, v in self.arrays[case].items() if k in keys}, "case": case}
        rng = np.random.default_rng([self.seed, int(index)])
        case = self.cases[int(rng.integers(len(self.cases)))]
        a = self.arrays[case]
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in self.shape], indexing="ij"))
        out = {"spacing": a["spacing"], "case": case}
        for side in ("moving", "fixed") if self.augment_fixed else ("moving",):
            u = multimodal.smooth_motion(self.shape, a["spacing"], seed=int(rng.integers(2**31)),
                                         **self.motion_options)
            y = grid + np.moveaxis(u, -1, 0)
            out[side] = ndimage.map_coordinates(a[side], y, order=1, cval=0.0)
            out[f"{side}_labels"] = ndimage.map_coordinates(a[f"{side}_labels"], y, order=0, cval=0)
        return {"fixed": a["fixed"], "fixed_labels": a["fixed_labels"], **out}


def make_dataset(cfg, *, split: str = "train"):
    """The dataset of a config's ``data`` block (``kind`` in ``DATA_KINDS``) for ``split`` ("train" or "test")."""
    if cfg.kind not in DATA_KINDS:
        raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {cfg.kind!r}")
    seed = int(cfg.seed if split == "train" else cfg.test_seed)
    options = dict(cfg.options)
    if cfg.kind == "open_ms":
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        patients = cfg.train_patients if split == "train" else cfg.test_patients
        return OpenMSSlices(cfg.folder, tuple(patients), cfg.shape, seed=seed,
                            fixed_contrast=cfg.get("fixed_contrast", "T1"),
                            moving_contrasts=tuple(cfg.moving_contrasts),
                            resolution=cfg.resolution, min_brain_fraction=cfg.get("min_brain_fraction", 0.25),
                            **options)
    if cfg.kind == "prostate":
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return ProstatePairs(cfg.folder, tuple(cfg.train_cases if split == "train" else cfg.test_cases), cfg.shape,
                             seed=seed, motion=split == "train", resolution=cfg.get("resolution"),
                             augment_fixed=cfg.get("augment_fixed", False), motion_options=options)
    if cfg.kind == "mni":
        options.setdefault("contrast", "t2")
        return datasets.MNIPairs(tuple(cfg.shape), seed=seed, resolution=cfg.resolution, **options)
    return GeneratedPairs(cfg.kind, cfg.shape, seed=seed, num_labels=cfg.num_labels, options=options)


# ------------------------------------------------------------------------------------------------------- model
def build_model(config, ndim: int) -> tmodels.TranslationRegistration:
    """R + T of ``config.model`` (``jaxreg.models.translation.build``) for ``ndim``-D images."""
    m = dict(config.model)
    for k in ("encoder", "decoder", "affine_encoder", "translation_encoder", "translation_decoder", "discriminator"):
        if k in m:
            m[k] = tuple(m[k] or ())
    return tmodels.build(ndim=ndim, **m)


# ------------------------------------------------------------------------------------------------------- loss
def l1(a, b):
    """Mean absolute difference of two same-shaped images (the paper's ‖·‖₁, normalised by the voxel count)."""
    if a.shape != b.shape:
        raise ValueError(f"l1: shapes differ, {a.shape} and {b.shape}")
    return jnp.mean(jnp.abs(a - b))


@dataclasses.dataclass(frozen=True)
class Loss:
    """The loss of R (and T) as a hashable callable ``loss(params, batch, key) -> (value, terms)`` for a batch
    ``{"moving", "fixed"}`` of ``(B, *S)`` images (``key`` unused); see the module docstring."""

    model: tmodels.TranslationRegistration
    objective: str = "translation"
    similarity_options: tuple = ()
    regularizer: str | None = "diffusion"
    reg_weight: float = 0.1
    translate_first_weight: float = 1.0
    register_first_weight: float = 1.0
    register_first_updates_r: bool = True
    adversarial_weight: float = 0.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"config.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.regularizer is not None and self.regularizer not in losses.REGULARIZERS:
            raise ValueError(f"loss.regularizer must be one of {sorted(losses.REGULARIZERS)} or None, got "
                             f"{self.regularizer!r}")
        if not self.adversarial_weight >= 0:
            raise ValueError(f"loss.adversarial_weight must be >= 0, got {self.adversarial_weight}")
        if self.adversarial and self.model.discriminator is None:
            raise ValueError("loss.adversarial_weight > 0 needs a discriminator: set model.discriminator, e.g. "
                             "(16, 32, 64)")

    @property
    def adversarial(self) -> bool:
        """Whether the adversarial term and D's loss are on (objective "translation", ``adversarial_weight > 0``)."""
        return self.objective == "translation" and self.adversarial_weight > 0

    def example(self, params, moving, fixed) -> dict:
        """Terms of one unbatched pair (``moving`` = ``I_a``, ``fixed`` = ``I_b``, ``(*S)``): ``similarity``
        (weighted reconstruction sum, or the baseline similarity), ``translate_first``, ``register_first`` (0 for
        baselines), ``regularizer``, ``adversarial`` (``L_adv``) and ``discriminator`` (``L_D``) (0 when off),
        and ``loss`` (``L + L_D``, module docstring)."""
        model, zero = self.model, jnp.zeros((), moving.dtype)
        out = model.apply(params, moving, fixed, method=tmodels.TranslationRegistration.register)
        if self.objective == "translation":
            translate = lambda x: model.apply(params, x, method=tmodels.TranslationRegistration.translate)  # noqa: E731
            disp = out["disp"] if self.register_first_updates_r else jax.lax.stop_gradient(out["disp"])
            translated = translate(moving)
            tf = l1(spatial.warp(translated, out["disp"]), fixed)  # translate first: R(T(I_a), φ)
            rf = l1(translate(spatial.warp(moving, disp)), fixed)  # register first: T(R(I_a, φ))
            sim = self.translate_first_weight * tf + self.register_first_weight * rf
        else:
            sim = losses.SIMILARITIES[self.objective](fixed, out["warped"], **dict(self.similarity_options))
            tf = rf = zero
        field = out.get("velocity")  # dense R only; the affine variant is not regularised
        reg = losses.REGULARIZERS[self.regularizer](field) if self.regularizer and field is not None else zero
        adv = disc = zero
        if self.adversarial:
            critic = lambda p, x: model.apply(p, x, method=tmodels.TranslationRegistration.discriminate)  # noqa: E731
            adv = jnp.mean((critic(_freeze_discriminator(params), translated) - 1.0) ** 2)  # trains T only
            fake = jax.lax.stop_gradient(translated)
            disc = 0.5 * (jnp.mean((critic(params, fixed) - 1.0) ** 2) + jnp.mean(critic(params, fake) ** 2))
        return {"similarity": sim, "translate_first": tf, "register_first": rf, "regularizer": reg,
                "adversarial": adv, "discriminator": disc,
                "loss": sim + self.reg_weight * reg + self.adversarial_weight * adv + disc}

    def __call__(self, params, batch, key):
        del key
        terms = jax.vmap(lambda m, f: self.example(params, m, f))(batch["moving"], batch["fixed"])
        terms = {k: jnp.mean(v) for k, v in terms.items()}
        return terms.pop("loss"), terms


def _freeze_discriminator(params):
    """``params`` (``{"params": {...}}``) with the discriminator's subtree under ``stop_gradient``."""
    inner = dict(params["params"])
    inner["discriminator"] = jax.lax.stop_gradient(inner["discriminator"])
    return {**params, "params": inner}


def make_loss(config, ndim: int) -> Loss:
    """The ``Loss`` of a config (``objective`` and its entries in ``loss``) for ``ndim``-D images."""
    c = config.loss
    objective = config.objective
    weights = dict(c.reg_weights)
    if objective not in weights:
        raise ValueError(f"loss.reg_weights has no entry for objective {objective!r} (has {sorted(weights)})")
    options = dict(dict(c.similarity_options).get(objective) or {}) if objective != "translation" else {}
    return Loss(build_model(config, ndim), objective=objective, similarity_options=tuple(sorted(options.items())),
                regularizer=c.regularizer or None, reg_weight=float(weights[objective]),
                translate_first_weight=float(c.translate_first_weight),
                register_first_weight=float(c.register_first_weight),
                register_first_updates_r=bool(c.register_first_updates_r),
                adversarial_weight=float(c.get("adversarial_weight", 0.0)))


# ------------------------------------------------------------------------------------------------------- fit
LOG_COLUMNS = ("loss", "similarity", "translate_first", "register_first", "regularizer", "adversarial",
               "discriminator", "grad_norm")  # metrics.jsonl


def fit(config, workdir, *, stop_at: int | None = None, progress: bool = True):
    """Train R (and T for ``objective="translation"``) in ``workdir``; resume from its latest checkpoint.

    Writes ``workdir/config.json``, ``workdir/checkpoints/`` (orbax, every ``train.checkpoint_every`` steps and at
    the end) and ``workdir/metrics.jsonl`` (every ``train.log_every`` steps: loss terms, grad_norm, steps_per_s).
    A resumed run sees the batches an uninterrupted one would. ``stop_at`` ends early after that step (saving), as
    a kill would. Returns the final ``TrainState``.
    """
    dataset = make_dataset(config.data, split="train")
    loss = make_loss(config, len(dataset.shape))
    t = config.train

    def batches(start, stop):
        loader = datasets.Loader(dataset, batch_size=t.batch_size, start=start, stop=stop, prefetch=t.prefetch)
        try:
            for _, batch in loader:
                yield {k: batch[k] for k in ("moving", "fixed")}
        finally:
            loader.close()

    return training.fit(workdir, model=loss.model, loss=loss, train=t, shape=dataset.shape, batches=batches,
                        key=jax.random.key(config.seed), columns=LOG_COLUMNS, config=config, stop_at=stop_at,
                        progress=progress, desc=f"train ({loss.objective})")


def load(config, workdir, shape, *, step: int | None = None):
    """``(model, params, step)`` from ``workdir/checkpoints`` for images of spatial ``shape``."""
    model = build_model(config, len(shape))
    params, step = training.load_params(workdir, model=model, shape=shape, step=step)
    return model, params, step


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


def _label(config) -> str:
    return f"R: {config.objective} ({config.model.registration})"


def _read_config(workdir):
    import ml_collections

    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _runs(config, workdir):
    """``[(label, config, workdir)]`` for the trained run and each baseline found; and the baselines missing."""
    runs, missing = [(_label(config), config, workdir)], []
    seen = {config.objective}
    dirs = dict(config.eval.baseline_dirs)
    for name in config.eval.baselines:
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


COLUMNS = (("tre_mm", "TRE (mm)", 3), ("tre_p90_mm", "TRE p90 (mm)", 3), ("dice_mean", "Dice", 3),
           ("epe_mm", "EPE (mm)", 3), ("folding_pct", "% folding", 3), ("t_l1", "T L1", 3),
           ("seconds", "s / pair", 4))


def evaluation(config, workdir) -> Evaluation:
    """Evaluate R of ``workdir`` and the baselines on held-out pairs (module docstring), for
    ``jaxreg.evaluation.evaluate``; ``info`` gives each run's training steps and the baselines not found."""
    dataset = make_dataset(config.data, split="test")
    e = config.eval
    shape = dataset.shape
    runs, missing = _runs(config, workdir)
    run = {"identity": lambda p: {"disp": jnp.zeros(shape + (len(shape),), jnp.float32)}}
    steps = {}
    for label, c, d in runs:
        model, params, steps[label] = load(c, d, shape)
        reg = jax.jit(functools.partial(model.apply, method=tmodels.TranslationRegistration.register))
        translate = None
        if c.objective == "translation":
            translate = jax.jit(functools.partial(model.apply, method=tmodels.TranslationRegistration.translate))

        def fn(p, reg=reg, params=params, translate=translate):
            out = {"disp": reg(params, p["moving"], p["fixed"])["disp"]}
            if translate is not None and "disp" in p:  # how well T maps A to B once the geometry is right
                aligned = spatial.warp(p["moving"], jnp.asarray(p["disp"]))
                out["t_l1"] = float(jnp.mean(jnp.abs(translate(params, aligned) - p["fixed"])))
            return out

        run[label] = fn
    if e.classical_preset:
        run[f"classical ({e.classical_preset} preset)"] = classical(e.classical_preset)

    first = dataset.pair(0)  # built once: test pair 0, and whether the pairs carry a true field

    def pair(i):
        p = first if i == 0 else dataset.pair(i)
        out = {**p, "fixed": jnp.asarray(p["fixed"]), "moving": jnp.asarray(p["moving"]),
               "spacing": tuple(float(s) for s in p.get("spacing", np.ones(len(shape))))}
        if "disp" in p:
            out["landmarks"] = landmarks(p["fixed_labels"], num=int(e.landmarks),
                                         seed=[int(config.data.test_seed), i], margin=int(e.landmark_margin))
        return out

    note = "" if not missing else f"baselines not found (train them first): {', '.join(missing)}"
    names = getattr(dataset, "label_names", None) or {k: str(k) for k in range(1, dataset.num_labels)}
    paired = tuple((runs[0][0], label) for label, _, _ in runs[1:])
    known = "disp" in first  # real cases (prostate) have landmarks but no true field: no EPE, no T L1
    columns = tuple(c for c in COLUMNS if known or c[0] not in ("epe_mm", "t_l1"))
    return Evaluation(pairs=pair, num_pairs=int(e.num_pairs), methods=run,
                      measures=("dice", "jacobian", "tre") + (("epe",) if known else ()),
                      label_names=dict(names), columns=columns, paired=paired,
                      paired_keys=("tre_mm",) + (("epe_mm",) if known else ()) + ("dice_mean",),
                      info={"steps": steps, "missing": missing}, note=note)
