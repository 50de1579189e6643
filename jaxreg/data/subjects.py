"""Learning sets: subjects resampled onto one template grid (after an affine alignment), cached on disk, and the
registration pairs drawn from them.

A learning-set folder (written by ``jaxreg.atlas.build_learning_set``, which does the alignment; read here):

* ``index.json``: ``{"version": 1, "template": {"shape", "affine"}, "settings": {...}, "subjects": [{"name",
  "image", "labels", "matrix", "source": {"image", "labels"}}, ...]}``. ``matrix`` is the ``(4, 4)`` RAS mm map from
  a template world point to the subject's world point (pull, as ``world.Registration.world_matrix``), so a field
  predicted on the template grid maps back to the subject's own grid.
* ``template.nii.gz``: the template image on the grid (the fixed image of atlas mode).
* ``NAME.npz``: ``image`` ``(*S)`` float32 in [0, 1] and, when the subject has labels, ``labels`` ``(*S)`` int32
  (the label values of the source file, nearest neighbour) on the template grid.

``SubjectPairs`` draws pairs from such a folder: ``"pairwise"`` (every ordered pair of distinct subjects, both
directions) or ``"atlas"`` (the template fixed, each subject moving). Label values become classes ``0 .. K-1``
either one per value present (``label_values``) or one per group of values (``label_groups``, e.g. a coarse grouping
of ~100 regions into ~35 structures for a Dice training term; values in no group are background).
"""
from __future__ import annotations

import json
import os

import numpy as np

from . import io, preprocess

VERSION = 1
INDEX = "index.json"
TEMPLATE = "template.nii.gz"


def read_index(folder) -> dict:
    """The ``index.json`` of a learning-set folder, checked: a ``ValueError``/``FileNotFoundError`` names the file."""
    path = os.path.join(os.fspath(folder), INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no learning set here (build one with jaxreg.atlas.build_learning_set)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable learning-set index ({err})") from None
    if not isinstance(index, dict) or index.get("version") != VERSION or not index.get("subjects"):
        raise ValueError(f"{path}: not a version-{VERSION} learning-set index with subjects")
    return index


def subject_path(folder, name: str) -> str:
    """Where subject ``name``'s arrays live in a learning-set folder."""
    return os.path.join(os.fspath(folder), f"{name}.npz")


def write_subject(folder, name: str, image: np.ndarray, labels: np.ndarray | None = None) -> str:
    """Write subject ``name``'s arrays (atomically); returns the file name."""
    path = subject_path(folder, name)
    arrays = {"image": np.asarray(image, np.float32)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int32)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    io.atomic_write(path, write)
    return os.path.basename(path)


def load_subject(folder, name: str) -> dict:
    """``{"image", "labels"?}`` of subject ``name`` (``FileNotFoundError``/``ValueError`` naming the file)."""
    path = subject_path(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: subject {name!r} is listed in the index but its file is missing")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable subject file ({err})") from None


def _classes(labels: list[np.ndarray], groups, source: str):
    """``(lookup(values) -> classes, num_labels, names, label_values or None)`` for the label maps ``labels``."""
    if groups:
        names = list(groups)
        table = {}
        for k, name in enumerate(names, start=1):
            for v in groups[name]:
                if int(v) in table:
                    raise ValueError(f"{source}: label value {v} is in two groups ({names[table[int(v)] - 1]!r}, "
                                     f"{name!r})")
                table[int(v)] = k
        keys = np.array(sorted(table), np.int64)
        vals = np.array([table[k] for k in keys], np.int32)

        def lookup(lab):
            i = np.clip(np.searchsorted(keys, lab), 0, len(keys) - 1)
            return np.where(keys[i] == lab, vals[i], 0).astype(np.int32)

        return lookup, len(names) + 1, {k: n for k, n in enumerate(names, start=1)}, None
    from .datasets import label_values

    values = label_values(labels, source)
    return (lambda lab: np.searchsorted(values, lab).astype(np.int32)), len(values), \
        {k: str(int(v)) for k, v in enumerate(values) if k}, values


class SubjectPairs:
    """Registration pairs from a learning-set folder (module docstring).

    Args:
      folder: the learning-set folder.
      subjects: names to use (default: all in the index, in index order); an unknown name is an error.
      mode: ``"pairwise"`` (ordered pairs of distinct subjects) or ``"atlas"`` (the template fixed).
      shuffle: draw the pairs in a new random order each pass (training); else in a fixed order (evaluation).
      label_groups: ``{name: [label values]}``: one class per group (others background); default one class per
        label value present in the used subjects.
      seed: the shuffling seed.
      slice_index: a 3-D set's axial slice (last axis) to use instead of the volumes: 2-D pairs of matched slices
        (every subject is affinely aligned to the template, so one index is one anatomical level).

    Attributes: ``shape``, ``num_labels`` (None without labels), ``label_values`` (per class, or None with groups),
    ``label_names`` ``{class: name}``, ``names`` (subjects), ``spacing`` (mm), ``affine`` (the template grid's),
    ``matrices`` (per subject, template world -> subject world), ``pairs`` ``[(fixed, moving)]`` subject indices
    (``-1`` is the template).
    """

    def __init__(self, folder, *, subjects=None, mode: str = "pairwise", shuffle: bool = True, label_groups=None,
                 seed: int = 0, slice_index: int | None = None):
        index = read_index(folder)
        source = os.path.join(os.fspath(folder), INDEX)
        if mode not in ("pairwise", "atlas"):
            raise ValueError(f"mode must be 'pairwise' or 'atlas', got {mode!r}")
        listed = {s["name"]: s for s in index["subjects"]}
        names = list(listed) if subjects is None or len(subjects) == 0 else [str(n) for n in subjects]
        unknown = [n for n in names if n not in listed]
        if unknown:
            raise ValueError(f"{source}: subjects {unknown} are not in the learning set (it has {sorted(listed)})")
        if mode == "pairwise" and len(names) < 2:
            raise ValueError(f"{source}: pairwise mode needs at least 2 subjects, got {names}")
        self.folder, self.names, self.mode, self.shuffle, self.seed = os.fspath(folder), names, mode, shuffle, int(seed)
        self.shape = tuple(int(n) for n in index["template"]["shape"])
        self.affine = np.asarray(index["template"]["affine"], np.float64)
        self.spacing = np.linalg.norm(self.affine[:3, :len(self.shape)], axis=0)
        self.matrices = [np.asarray(listed[n]["matrix"], np.float64) for n in names]
        arrays = [load_subject(folder, n) for n in names]
        for n, a in zip(names, arrays):
            if a["image"].shape != self.shape:
                raise ValueError(f"{subject_path(folder, n)}: image shape {a['image'].shape} is not the template "
                                 f"grid's {self.shape}")
        if slice_index is not None:
            if len(self.shape) != 3 or not 0 <= int(slice_index) < self.shape[-1]:
                raise ValueError(f"{source}: slice_index {slice_index} is not an axial slice of the {self.shape} grid")
            arrays = [{k: v[..., int(slice_index)] for k, v in a.items()} for a in arrays]
            self.shape, self.spacing = self.shape[:2], self.spacing[:2]
        self.slice_index = slice_index
        self.images = [a["image"] for a in arrays]
        has = ["labels" in a for a in arrays]
        self.labels = self.num_labels = self.label_values = None
        self.label_names = {}
        if all(has) and mode == "pairwise":
            lookup, self.num_labels, self.label_names, self.label_values = _classes(
                [a["labels"] for a in arrays], label_groups, source)
            self.labels = [lookup(a["labels"]) for a in arrays]
        if mode == "atlas":
            self.template = preprocess.normalize(io.load(os.path.join(self.folder, TEMPLATE)).data)
            if slice_index is not None:
                self.template = self.template[..., int(slice_index)]
            self.pairs = [(-1, m) for m in range(len(names))]
        else:
            self.pairs = [(f, m) for f in range(len(names)) for m in range(len(names)) if f != m]

    def __len__(self):
        return len(self.pairs)

    def _indices(self, index: int):
        n = len(self.pairs)
        if not self.shuffle:
            return self.pairs[index % n]
        order = np.random.default_rng([self.seed, index // n]).permutation(n)
        return self.pairs[int(order[index % n])]

    def pair(self, index: int) -> dict:
        """Pair ``index``: ``fixed``, ``moving`` ``shape`` float32, ``*_labels`` int32 classes (pairwise mode with
        labels), ``spacing``, ``name`` ("moving->fixed"), ``fixed_index``, ``moving_index`` (-1: the template)."""
        f, m = self._indices(index)
        fixed = self.template if f < 0 else self.images[f]
        out = {"fixed": fixed, "moving": self.images[m], "spacing": self.spacing,
               "name": f"{self.names[m]}->{'template' if f < 0 else self.names[f]}", "fixed_index": f,
               "moving_index": m}
        if self.labels is not None:
            out["fixed_labels"], out["moving_labels"] = self.labels[f], self.labels[m]
        return out
