"""Learned similarity metric for multimodal registration (Simonovsky et al., MICCAI 2016).

A patch CNN ``N`` (``jaxreg.models.learned_metric.PatchSimilarity``) learns whether a fixed-modality patch and a
moving-modality patch show the same anatomy in alignment. Used as a metric it is evaluated densely on every patch of
the fixed image and the warped moving image, ``M(F, M∘T) = mean_P N(F(P), (M∘T)(P))``, and minimised through the
classical engine by passing :func:`metric` itself as the similarity: ``optimize.register(f, m,
metric=learned_metric.metric, metric_options={"checkpoint": PATH})`` (optionally ``stride``, ``form``); the
``jaxreg`` command's ``--metric learned --metric-checkpoint PATH`` does the same. ``jaxreg.losses`` does not know
this module (no import from a lower layer to a higher one).

Training (``fit``): from ``k`` *aligned* multimodal pairs (the data generators with their deformation switched
off: one anatomy rendered in both contrasts), patches are drawn online inside the jitted step. A patch centre ``c``
is drawn uniformly from the foreground (brain mask dilated by the patch radius, at least a patch radius from the
border) of one of the ``k`` pairs, at one of the pyramid ``scales`` (images downsampled as the registration
pyramid does, so one network serves every level). A random transform ``T`` (rotation up to
``max_rotation_deg``, per-axis scaling ``1 ± max_scaling``, sub-voxel jitter) samples the fixed patch
``F(c + T o)`` over the patch offsets ``o``. The positive moving patch uses the same transform, ``M(c + T o)``; the
negative one a different transform, ``M(c + d + T' o)``: a shift ``d`` of length uniform in
``[neg_min_shift, neg_max_shift]`` voxels in a random direction and a rotation differing by up to
``neg_rotation_deg``. Every fixed patch thus comes with one positive and one negative. Loss: logistic,
``mean softplus(-z+) + mean softplus(z-)`` (halved), or hinge, ``mean relu(1 - z+) + mean relu(1 + z-)`` (halved).

Layout of a run (``fit(config, workdir)``): one model per ``k`` of ``config.train.ks`` in ``workdir/k{k}/`` with
``model.json`` (architecture and training settings), ``checkpoints/`` (orbax, resumable) and ``metrics.jsonl``.
``workdir/k{k}`` is the path to give as ``metric_options={"checkpoint": ...}``. All variants start from the same
initial parameters and draw from the same random stream, so they differ only in the training pairs (the first
``k`` of ``data.num_train_pairs``).

``evaluation(config, workdir)`` (run by ``evaluate.py``) registers held-out multimodal pairs (another seed) with the engine's affine +
deformable pipeline using MI, MI restricted to brain masks, and the learned metric of every ``k``, and reports Dice
and Jaccard (mean over labels 1..K-1) as mean ± std over pairs, like Table 1 of the paper.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import spatial, training, transforms
from jaxreg.methods import Evaluation
from jaxreg.models.learned_metric import FORMS, PatchSimilarity, dense_similarity

MODEL_FILE = "model.json"
LOSSES = ("logistic", "hinge")


# -------------------------------------------------------------------------------------------------------- model
def build_model(ndim: int, *, features=(16, 16, 16, 16), dilations=(1, 1, 2, 2), kernel: int = 3,
                hidden=(32,)) -> PatchSimilarity:
    """A ``PatchSimilarity`` with hashable (tuple) settings."""
    return PatchSimilarity(ndim=int(ndim), features=tuple(int(f) for f in features),
                           dilations=tuple(int(d) for d in dilations), kernel=int(kernel),
                           hidden=tuple(int(h) for h in hidden))


def _model_kwargs(config) -> dict:
    m = config.model
    return dict(features=tuple(m.features), dilations=tuple(m.dilations), kernel=int(m.kernel),
                hidden=tuple(m.hidden))


# --------------------------------------------------------------------------------------------------------- data
def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def _render(rng, labels, means, *, blur: float, bias_scale: float, noise_std: float) -> np.ndarray:
    """Label map → image with per-label ``means``, blur, multiplicative bias field, noise, scaled to [0, 1]."""
    import scipy.ndimage as ndi

    from jaxreg.data.preprocess import normalize
    from jaxreg.data.synthetic import smooth_random_field

    img = means[labels].astype(np.float64)
    if blur > 0:
        img = ndi.gaussian_filter(img, blur, mode="nearest")
    if bias_scale > 0:
        bias = smooth_random_field(rng, labels.shape, 1, spacing=max(labels.shape) / 2)[..., 0]
        img = img * np.exp(bias_scale * bias)
    if noise_std > 0:
        img = img + noise_std * rng.standard_normal(labels.shape)
    return normalize(img, lower=0.0, upper=100.0)


def make_pair(data, *, seed: int, index: int, aligned: bool) -> dict:
    """One multimodal pair of ``data.kind`` (host NumPy): ``fixed``, ``moving`` float32, labels int32, ``spacing``.

    ``aligned=True`` switches the deformation off (affine and deformable scales 0): one anatomy in two contrasts,
    a training pair. Kinds:

    * ``"mni_slice"``: ``synthetic.mni_slice_pair`` (2-D axial MNI152 slice; fixed T1, moving ``data.contrast``).
    * ``"open_ms"``: real co-registered contrasts of ``open_ms`` patients (``_open_ms_pair``): fixed
      ``data.fixed_contrast`` (T1), moving one of ``data.moving_contrasts``, tissue classes of T1 as labels;
      training pairs from ``data.train_patients``, test pairs from ``data.test_patients`` moved by a known motion.
    * ``"prostate"``: real MR (moving) ↔ TRUS (fixed) cases on the TRUS grid (``_prostate_pair``): training pairs
      ``data.train_cases`` aligned by their gland masks, test pairs ``data.test_cases`` unregistered; gland labels.
    * ``"synthetic"``: the label maps and field of ``synthetic.synthetic_pair`` (2-D or 3-D ``data.shape``),
      rendered in two *fixed* modalities: label ``l`` has intensity ``A[l]`` in the fixed image and ``B[l]`` in the
      moving one, with ``A, B`` drawn once from ``data.contrast_seed`` (a consistent modality pair, as T1/T2), plus
      per-image blur 0.5, bias field (0.2) and noise (0.02).
    """
    from jaxreg.data import synthetic

    rng = _rng(seed, index)
    scale = 0.0 if aligned else 1.0
    if data.kind == "mni_slice":
        p = synthetic.mni_slice_pair(rng, shape=tuple(data.shape), contrast=data.contrast,
                                     affine_scale=scale * float(data.affine_scale),
                                     deform_scale=scale * float(data.deform_scale))
        return {k: p[k] for k in ("fixed", "moving", "fixed_labels", "moving_labels", "spacing")}
    if data.kind == "synthetic":
        n = int(data.num_labels)
        p = synthetic.synthetic_pair(rng, shape=tuple(data.shape), num_labels=n,
                                     affine_scale=scale * float(data.affine_scale),
                                     deform_scale=scale * float(data.deform_scale), blur=0.0, bias_scale=0.0,
                                     noise_std=0.0)
        means = np.random.default_rng(int(data.contrast_seed)).uniform(0.0, 1.0, (2, n))
        opts = dict(blur=0.5, bias_scale=0.2, noise_std=0.02)
        return dict(fixed=_render(rng, p["fixed_labels"], means[0], **opts),
                    moving=_render(rng, p["moving_labels"], means[1], **opts),
                    fixed_labels=p["fixed_labels"], moving_labels=p["moving_labels"],
                    spacing=np.ones(len(data.shape)))
    if data.kind == "open_ms":
        return _open_ms_pair(data, seed=seed, index=index, aligned=aligned)
    if data.kind == "prostate":
        cases = tuple(data.train_cases if aligned else data.test_cases)
        return _prostate_pair(os.fspath(data.folder), int(cases[index % len(cases)]), aligned=aligned)
    raise ValueError(f"config.data.kind must be 'mni_slice', 'synthetic', 'open_ms' or 'prostate', got {data.kind!r}")


@functools.lru_cache(maxsize=32)
def _prostate_pair(folder: str, case: int, *, aligned: bool) -> dict:
    """MR (moving) ↔ TRUS (fixed) case ``case`` of ``prostate_mr_trus`` on the TRUS grid (0.4 mm).

    ``aligned=False`` (a test pair): the MR and its gland mask resampled onto the TRUS grid through the identity
    world map (the unregistered state of ``jaxreg.data.multimodal``'s reference table). ``aligned=True`` (a training
    pair): the MR pulled onto the TRUS grid through a registration of the two gland masks (the engine's ``default``
    preset on the masks, MSE): the pairs have no reference alignment, and the glands' alignment is the best
    available (on case 0 it brings the landmarks from 4.1 to 1.5 mm). Labels: gland 1, background 0; images
    normalised to [0, 1].
    """
    from jaxreg import world
    from jaxreg.data import io, multimodal, preprocess

    (c,) = multimodal.prostate_cases(folder, cases=[case])
    if not aligned:
        p = multimodal.prostate_arrays(c, start="identity")
        return {k: p[k] for k in ("fixed", "moving", "fixed_labels", "moving_labels", "spacing")}
    fixed_gland, moving_gland = c.masks["gland"]
    reg = world.register_images(*(io.Volume(np.asarray(v.data, np.float32), v.affine)
                                  for v in (fixed_gland, moving_gland)),
                                preset="default", metric="mse", metric_options={}, affine_metric="mse",
                                affine_metric_options={}, normalize=False)
    return {"fixed": preprocess.normalize(c.fixed.data), "moving": preprocess.normalize(reg.apply(c.moving).data),
            "fixed_labels": (np.asarray(fixed_gland.data) > 0).astype(np.int32),
            "moving_labels": (np.asarray(reg.apply(moving_gland, labels=True).data) > 0).astype(np.int32),
            "spacing": np.asarray(c.fixed.spacing, np.float32)}


def open_ms_combos(data, *, aligned: bool) -> list[tuple[str, str]]:
    """The ``(patient, moving contrast)`` of the ``"open_ms"`` pairs of a split: ``data.train_patients`` (aligned
    training pairs) or ``data.test_patients``, each with every ``data.moving_contrasts``."""
    patients = tuple(data.train_patients if aligned else data.test_patients)
    contrasts = tuple(data.moving_contrasts)
    if not patients or not contrasts:
        raise ValueError("config.data.train_patients, test_patients and moving_contrasts must not be empty")
    return [(p, c) for p in patients for c in contrasts]


def _open_ms_pair(data, *, seed: int, index: int, aligned: bool) -> dict:
    """Pair ``index`` of a real ``open_ms`` split (fixed: ``data.fixed_contrast``, normally T1): aligned
    (``(patient, contrast) = open_ms_combos[index]``, no motion) or moved by the known motion
    ``multimodal.smooth_motion(seed + index)`` (cycling through the combos), with its true ``disp``."""
    from jaxreg.data import multimodal

    combos = open_ms_combos(data, aligned=aligned)
    patient, contrast = combos[index % len(combos)]
    vols = multimodal.open_ms_volumes_cached(os.fspath(data.folder), patient,
                                             (data.fixed_contrast, *tuple(data.moving_contrasts)),
                                             float(data.resolution))
    spacing = np.linalg.norm(vols["affine"][:3, :3], axis=0).astype(np.float32)
    if aligned:
        return {"fixed": vols[data.fixed_contrast], "moving": vols[contrast], "fixed_labels": vols["labels"],
                "moving_labels": vols["labels"], "spacing": spacing}
    return multimodal.moved_pair(vols, fixed=data.fixed_contrast, moving=contrast, seed=int(seed) + int(index))


def training_arrays(pairs, k: int, *, scales, patch: int, foreground: str = "labels"):
    """Per pyramid scale, the device arrays the train step samples from (shapes fixed for every ``k``).

    Returns a tuple with one dict per scale: ``fixed``, ``moving`` ``(N, *S_s)`` float32 (all ``N`` pairs,
    downsampled by ``spatial.downsample``) and ``cdf`` ``(N * prod(S_s),)`` float32, the cumulative distribution
    of the patch centre over pair and voxel (flattened): uniform over the allowed centres of the first ``k`` pairs,
    none elsewhere (pairs beyond ``k``, background, within a patch radius of the border).
    ``foreground="labels"`` allows centres within a patch radius of a label > 0 (the brain), ``"edges"`` within
    half a patch radius of a label boundary (label maps without background), ``"all"`` everywhere.
    """
    import scipy.ndimage as ndi

    n = len(pairs)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of training pairs), got {k}")
    out = []
    r = patch // 2
    for s in scales:
        down = lambda x: np.asarray(spatial.downsample(jnp.asarray(x, jnp.float32), int(s)))  # noqa: E731
        fixed = np.stack([down(p["fixed"]) for p in pairs])
        moving = np.stack([down(p["moving"]) for p in pairs])
        shape = fixed.shape[1:]
        if min(shape) < patch:
            raise ValueError(f"scale {s} gives images of shape {shape}, smaller than the {patch}-voxel patch")
        allowed = np.zeros((n,) + shape, bool)
        inner = tuple(slice(r, m - r) for m in shape)
        for i, p in enumerate(pairs[:k]):
            if foreground == "labels":
                fg = np.asarray(spatial.downsample(jnp.asarray(p["fixed_labels"] > 0, jnp.float32), int(s))) > 0.25
                fg = ndi.binary_dilation(fg, iterations=r) if fg.any() else np.ones(shape, bool)
            elif foreground == "edges":
                lab = p["fixed_labels"]
                edge = (ndi.maximum_filter(lab, size=3) != ndi.minimum_filter(lab, size=3)).astype(np.float32)
                fg = np.asarray(spatial.downsample(jnp.asarray(edge), int(s))) > 0.1
                fg = ndi.binary_dilation(fg, iterations=max(1, r // 2)) if fg.any() else np.ones(shape, bool)
            elif foreground == "all":
                fg = np.ones(shape, bool)
            else:
                raise ValueError(f"foreground must be 'labels', 'edges' or 'all', got {foreground!r}")
            a = np.zeros(shape, bool)
            a[inner] = fg[inner]
            allowed[i] = a
        cdf = np.cumsum(allowed.ravel(), dtype=np.float64)
        if cdf[-1] == 0:
            raise ValueError(f"no allowed patch centre at scale {s} (images {shape}, patch {patch})")
        out.append({"fixed": jnp.asarray(fixed), "moving": jnp.asarray(moving),
                    "cdf": jnp.asarray((cdf / cdf[-1]).astype(np.float32))})
    return tuple(out)


# ------------------------------------------------------------------------------------------ sampling and the step
@dataclasses.dataclass(frozen=True)
class Augment:
    """Online augmentation of patch pairs (angles in degrees, shifts in voxels of the sampled level)."""

    max_rotation_deg: float = 15.0
    max_scaling: float = 0.1
    neg_min_shift: float = 2.0
    neg_max_shift: float = 6.0
    neg_rotation_deg: float = 10.0


def _rotations(angles, ndim):
    """``(B, n_angles)`` radians → ``(B, ndim, ndim)`` rotation matrices (``transforms.rigid``'s convention)."""
    zeros = jnp.zeros(angles.shape[:1] + (ndim,), angles.dtype)
    return jax.vmap(lambda p: transforms.rigid(p)[:ndim, :ndim])(jnp.concatenate([angles, zeros], axis=1))


def _num_uniforms(ndim: int) -> int:
    n_ang = 1 if ndim == 2 else 3
    return 1 + ndim + n_ang + ndim + n_ang + 3


def sample_patches(key, images, *, size: int, batch: int, aug: Augment):
    """Draw ``batch`` (fixed, positive moving, negative moving) patch triples from one scale's ``images``.

    ``images``: a dict of :func:`training_arrays`. Returns three ``(batch, *(size,) * ndim)`` arrays (see the module
    docstring for the transforms). Pure and deterministic in ``key``; jit-compatible.
    """
    nd = images["fixed"].ndim - 1
    u = jax.random.uniform(key, (batch, _num_uniforms(nd)), images["fixed"].dtype)
    return _patches_from_uniforms(u, images, size=size, aug=aug)


def _patches_from_uniforms(u, images, *, size: int, aug: Augment):
    """``sample_patches`` given its uniform variates ``u`` ``(batch, _num_uniforms(ndim))`` in [0, 1)."""
    fixed, moving, cdf = images["fixed"], images["moving"], images["cdf"]
    shape = fixed.shape[1:]
    nd, dtype, count, batch = len(shape), fixed.dtype, math.prod(shape), u.shape[0]
    n_ang = 1 if nd == 2 else 3
    u = u.astype(dtype)
    cols = np.cumsum([0, 1, nd, n_ang, nd, n_ang, 3])
    u_c, u_j, u_a, u_s, u_r, u_d = (u[:, a:b] for a, b in zip(cols[:-1], cols[1:]))
    # patch centre: inverse-CDF draw over (pair, voxel) (categorical() would draw batch x N x prod(S) variates)
    flat = jnp.minimum(jnp.searchsorted(cdf, u_c[:, 0].astype(cdf.dtype), side="right"), cdf.shape[0] - 1)
    pair = flat // count
    centre = jnp.stack(jnp.unravel_index(flat % count, shape), axis=-1).astype(dtype) + (u_j - 0.5)
    rad = math.pi / 180.0
    angles = (2 * u_a - 1) * (aug.max_rotation_deg * rad)
    scales = 1 + (2 * u_s - 1) * aug.max_scaling
    lin = _rotations(angles, nd) * scales[:, None, :]
    lin_neg = _rotations(angles + (2 * u_r - 1) * (aug.neg_rotation_deg * rad), nd) * scales[:, None, :]
    # negative shift: uniform direction (circle / sphere), length uniform in [neg_min_shift, neg_max_shift]
    phi = 2 * math.pi * u_d[:, :1]
    if nd == 2:
        direction = jnp.concatenate([jnp.cos(phi), jnp.sin(phi)], axis=1)
    else:
        z = 2 * u_d[:, 1:2] - 1
        rho = jnp.sqrt(jnp.maximum(1 - z * z, 0))
        direction = jnp.concatenate([rho * jnp.cos(phi), rho * jnp.sin(phi), z], axis=1)
    length = aug.neg_min_shift + (aug.neg_max_shift - aug.neg_min_shift) * u_d[:, 2:3]
    r = (size - 1) / 2
    offsets = jnp.asarray(np.stack(np.meshgrid(*[np.arange(size) - r] * nd, indexing="ij"), -1).reshape(-1, nd), dtype)
    c = centre[:, None, :]
    coords_f = c + jnp.einsum("bij,pj->bpi", lin, offsets)
    coords_n = c + (direction * length)[:, None, :] + jnp.einsum("bij,pj->bpi", lin_neg, offsets)
    grid = (size,) * nd + (nd,)

    def take(imgs, coords):  # every pair as a channel, then each sample's own: no per-sample image gather
        values = spatial.sample(jnp.moveaxis(imgs, 0, -1), coords.reshape((batch,) + grid))
        return jnp.take_along_axis(values, pair.reshape((batch,) + (1,) * (nd + 1)), axis=-1)[..., 0]

    return take(fixed, coords_f), take(moving, coords_f), take(moving, coords_n)


def pair_loss(params, model, fixed, pos, neg, *, loss: str = "logistic"):
    """Loss of a batch of patch triples and its metrics (``loss``, ``accuracy``, mean ``score_pos``/``score_neg``)."""
    z_pos = model.apply(params, fixed, pos).reshape(-1)
    z_neg = model.apply(params, fixed, neg).reshape(-1)
    if loss == "logistic":
        value = 0.5 * (jnp.mean(jax.nn.softplus(-z_pos)) + jnp.mean(jax.nn.softplus(z_neg)))
    elif loss == "hinge":
        value = 0.5 * (jnp.mean(jax.nn.relu(1 - z_pos)) + jnp.mean(jax.nn.relu(1 + z_neg)))
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    acc = 0.5 * (jnp.mean((z_pos > 0).astype(value.dtype)) + jnp.mean((z_neg < 0).astype(value.dtype)))
    return value, {"loss": value, "accuracy": acc, "score_pos": jnp.mean(z_pos), "score_neg": jnp.mean(z_neg)}


@dataclasses.dataclass(frozen=True)
class Loss:
    """The training loss as a hashable callable ``loss(params, data, key) -> (value, terms)`` for
    ``jaxreg.training``.

    ``data``: the tuple of :func:`training_arrays` (one dict per scale); each scale contributes ``batch`` patch
    triples, drawn inside the step from ``key``; ``terms``: those of :func:`pair_loss` but ``loss``.
    """

    model: PatchSimilarity
    aug: Augment
    batch: int
    kind: str = "logistic"

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"config.train.loss must be one of {LOSSES}, got {self.kind!r}")

    def __call__(self, params, data, key):
        # one draw for all scales: every random call site costs seconds of XLA:CPU compilation
        nd = data[0]["fixed"].ndim - 1
        u = jax.random.uniform(key, (len(data), self.batch, _num_uniforms(nd)), data[0]["fixed"].dtype)
        size = self.model.patch_size
        triples = [_patches_from_uniforms(u[i], d, size=size, aug=self.aug) for i, d in enumerate(data)]
        fixed, pos, neg = (jnp.concatenate([t[i] for t in triples]) for i in range(3))
        net = self.model.clone(impl="xla")  # same parameters; on patches it compiles in about half im2col's time
        value, terms = pair_loss(params, net, fixed, pos, neg, loss=self.kind)
        return value, {k: v for k, v in terms.items() if k != "loss"}


# ------------------------------------------------------------------------------------------ checkpoints and metric
def variant_dir(workdir, k: int) -> str:
    """The model folder of the variant trained on ``k`` pairs (the metric's ``checkpoint`` path)."""
    return os.path.join(os.fspath(workdir), f"k{int(k)}")


def _read_info(path: str) -> dict:
    info_path = os.path.join(path, MODEL_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"learned metric checkpoint {path!r} is not a directory: give the model folder "
                                f"written by train.py (WORKDIR/k<K>, containing {MODEL_FILE} and checkpoints/)")
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"learned metric checkpoint {path!r} has no {MODEL_FILE}: give the model folder "
                                f"written by train.py (WORKDIR/k<K>)")
    with open(info_path) as fh:
        return json.load(fh)


def _latest_step(path: str) -> int | None:
    folder = os.path.join(path, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()]
    return max(steps) if steps else None


@functools.lru_cache(maxsize=16)
def _load(path: str, step: int):
    info = _read_info(path)
    model = build_model(info["ndim"], **info["model"])
    shape = (model.patch_size,) * model.ndim
    # the metric is first called while a registration is being traced: keep loading out of that trace
    with jax.ensure_compile_time_eval():
        params, _ = training.load_params(path, model=model, shape=shape, step=step)
        return model, jax.tree_util.tree_map(np.asarray, jax.device_get(params))


def load(checkpoint) -> tuple[PatchSimilarity, dict]:
    """``(model, params)`` of a trained metric folder (``WORKDIR/k<K>``), latest checkpoint; cached per path and step.

    Raises ``FileNotFoundError`` naming ``checkpoint`` when it is not such a folder or holds no checkpoint.
    """
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"checkpoint must be a path (str), got {type(checkpoint).__name__}: {checkpoint!r}")
    path = os.path.abspath(os.fspath(checkpoint))
    _read_info(path)  # clear errors before anything else
    step = _latest_step(path)
    if step is None:
        raise FileNotFoundError(f"learned metric checkpoint {os.fspath(checkpoint)!r} holds no saved step in "
                                f"{os.path.join(path, 'checkpoints')}: finish training first (train.py)")
    return _load(path, step)


def metric(fixed, warped, *, checkpoint, mask=None, stride: int = 1, form: str | None = None):
    """The learned similarity as a registration loss (a similarity callable for ``optimize.register``'s
    ``metric``); lower is better.

    ``fixed``, ``warped``: ``(*S)`` float images (2-D or 3-D, as the model was trained) in about [0, 1];
    ``checkpoint``: the model folder (``WORKDIR/k<K>``); the parameters are loaded once per path and saved step and
    become constants of the caller's compiled program (the engine caches that program by its options, so a model
    retrained into the same folder is picked up by a new process, not by the one that already used it).
    ``mask``, ``stride``, ``form``: see ``jaxreg.models.learned_metric.dense_similarity`` (``"score"``: minus the mean
    logit over all patches; ``"nll"``: the mean negative log-probability of alignment); None: the form the model was
    evaluated with (``eval.form`` of its training config, saved in ``model.json``), else ``"score"``.
    """
    if form is None:
        form = _read_info(os.path.abspath(os.fspath(checkpoint))).get("form", "score")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    model, params = load(checkpoint)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.result_type(fixed, warped)), params)
    return dense_similarity(model, params, fixed, warped, mask=mask, stride=stride, form=form)


# ------------------------------------------------------------------------------------------------------ training
def _ks(config) -> tuple[int, ...]:
    n = int(config.data.num_train_pairs)
    ks = tuple(int(k) for k in config.train.ks)
    bad = [k for k in ks if not 1 <= k <= n]
    if bad or not ks:
        raise ValueError(f"config.train.ks must list pair counts in [1, data.num_train_pairs={n}], got {ks}")
    return ks


def _augment(config) -> Augment:
    a = config.train.augment
    return Augment(float(a.max_rotation_deg), float(a.max_scaling), float(a.neg_min_shift), float(a.neg_max_shift),
                   float(a.neg_rotation_deg))


def training_pairs(config) -> list[dict]:
    """The ``data.num_train_pairs`` aligned pairs (seed ``data.seed``), generated on the host."""
    from jaxreg.data.preprocess import crop_or_pad

    pairs = [make_pair(config.data, seed=config.data.seed, index=i, aligned=True)
             for i in range(int(config.data.num_train_pairs))]
    shape = tuple(np.max([p["fixed"].shape for p in pairs], axis=0))  # real subjects differ: pad to one shape
    return [{k: crop_or_pad(v, shape) if k in ("fixed", "moving", "fixed_labels", "moving_labels") else v
             for k, v in p.items()} for p in pairs]


def _write_json_atomic(path, obj):
    from jaxreg.data.io import atomic_write

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")

    atomic_write(path, write)


LOG_COLUMNS = ("loss", "accuracy", "score_pos", "score_neg", "grad_norm")  # metrics.jsonl, with step and steps_per_s


def fit(config, workdir, *, stop_at: int | None = None, progress: bool = True):
    """Train one metric per ``k`` in ``config.train.ks`` under ``workdir/k{k}``; resume from saved checkpoints.

    Each variant runs ``config.train.steps`` steps through ``jaxreg.training.fit`` (``stop_at``: stop every variant
    after that step, saving a checkpoint, as a kill would; rerun to resume). The random stream depends on the step
    only, so a resumed run reproduces an uninterrupted one. Returns the ``TrainState`` of the last variant.
    """
    t = config.train
    ks = _ks(config)
    pairs = training_pairs(config)
    ndim = pairs[0]["fixed"].ndim
    model = build_model(ndim, **_model_kwargs(config))
    aug = _augment(config)
    scales = tuple(int(s) for s in t.scales)
    loss = Loss(model, aug, int(t.batch_size), t.loss)
    training.save_config(config, workdir)
    # "rbg" keys: XLA's RngBitGenerator compiles in a fraction of threefry's time on CPU (deterministic per backend)
    key = jax.random.key(int(config.seed), impl="rbg")
    state = None
    for k in ks:
        vdir = variant_dir(workdir, k)
        os.makedirs(vdir, exist_ok=True)
        info = {"ndim": ndim, "model": _model_kwargs(config), "patch_size": model.patch_size, "k": k,
                "form": config.eval.form,
                "train": {**json.loads(t.to_json()), "augment": dataclasses.asdict(aug)},
                "data": json.loads(config.data.to_json())}
        _write_json_atomic(os.path.join(vdir, MODEL_FILE), info)
        data = training_arrays(pairs, k, scales=scales, patch=model.patch_size, foreground=config.data.foreground)
        try:
            state = training.fit(vdir, model=model, loss=loss, train=t, shape=(model.patch_size,) * ndim,
                                 batches=lambda start, stop, data=data: itertools.repeat(data, stop - start),
                                 key=key, columns=LOG_COLUMNS, place="replicate", stop_at=stop_at,
                                 progress=progress, desc=f"k={k}", postfix=("loss", "accuracy"))
        except FloatingPointError as err:  # which variant: the message names the step and the term
            raise FloatingPointError(f"learned metric k={k}: {err}") from err
    return state


# ---------------------------------------------------------------------------------------------------- evaluation
def _label(name, k, n_train):
    if k is None:
        return name
    return f"{name} (k={'all, ' if k == n_train else ''}{k})"


def evaluation(config, workdir) -> Evaluation:
    """Register ``config.eval.num_pairs`` held-out pairs with every method (for ``jaxreg.evaluation.evaluate``).

    Test pairs: ``make_pair(config.data, seed=data.test_seed, index=i, aligned=False)`` (deformed, multimodal).
    Methods (``config.eval.methods``): ``identity``; any similarity of ``jaxreg.losses.SIMILARITIES`` (``mi``,
    ``nmi``, ``ngf``, ``mind``, ...; ``mi``/``nmi`` with ``eval.mi_bins`` bins); ``learned`` (one per ``k`` of
    ``train.ks``); each similarity also as ``NAME_masked``. All run the engine with the options ``eval.register``
    (the metric replaced; ``eval.overrides[NAME]`` adds options for one method, e.g. its ``reg_weight``).
    Masks (``*_masked``): the label maps' foreground (labels > 0) of each image, a stand-in for brain masks.
    Measures: Dice and Jaccard per label and their means, % folding voxels, the end-point error (mm) when the pairs
    carry their true field, seconds; every method is compared, pair by pair, with MI's (when ``"mi"`` is
    evaluated) on the mean Dice and, when known, the end-point error.
    """
    from jaxreg import losses, optimize

    e = config.eval
    plain_dict = lambda d: d.to_dict() if hasattr(d, "to_dict") else dict(d)  # noqa: E731  (nested ConfigDicts too)
    base = plain_dict(e.register)
    overrides = {k: plain_dict(v) for k, v in plain_dict(e.overrides).items()}
    n_train = int(config.data.num_train_pairs)
    run = {}

    def registration(options, masked):
        def fn(p):
            masks = {}
            if masked:
                masks = {"fixed_mask": jnp.asarray(p["fixed_labels"] > 0, jnp.float32),
                         "moving_mask": jnp.asarray(p["moving_labels"] > 0, jnp.float32)}
            return {"disp": optimize.register(p["fixed"], p["moving"], **options, **masks).disp}
        return fn

    for name in e.methods:
        plain = name.removesuffix("_masked")
        extra = overrides.get(plain, {})
        if name == "identity":
            run[name] = lambda p: {"disp": jnp.zeros(p["fixed"].shape + (p["fixed"].ndim,), p["fixed"].dtype)}
        elif plain in losses.SIMILARITIES:
            opts = {"bins": int(e.mi_bins)} if plain in ("mi", "nmi") else None
            run[name] = registration({**base, "metric": plain, "metric_options": opts, **extra}, name != plain)
        elif plain == "learned":
            for k in _ks(config):
                path = variant_dir(workdir, k)
                load(path)  # fail early, naming the path
                opts = {"checkpoint": path, "stride": int(e.stride), "form": e.form}
                run[_label(name, k, n_train)] = registration(
                    {**base, "metric": metric, "metric_options": opts, **extra}, name != plain)
        else:
            raise ValueError(f"config.eval.methods: unknown method {name!r}; choose from identity, learned, "
                             f"{', '.join(losses.SIMILARITIES)} (each also as NAME_masked)")
    unknown = sorted(set(overrides) - {"learned", *losses.SIMILARITIES})
    if unknown:
        raise ValueError(f"config.eval.overrides names unknown methods {unknown}; use learned or a similarity name")

    @functools.lru_cache(maxsize=1)  # pair 0 is read here for its labels, then again by the evaluation
    def host_pair(i):
        return make_pair(config.data, seed=config.data.test_seed, index=i, aligned=False)

    def pair(i):
        p = host_pair(i)
        return {**p, "fixed": jnp.asarray(p["fixed"]), "moving": jnp.asarray(p["moving"])}

    first = host_pair(0)
    if config.data.kind == "open_ms":
        from jaxreg.data.multimodal import TISSUES
        label_names = dict(TISSUES)
    elif config.data.kind == "prostate":
        label_names = {1: "gland"}
    else:
        num_labels = int(max(first["fixed_labels"].max(), first["moving_labels"].max())) + 1
        label_names = {k: str(k) for k in range(1, num_labels)}
    known = first.get("disp") is not None
    columns = (("dice_mean", "Dice", 3), ("jaccard_mean", "Jaccard", 3))
    columns += ((("epe_mm", "EPE mm", 2),) if known else ()) + (("folding_pct", "% folding", 3),
                                                               ("seconds", "s / pair", 2))
    paired = tuple((name, "mi") for name in run if name != "mi") if "mi" in run else ()
    return Evaluation(pairs=pair, num_pairs=int(e.num_pairs), methods=run,
                      measures=("dice", "jaccard", "jacobian") + (("epe",) if known else ()),
                      label_names=label_names, columns=columns, paired=paired,
                      paired_keys=("dice_mean",) + (("epe_mm",) if known else ()))
