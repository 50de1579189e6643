"""Learned registration methods, each trained by ``train.py`` and evaluated by ``evaluate.py`` the same way.

``config.method`` names one module here (``METHODS``). Every method module has the same small interface:

* ``fit(config, workdir, *, stop_at=None, progress=True) -> TrainState``: train (resumable) through
  ``jaxreg.training.fit`` (one train step, one loop, one checkpoint layout for all methods);
* ``evaluation(config, workdir) -> Evaluation``: what the held-out evaluation needs (the test pairs, one function
  per compared method, the measures, the table's columns); ``jaxreg.evaluation.evaluate`` runs the one evaluation
  loop and writes the tables;
* ``load(...)`` and a ``make_predict``-style function for using a trained model from Python.

The methods:

* ``"voxelmorph"``: the VoxelMorph U-Net, unsupervised or semi-supervised (Balakrishnan et al., 2019);
* ``"learned_metric"``: a CNN similarity for multimodal patches (Simonovsky et al., MICCAI 2016);
* ``"supervised"``: a patch CNN regressing known displacements (Cao et al., MICCAI 2017);
* ``"translation"``: joint registration and modality translation (Arar et al., CVPR 2020).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

METHODS = {
    "voxelmorph": "jaxreg.methods.voxelmorph",
    "learned_metric": "jaxreg.methods.learned_metric",
    "supervised": "jaxreg.methods.supervised",
    "translation": "jaxreg.methods.translation",
}


def get(name: str):
    """The module implementing method ``name`` (imported on first use)."""
    if name not in METHODS:
        raise ValueError(f"config.method: unknown method {name!r}; known: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])


class Evaluation(NamedTuple):
    """A method's held-out evaluation, as ``jaxreg.evaluation.evaluate`` runs it.

    pairs: ``pairs(i) -> dict`` for ``0 <= i < num_pairs``: ``fixed``, ``moving`` ``(*S)`` float32 (device arrays),
      ``fixed_labels``, ``moving_labels`` ``(*S)`` int, ``spacing`` (mm per axis) and, when known, ``disp``
      ``(*S, ndim)`` the true field (voxels, pull convention), ``landmarks`` ``(N, ndim)`` fixed-grid voxels and
      ``moving_landmarks`` ``(N, ndim)`` their corresponding points (TRE needs one of ``disp`` and these).
    num_pairs: how many test pairs.
    methods: ``{name: fn(pair) -> dict}`` in table order; the dict holds ``disp`` ``(*S, ndim)`` (voxels, pull) and
      optionally further per-pair measures (floats) that go into the row as they are.
    measures: which of ``jaxreg.evaluation.MEASURES`` to compute from ``disp`` and the labels.
    label_names: ``{label: name}`` of the labels scored (background excluded).
    columns: the summary table's ``(key, title, digits)``; keys of the rows (nested keys as ``"dice/GM"``).
    paired: ``((method, baseline), ...)``: paired differences and tests per measure of ``paired_keys``.
    paired_keys: the measures compared by ``paired``.
    info: extra JSON-able fields for ``results.json`` (checkpoint step, missing baselines, ...).
    note: a line printed under the table (e.g. baselines not found).
    """

    pairs: Callable[[int], dict]
    num_pairs: int
    methods: Mapping[str, Callable[[dict], dict]]
    measures: tuple
    label_names: Mapping[int, str]
    columns: tuple
    paired: tuple = ()
    paired_keys: tuple = ("dice_mean",)
    info: Mapping = {}
    note: str = ""


def classical(preset: str) -> Callable[[dict], dict]:
    """The classical engine with ``optimize.PRESETS[preset]`` as an evaluated method (``Evaluation.methods``):
    ``fn(pair) -> {"disp"}``, the pair's moving image registered onto its fixed one on their shared grid."""
    from jaxreg import optimize

    if preset not in optimize.PRESETS:
        raise ValueError(f"classical preset must be one of {sorted(optimize.PRESETS)}, got {preset!r}")
    options = optimize.PRESETS[preset]
    return lambda p: {"disp": optimize.register(p["fixed"], p["moving"], options=options).disp}
