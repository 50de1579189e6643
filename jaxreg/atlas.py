"""Template space for learned registration: learning sets of real subjects aligned to a template, and trained models
that register any pair of images through that space.

* ``build_learning_set(records, out, template=...)``: align every subject to the template with jaxreg's own affine
  engine (``world.register_images``, preset ``"affine"``), resample image (linear) and labels (nearest) onto the
  template grid, normalise, and cache it (``jaxreg.data.subjects`` describes the folder). Kept with each subject:
  the ``(4, 4)`` RAS map from template world points to the subject's world points, so predictions map back.
* ``prepare(config)``: the learning set of a config whose ``data.kind`` is ``"subjects"``, built on first use
  (``train.py`` and ``evaluate.py`` call it before anything is compiled).
* A **model folder** (``export_model`` writes one from a training workdir; ``load_model`` reads one by path or by
  the name of a packaged model, ``available()`` lists those): ``model.json`` (architecture, shape, training info),
  ``params.msgpack`` (Flax serialisation), ``template.nii.gz`` (its grid, uint8), ``README.md`` (data card).
* ``Model.register(fixed, moving, refine=N)``: both images affinely aligned to the template, the network's field
  on the template grid (a pairwise model: one pass on the pair; an atlas model, trained with the template fixed:
  one pass per image, ``phi_M ∘ phi_F^-1``), optionally refined by the classical engine from it (``N``
  iterations at half resolution, then ``N // 2`` at full resolution), then the whole map
  carried back to the fixed image's own grid as a ``world.Registration`` (native space, the moving image on its own
  grid, interpolated once), like the classical result:

      T(p) = A_M (q + w(q)),  q = A_F^-1 p

  with ``A_F``, ``A_M`` the template -> image world maps of the two affine alignments and ``w`` the network's field
  (RAS mm) on the template grid, read with edge values outside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import models, optimize, spatial, training, transforms, world
from jaxreg.data import io, preprocess, subjects

#: where the packaged models live (one folder per model)
PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
MODEL_FILE, PARAMS_FILE, CARD_FILE = "model.json", "params.msgpack", "README.md"
FORMAT = 1
#: the classical preset whose metric and regulariser refine a network's field (``refine``), and the pyramid levels
#: of the refinement (``optimize.instance_options``): on 4 held-out Mindboggle pairs (2 mm) 40 iterations at half
#: resolution + 20 at full gave 0.586 Dice in 3.1 s against 0.584 in 5.9 s for 50 at full resolution
REFINE_PRESET = "default"
REFINE_LEVELS = (2, 1)
#: the affine alignment of a model's inputs to its template: 60 iterations at quarter resolution (on the same pairs
#: 0.6 s per image and 0.588 Dice after refinement, against 1.5 s and 0.586 with the learning sets' ``affine`` preset)
ALIGN_OPTIONS = dataclasses.replace(optimize.PRESETS["affine"], affine_levels=(4,), affine_iterations=(60,))
#: how many images' affine alignments a loaded model remembers
ALIGN_CACHE = 8


def align(template: io.Volume, image, *, preset: str = "affine", options=None, mask=None) -> np.ndarray:
    """``(4, 4)`` RAS map from template world points to ``image``'s world points (pull), by jaxreg's engine with
    ``preset`` or ``options`` (a ``RegisterOptions``; the template the fixed image, masked by ``mask`` when
    given)."""
    reg = world.register_images(template, image, options=options, preset=None if options is not None else preset,
                                fixed_mask=mask)
    return reg.world_matrix


def to_template(template: io.Volume, image: io.Volume, matrix, *, labels: bool = False) -> np.ndarray:
    """``image`` resampled onto the template grid through ``matrix`` (template world -> image world): linear for
    images, nearest neighbour (int32) for label maps; outside the image: 0."""
    moved = io.Volume(image.data, np.linalg.inv(np.asarray(matrix, np.float64)) @ image.affine)
    return preprocess.resample_to(moved, template.shape, template.affine, order=0 if labels else 1).data


def build_learning_set(records, out, *, template: io.Volume, mask=None, preset: str = "affine",
                       progress=print) -> str:
    """Align ``records`` to ``template`` and cache them in the learning-set folder ``out`` (module docstring).

    records: ``[{"name", "image", "labels"?}]`` (paths; names unique, used as file names).
    template: the fixed grid (``io.Volume``, 3-D or 2-D); ``mask``: its foreground (bool array), used by the alignment.
    A subject already in ``out`` with the same source files and template is kept (the cache). Returns ``out``.
    Every file is checked (present, readable, labels on their image's grid) before the first alignment.
    """
    out = os.fspath(out)
    names = [str(r["name"]) for r in records]
    if not records or len(set(names)) != len(names):
        raise ValueError(f"learning set {out}: records need unique names, got {names}")
    for r in records:
        image = io.check_header(r["image"])
        if r.get("labels") is not None and not np.allclose(io.check_header(r["labels"]), image, atol=1e-3):
            raise ValueError(f"{r['labels']}: label map is not on its image's grid ({r['image']})")
    os.makedirs(out, exist_ok=True)
    tpl = {"shape": list(template.shape), "affine": np.asarray(template.affine).tolist()}
    old = {}
    try:
        index = subjects.read_index(out)
        if index["template"] == tpl:
            old = {s["name"]: s for s in index["subjects"]}
    except (FileNotFoundError, ValueError):
        pass
    io.save(os.path.join(out, subjects.TEMPLATE), template)
    entries = []
    for i, r in enumerate(records):
        name = str(r["name"])
        source = {"image": os.path.abspath(r["image"]),
                  "labels": None if r.get("labels") is None else os.path.abspath(r["labels"])}
        prev = old.get(name)
        if prev is not None and prev["source"] == source and os.path.isfile(subjects.subject_path(out, name)):
            entries.append(prev)
            continue
        t0 = time.perf_counter()
        vol = io.load(r["image"])
        matrix = align(template, vol, preset=preset, mask=mask)
        image = preprocess.normalize(to_template(template, vol, matrix))
        labels = None
        if r.get("labels") is not None:
            labels = to_template(template, io.load_labels(r["labels"]), matrix, labels=True)
        subjects.write_subject(out, name, image, labels)
        entries.append({"name": name, "matrix": matrix.tolist(), "source": source})
        if progress:
            progress(f"learning set {out}: {name} aligned to the template ({i + 1}/{len(records)}, "
                     f"{time.perf_counter() - t0:.1f} s)")
        _write_index(out, tpl, preset, entries + [old[n] for n in names[i + 1:] if n in old])
    _write_index(out, tpl, preset, entries)
    return out


def _write_index(out, tpl, preset, entries):
    io.write_json(os.path.join(out, subjects.INDEX), {"version": subjects.VERSION, "template": tpl,
                                                      "settings": {"align_preset": preset}, "subjects": entries})


def records_from_config(data) -> list[dict]:
    """``[{"name", "image", "labels"}]`` of a ``data.kind == "subjects"`` config: ``data.source`` (folder),
    ``data.source_image`` / ``data.source_labels`` (file name patterns with ``{}`` for the subject's name; or
    ``data.files``, ``{name: image path under data.source}``, without labels) and the names in
    ``data.subjects.train`` and ``data.subjects.test``."""
    names = list(dict.fromkeys([str(n) for n in (*data.subjects.train, *data.subjects.test)]))
    if not data.source or not os.path.isdir(data.source):
        raise FileNotFoundError(f"data.source: folder of subjects not found: {data.source!r}")
    files = dict(data.get("files") or {})  # {name: image path under data.source}: overrides the pattern
    out = []
    for n in names:
        rec = {"name": n, "image": os.path.join(data.source, files.get(n) or data.source_image.format(n))}
        if data.source_labels and n not in files:
            rec["labels"] = os.path.join(data.source, data.source_labels.format(n))
        for key in ("image", "labels"):
            if key in rec and not os.path.isfile(rec[key]):
                raise FileNotFoundError(f"data.source: subject {n!r}: {key} file not found: {rec[key]}")
        out.append(rec)
    return out


def config_template(data) -> tuple[io.Volume, np.ndarray]:
    """The template of a ``"subjects"`` config: ``data.template`` ``"mni"`` (nilearn's MNI152 at
    ``data.resolution`` mm on ``data.shape``) or a NIfTI path (its non-zero voxels the mask)."""
    if data.template == "mni":
        from jaxreg.data import synthetic

        return synthetic.mni_template(int(data.resolution), tuple(data.shape))
    vol = io.load(data.template)
    return vol, np.asarray(vol.data) > 0


def prepare(config) -> str | None:
    """Build (or reuse) the learning set of ``config`` when ``config.data.kind == "subjects"``; its folder."""
    data = config.data
    if data.get("kind") != "subjects":
        return None
    records = records_from_config(data)
    template, mask = config_template(data)
    return build_learning_set(records, data.path, template=template, mask=mask, preset=data.align_preset)


# ----------------------------------------------------------------------------------------------- model folders
def export_model(out, *, net_config: dict, params, template: io.Volume, info: dict, card: str) -> str:
    """Write a model folder ``out`` (module docstring): ``net_config`` the ``models.build`` keywords (``ndim``
    included), ``params`` the trained parameters, ``template`` the grid the network works on, ``info`` JSON-able
    facts (data, split, steps, validation Dice, licence), ``card`` the data card (Markdown). Written to a temporary
    folder and renamed, so an interrupted export leaves no half-written model."""
    from flax import serialization

    out = os.fspath(out)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {"format": FORMAT, "net": dict(net_config), "shape": list(template.shape),
            "spacing": [float(s) for s in template.spacing], **info}
    io.write_json(os.path.join(tmp, MODEL_FILE), meta)
    with open(os.path.join(tmp, PARAMS_FILE), "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))
    data = np.asarray(template.data, np.float32)  # stored as uint8 (models normalise it): ~4x smaller
    span = max(float(data.max() - data.min()), 1e-12)
    io.save(os.path.join(tmp, subjects.TEMPLATE),
            io.Volume(np.round((data - data.min()) / span * 255).astype(np.uint8), template.affine))
    with open(os.path.join(tmp, CARD_FILE), "w", encoding="utf-8") as f:
        f.write(card)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_workdir(config, workdir, out, *, description: str = "", card: str = "") -> str:
    """The model folder ``out`` of a training ``workdir`` of a ``data.kind == "subjects"`` config: its latest
    checkpoint, the learning set's template, ``info`` from the config (data, split, steps, licence, its
    ``description`` unless one is given) and a data card (``card`` appended to the generated one). Raises
    ``ValueError`` for another kind of config."""
    data = config.data
    if data.get("kind") != "subjects":
        raise ValueError(f"export: config.data.kind must be 'subjects' (a template-space model), got {data.kind!r}")
    net_config = {"ndim": len(data.shape), **{k: list(v) if isinstance(v, (list, tuple)) else v
                                              for k, v in dict(config.model).items()}}
    net = models.build(**net_config)
    params, step = training.load_params(workdir, model=net, shape=tuple(data.shape))
    template = io.load(os.path.join(data.path, subjects.TEMPLATE))
    description = description or config.get("description", "")
    info = {"description": description, "steps": int(step), "mode": data.mode,
            "train_subjects": list(data.subjects.train), "test_subjects": list(data.subjects.test),
            "source": os.path.abspath(data.source), "licence": data.get("licence", ""),
            "loss": {k: v for k, v in config.loss.to_dict().items()}}
    text = (f"# {os.path.basename(os.path.normpath(out))}\n\n{description}\n\n"
            f"- network: `{json.dumps(net_config)}` on a {list(template.shape)} grid of "
            f"{[round(float(s), 3) for s in template.spacing]} mm (`template.nii.gz`)\n"
            f"- trained: {step} steps, mode {data.mode}, subjects {list(data.subjects.train)} of {data.source}\n"
            f"- held out: {list(data.subjects.test)}\n- loss: `{json.dumps(info['loss'])}`\n"
            f"- licence: {info['licence'] or 'see the training data'}\n\n{card}\n")
    return export_model(out, net_config=net_config, params=params, template=template, info=info, card=text)


def available() -> list[dict]:
    """The packaged models: ``[{"name", "path", "description"}]`` sorted by name (``description``: the model's
    ``info["description"]``)."""
    found = []
    if os.path.isdir(PRETRAINED):
        for name in sorted(os.listdir(PRETRAINED)):
            path = os.path.join(PRETRAINED, name, MODEL_FILE)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    desc = json.load(f).get("description", "")
                found.append({"name": name, "path": os.path.dirname(path), "description": desc})
    return found


def resolve(name_or_path) -> str:
    """The folder of a model given by path (a folder holding ``model.json``) or by a packaged model's name."""
    text = os.fspath(name_or_path)
    if os.path.isdir(text):
        return text
    packaged = os.path.join(PRETRAINED, text)
    if os.sep not in text and os.path.isfile(os.path.join(packaged, MODEL_FILE)):
        return packaged
    names = ", ".join(m["name"] for m in available()) or "none"
    raise FileNotFoundError(f"model {text!r}: no such folder and no packaged model of that name (packaged: {names})")


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model folder: ``meta`` (``model.json``), ``net`` (the Flax module), ``params``, ``template``."""

    path: str
    meta: dict
    net: object
    params: object
    template: io.Volume
    #: affine alignments already found, by image content (a fixed image shared by many pairs is aligned once)
    aligned: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def ndim(self) -> int:
        return len(self.meta["shape"])

    def predict(self, moving, fixed) -> jax.Array:
        """The network's field ``(*S, ndim)`` (template-grid voxels, pull) for images on the template grid."""
        return _predict(self.net)(self.params, jnp.asarray(moving, jnp.float32), jnp.asarray(fixed, jnp.float32))

    def register(self, fixed, moving, *, refine: int = 0, moving_labels=None, progress=None) -> world.Registration:
        """Register ``moving`` onto ``fixed`` (paths, nibabel images, ``io.Volume`` or arrays) through the model
        (module docstring); ``refine``: iterations of the classical engine (``REFINE_PRESET``'s similarity and
        regulariser) from the network's field: ``refine`` at half resolution, then ``refine // 2`` at full. Returns
        a ``world.Registration`` on the fixed image's grid whose ``seconds`` split ``align``, ``network``,
        ``refine`` and ``map_back``."""
        return register_with_model(self, fixed, moving, refine=refine, moving_labels=moving_labels,
                                   progress=progress)


_PREDICT = {}


def _predict(net):
    if net not in _PREDICT:
        _PREDICT[net] = jax.jit(lambda params, moving, fixed: net.apply(params, moving, fixed)["disp"])
    return _PREDICT[net]


def load_model(name_or_path) -> Model:
    """Read a model folder (by path or packaged name): a ``Model`` whose network takes two images on its template
    grid (``meta["shape"]``, e.g. ``(80, 96, 80)`` at 2 mm) and whose ``register`` takes images of any shape. A
    missing folder or file, an unreadable or corrupt file, or parameters that do not fit the architecture in
    ``model.json`` raise ``FileNotFoundError``/``ValueError`` naming the file."""
    from flax import serialization

    folder = resolve(name_or_path)
    paths = {k: os.path.join(folder, f) for k, f in (("meta", MODEL_FILE), ("params", PARAMS_FILE),
                                                       ("template", subjects.TEMPLATE))}
    for key, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model {folder}: {os.path.basename(path)} is missing (not a model folder)")
    try:
        with open(paths["meta"], encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or "net" not in meta or "shape" not in meta:
            raise ValueError("not a jaxreg model description")
        net = models.build(**meta["net"])
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{paths['meta']}: unreadable model description ({err})") from None
    template = io.load(paths["template"])
    if list(template.shape) != list(meta["shape"]):
        raise ValueError(f"{paths['template']}: grid {template.shape} differs from model.json's {meta['shape']}")
    abstract = training.init_shapes(net, tuple(meta["shape"]))
    try:
        with open(paths["params"], "rb") as f:
            raw = serialization.msgpack_restore(f.read())
    except Exception as err:  # msgpack raises several types on corrupt bytes
        raise ValueError(f"{paths['params']}: corrupt or unreadable parameters ({type(err).__name__}: {err})") from None
    training.check_params(raw, abstract, paths["params"])
    params = jax.tree_util.tree_map(jnp.asarray, raw)
    return Model(folder, meta, net, params, template)


def register_with_model(model: Model, fixed, moving, *, refine: int = 0, moving_labels=None,
                        progress=None) -> world.Registration:
    """See ``Model.register``."""
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 0:
        raise ValueError(f"refine must be an int >= 0 (iterations), got {refine!r}")
    t0 = time.perf_counter()
    fixed_vol, moving_vol = world.as_volume(fixed, "fixed"), world.as_volume(moving, "moving")
    for name, vol in (("fixed", fixed_vol), ("moving", moving_vol)):
        if vol.has_channels or vol.ndim != model.ndim:
            raise ValueError(f"{name}: model {os.path.basename(model.path)} registers single-channel "
                             f"{model.ndim}-D images, got shape {vol.data.shape}")
    labels = None if moving_labels is None else world.as_volume(moving_labels, "moving_labels", labels=True)
    tpl = model.template
    mask = np.asarray(tpl.data) > 0
    seconds = {}
    a_f, a_m = (_aligned(model, vol, mask) for vol in (fixed_vol, moving_vol))
    f_t = preprocess.normalize(to_template(tpl, fixed_vol, a_f))
    m_t = preprocess.normalize(to_template(tpl, moving_vol, a_m))
    seconds["align"] = time.perf_counter() - t0
    if progress:
        progress("align", 1, 1, 0.0)
    t = time.perf_counter()
    if model.meta.get("mode") == "atlas":  # trained with the template fixed: go through it
        t_img = preprocess.normalize(np.asarray(tpl.data, np.float32))
        u = _through_template(model.predict(m_t, t_img), model.predict(f_t, t_img))
    else:
        u = model.predict(m_t, f_t)
    u = jax.block_until_ready(u)
    seconds["network"] = time.perf_counter() - t
    options = optimize.PRESETS["affine"]
    if refine:
        t = time.perf_counter()
        options = optimize.instance_options(refine, REFINE_PRESET, levels=REFINE_LEVELS)
        u = jax.block_until_ready(optimize.register(f_t, m_t, options=options, initial_disp=u,
                                                    spacing=tpl.spacing, progress=progress).disp)
        seconds["refine"] = time.perf_counter() - t
    t = time.perf_counter()
    disp = _map_back(np.asarray(u, np.float32), tpl, fixed_vol, moving_vol, a_f, a_m)
    seconds["map_back"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return world.Registration(fixed_vol, moving_vol, options, np.eye(model.ndim + 1), disp, labels, seconds, {})


def _aligned(model: Model, vol: io.Volume, mask) -> np.ndarray:
    """``align(model.template, vol)``, remembered by the image's content (the last ``ALIGN_CACHE`` images)."""
    import hashlib

    data = np.ascontiguousarray(vol.data)
    key = hashlib.sha1(data.tobytes() + np.asarray(vol.affine).tobytes() + str(data.shape).encode()).hexdigest()
    if key not in model.aligned:
        while len(model.aligned) >= ALIGN_CACHE:
            model.aligned.pop(next(iter(model.aligned)))
        model.aligned[key] = align(model.template, vol, options=ALIGN_OPTIONS, mask=mask)
    return model.aligned[key]


@jax.jit
def _through_template(u_moving, u_fixed):
    """The pair's field on the template grid from an atlas model's two fields (template -> each image):
    ``phi_M ∘ phi_F^-1`` (``transforms.invert_disp`` of the fixed image's)."""
    return spatial.compose(u_moving, transforms.invert_disp(u_fixed))


def _map_back(u, tpl: io.Volume, fixed: io.Volume, moving: io.Volume, a_f, a_m) -> np.ndarray:
    """The fixed-grid voxel displacement of ``T`` (module docstring): ``A_f^-1 T(A_f x) - x`` with ``u`` the
    template-grid voxel field."""
    nd = tpl.ndim
    affine = lambda a: io.as_affine4(a, nd)  # noqa: E731
    to_tpl = np.linalg.inv(affine(tpl.affine)) @ np.linalg.inv(a_f) @ affine(fixed.affine)  # fixed vox -> tpl vox
    back = np.linalg.inv(affine(fixed.affine)) @ a_m @ affine(tpl.affine)  # tpl vox -> fixed vox (through M)
    to_tpl, back = _square(to_tpl, nd), _square(back, nd)
    return np.asarray(_map_back_jit(jnp.asarray(u), jnp.asarray(to_tpl, jnp.float32), jnp.asarray(back, jnp.float32),
                                    tuple(fixed.shape)), np.float32)


@jax.jit
def _affine_points(points, matrix):
    nd = points.shape[-1]
    return points @ matrix[:nd, :nd].T + matrix[:nd, nd].reshape((1,) * nd + (nd,))


def _map_back_body(u, to_tpl, back, shape):
    nd = len(shape)
    x = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape], indexing="ij"), -1)
    q = _affine_points(x, to_tpl)
    coords = [jnp.clip(q[..., d], 0, u.shape[d] - 1) for d in range(nd)]  # edge values outside the template
    uq = jnp.stack([jax.scipy.ndimage.map_coordinates(u[..., d], coords, order=1) for d in range(nd)], -1)
    return _affine_points(q + uq, back) - x


_map_back_jit = jax.jit(_map_back_body, static_argnums=3)


def _square(matrix: np.ndarray, nd: int) -> np.ndarray:
    """The ``(nd+1, nd+1)`` voxel matrix of a ``(4, 4)`` one (2-D: the in-plane rows/columns and the offset)."""
    idx = list(range(nd)) + [3]
    return matrix[np.ix_(idx, idx)]
