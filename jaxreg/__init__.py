"""jaxreg: differentiable medical image registration in JAX.

The public API, by floor (every name is also its module's: ``jaxreg.warp is jaxreg.spatial.warp``):

* **Warping and fields** (``jaxreg.spatial``): ``identity_grid``, ``sample``, ``warp``, ``warp_labels``;
  ``affine_to_disp``, ``compose_affine``, ``compose``, ``integrate_velocity`` (scaling and squaring),
  ``resize_disp``, ``jacobian_determinant``; ``gaussian_smooth``, ``downsample``, ``pyramid``.
* **Transforms** (``jaxreg.transforms``): parameter vectors → ``(ndim+1, ndim+1)`` voxel matrices about the grid
  centre: ``translation_matrix``, ``rigid_matrix``, ``similarity_matrix``, ``affine_matrix`` (``transforms.translation``
  etc., suffixed here so that ``jaxreg.similarity`` cannot be read as an image similarity), ``to_matrix`` with the
  registry ``PARAMETRIC``, ``invert_matrix``; B-spline free-form deformation ``bspline_grid_shape``,
  ``bspline_to_disp``; ``invert_disp``; voxel → world ``matrix_about_centre_to_world``.
* **Losses** (``jaxreg.losses``; 0-d, lower is better, differentiable): similarities ``mse``, ``ncc``, ``local_ncc``,
  ``mutual_information``, ``nmi``, ``mind_loss``, ``ngf``, ``dice_loss`` (and the descriptor ``mind_ssc``);
  regularisers ``diffusion``, ``bending_energy``, ``folding``; the registries ``SIMILARITIES``, ``REGULARIZERS``.
* **Metrics** (``jaxreg.metrics``; host NumPy in float64, not traceable): ``dice``, ``jaccard``,
  ``surface_distances``, ``hausdorff``, ``hd95``, ``assd`` (mm), ``tre``, ``mean_tre`` (mm), ``folding_fraction``,
  ``sd_log_jacobian``.
* **Classical registration** (``jaxreg.optimize``): ``register`` (one pair), ``register_batch`` (``vmap`` over pairs),
  the frozen ``RegisterOptions``, named ``PRESETS``, the ``Result``. Demons is the module ``jaxreg.demons``
  (``jaxreg.demons.demons(fixed, moving)``): the name ``demons`` stays the module, which callers import as such.
* **Trained models** (``jaxreg.atlas``): ``load_model(name_or_path)`` returns a model whose ``register(fixed,
  moving, refine=N)`` gives a ``Registration`` like ``register_images`` (both images aligned to the model's
  template, the network's field carried back to the fixed grid); ``jaxreg.atlas.available()`` lists the packaged ones.
* **Modules**: ``data`` (NIfTI I/O, preprocessing, datasets, augmentation, synthetic data), ``models`` (Flax
  networks), ``training`` (train step, loop, checkpoints), ``methods`` (the learned methods), ``evaluation``
  (measures per pair, tables, figures, the held-out evaluation loop), ``groupwise`` (template building:
  ``build_template``, label fusion through the template), ``uncertainty`` (per-voxel displacement uncertainty of a
  ``Registration``: ``estimate``, ``laplace``, ``ensemble``).

Conventions:

* Channels last: an image is ``(*spatial)`` or ``(*spatial, C)`` with 2 or 3 spatial axes; a displacement or
  velocity field is ``(*spatial, ndim)`` in **voxel units** of the fixed grid (component ``d`` along array axis ``d``).
* Warping **pulls**: ``warped[x] = moving[x + u(x)]``; a matrix maps fixed voxel positions to moving ones.
* Functions take one unbatched example; batch with ``jax.vmap`` at the call site (metrics: a Python loop).
* Array arguments are positional; options are keyword-only; a PRNG argument is called ``key`` and comes first.

``import jaxreg`` loads JAX and the pure floors (spatial, transforms, losses) only. Metrics (SciPy), the optimiser
(optax), Demons and the subpackages (Flax, nibabel) load on first use of one of their names (PEP 562
``__getattr__``); ``from jaxreg import *`` loads everything.
"""
from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING

from jaxreg import losses, spatial, transforms
from jaxreg.losses import (
    REGULARIZERS,
    SIMILARITIES,
    bending_energy,
    dice_loss,
    diffusion,
    folding,
    local_ncc,
    mind_loss,
    mind_ssc,
    mse,
    mutual_information,
    ncc,
    ngf,
    nmi,
)
from jaxreg.spatial import (
    affine_to_disp,
    compose,
    compose_affine,
    downsample,
    gaussian_smooth,
    identity_grid,
    integrate_velocity,
    jacobian_determinant,
    pyramid,
    resize_disp,
    sample,
    warp,
    warp_labels,
)
from jaxreg.transforms import (
    PARAMETRIC,
    bspline_grid_shape,
    bspline_to_disp,
    invert_disp,
    invert_matrix,
    matrix_about_centre_to_world,
    to_matrix,
)
from jaxreg.transforms import affine as affine_matrix
from jaxreg.transforms import rigid as rigid_matrix
from jaxreg.transforms import similarity as similarity_matrix
from jaxreg.transforms import translation as translation_matrix

# Names loaded on first access: {name: module it comes from}. These modules import SciPy, optax, Flax or nibabel,
# or are still changing; importing them here would make ``import jaxreg`` slow (and cycles easy).
_LAZY_NAMES = {
    **{name: "metrics" for name in ("dice", "jaccard", "surface_distances", "hausdorff", "hd95", "assd", "tre",
                                    "mean_tre", "folding_fraction", "sd_log_jacobian")},
    **{name: "optimize" for name in ("register", "register_batch", "RegisterOptions", "PRESETS", "Result")},
    **{name: "world" for name in ("register_images", "Registration")},
    **{name: "atlas" for name in ("load_model",)},
}
_LAZY_MODULES = ("metrics", "optimize", "demons", "data", "models", "training", "methods", "evaluation", "world",
                 "atlas")

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from jaxreg import atlas, data, demons, evaluation, methods, metrics, models, optimize, training, world  # noqa: F401
    from jaxreg.atlas import load_model  # noqa: F401
    from jaxreg.metrics import (  # noqa: F401
        assd,
        dice,
        folding_fraction,
        hausdorff,
        hd95,
        jaccard,
        mean_tre,
        sd_log_jacobian,
        surface_distances,
        tre,
    )
    from jaxreg.optimize import PRESETS, RegisterOptions, Result, register, register_batch  # noqa: F401
    from jaxreg.world import Registration, register_images  # noqa: F401

__all__ = [
    # spatial: warping and fields
    "identity_grid",
    "sample",
    "warp",
    "warp_labels",
    "affine_to_disp",
    "compose_affine",
    "compose",
    "integrate_velocity",
    "resize_disp",
    "jacobian_determinant",
    "gaussian_smooth",
    "downsample",
    "pyramid",
    # transforms
    "translation_matrix",
    "rigid_matrix",
    "similarity_matrix",
    "affine_matrix",
    "to_matrix",
    "PARAMETRIC",
    "invert_matrix",
    "bspline_grid_shape",
    "bspline_to_disp",
    "invert_disp",
    "matrix_about_centre_to_world",
    # losses
    "mse",
    "ncc",
    "local_ncc",
    "mutual_information",
    "nmi",
    "mind_ssc",
    "mind_loss",
    "ngf",
    "dice_loss",
    "diffusion",
    "bending_energy",
    "folding",
    "SIMILARITIES",
    "REGULARIZERS",
    # metrics (lazy)
    "dice",
    "jaccard",
    "surface_distances",
    "hausdorff",
    "hd95",
    "assd",
    "tre",
    "mean_tre",
    "folding_fraction",
    "sd_log_jacobian",
    # classical registration (lazy)
    "register",
    "register_batch",
    "RegisterOptions",
    "PRESETS",
    "Result",
    # registration of images in world space (lazy)
    "register_images",
    "Registration",
    # trained models in template space (lazy): jaxreg.load_model("mni152_atlas").register(fixed, moving, refine=20)
    "load_model",
    # modules (spatial, transforms, losses loaded; the others lazy)
    "spatial",
    "transforms",
    "losses",
    "metrics",
    "optimize",
    "demons",
    "data",
    "models",
    "training",
    "methods",
    "evaluation",
    "world",
    "atlas",
]


def __getattr__(name: str):
    """Load a lazy name (``_LAZY_NAMES``) or module (``_LAZY_MODULES``) on first access (PEP 562)."""
    if name in _LAZY_MODULES:
        return _importlib.import_module(f"jaxreg.{name}")  # the import also binds jaxreg.<name>
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'jaxreg' has no attribute {name!r}")
    module = _importlib.import_module(f"jaxreg.{module_name}")
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"jaxreg.{name} is re-exported from jaxreg.{module_name}, which does not define it "
                             f"(yet)") from None
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
