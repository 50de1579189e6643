"""The seed's other learned methods, each trained and evaluated through ``train.py`` / ``evaluate.py``.

A config selects one with ``config.method``; ``"registration"`` (the default when the field is absent) is the
VoxelMorph-style network of ``jaxreg.training``. Every other entry names a module here that exposes
``fit(config, workdir, *, stop_at=None, progress=True)`` (train, resumable) and
``evaluate(config, workdir, *, out=None) -> dict`` (held-out table; the dict has a ``"markdown"`` entry):

* ``"learned_metric"``: a CNN similarity for multimodal patches (Simonovsky et al., MICCAI 2016);
* ``"supervised"``: a patch CNN regressing known displacements (Cao et al., MICCAI 2017);
* ``"translation"``: joint registration and modality translation (Arar et al., CVPR 2020).
"""
from __future__ import annotations

import importlib

METHODS = {
    "learned_metric": "jaxreg.methods.learned_metric",
    "supervised": "jaxreg.methods.supervised",
    "translation": "jaxreg.methods.translation",
}


def get(name: str):
    """The module implementing method ``name`` (imported on first use)."""
    if name not in METHODS:
        raise ValueError(f"config.method: unknown method {name!r}; known: registration, {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])
