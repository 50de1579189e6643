"""Registration datasets (pairs of images, optional labels) and a deterministic, prefetching host loader.

A dataset has ``shape`` (spatial, all pairs share it), ``num_labels`` (``K`` with labels in ``[0, K)``, or None
when there are no labels) and ``pair(index) -> dict``: ``fixed``, ``moving`` ``shape`` float32 in [0, 1] and, with
labels, ``fixed_labels``, ``moving_labels`` ``shape`` int32. ``pair`` is deterministic in ``(seed, index)``.

Label maps read from files keep any label values (FreeSurfer's go to 2035, others further): the classes are the
values present (background 0 always among them), numbered ``0 .. K-1`` in increasing order by a lookup table
(``label_values[k]`` is class ``k``'s value in the files), so one-hot maps and Dice terms have ``K`` channels, never
``max + 1``. More than ``MAX_LABELS`` classes is an error.

Kinds:

* ``SyntheticPairs``: ``data.synthetic.synthetic_pair`` (SynthMorph-style random label maps, contrasts and
  deformations), the embedded default: nothing to download.
* ``MNIPairs``: atlas registration to the MNI152 template (``data.synthetic.mni_pair``, needs nilearn), cropped or
  padded to ``shape``.
* ``VolumePairs``: NIfTI files, from a folder (``from_folder``) or a Learn2Reg-style JSON list (``from_json``),
  in ``"pairwise"`` mode (random ordered pairs of distinct images), ``"atlas"`` mode (every image to one fixed
  image) or with explicit pairs. Images are intensity-normalised (``preprocess.normalize``) and cropped/padded to
  ``shape`` (``preprocess.crop_or_pad``). All files are read and checked when the dataset is built, so a missing
  file, a label map whose shape differs from its image or an empty folder fails before training starts.
* ``subjects.SubjectPairs``: a learning set of real subjects aligned to a template (``jaxreg.data.subjects``; built
  by ``jaxreg.atlas.prepare``), split by subject (``data.subjects.train`` / ``data.subjects.test``).
* ``FixedAsMoving``: any of the above with ``moving = fixed`` (``data.fixed_as_moving``), for training from one
  image where on-device augmentation (``jaxreg.data.augment``) makes the moving image.

``Loader`` yields ``(step, batch)`` for steps ``start .. stop - 1``; batch ``step`` holds pairs
``step * batch_size + i``, so a resumed run sees exactly the batches an uninterrupted one would. A background thread
prepares up to ``prefetch`` batches ahead.
"""
from __future__ import annotations

import glob
import json
import os
import queue
import threading

import numpy as np

from . import io, preprocess, synthetic

_NII = (".nii", ".nii.gz")
#: the most label classes a dataset may hold (one-hot maps have one channel per class)
MAX_LABELS = 1000


def _num_labels(value, where: str) -> int:
    """``value`` as a number of label classes in ``[2, MAX_LABELS]``, or a ``ValueError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= value <= MAX_LABELS:
        raise ValueError(f"{where} must be an int in [2, {MAX_LABELS}] (label classes, background included), got "
                         f"{value!r}")
    return int(value)


def _shape(value, where: str) -> tuple:
    """``value`` as a spatial shape: 2 or 3 ints >= 8, or a ``ValueError`` naming ``where``."""
    try:
        shape = tuple(value)
        ok = len(shape) in (2, 3) and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 8
                                          for n in shape)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{where} must be a spatial shape of 2 or 3 ints >= 8, e.g. (64, 64), got {value!r}")
    return tuple(int(n) for n in shape)


def label_values(labels, source: str) -> np.ndarray:
    """The classes of the label maps ``labels``: the values present (0 always among them), sorted, int64; class
    ``k`` is ``values[k]`` (``np.searchsorted(values, lab)`` numbers a map ``0 .. K-1``, never ``max + 1``). More
    than ``MAX_LABELS`` values is a ``ValueError`` naming ``source``."""
    values = np.union1d(np.unique(np.concatenate([np.unique(lab) for lab in labels])), [0])
    if len(values) > MAX_LABELS:
        raise ValueError(f"{source}: the label maps hold {len(values)} distinct labels, more than "
                         f"MAX_LABELS = {MAX_LABELS} (is a label file an intensity image?)")
    return values.astype(np.int64)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


class SyntheticPairs:
    """Random synthetic pairs (``synthetic.synthetic_pair``): pair ``i`` uses the generator seeded ``(seed, i)``."""

    def __init__(self, shape, *, seed: int = 0, num_labels: int = 8, **options):
        self.shape = _shape(shape, "shape")
        self.seed, self.options = int(seed), dict(options)
        self.num_labels = _num_labels(num_labels, "num_labels")

    def __len__(self):
        return 2**31 - 1

    def pair(self, index: int) -> dict:
        p = synthetic.synthetic_pair(_rng(self.seed, index), shape=self.shape, num_labels=self.num_labels,
                                     **self.options)
        return {k: p[k] for k in ("fixed", "moving", "fixed_labels", "moving_labels")}


class MNIPairs:
    """Atlas pairs from the MNI152 template (``synthetic.mni_pair``), cropped/padded to ``shape``; labels 0-3."""

    num_labels = 4

    def __init__(self, shape, *, seed: int = 0, resolution: int = 2, **options):
        self.shape = _shape(shape, "shape")
        self.seed, self.resolution, self.options = int(seed), int(resolution), dict(options)
        synthetic._nilearn_data_dir()  # fail now (ImportError) when nilearn is missing

    def __len__(self):
        return 2**31 - 1

    def pair(self, index: int) -> dict:
        p = synthetic.mni_pair(_rng(self.seed, index), resolution=self.resolution, **self.options)
        out = {k: preprocess.crop_or_pad(p[k], self.shape) for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
        out["spacing"] = np.asarray(p["spacing"])
        return out


class VolumePairs:
    """Pairs of preloaded NIfTI images (see module docstring).

    Args:
      records: list of dicts with ``image`` (path) and optional ``label`` (path); all or none have labels.
      shape: spatial shape to crop/pad to (None: the images' common shape, padded to a multiple of ``multiple``).
      mode: ``"pairwise"`` or ``"atlas"``; ``atlas``: index of the fixed image in atlas mode (default 0).
      pairs: explicit ``(fixed_index, moving_index)`` list (overrides ``mode``).
    """

    def __init__(self, records, *, shape=None, mode: str = "pairwise", atlas: int = 0, pairs=None, seed: int = 0,
                 multiple: int = 16, source: str = "dataset"):
        if not records:
            raise ValueError(f"{source}: no images found")
        if mode not in ("pairwise", "atlas"):
            raise ValueError(f"mode must be 'pairwise' or 'atlas', got {mode!r}")
        has = [r.get("label") is not None for r in records]
        if any(has) and not all(has):
            missing = [r["image"] for r, h in zip(records, has) if not h]
            raise ValueError(f"{source}: some images have labels and some do not (no label for {missing[:3]})")
        for r in records:
            for k in ("image", "label"):
                if r.get(k) is not None and not os.path.isfile(r[k]):
                    raise FileNotFoundError(f"{source}: {k} file not found: {r[k]}")
        images, labels = [], []
        for r in records:
            img = io.load(r["image"]).data
            if img.ndim not in (2, 3):
                raise ValueError(f"{r['image']}: expected a 2-D or 3-D image, got shape {img.shape}")
            images.append(img)
            if r.get("label") is not None:
                lab = io.load_labels(r["label"]).data
                if lab.shape != img.shape:
                    raise ValueError(f"{r['label']}: label map shape {lab.shape} differs from its image "
                                     f"{r['image']} shape {img.shape}")
                if lab.min() < 0:
                    raise ValueError(f"{r['label']}: negative labels")
                labels.append(lab)
        if shape is None:
            shapes = {im.shape for im in images}
            if len(shapes) > 1:
                raise ValueError(f"{source}: images have different shapes {sorted(shapes)}; set data.shape")
            shape = tuple(-(-s // multiple) * multiple for s in images[0].shape)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != images[0].ndim:
            raise ValueError(f"{source}: data.shape {self.shape} does not match the {images[0].ndim}-D images")
        self.images = [preprocess.crop_or_pad(preprocess.normalize(im), self.shape) for im in images]
        self.labels, self.label_values, self.num_labels = None, None, None
        if labels:
            values = label_values(labels, source)
            self.label_values = values
            self.num_labels = len(values)
            self.labels = [preprocess.crop_or_pad(np.searchsorted(values, lab).astype(np.int32), self.shape)
                           for lab in labels]
        self.names = [os.path.basename(r["image"]) for r in records]
        self.seed, self.mode, self.atlas = int(seed), mode, int(atlas)
        n = len(self.images)
        if pairs is not None:
            self.pairs = [(int(a), int(b)) for a, b in pairs]
            bad = [p for p in self.pairs if not (0 <= p[0] < n and 0 <= p[1] < n)]
            if bad or not self.pairs:
                raise ValueError(f"{source}: bad or empty explicit pairs {bad[:3]} for {n} images")
        else:
            self.pairs = None
            if mode == "pairwise" and n < 2:
                raise ValueError(f"{source}: pairwise mode needs at least 2 images, found {n}")
            if mode == "atlas" and not (0 <= self.atlas < n) or mode == "atlas" and n < 2:
                raise ValueError(f"{source}: atlas mode needs an atlas index in [0, {n}) and another image")

    def __len__(self):
        if self.pairs is not None:
            return len(self.pairs)
        n = len(self.images)
        return n - 1 if self.mode == "atlas" else n * (n - 1)

    def _indices(self, index: int):
        if self.pairs is not None:
            return self.pairs[index % len(self.pairs)]
        n = len(self.images)
        rng = _rng(self.seed, index)
        if self.mode == "atlas":
            others = [i for i in range(n) if i != self.atlas]
            return self.atlas, others[int(rng.integers(len(others)))]
        a, b = rng.choice(n, size=2, replace=False)
        return int(a), int(b)

    def pair(self, index: int) -> dict:
        f, m = self._indices(index)
        out = {"fixed": self.images[f], "moving": self.images[m]}
        if self.labels is not None:
            out["fixed_labels"], out["moving_labels"] = self.labels[f], self.labels[m]
        out["name"] = f"{self.names[m]}->{self.names[f]}"
        return out


class FixedAsMoving:
    """``base``'s pairs with the moving image (and labels) replaced by the fixed one: ``moving == fixed``.

    For training from one image ("atlas from one image"): on-device augmentation (``data.augment``) then makes the
    moving image, a random transform of the fixed one. ``constant`` is True when ``base``'s fixed image does not
    depend on the index (``MNIPairs``; ``VolumePairs`` in atlas mode without explicit pairs): every pair is then
    pair 0, built once and cached, and ``training.fit`` puts one batch on the devices for the whole run.
    """

    def __init__(self, base):
        self.base = base
        self.shape, self.num_labels = base.shape, base.num_labels
        self.label_values = getattr(base, "label_values", None)
        self.constant = isinstance(base, MNIPairs) or (isinstance(base, VolumePairs) and base.pairs is None
                                                       and base.mode == "atlas")
        self._cached = None

    def __len__(self):
        return len(self.base)

    def pair(self, index: int) -> dict:
        if self.constant and self._cached is not None:
            return dict(self._cached)
        p = self.base.pair(0 if self.constant else index)
        out = {k: v for k, v in p.items() if not k.startswith("moving")}
        out["moving"] = p["fixed"]
        if "fixed_labels" in p:
            out["moving_labels"] = p["fixed_labels"]
        if "name" in p:
            fixed_name = p["name"].split("->")[-1]
            out["name"] = f"{fixed_name}->{fixed_name}"
        if self.constant:
            self._cached = out
        return dict(out)


def _find_label(image_path: str, label_dir: str | None) -> str | None:
    base = os.path.basename(image_path)
    if label_dir is not None:
        return os.path.join(label_dir, base)
    for suf in _NII:
        if base.endswith(suf):
            cand = os.path.join(os.path.dirname(image_path), base[: -len(suf)] + "_seg" + suf)
            return cand if os.path.isfile(cand) else None
    return None


def from_folder(path, **options) -> VolumePairs:
    """Images from a folder of NIfTI files (``*.nii``, ``*.nii.gz``).

    Layout: ``path/images/*.nii.gz`` with labels of the same name in ``path/labels/``; or a flat folder where the
    labels of ``x.nii.gz`` are ``x_seg.nii.gz``. Other options go to ``VolumePairs``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data folder not found: {path}")
    img_dir = os.path.join(path, "images")
    flat = not os.path.isdir(img_dir)
    img_dir = path if flat else img_dir
    label_dir = None if flat or not os.path.isdir(os.path.join(path, "labels")) else os.path.join(path, "labels")
    files = sorted(f for f in glob.glob(os.path.join(img_dir, "*")) if f.endswith(_NII) and not
                   (flat and os.path.basename(f).split(".")[0].endswith("_seg")))
    if not files:
        raise ValueError(f"data folder {path}: no NIfTI images (*.nii, *.nii.gz) found in {img_dir}")
    records = [{"image": f, "label": _find_label(f, label_dir)} for f in files]
    if label_dir is not None:
        for r in records:
            if not os.path.isfile(r["label"]):
                raise FileNotFoundError(f"data folder {path}: label file not found: {r['label']}")
    return VolumePairs(records, source=f"data folder {path}", **options)


def from_json(path, *, split: str = "train", **options) -> VolumePairs:
    """Images from a Learn2Reg-style JSON file.

    ``{"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}, ...],
    "registration_val": [{"fixed": "...", "moving": "..."}, ...]}``; paths are relative to the JSON file's folder.
    ``split="train"`` uses the training images (``"training_paired_images"`` pairs if present, else ``mode``);
    ``split="test"`` uses the ``"registration_val"`` (or ``"registration_test"``) pairs over the images they name.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset JSON not found: {path}")
    with open(path) as f:
        spec = json.load(f)
    root = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(root, p))
    records = [{"image": resolve(r["image"]), "label": resolve(r["label"]) if r.get("label") else None}
               for r in spec.get("training", [])]
    pairs_key = "training_paired_images" if split == "train" else next(
        (k for k in ("registration_val", "registration_test") if k in spec), None)
    pairs = None
    if pairs_key and spec.get(pairs_key):
        index = {r["image"]: i for i, r in enumerate(records)}
        pairs = []
        for p in spec[pairs_key]:
            ids = []
            for k in ("fixed", "moving"):
                img = resolve(p[k])
                if img not in index:
                    index[img] = len(records)
                    label = img.replace("images", "labels") if "images" in img else None
                    records.append({"image": img, "label": label if label and os.path.isfile(label) else None})
                ids.append(index[img])
            pairs.append(tuple(ids))
    if not records:
        raise ValueError(f"dataset JSON {path}: no images listed under 'training'")
    return VolumePairs(records, pairs=pairs, source=f"dataset JSON {path}", **options)


def from_config(cfg, *, split: str = "train"):
    """The dataset of a config's ``data`` block for ``split`` ("train" or "test").

    ``cfg.kind``: ``"synthetic"`` (``shape``, ``num_labels``, ``synthetic`` options), ``"mni"`` (``shape``,
    ``resolution``), ``"folder"`` or ``"json"`` (``path``, optional ``test_path``, ``mode``, ``atlas``, ``shape``).
    Generated kinds use ``seed`` for training and ``test_seed`` for testing. ``cfg.fixed_as_moving`` (optional,
    default False) wraps the training split in ``FixedAsMoving`` (moving = fixed; ``data.augment`` then makes the
    moving image); the test split keeps the kind's usual pairs.
    """
    dataset = _from_config(cfg, split=split)
    if split == "train" and cfg.fixed_as_moving:
        return FixedAsMoving(dataset)
    return dataset


KINDS = ("synthetic", "mni", "folder", "json", "subjects")


def _from_config(cfg, *, split: str):
    kind = cfg.kind
    if kind not in KINDS:
        raise ValueError(f"data.kind must be one of {', '.join(repr(k) for k in KINDS)}, got {kind!r}")
    seed = int(cfg.seed if split == "train" else cfg.test_seed)
    if kind == "subjects":  # a learning set: the template grid is the shape
        from .subjects import SubjectPairs

        names = tuple(cfg.subjects.train if split == "train" else cfg.subjects.test)
        groups = cfg.label_groups if split == "train" else None  # evaluation scores every region
        return SubjectPairs(cfg.path, subjects=names, mode=cfg.mode, shuffle=split == "train",
                            label_groups=dict(groups) if groups else None, seed=seed,
                            slice_index=cfg.get("slice_index"))
    if kind in ("synthetic", "mni"):  # generated: the shape is the config's
        shape = _shape(cfg.shape, f"data.shape (data.kind={kind!r})")
    else:  # files: None (or empty) means the images' own shape
        shape = _shape(cfg.shape, "data.shape") if cfg.shape else None
    if kind == "synthetic":
        return SyntheticPairs(shape, seed=seed, num_labels=_num_labels(cfg.num_labels, "data.num_labels"),
                              **dict(cfg.synthetic or {}))
    if kind == "mni":
        return MNIPairs(shape, seed=seed, resolution=cfg.resolution, **dict(cfg.mni or {}))
    path = cfg.test_path if split == "test" and cfg.test_path else cfg.path
    if not path:
        raise ValueError(f"data.kind={kind!r} needs data.path (a {'folder' if kind == 'folder' else 'JSON file'})")
    opts = dict(shape=shape, mode=cfg.mode, atlas=cfg.atlas, seed=seed)
    if kind == "folder":
        return from_folder(path, **opts)
    return from_json(path, split=split, **opts)


_ARRAY_KEYS = ("fixed", "moving", "fixed_labels", "moving_labels")


def make_batch(dataset, step: int, batch_size: int) -> dict:
    """Batch ``step``: pairs ``step * batch_size .. + batch_size - 1`` stacked along a new leading axis."""
    pairs = [dataset.pair(step * batch_size + i) for i in range(batch_size)]
    return {k: np.stack([p[k] for p in pairs]) for k in _ARRAY_KEYS if k in pairs[0]}


class Loader:
    """Iterate ``(step, batch)`` for ``start <= step < stop``, prepared by a background thread (``prefetch`` ahead).

    Deterministic: batch ``step`` depends only on the dataset (its seed) and ``step``. Errors in the thread are
    raised in the consumer. ``close()`` stops the thread.
    """

    def __init__(self, dataset, *, batch_size: int, seed: int = 0, start: int = 0, stop: int, prefetch: int = 2):
        del seed  # the dataset carries its seed; kept for a stable signature
        self.dataset, self.batch_size, self.start, self.stop = dataset, int(batch_size), int(start), int(stop)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self):
        try:
            for step in range(self.start, self.stop):
                if not self._put((step, make_batch(self.dataset, step, self.batch_size))):
                    return
        except BaseException as err:  # handed to the consumer
            self._put(err)
            return
        self._put(None)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
