"""Registration of images in world space: the one call that reads images, registers them and gives the results on
the fixed grid with world transforms other tools read.

    reg = jaxreg.register_images("fixed.nii.gz", "moving.nii.gz", preset="default",
                                 moving_labels="moving_seg.nii.gz")
    reg.warped, reg.warped_labels        # io.Volume on the fixed grid (one interpolation each)
    reg.world_matrix                     # (4, 4) RAS mm, fixed world point -> moving world point (parametric stage)
    reg.apply("other_moving.nii.gz")     # any image in the moving image's world space, any grid
    reg.save("out/")                     # NIfTI results, world transforms (jaxreg, ITK/ANTs), report

Conventions. Images are NIfTI (RAS+ mm world, ``world = affine @ [i, j, k, 1]``). The moving image keeps its own grid
(shape, voxel size, orientation, field of view): the engine samples it through ``grid = inv(A_moving) @ A_fixed``
(fixed voxel -> moving voxel) at every pyramid level (``optimize.register(..., moving_grid=grid)``), so nothing outside
the fixed field of view is lost and images and labels are interpolated exactly once. The transform is found in
fixed-grid voxels: ``y(x) = M_c (x + u(x))``, a deformable field ``u`` then a matrix ``M_c`` about the fixed grid's
centre; ``disp = y - x``. In world coordinates the map from a fixed world point ``p`` to the moving world point is

    T(p) = A_f y(A_f^-1 p) = M (p + w(p)),   M = A_f M_c' A_f^-1 (``world_matrix``),  w = L_f u (``deformable_field``)

with ``M_c'`` the centre-relative matrix written about voxel 0 and ``L_f`` the fixed affine's linear part: the
deformable part first, then the affine, the order in which ANTs chains ``-t 1Warp.nii.gz -t 0GenericAffine.mat``.
``displacement_field`` is the whole map as one field, ``T(p) - p`` (RAS mm on the fixed grid). A registration
started from another tool's affine ``M0`` (``initial_affine``) finds ``y`` on top of it: ``T = M0 ∘ A_f y A_f^-1``,
and ``M`` above includes ``M0``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxreg import optimize, spatial, transforms
from jaxreg.data import io, preprocess


def as_volume(image, name: str, *, labels: bool = False) -> io.Volume:
    """``image`` as an ``io.Volume``: a NIfTI path (read with ``io.load``/``io.load_labels``), a nibabel image, a
    Volume, or an array (identity affine: 1 mm voxels at the origin). ``name`` goes into error messages."""
    if isinstance(image, io.Volume):
        return image
    if isinstance(image, (str, os.PathLike)):
        return io.load_labels(image) if labels else io.load(image)
    if hasattr(image, "dataobj") and hasattr(image, "affine"):  # a nibabel image
        return io.from_nibabel(image, name=name, dtype=np.int32 if labels else np.float32)
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a NIfTI path, a nibabel image, an io.Volume or a 2-D/3-D array, got "
                         f"{type(image).__name__} of shape {array.shape}")
    return io.Volume(array.astype(np.int32 if labels else np.float32), np.eye(4))


def stores_integers(path) -> bool:
    """Whether a NIfTI file stores integers (its on-disk type, unscaled): a label map, for ``apply``."""
    import nibabel as nib

    try:
        img = nib.load(os.fspath(path))
    except Exception as err:  # nibabel raises many types
        raise ValueError(f"could not read NIfTI file {os.fspath(path)}: {type(err).__name__}: {err}") from err
    slope, _ = img.header.get_slope_inter()
    return bool(np.issubdtype(img.get_data_dtype(), np.integer) and slope in (None, 1.0))


def grid_of(fixed: io.Volume, moving: io.Volume, initial=None) -> np.ndarray:
    """``(ndim+1, ndim+1)`` float64 homogeneous map from fixed voxel indices to moving voxel indices, through the
    world matrix ``initial`` (``(4, 4)`` RAS, fixed world -> moving world; identity when None)."""
    ref = fixed.affine if initial is None else np.asarray(initial, np.float64) @ fixed.affine
    return preprocess.index_map(moving.affine, ref, fixed.ndim)


def _centred(matrix: np.ndarray, shape) -> np.ndarray:
    """A matrix acting about the grid centre (``optimize``'s convention) written as one acting on voxel indices."""
    nd = len(shape)
    c = (np.asarray(shape, np.float64) - 1) / 2
    shift = np.eye(nd + 1)
    shift[:nd, nd] = -c
    unshift = np.eye(nd + 1)
    unshift[:nd, nd] = c
    return unshift @ np.asarray(matrix, np.float64) @ shift


def _voxels(shape) -> np.ndarray:
    """Host float64 voxel coordinates of a grid, ``(*shape, ndim)`` with ``x[i] = i``."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def _to_world(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel vectors ``(..., ndim)`` of a grid as RAS mm vectors ``(..., 3)``."""
    nd = vectors.shape[-1]
    return np.einsum("ij,...j->...i", affine[:3, :nd], vectors.astype(np.float64))


@dataclasses.dataclass(frozen=True)
class Registration:
    """The result of ``register_images`` (module docstring for the conventions).

    Attributes:
      fixed, moving: the images as registered (``io.Volume``; the moving image on its own grid).
      options: the engine's ``RegisterOptions``.
      matrix: ``(ndim+1, ndim+1)`` the parametric stage in fixed voxels, about the fixed grid centre.
      disp: ``(*S_fixed, ndim)`` float32, the found transform as a fixed-grid voxel displacement (``y(x) - x``;
        the whole map, ``initial`` included, is ``total_disp``).
      moving_labels: the moving label map (``io.Volume``) when one was given.
      seconds: wall time per stage and level, and in total; history: the loss per iteration per level.
      initial: ``(4, 4)`` RAS world matrix the registration started from (e.g. an ITK affine file), applied after
        the found transform: ``T = initial ∘ A_f y A_f^-1`` (identity when none was given).
    """

    fixed: io.Volume
    moving: io.Volume
    options: optimize.RegisterOptions
    matrix: np.ndarray
    disp: np.ndarray
    moving_labels: io.Volume | None = None
    seconds: dict = dataclasses.field(default_factory=dict)
    history: dict = dataclasses.field(default_factory=dict)
    initial: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(4))

    @property
    def grid(self) -> np.ndarray:
        """Fixed voxel -> moving voxel map (homogeneous, float64), ``initial`` included."""
        return grid_of(self.fixed, self.moving, self.initial)

    @property
    def world_matrix(self) -> np.ndarray:
        """``(4, 4)`` RAS mm: the parametric stage (after ``initial``) as a map from fixed world points to moving world
        points."""
        affine = self.fixed.affine
        return self.initial @ transforms.matrix_about_centre_to_world(self.matrix, self.fixed.shape, affine, affine)

    @property
    def deformable_field(self) -> np.ndarray:
        """``(*S_fixed, 3)`` RAS mm on the fixed grid: the deformable part ``w``, ``T(p) = M (p + w(p))``."""
        nd = self.fixed.ndim
        inv = np.linalg.inv(_centred(self.matrix, self.fixed.shape))
        x = _voxels(self.fixed.shape)
        y = x + self.disp.astype(np.float64)
        u = y @ inv[:nd, :nd].T + inv[:nd, nd] - x  # x + u(x) = M_c^-1 y(x)
        return _to_world(u, self.fixed.affine)

    @property
    def total_disp(self) -> np.ndarray:
        """``(*S_fixed, ndim)`` float32: the whole map ``T`` (``initial`` included) as a fixed-grid voxel
        displacement, ``A_f (x + total_disp(x)) = T(A_f x)``."""
        if np.allclose(self.initial, np.eye(4)):
            return self.disp
        return (self.disp + affine_displacement(self.initial, self.fixed, points=self.disp)).astype(np.float32)

    @property
    def displacement_field(self) -> np.ndarray:
        """``(*S_fixed, 3)`` RAS mm on the fixed grid: the whole map as one field, ``T(p) - p``."""
        return _to_world(self.total_disp, self.fixed.affine)

    def apply(self, image, *, labels: bool | None = None) -> io.Volume:
        """``image`` (a path, nibabel image, Volume or array in the moving image's world space, on any grid) pulled
        onto the fixed grid through the transform, interpolated once: linear, or nearest neighbour for label maps
        (``labels``; default: integer data are labels). Returns an ``io.Volume`` with the fixed affine; label maps
        keep an integer dtype."""
        if labels is None and isinstance(image, (str, os.PathLike)):
            labels = stores_integers(image)
        vol = as_volume(image, "image", labels=bool(labels))
        if labels is None:
            labels = np.issubdtype(np.asarray(vol.data).dtype, np.integer)
        if vol.ndim != self.fixed.ndim or vol.has_channels:
            raise ValueError(f"apply: expected a single-channel {self.fixed.ndim}-D image, got shape {vol.data.shape}")
        grid = jnp.asarray(grid_of(self.fixed, vol, self.initial), jnp.float32)
        disp = jnp.asarray(self.disp, jnp.float32)
        out = np.asarray(_pull(jnp.asarray(vol.data, jnp.float32), disp, grid, 0 if labels else 1))
        if labels:
            return io.Volume(np.rint(out).astype(np.int32), self.fixed.affine)
        return io.Volume(out.astype(np.float32), self.fixed.affine)

    @functools.cached_property
    def warped(self) -> io.Volume:
        """The moving image on the fixed grid (its own intensities, one linear interpolation)."""
        return self.apply(self.moving, labels=False)

    @functools.cached_property
    def warped_labels(self) -> io.Volume | None:
        """The moving label map on the fixed grid (nearest neighbour, int32), or None."""
        return None if self.moving_labels is None else self.apply(self.moving_labels, labels=True)

    def inverse_displacement_field(self, *, iterations: int = 30) -> io.Volume:
        """The inverse map on the moving grid: ``(*S_moving, 3)`` RAS mm, moving world point ``q`` to
        ``T^-1(q) - q`` (fixed world point minus ``q``), as an ``io.Volume`` with the moving affine.

        ``T^-1 = A_f ∘ (id + u)^-1 ∘ M_c^-1 ∘ A_f^-1``, with ``(id + u)^-1 = id + transforms.invert_disp(u)``
        (fixed-point iterations on the fixed grid). Points that fall outside the fixed grid use the border value of
        the inverted field. ``inverse_consistency`` measures the error.
        """
        nd = self.fixed.ndim
        mc = _centred(self.matrix, self.fixed.shape)
        u = self.deformable_field @ np.linalg.inv(self.fixed.affine[:3, :3]).T  # back to fixed voxels (3 comps)
        u = u[..., :nd].astype(np.float32)
        u_inv = transforms.invert_disp(jnp.asarray(u), iterations=iterations)
        v = _voxels(self.moving.shape)
        to_fixed = np.linalg.inv(mc) @ np.linalg.inv(self.grid)  # moving voxel -> M_c^-1 y
        z = v @ to_fixed[:nd, :nd].T + to_fixed[:nd, nd]
        x = z + np.asarray(spatial.sample(u_inv, jnp.asarray(z, jnp.float32), mode="nearest"), np.float64)
        q = v @ self.moving.affine[:3, :nd].T + self.moving.affine[:3, 3]
        p = x @ self.fixed.affine[:3, :nd].T + self.fixed.affine[:3, 3]
        return io.Volume((p - q).astype(np.float32), self.moving.affine, True)

    def inverse_consistency(self, inverse: io.Volume | None = None) -> dict:
        """``|T(T^-1(q)) - q|`` in mm over the moving grid points whose inverse lands inside the fixed grid:
        ``{"mean_mm", "p95_mm", "max_mm", "fraction_inside"}``."""
        inverse = self.inverse_displacement_field() if inverse is None else inverse
        nd = self.fixed.ndim
        v = _voxels(self.moving.shape)
        q = v @ self.moving.affine[:3, :nd].T + self.moving.affine[:3, 3]
        p = q + inverse.data.astype(np.float64)
        x = (p - self.fixed.affine[:3, 3]) @ np.linalg.pinv(self.fixed.affine[:3, :nd]).T  # fixed voxels
        inside = np.all((x >= 0) & (x <= np.asarray(self.fixed.shape) - 1), axis=-1)
        d = np.asarray(spatial.sample(jnp.asarray(self.total_disp, jnp.float32), jnp.asarray(x, jnp.float32),
                                      mode="nearest"), np.float64)
        back = (x + d) @ self.fixed.affine[:3, :nd].T + self.fixed.affine[:3, 3]  # T(p) in world
        err = np.linalg.norm(back - q, axis=-1)[inside]
        if err.size == 0:
            return {"mean_mm": float("nan"), "p95_mm": float("nan"), "max_mm": float("nan"), "fraction_inside": 0.0}
        return {"mean_mm": float(err.mean()), "p95_mm": float(np.percentile(err, 95)), "max_mm": float(err.max()),
                "fraction_inside": float(inside.mean())}


    def save(self, folder, *, itk: bool = True, inverse: bool = False, l2r: tuple[str, str] | None = None,
             report: dict | None = None, uncertainty=None) -> dict:
        """Write the results into ``folder`` all at once; returns ``{what: file name}``.

        Every file is written into a staging folder beside ``folder`` and moved in only when all succeeded; result
        files of an earlier run that this run does not write (e.g. ``warped_labels.nii.gz`` from a run with labels,
        or a Learn2Reg file of another pair: every name in ``FILES`` and in the earlier ``report.json``'s manifest,
        ``earlier_results``) are removed, so the folder never mixes two runs. ``report.json`` lists the files
        written (``files``: the manifest). Files (``FILES``):

        * ``warped.nii.gz``, ``warped_labels.nii.gz`` (int32): the moving image and labels on the fixed grid;
        * ``displacement.nii.gz``: the whole map ``T(p) - p`` (RAS mm, vector NIfTI on the fixed grid; it already
          contains the affine: do not chain it with ``affine.json``);
        * ``affine.json``: ``world_matrix`` (RAS mm, fixed world -> moving world, the parametric stage only);
        * with ``itk``: ``0GenericAffine.mat`` and ``affine.txt`` (the same affine in ITK's LPS convention, binary
          as ANTs writes it and as ITK text) and ``1Warp.nii.gz`` (the deformable part ``w`` as an ITK/ANTs LPS
          displacement field): ``antsApplyTransforms -r FIXED -i MOVING -t 1Warp.nii.gz -t 0GenericAffine.mat``
          reproduces ``warped``;
        * with ``inverse``: ``inverse_displacement.nii.gz`` (RAS mm on the moving grid, ``T^-1(q) - q``),
          ``inverse_warp_itk.nii.gz`` (the same, LPS) and ``affine_inverse.txt`` (the inverse of the affine, ITK);
        * with ``l2r=(fixed_id, moving_id)``: Learn2Reg's ``disp_FFFF_MMMM.nii.gz`` (fixed-grid voxels);
        * with ``uncertainty`` (``(*S_fixed)`` mm, ``jaxreg.uncertainty``): ``uncertainty.nii.gz`` on the fixed grid;
        * with ``report``: ``report.json``.
        """
        from jaxreg.data import itk as itk_io

        folder = os.fspath(folder)
        parent = os.path.dirname(os.path.abspath(folder)) or "."
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".jaxreg-", dir=parent)
        files = {}

        def put(key, name, write):
            write(os.path.join(stage, name))
            files[key] = name

        try:
            put("warped", "warped.nii.gz", lambda p: io.save(p, self.warped))
            if self.warped_labels is not None:
                put("warped_labels", "warped_labels.nii.gz", lambda p: io.save(p, self.warped_labels))
            put("displacement_mm_ras", "displacement.nii.gz",
                lambda p: io.save_displacement(p, self.total_disp, self.fixed.affine))
            put("affine_world", "affine.json", lambda p: io.save_matrix(p, self.world_matrix))
            if uncertainty is not None:
                put("uncertainty_mm", "uncertainty.nii.gz",
                    lambda p: io.save(p, io.Volume(np.asarray(uncertainty, np.float32), self.fixed.affine)))
            if itk:
                put("affine_ants", "0GenericAffine.mat", lambda p: itk_io.write_affine(p, self.world_matrix))
                put("affine_itk", "affine.txt", lambda p: itk_io.write_affine(p, self.world_matrix))
                put("warp_ants", "1Warp.nii.gz",
                    lambda p: itk_io.write_displacement(p, _as_3d(self.deformable_field), self.fixed.affine))
            if inverse:
                inv = self.inverse_displacement_field()
                put("inverse_displacement_mm_ras", "inverse_displacement.nii.gz",
                    lambda p: io.save(p, io.Volume(inv.data, inv.affine, True)))
                put("inverse_warp_itk", "inverse_warp_itk.nii.gz",
                    lambda p: itk_io.write_displacement(p, _as_3d(inv.data), inv.affine))
                put("affine_inverse_itk", "affine_inverse.txt",
                    lambda p: itk_io.write_affine(p, np.linalg.inv(self.world_matrix)))
                if report is not None:
                    report = {**report, "inverse_consistency": self.inverse_consistency(inv)}
            if l2r is not None:
                name = itk_io.l2r_name(*l2r)
                total = self.total_disp
                disp3 = _as_3d(np.concatenate([total, np.zeros(total.shape[:-1] + (3 - total.shape[-1],),
                                                               total.dtype)], axis=-1))
                put("learn2reg", name, lambda p: itk_io.write_l2r_displacement(p, disp3, affine=self.fixed.affine))
            if report is not None:
                put("report", "report.json", lambda p: io.write_json(p, {**report, "files": {**files,
                                                                                     "report": "report.json"}}))
            earlier = earlier_results(folder)  # read before this run's report.json replaces the manifest
            os.makedirs(folder, exist_ok=True)
            for name in files.values():
                os.replace(os.path.join(stage, name), os.path.join(folder, name))
            for name in earlier:  # an earlier run's results that this run did not write
                if name not in files.values() and os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return files


def _as_3d(field: np.ndarray) -> np.ndarray:
    """A field ``(X, Y, 3)`` of a 2-D image as ``(X, Y, 1, 3)`` (ITK and Learn2Reg files are 3-D)."""
    return field[:, :, None, :] if field.ndim == 3 else field


#: every fixed file name ``Registration.save`` may write (a Learn2Reg file is named after the pair)
FILES = ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz", "affine.json", "0GenericAffine.mat",
         "affine.txt", "1Warp.nii.gz", "inverse_displacement.nii.gz", "inverse_warp_itk.nii.gz",
         "affine_inverse.txt", "uncertainty.nii.gz", "report.json")


def earlier_results(folder) -> list[str]:
    """The result files of an earlier ``save`` in ``folder`` (sorted names): those of ``FILES`` present, and those
    its ``report.json`` lists (``files``, the manifest; plain names only) that are present. Empty when ``folder``
    does not exist."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    names = set(FILES)
    try:
        with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
            listed = json.load(f).get("files", {})
        names |= {n for n in listed.values() if isinstance(n, str) and n == os.path.basename(n)
                  and n not in ("", ".", "..")}
    except (OSError, ValueError, AttributeError):
        pass  # no (readable) manifest: the fixed names only
    return sorted(n for n in names if os.path.isfile(os.path.join(folder, n)))


@functools.partial(jax.jit, static_argnums=3)
def _pull(image, disp, grid, order):
    return optimize.pull(image, disp, grid, order=order)


def affine_displacement(world_matrix, fixed: io.Volume, *, points=None) -> np.ndarray:
    """A world matrix (``(4, 4)`` RAS mm, fixed world -> moving world) as a fixed-grid voxel displacement
    ``(*S_fixed, ndim)`` float32, ``A_f (x + disp(x)) = world_matrix A_f x`` (for ``Registration(disp=...)``);
    with ``points`` (a voxel displacement ``(*S_fixed, ndim)``) the matrix acts on ``x + points(x)`` instead, and the
    result is what it adds there."""
    nd = fixed.ndim
    vox = np.linalg.inv(fixed.affine) @ np.asarray(world_matrix, np.float64) @ fixed.affine
    if nd == 2 and not np.allclose(vox[2, [0, 1, 3]], 0.0, atol=1e-6):
        raise ValueError("the affine moves points out of the 2-D fixed image's plane")
    keep = list(range(nd)) + [3]
    vox = vox[np.ix_(keep, keep)]
    x = _voxels(fixed.shape)
    if points is not None:
        x = x + np.asarray(points, np.float64)
    return (x @ vox[:nd, :nd].T + vox[:nd, nd] - x).astype(np.float32)


def _mask(mask, image: io.Volume, name: str) -> np.ndarray | None:
    """A mask (path, image, Volume or array) on ``image``'s grid as float32 0/1; it must lie on that grid."""
    if mask is None:
        return None
    vol = as_volume(mask, name)
    if vol.shape != image.shape:
        raise ValueError(f"{name}: shape {vol.shape} differs from its image's {image.shape} (a mask lies on the grid "
                         f"of its image)")
    out = (np.asarray(vol.data) > 0).astype(np.float32)
    if not out.any():
        raise ValueError(f"{name} is empty (no voxel > 0)")
    return out


def register_images(fixed: ArrayLike | str | os.PathLike | io.Volume, moving: ArrayLike | str | os.PathLike | io.Volume,
                    *, options: optimize.RegisterOptions | None = None, preset: str | None = None,
                    fixed_mask=None, moving_mask=None, moving_labels=None, normalize: bool = True,
                    initial_affine=None, callback=None, progress=None, **overrides) -> Registration:
    """Register ``moving`` onto ``fixed`` in world space; returns a :class:`Registration`.

    fixed, moving: NIfTI paths, nibabel images, ``io.Volume`` or ``(*spatial)`` arrays (2-D/3-D, identity
      affine), on any grids: the moving image keeps its own (module docstring).
    options, preset, overrides: the engine's settings: ``options`` (a ``RegisterOptions``) or ``preset`` (a key of
      ``optimize.PRESETS``; default "default"), with single fields replaced by keyword.
    fixed_mask, moving_mask: masks on their image's grid (> 0 inside). moving_labels: a label map on the moving
      grid, carried to the fixed grid as ``warped_labels``.
    normalize: robust [0.5, 99.5] percentile scaling of each image to [0, 1] before registering (the results keep
      the original intensities).
    initial_affine: a starting transform, ``(4, 4)`` RAS world matrix fixed -> moving or an ITK/ANTs affine file
      (``jaxreg.data.itk.read_affine``); the registration refines it (``Registration.initial``) and starts there
      instead of from the centres of mass.
    callback, progress: ``callback(stage_level_name, loss_history)`` after each level and
      ``progress(stage_level_name, iteration, max_iterations, loss)`` during each (see ``optimize.register``).
    """
    if options is not None and preset is not None:
        raise ValueError("give options or preset, not both")
    if options is None:
        preset = "default" if preset is None else preset
        if preset not in optimize.PRESETS:
            raise ValueError(f"preset must be one of {sorted(optimize.PRESETS)}, got {preset!r}")
        options = optimize.PRESETS[preset]
    t0 = time.perf_counter()
    fixed_vol, moving_vol = as_volume(fixed, "fixed"), as_volume(moving, "moving")
    for name, vol in (("fixed", fixed_vol), ("moving", moving_vol)):
        if vol.has_channels:
            raise ValueError(f"{name}: expected a single-channel image, got shape {vol.data.shape}")
    if fixed_vol.ndim != moving_vol.ndim:
        raise ValueError(f"fixed is {fixed_vol.ndim}-D but moving is {moving_vol.ndim}-D")
    labels = None if moving_labels is None else as_volume(moving_labels, "moving_labels", labels=True)
    if labels is not None and (labels.shape != moving_vol.shape or not np.allclose(labels.affine, moving_vol.affine,
                                                                                     atol=1e-3)):
        raise ValueError(f"moving_labels: grid {labels.shape} differs from the moving image's {moving_vol.shape} "
                         f"(or its affine does)")
    f, m = (np.asarray(v.data, np.float32) for v in (fixed_vol, moving_vol))
    if normalize:
        f, m = preprocess.normalize(f), preprocess.normalize(m)
    for name, img in (("fixed", f), ("moving", m)):
        if np.ptp(img) == 0:
            raise ValueError(f"{name}: the image is constant")
    opts = optimize.with_overrides(options, overrides)  # checked before anything is read into the engine
    initial = np.eye(4)
    if initial_affine is not None:
        if isinstance(initial_affine, (str, os.PathLike)):
            from jaxreg.data import itk

            initial = itk.read_affine(initial_affine)
        else:
            initial = np.asarray(initial_affine, np.float64)
            if initial.shape != (4, 4) or not np.isfinite(initial).all() or abs(np.linalg.det(initial)) < 1e-12:
                raise ValueError(f"initial_affine must be a finite, invertible (4, 4) world matrix, got {initial!r}")
        opts = dataclasses.replace(opts, init=None)  # the given start replaces the centre-of-mass one
    grid = grid_of(fixed_vol, moving_vol, initial)
    result = optimize.register(f, m, options=opts, moving_grid=grid, spacing=fixed_vol.spacing,
                               fixed_mask=_mask(fixed_mask, fixed_vol, "fixed_mask"),
                               moving_mask=_mask(moving_mask, moving_vol, "moving_mask"),
                               callback=callback, progress=progress)
    disp = np.asarray(jax.block_until_ready(result.disp), np.float32)
    seconds = {**{k: float(v) for k, v in result.seconds.items()}, "total": time.perf_counter() - t0}
    return Registration(fixed_vol, moving_vol, opts, np.asarray(result.matrix, np.float64), disp, labels, seconds,
                        {k: np.asarray(v) for k, v in result.history.items()}, initial)
