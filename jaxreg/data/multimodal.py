"""Real multimodal registration cases and how to score a registration of them.

* ``prostate_cases(folder)``: MR (moving) ↔ transrectal ultrasound (fixed) pairs of ``prostate_mr_trus``
  (``moving_images/``, ``fixed_images/`` and ``*_labels/``: the gland mask, then 0–2 landmark blobs as further
  channels). The two images of a case share no world frame (both grids start at the same corner): register them with a
  centre-of-mass start (the engine's default). Scored by the gland's Dice and the landmarks' target registration
  error (distance between the mapped fixed blob centroid and the moving one, mm).
* ``open_ms_case(folder, patient)``: two co-registered contrasts of one ``open_ms`` patient (e.g. T1 fixed, T2 or
  FLAIR moving), the moving one pulled through a known random affine + smooth deformation: the exact answer is
  known everywhere (end-point error in mm) and the lesion mask gives a Dice.

``score(case, reg)`` measures a ``world.Registration`` of a case (fixed = ``case.fixed``, moving = ``case.moving``).
Nothing here needs the data to import; the loaders name the missing file.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from jaxreg import metrics
from jaxreg.data import io, preprocess


@dataclasses.dataclass(frozen=True)
class Case:
    """One multimodal pair with what scores it.

    name: e.g. ``"prostate_000007"`` or ``"open_ms_patient07_T2"``.
    fixed, moving: ``io.Volume`` images, each on its own grid.
    masks: ``{name: (fixed mask Volume, moving mask Volume)}`` (uint8 0/1; e.g. ``"gland"``, ``"lesions"``).
    landmarks: ``(K, 2, 3)`` RAS mm: landmark ``k``'s world position in the fixed ``[k, 0]`` and moving ``[k, 1]``
      image, or None.
    true_disp: ``(*S_fixed, 3)`` RAS mm, the exact map ``T(p) - p`` (fixed world -> moving world), or None.
    """

    name: str
    fixed: io.Volume
    moving: io.Volume
    masks: dict
    landmarks: np.ndarray | None = None
    true_disp: np.ndarray | None = None


def _need(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (the data set's README says what the folder holds)")
    return path


def _centroid_world(vol: io.Volume, channel: np.ndarray) -> np.ndarray:
    """RAS mm centroid of a blob (weights ``channel``, ``(*S)``) of a volume's grid."""
    if np.asarray(channel, np.float64).sum() <= 0:
        raise ValueError("an empty landmark blob")
    return preprocess.centroid(vol, channel)


def prostate_cases(folder, *, cases=None) -> list[Case]:
    """The MR ↔ TRUS cases of ``folder`` (``prostate_mr_trus``), sorted by name; ``cases``: their numbers (e.g.
    ``range(10)``) [all]. Fixed: TRUS; moving: MR; masks ``{"gland": ...}``; the landmarks their label files hold
    (cases with the gland only: None)."""
    folder = os.fspath(folder)
    names = sorted(f for f in os.listdir(_need(os.path.join(folder, "fixed_images"))) if f.endswith(".nii.gz"))
    if cases is not None:
        wanted = {f"case{int(c):06d}.nii.gz" for c in cases}
        names = [n for n in names if n in wanted]
    out = []
    for n in names:
        vols = {k: _need(os.path.join(folder, k, n)) for k in ("fixed_images", "moving_images", "fixed_labels",
                                                                  "moving_labels")}
        fixed, moving = io.load(vols["fixed_images"]), io.load(vols["moving_images"])
        labs = {}
        for side, image in (("fixed", fixed), ("moving", moving)):
            lab = np.asarray(nib.load(vols[f"{side}_labels"]).dataobj, np.float32)  # (X, Y, Z[, C]), not a vector
            lab = lab[..., None] if lab.ndim == 3 else lab
            if lab.shape[:3] != image.shape:
                raise ValueError(f"{vols[side + '_labels']}: labels of shape {lab.shape} are not on their image's grid "
                                 f"{image.shape}")
            labs[side] = lab
        if labs["fixed"].shape[-1] != labs["moving"].shape[-1]:
            raise ValueError(f"{n}: the fixed and moving label files hold different numbers of channels "
                             f"({labs['fixed'].shape[-1]} and {labs['moving'].shape[-1]})")
        gland = tuple(io.Volume((labs[s][..., 0] > 0.5).astype(np.uint8), v.affine)
                      for s, v in (("fixed", fixed), ("moving", moving)))
        marks = None
        if labs["fixed"].shape[-1] > 1:
            marks = np.stack([[_centroid_world(fixed, labs["fixed"][..., k]),
                               _centroid_world(moving, labs["moving"][..., k])]
                              for k in range(1, labs["fixed"].shape[-1])])
        out.append(Case(f"prostate_{n[4:10]}", fixed, moving, {"gland": gland}, marks))
    return out


START_MAPS = ("centre", "identity")


def centre_start(fixed: io.Volume, moving: io.Volume) -> np.ndarray:
    """``(4, 4)`` world map fixed -> moving, the translation that brings the centre of the fixed grid onto the
    centre of the moving one (a start for images centred on the same anatomy; ``world.register_images``'
    ``initial_affine``)."""
    centre = lambda v: (v.affine @ np.r_[(np.asarray(v.shape, np.float64) - 1) / 2, 1.0])[:3]  # noqa: E731
    out = np.eye(4)
    out[:3, 3] = centre(moving) - centre(fixed)
    return out


def prostate_arrays(case: Case, *, start: str = "centre", resolution: float | None = None, shape=None) -> dict:
    """A prostate case as arrays on its TRUS (fixed) grid: the pair dict of ``jaxreg.methods.Evaluation``.

    The MR and its gland mask are resampled onto the fixed grid (linear / nearest) through a start map fixed world
    -> moving world, a translation: ``start="centre"`` brings the two grids' centres together (the images are
    centred on the gland: over the 20 cases the glands' Dice is 0.61 from this start and 0.32 from the identity,
    BENCHMARKS.md), ``"identity"`` is the world identity (the two grids share their first corner). ``resolution``: the fixed image too is resampled, onto a grid of that many mm with its field of view
    (``_grid_at``) [its own grid]. Both images are normalised to [0, 1] (``preprocess.normalize``). ``shape``:
    centre-crop/pad both to it (the landmark positions follow) [the grid's].

    Returns ``fixed``, ``moving`` ``(*S)`` float32; ``fixed_labels``, ``moving_labels`` ``(*S)`` int32 (gland 1);
    ``spacing`` ``(3,)`` mm; ``start`` the ``(4, 4)`` start map; and, when the case has landmarks, ``landmarks`` and
    ``moving_landmarks`` ``(K, 3)`` float64: each blob's centroid as a voxel position of the returned grid, in the
    fixed image and (through the start map) in the moving one, so that a field ``disp`` that aligns the pair has
    ``landmarks + disp(landmarks) ≈ moving_landmarks``.
    """
    if start not in START_MAPS:
        raise ValueError(f"start must be one of {START_MAPS}, got {start!r}")
    fixed_gland, moving_gland = case.masks["gland"]
    start_map = centre_start(case.fixed, case.moving) if start == "centre" else np.eye(4)
    fixed = case.fixed
    if resolution is not None:
        if not float(resolution) > 0:
            raise ValueError(f"resolution must be > 0 (mm), got {resolution}")
        target = _grid_at(fixed, float(resolution))
        fixed, fixed_gland = (preprocess.resample_to(v, *target, order=o) for v, o in ((fixed, 1), (fixed_gland, 0)))
    grid = start_map @ fixed.affine  # fixed voxel -> moving world
    out = {"fixed": preprocess.normalize(np.asarray(fixed.data, np.float32)),
           "moving": preprocess.normalize(preprocess.resample_to(case.moving, fixed.shape, grid).data),
           "fixed_labels": (np.asarray(fixed_gland.data) > 0).astype(np.int32),
           "moving_labels": (np.asarray(preprocess.resample_to(moving_gland, fixed.shape, grid,
                                                               order=0).data) > 0).astype(np.int32)}
    offset = np.zeros(3)
    if shape is not None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3:
            raise ValueError(f"shape must be 3-D, got {shape}")
        out = {k: preprocess.crop_or_pad(v, shape) for k, v in out.items()}
        offset = np.array([(s - n) // 2 if s > n else -((n - s) // 2) for n, s in zip(fixed.shape, shape)],
                          np.float64)  # crop_or_pad's: an odd difference goes at the end
    out.update(spacing=np.asarray(fixed.spacing, np.float32), start=start_map)
    if case.landmarks is not None:
        to_voxel = np.linalg.inv(fixed.affine)
        for key, pts, mapping in (("landmarks", case.landmarks[:, 0], to_voxel),
                                  ("moving_landmarks", case.landmarks[:, 1], np.linalg.inv(grid))):
            out[key] = np.stack([(mapping @ np.r_[p, 1.0])[:3] for p in pts]) + offset
    return out


def _grid_at(vol: io.Volume, resolution: float):
    """``(shape, affine)`` of a grid of ``resolution`` mm voxels with ``vol``'s corner voxel, axes and field of view
    (rounded up)."""
    factor = float(resolution) / np.asarray(vol.spacing, np.float64)
    shape = tuple(int(np.ceil(n / s)) for n, s in zip(vol.shape, factor))
    aff = vol.affine.copy()
    aff[:3, :3] = vol.affine[:3, :3] * factor
    return shape, aff


def smooth_motion(shape, spacing, *, seed: int = 0, rotation_deg: float = 8.0, shift_mm: float = 6.0,
                  scale: float = 0.05, deform_mm: float = 3.0, sigma_mm: float = 20.0) -> np.ndarray:
    """A random affine (rotations up to ``rotation_deg``, translations up to ``shift_mm``, scales within
    ``1 ± scale``, about the grid centre) plus a smooth deformation (Gaussian-filtered noise of sigma ``sigma_mm``,
    scaled to a maximum of ``deform_mm``): ``(*shape, 3)`` voxel displacement on a grid of ``spacing`` mm (pull)."""
    rng = np.random.default_rng(seed)
    nd = len(shape)
    spacing = np.asarray(spacing, np.float64)
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = r @ rot
    lin = rot @ np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    shift = rng.uniform(-shift_mm, shift_mm, 3)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1) * spacing
    c = (np.asarray(shape, np.float64) - 1) / 2 * spacing
    moved = (x - c) @ lin.T + c + shift
    noise = rng.standard_normal((*shape, nd))
    field = np.stack([ndimage.gaussian_filter(noise[..., d], sigma_mm / spacing) for d in range(nd)], -1)
    field *= deform_mm / max(np.abs(field).max(), 1e-12)
    return ((moved + field - x) / spacing).astype(np.float32)


def move(u, *images, orders=None) -> list[np.ndarray]:
    """Carry ``images`` (each ``(*S)``) by the map ``p -> p + u(p)`` (``u`` ``(*S, nd)`` voxels): ``new(p + u(p)) =
    image(p)``, i.e. each image pulled through the inverse map (``transforms.invert_disp``, 50 iterations), so that
    ``u`` is the exact pull field from the image's grid to the moved one's. ``orders``: interpolation order per
    image (1 linear, 0 nearest for labels) [all 1]. float32 arrays."""
    from jaxreg import transforms

    inv = np.asarray(transforms.invert_disp(u, iterations=50), np.float32)
    pts = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in u.shape[:-1]], indexing="ij"), -1) + inv
    pts = np.moveaxis(pts, -1, 0)
    orders = orders or (1,) * len(images)
    return [ndimage.map_coordinates(np.asarray(im, np.float32), pts, order=o, cval=0.0).astype(np.float32)
            for im, o in zip(images, orders)]


def moved_pair(volumes: dict, *, fixed: str = "T1", moving: str = "T2", seed: int = 0, spacing=None,
               **motion) -> dict:
    """A multimodal pair with an exact answer from ``open_ms_volumes``' aligned contrasts: ``fixed`` as it is,
    ``moving`` (and the labels) carried by ``smooth_motion(seed, **motion)``. The pair dict of
    ``jaxreg.methods.Evaluation``: ``fixed``, ``moving`` ``(*S)`` float32, ``fixed_labels``, ``moving_labels``
    ``(*S)`` int32 (``TISSUES``), ``disp`` ``(*S, 3)`` voxels (pull: ``fixed[x] ≈ moving[x + disp(x)]``),
    ``spacing`` mm (default: from ``volumes["affine"]``)."""
    if spacing is None:
        spacing = np.linalg.norm(np.asarray(volumes["affine"])[:3, :3], axis=0)
    f = np.asarray(volumes[fixed], np.float32)
    u = smooth_motion(f.shape, spacing, seed=seed, **motion)
    m, lab = move(u, volumes[moving], volumes["labels"], orders=(1, 0))
    return {"fixed": f, "moving": m, "fixed_labels": np.asarray(volumes["labels"], np.int32),
            "moving_labels": lab.astype(np.int32), "disp": u, "spacing": np.asarray(spacing, np.float32)}


def open_ms_case(folder, patient: str, *, fixed: str = "T1", moving: str = "T2", seed: int = 0,
                 resolution: float | None = None, **motion) -> Case:
    """Patient ``patient`` (e.g. ``"patient07"``) of ``folder`` (``open_ms``): ``fixed`` contrast as stored, the
    ``moving`` contrast pulled through ``smooth_motion(seed, **motion)`` (so ``moving(T(p)) = original(p)`` with the
    exact ``true_disp``); masks ``{"lesions": ...}``. ``resolution``: resample both to this many mm first [None]."""
    base = os.path.join(os.fspath(folder), "cross_sectional", patient)
    f = io.load(_need(os.path.join(base, f"{fixed}.nii.gz")))
    m = io.load(_need(os.path.join(base, f"{moving}.nii.gz")))
    les = io.load_labels(_need(os.path.join(base, "lesions.nii.gz")))
    if resolution:
        shape, aff = _grid_at(f, resolution)
        f = preprocess.resample_to(f, shape, aff)
        m = preprocess.resample_to(m, shape, aff)
        les = preprocess.resample_to(les, shape, aff, order=0)
    if m.shape != f.shape or les.shape != f.shape:
        raise ValueError(f"{base}: {moving} {m.shape} and lesions {les.shape} must share {fixed}'s grid {f.shape}")
    u = smooth_motion(f.shape, f.spacing, seed=seed, **motion)
    moved, moved_les = move(u, np.asarray(m.data, np.float32), np.asarray(les.data, np.float32), orders=(1, 0))
    lin = f.affine[:3, :3]
    true_mm = np.einsum("ij,...j->...i", lin, u).astype(np.float32)
    masks = {"lesions": (io.Volume((np.asarray(les.data) > 0).astype(np.uint8), f.affine),
                         io.Volume((moved_les > 0).astype(np.uint8), f.affine))}
    return Case(f"open_ms_{patient}_{moving}", f, io.Volume(moved.astype(np.float32), f.affine), masks, None, true_mm)


TISSUES = {1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}


def tissue_classes(t1, lesions=None, *, iterations: int = 20) -> np.ndarray:
    """Tissue classes of a skull-stripped T1 ``(*S)``: 0 background (intensity <= 0), then 1 CSF, 2 GM, 3 WM by a
    three-class k-means of the brain's intensities (dark to bright, started at their 15th/50th/85th percentiles),
    and 4 where ``lesions`` > 0. ``(*S)`` int32."""
    t1 = np.asarray(t1, np.float64)
    brain = t1 > 0
    out = np.zeros(t1.shape, np.int32)
    if not brain.any():
        return out
    v = t1[brain]
    centres = np.percentile(v, [15, 50, 85])
    for _ in range(iterations):
        assign = np.argmin(np.abs(v[:, None] - centres[None]), axis=1)
        centres = np.array([v[assign == k].mean() if np.any(assign == k) else centres[k] for k in range(3)])
    out[brain] = np.argmin(np.abs(v[:, None] - np.sort(centres)[None]), axis=1) + 1
    if lesions is not None:
        out[(np.asarray(lesions) > 0) & brain] = 4
    return out


def open_ms_volumes(folder, patient: str, *, contrasts=("T1", "T2", "FLAIR"), resolution: float | None = 2.0,
                    margin: int = 4) -> dict:
    """The co-registered contrasts of one ``open_ms`` patient on one grid, for learning (aligned multimodal data).

    Every contrast (``{folder}/cross_sectional/{patient}/{name}.nii.gz``) is resampled to ``resolution`` mm
    (None: as stored, 1 mm), cropped to the bounding box of the T1 brain plus ``margin`` voxels and scaled to
    [0, 1] (``preprocess.normalize``, percentiles 0.5–99.5 of the brain). Returns ``{name: (*S) float32}`` for
    every contrast, ``"labels"`` ``(*S)`` int32 (``tissue_classes`` of T1 with the lesion mask: ``TISSUES``),
    ``"lesions"`` ``(*S)`` uint8 and ``"affine"`` (4, 4) of the cropped grid.
    """
    base = os.path.join(os.fspath(folder), "cross_sectional", patient)
    names = tuple(dict.fromkeys(("T1",) + tuple(contrasts)))
    vols = {n: io.load(_need(os.path.join(base, f"{n}.nii.gz"))) for n in names}
    les = io.load_labels(_need(os.path.join(base, "lesions.nii.gz")))
    ref = vols["T1"]
    for n, v in list(vols.items()) + [("lesions", les)]:
        if v.shape != ref.shape or not np.allclose(v.affine, ref.affine, atol=1e-3):
            raise ValueError(f"{base}: {n} is not on T1's grid ({v.shape} vs {ref.shape}); open_ms cross-sectional "
                             f"contrasts are co-registered")
    shape, aff = _grid_at(ref, resolution) if resolution else (ref.shape, ref.affine)
    data = {n: np.asarray(preprocess.resample_to(v, shape, aff).data, np.float32) for n, v in vols.items()}
    lesions = np.asarray(preprocess.resample_to(les, shape, aff, order=0).data) > 0
    idx = np.argwhere(data["T1"] > 0)
    if idx.size == 0:
        raise ValueError(f"{base}/T1.nii.gz: no brain (all intensities <= 0)")
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    brain = data["T1"][box] > 0
    out = {n: preprocess.normalize(d[box], mask=brain).astype(np.float32) * brain for n, d in data.items()}
    out["labels"] = tissue_classes(data["T1"][box], lesions[box])
    out["lesions"] = lesions[box].astype(np.uint8)
    crop = np.eye(4)
    crop[:3, 3] = lo
    out["affine"] = aff @ crop
    return out


@functools.lru_cache(maxsize=8)
def open_ms_volumes_cached(folder: str, patient: str, contrasts: tuple, resolution: float | None) -> dict:
    """``open_ms_volumes(folder, patient, contrasts=contrasts, resolution=resolution)``, kept per process (loading a
    patient takes seconds and the learned methods draw from it at every pair): treat the arrays as read-only."""
    return open_ms_volumes(folder, patient, contrasts=contrasts, resolution=resolution)


def score(case: Case, reg) -> dict:
    """Accuracy of ``reg`` (a ``world.Registration`` with ``case.fixed`` fixed and ``case.moving`` moving):
    ``dice_<mask>`` for every mask (the moving mask pulled onto the fixed grid, nearest), ``tre_mm`` (mean landmark
    error: ``|T(p_fixed) - p_moving|``) when the case has landmarks, ``epe_mm`` (mean ``|T(p) - T_true(p)|`` over the
    fixed image's foreground: normalised intensity > 0.1) when it has the exact answer; ``*_before_mm`` the same
    for the identity map."""
    out = {}
    for name, (fm, mm) in case.masks.items():
        warped = (np.asarray(reg.apply(mm, labels=True).data) > 0).astype(np.int32)
        d = metrics.dice((np.asarray(fm.data) > 0).astype(np.int32), warped, labels=[1])[1]
        out[f"dice_{name}"] = None if np.isnan(d) else float(d)
    disp_mm = np.asarray(reg.displacement_field, np.float64)
    if case.landmarks is not None:
        inv = np.linalg.inv(case.fixed.affine)
        errors = []
        for p_f, p_m in case.landmarks:
            v = (inv @ np.r_[p_f, 1.0])[:3]
            d = np.array([ndimage.map_coordinates(disp_mm[..., k], v[:, None], order=1, mode="nearest")[0]
                          for k in range(3)])
            errors.append(float(np.linalg.norm(p_f + d - p_m)))
        out["tre_mm"] = float(np.mean(errors))
        out["tre_before_mm"] = float(np.mean([np.linalg.norm(p_f - p_m) for p_f, p_m in case.landmarks]))
    if case.true_disp is not None:
        fg = preprocess.normalize(np.asarray(case.fixed.data, np.float32)) > 0.1
        err = np.linalg.norm(disp_mm - case.true_disp, axis=-1)
        out["epe_mm"] = float(err[fg].mean())
        out["epe_before_mm"] = float(np.linalg.norm(case.true_disp, axis=-1)[fg].mean())
    return out
