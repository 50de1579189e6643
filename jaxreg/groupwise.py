"""Group-wise registration: unbiased template building and label propagation through a template.

``build_template(images)`` follows the iterative scheme of ANTs' ``antsMultivariateTemplateConstruction2``. On an
accelerator each round's registrations run as one compiled program (``optimize.register_batch``: every subject
against the current template through ``vmap``, one program per pyramid level, the subjects split over the devices
when there are several); on the CPU, where that was slower, one compiled ``register`` call per subject (``batch``):

1. The grid: the initial template's, or one of ``resolution`` mm around the first image's foreground. Every image
   is intensity-normalised and placed on it by its centre of mass (a translation in world space).
2. ``affine_rounds`` rounds: each subject affinely registered to the template; the template's shape is moved by the
   inverse of the mean non-rigid part (scale and shear, as ANTs' ``AverageAffineTransformNoRigid``), so its size and
   shape are the population's while it stays where it is; the new template is the mean of the aligned subjects.
3. ``deformable_rounds`` rounds: each subject's field ``u_i`` (template voxels, pull: template point ``x`` lies at
   subject point ``A_i(x + u_i(x))``) is found from the last round's; the mean field ``ū`` is removed by composing
   every field with its inverse, ``u_i ← u_i ∘ (id + ū)^-1``, so the template sits at the population's centre
   (mean displacement zero); the new template is the mean of the subjects pulled through their fields.

Every subject is sampled from its own native grid once per round (one interpolation). ``mode="joint"`` replaces the
deformable rounds' pair-wise registrations by one group-wise objective: all fields optimised together against their
own evolving mean, ``sum_i sim(mean_j I_j∘φ_j, I_i∘φ_i) + λ sum_i R(u_i)``, projected onto ``mean_i u_i = 0`` after
every step (``joint_register``).

A ``checkpoint`` folder keeps the state after every round (``state.npz``, written atomically): a build that is
killed resumes from its last finished round when called again with the same images and settings.

``propagate_labels(template, labels, target)`` segments a new subject through the template: the subjects' label maps
are pulled into template space through their transforms and fused by majority vote, then carried to the target by
one registration (target fixed, template moving).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreg import losses, optimize, spatial, transforms, world
from jaxreg.data import io, preprocess

#: the engine settings of each kind of round (the deformable stage of ``default``, without its affine stage)
AFFINE_OPTIONS = dataclasses.replace(optimize.PRESETS["affine"], init=None)
DEFORMABLE_OPTIONS = dataclasses.replace(optimize.PRESETS["default"], transform=None, init=None, crop=False)
STATE_FILE = "state.npz"
MODES = ("pairwise", "joint")


@dataclasses.dataclass(frozen=True)
class Template:
    """A built template and the transforms that carry it to every subject.

    template: the template image (``io.Volume``, ``(*S)`` on its grid, intensities normalised to [0, 1]).
    names: the subjects' names (file stems), in input order.
    matrices: ``(N, 4, 4)`` RAS mm, template world point -> subject world point (the affine part, pull).
    fields: ``(N, *S, ndim)`` float32 template-grid voxel fields: template voxel ``x`` lies at subject world point
      ``matrices[i] @ template.affine @ [x + fields[i](x), 1]`` (zeros after affine rounds only).
    sharpness: per round, the mean normalised cross-correlation of the warped subjects with the template over the
      template's foreground (``optimize._foreground``).
    seconds: per round, wall seconds.
    """

    template: io.Volume
    names: tuple
    matrices: np.ndarray
    fields: np.ndarray
    sharpness: tuple = ()
    seconds: tuple = ()

    def grid(self, i: int, subject: io.Volume) -> np.ndarray:
        """``(ndim+1, ndim+1)`` template voxel -> ``subject`` voxel matrix of subject ``i``'s affine part."""
        return preprocess.index_map(subject.affine, self.matrices[i] @ self.template.affine, self.template.ndim)

    def warp(self, i: int, subject: io.Volume, *, labels: bool = False) -> np.ndarray:
        """Subject ``i`` (its own image or label map, ``io.Volume`` on its native grid) pulled onto the template grid
        through its transform: linear for images, nearest neighbour (int32) for label maps."""
        out = optimize.pull(jnp.asarray(subject.data, jnp.float32), jnp.asarray(self.fields[i]),
                            self.grid(i, subject), order=0 if labels else 1)
        return np.rint(np.asarray(out)).astype(np.int32) if labels else np.asarray(out, np.float32)


def _load(image, name: str) -> io.Volume:
    vol = world.as_volume(image, name)
    if vol.has_channels:
        raise ValueError(f"{name}: template building takes single-channel images, got shape {vol.data.shape}")
    return vol


def _names(images) -> list[str]:
    names = []
    for i, im in enumerate(images):
        base = os.path.basename(os.fspath(im)) if isinstance(im, (str, os.PathLike)) else f"image{i}"
        stem = base[:-7] if base.endswith(".nii.gz") else os.path.splitext(base)[0]
        names.append(stem if stem not in names else f"{stem}_{i}")
    return names


def _centre_of_mass(vol: io.Volume) -> np.ndarray:
    """World (RAS mm, ``(3,)``) centre of mass of the image's foreground intensities."""
    data = np.asarray(vol.data, np.float64)
    return preprocess.centroid(vol, np.where(optimize._foreground(data), data, 0.0))


def _grid_around(vol: io.Volume, resolution: float | None, margin: float = 8.0) -> io.Volume:
    """An empty RAS-aligned grid of ``resolution`` mm (the image's own voxel size when None) around ``vol``'s
    foreground, ``margin`` mm wider on every side."""
    nd = vol.ndim
    aff = io.as_affine4(vol.affine, nd)
    spacing = np.sqrt((aff[:3, :nd] ** 2).sum(0))
    res = float(resolution) if resolution else float(spacing.min())
    idx = np.argwhere(optimize._foreground(np.asarray(vol.data)))
    lo, hi = idx.min(0), idx.max(0)
    corners = np.stack(np.meshgrid(*[[a, b] for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, nd)
    world_pts = corners @ aff[:3, :nd].T + aff[:3, 3]
    wlo, whi = world_pts.min(0)[:nd] - margin, world_pts.max(0)[:nd] + margin
    shape = tuple(int(np.ceil((b - a) / res)) + 1 for a, b in zip(wlo, whi))
    affine = np.eye(4)
    affine[:nd, :nd] = np.eye(nd) * res
    affine[:nd, 3] = wlo
    if nd == 2:
        affine[2, 3] = aff[2, 3]
    return io.Volume(np.zeros(shape, np.float32), affine)


def _fingerprint(vols, settings: dict) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
    for v in vols:
        h.update(np.ascontiguousarray(v.data).tobytes())
        h.update(np.asarray(v.affine, np.float64).tobytes())
    return h.hexdigest()


def _save_state(folder: str, state: dict) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **state)
    io.atomic_write(os.path.join(folder, STATE_FILE), write)


def _load_state(folder: str, fingerprint: str) -> dict | None:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as z:
            state = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001  a broken checkpoint is named, never silently replaced
        raise ValueError(f"{path}: cannot read the template checkpoint ({exc}); delete it to start again") from exc
    if str(state.get("fingerprint")) != fingerprint:
        raise ValueError(f"{path}: this checkpoint belongs to other images or settings; use another folder or "
                         f"delete it to start again")
    return state


def _non_rigid_mean(matrices: np.ndarray, nd: int) -> np.ndarray:
    """Mean of the matrices' symmetric (scale and shear) polar factors ``S`` (``L = R S``), ``(nd, nd)``."""
    parts = []
    for m in matrices:
        u, s, vt = np.linalg.svd(m[:nd, :nd])
        parts.append(vt.T @ np.diag(s) @ vt)
    return np.mean(parts, 0)


@jax.jit
def _ncc(a, b, mask):
    """Normalised cross-correlation of ``a`` and ``b`` over the voxels where ``mask`` (``losses.ncc``, sign flipped)."""
    return -losses.ncc(a, b, mask=mask)


def _register_all(template, stack, options, spacing, batched: bool, field: str, initial=None) -> np.ndarray:
    """Every subject of ``stack`` ``(N, *S)`` registered to ``template`` ``(*S)``; ``field`` of each result
    (``"matrix"`` or ``"disp"``) stacked, ``(N, ...)``. ``initial``: ``(N, *S, nd)`` starting fields."""
    if batched:
        fixed = _spread(np.broadcast_to(template, stack.shape))
        init = None if initial is None else _spread(initial)
        res = optimize.register_batch(fixed, _spread(stack), options=options, initial_disp=init, spacing=spacing)
        return np.asarray(getattr(res, field))
    return np.stack([np.asarray(getattr(optimize.register(template, s, options=options, spacing=spacing,
                                                          initial_disp=None if initial is None else initial[i]),
                                        field)) for i, s in enumerate(stack)])


def _spread(x):
    """``x`` (leading axis: the subjects) split over every device JAX sees when there are several and they divide
    the subjects evenly (each device then registers its share of the batch: the compiled program follows the data's
    sharding); else as it is."""
    devices = jax.devices()
    if len(devices) < 2 or x.shape[0] % len(devices):
        return jnp.asarray(x)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("subjects",))
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("subjects")))


@jax.jit
def _mean_field_removed(fields):
    """``u_i ∘ (id + ū)^-1`` for every field: the fields' mean displacement becomes (about) zero."""
    inv = transforms.invert_disp(fields.mean(0))
    return jax.vmap(lambda u: spatial.compose(u, inv))(fields)


def build_template(images: Sequence, *, initial=None, resolution: float | None = None, affine_rounds: int = 2,
                   deformable_rounds: int = 3, mode: str = "pairwise", affine_options=None, deformable_options=None,
                   batch: bool | None = None, checkpoint: str | os.PathLike | None = None,
                   progress: Callable[[str], object] | None = print) -> Template:
    """Build an unbiased template of ``images`` (module docstring); returns a ``Template``.

    images: >= 2 single-channel images (paths, ``io.Volume``; 2-D or 3-D, each on its own grid).
    initial: a starting template (path or ``io.Volume``): its grid is the template's, and the first round registers
      to it [None: the mean of the centred images on a ``resolution`` mm grid around the first image].
    resolution: the grid's voxel size in mm without ``initial`` [None: the first image's smallest voxel size].
    affine_rounds, deformable_rounds: how many rounds of each kind (>= 0, not both 0) [2, 3].
    mode: "pairwise" (every subject registered to the template) or "joint" (``joint_register``) for the deformable
      rounds ["pairwise"].
    affine_options, deformable_options: ``optimize.RegisterOptions`` of the two kinds of rounds [``AFFINE_OPTIONS``,
      ``DEFORMABLE_OPTIONS``].
    batch: register a round's subjects as one ``register_batch`` program (True) or one ``register`` call each
      (False) [None: batched on an accelerator, one by one on the CPU, where a round of 10 Mindboggle subjects at
      2 mm took 65.5 s batched and 42.4 s one by one: the batch runs every level until its slowest pair stops].
    checkpoint: a folder for the state after every round; an unfinished build found there resumes [None].
    progress: ``progress(message)`` after each round [print].
    """
    if len(images) < 2:
        raise ValueError(f"images: a template needs at least 2 images, got {len(images)}")
    for name, n in (("affine_rounds", affine_rounds), ("deformable_rounds", deformable_rounds)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    if affine_rounds + deformable_rounds == 0:
        raise ValueError("affine_rounds and deformable_rounds are both 0: nothing to build")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if resolution is not None and not (np.isfinite(resolution) and resolution > 0):
        raise ValueError(f"resolution must be a positive number of mm, got {resolution!r}")
    a_opts = AFFINE_OPTIONS if affine_options is None else affine_options
    d_opts = DEFORMABLE_OPTIONS if deformable_options is None else deformable_options
    for name, o in (("affine_options", a_opts), ("deformable_options", d_opts)):
        if not isinstance(o, optimize.RegisterOptions):
            raise ValueError(f"{name} must be an optimize.RegisterOptions, got {type(o).__name__}")
    names = _names(images)
    vols = [_load(im, f"images[{i}] ({names[i]})") for i, im in enumerate(images)]
    nd = vols[0].ndim
    for i, v in enumerate(vols):
        if v.ndim != nd:
            raise ValueError(f"images[{i}] ({names[i]}): {v.ndim}-D, but images[0] is {nd}-D")
    init_vol = None if initial is None else _load(initial, "initial")
    if init_vol is not None and init_vol.ndim != nd:
        raise ValueError(f"initial: {init_vol.ndim}-D template for {nd}-D images")
    settings = {"resolution": resolution, "affine_rounds": affine_rounds, "deformable_rounds": deformable_rounds,
                "mode": mode, "affine": repr(a_opts), "deformable": repr(d_opts)}
    fingerprint = _fingerprint(vols + ([init_vol] if init_vol is not None else []), settings)
    folder = None if checkpoint is None else os.fspath(checkpoint)
    if folder is not None:
        os.makedirs(folder, exist_ok=True)

    data = [preprocess.normalize(np.asarray(v.data, np.float32)) for v in vols]
    grid_vol = init_vol if init_vol is not None else _grid_around(vols[0], resolution)
    shape, t_aff = tuple(grid_vol.shape), io.as_affine4(grid_vol.affine, nd)
    spacing = np.sqrt((t_aff[:3, :nd] ** 2).sum(0))
    state = _load_state(folder, fingerprint) if folder else None
    if state is not None:
        done, matrices, fields = int(state["round"]), state["matrices"], state["fields"]
        tpl = state["template"]
        sharp, secs = list(state["sharpness"]), list(state["seconds"])
        if progress:
            progress(f"template: resuming after round {done} of {affine_rounds + deformable_rounds} ({folder})")
    else:
        ref = _centre_of_mass(init_vol) if init_vol is not None else _centre_of_mass(vols[0])
        matrices = np.stack([np.eye(4) for _ in vols])
        matrices[:, :3, 3] = [_centre_of_mass(v) - ref for v in vols]
        fields = np.zeros((len(vols), *shape, nd), np.float32)
        done, sharp, secs = 0, [], []
        tpl = None if init_vol is None else preprocess.normalize(np.asarray(init_vol.data, np.float32))

    def grids(mats):
        return [preprocess.index_map(v.affine, m @ t_aff, nd) for v, m in zip(vols, mats)]

    def pulled(mats, flds):
        return np.stack([np.asarray(optimize.pull(jnp.asarray(d), jnp.asarray(f), g))
                         for d, f, g in zip(data, flds, grids(mats))])

    batched = jax.default_backend() != "cpu" if batch is None else bool(batch)
    if tpl is None:
        tpl = pulled(matrices, fields).mean(0)
    total = affine_rounds + deformable_rounds
    for r in range(done, total):
        t0 = time.perf_counter()
        affine_round = r < affine_rounds
        stack = pulled(matrices, np.zeros_like(fields))
        if affine_round:
            found = _register_all(tpl, stack, a_opts, spacing, batched, "matrix")
            found = np.stack([transforms.matrix_about_centre_to_world(m, shape, t_aff, t_aff)
                              for m in np.asarray(found, np.float64)])
            matrices = np.einsum("nij,njk->nik", matrices, found)
            s_mean = _non_rigid_mean(matrices, nd)
            centre = t_aff @ np.r_[(np.asarray(shape) - 1) / 2, np.zeros(3 - nd), 1.0]
            shape_update = np.eye(4)
            shape_update[:nd, :nd] = np.linalg.inv(s_mean)
            shape_update[:3, 3] = centre[:3] - shape_update[:3, :3] @ centre[:3]
            matrices = np.einsum("nij,jk->nik", matrices, shape_update)
        else:
            if mode == "joint":
                flds = joint_register(_spread(stack), options=d_opts, initial=_spread(fields))
            else:
                flds = _register_all(tpl, stack, d_opts, spacing, batched, "disp", initial=fields)
            fields = np.asarray(_mean_field_removed(jnp.asarray(flds)), np.float32)
        warped = pulled(matrices, fields)
        tpl = warped.mean(0)
        fg = jnp.asarray(optimize._foreground(tpl), jnp.float32)
        sharp.append(float(np.mean([_ncc(jnp.asarray(w), jnp.asarray(tpl), fg) for w in warped])))
        secs.append(time.perf_counter() - t0)
        if folder:
            _save_state(folder, {"round": r + 1, "matrices": matrices, "fields": fields, "template": tpl,
                                 "sharpness": np.asarray(sharp), "seconds": np.asarray(secs),
                                 "fingerprint": fingerprint})
        if progress:
            kind = "affine" if affine_round else f"deformable ({mode})"
            progress(f"template round {r + 1}/{total} ({kind}): sharpness (mean NCC) {sharp[-1]:.4f}, "
                     f"{secs[-1]:.1f} s")
    return Template(io.Volume(np.asarray(tpl, np.float32), grid_vol.affine), tuple(names), np.asarray(matrices),
                    np.asarray(fields, np.float32), tuple(sharp), tuple(secs))


def joint_register(images, *, options=None, initial=None) -> np.ndarray:
    """Group-wise registration of ``images`` ``(N, *S)`` (on one grid) to their own evolving mean.

    Minimises ``sum_i sim(mean_j I_j∘φ_j, I_i∘φ_i) + reg_weight * sum_i R(u_i)`` over all fields at once (one
    compiled optax loop per pyramid level of ``options.levels``), projecting the fields onto ``mean_i u_i = 0``
    after every step. ``options``: an ``optimize.RegisterOptions`` whose metric, metric_options, regularizer,
    reg_weight, learning_rate, levels and iterations are used [``DEFORMABLE_OPTIONS``]; ``initial``: ``(N, *S, nd)``
    starting fields (voxels) [zeros]. The fields are updated additively (dense displacements, whatever
    ``options.deformable``). Returns the fields ``(N, *S, nd)`` float32 (template-grid voxels, pull).
    """
    opts = DEFORMABLE_OPTIONS if options is None else options
    images = jnp.asarray(images, jnp.float32)
    n, shape = images.shape[0], images.shape[1:]
    nd = len(shape)
    fields = jnp.zeros((n, *shape, nd), jnp.float32) if initial is None else jnp.asarray(initial, jnp.float32)
    if not isinstance(opts.metric, str):
        raise ValueError("joint_register: options.metric must be a named similarity (losses.SIMILARITIES)")
    iters = opts.iterations if isinstance(opts.iterations, tuple) else (opts.iterations,) * len(opts.levels)
    for factor, it in zip(opts.levels, iters * (len(opts.levels) if len(iters) == 1 else 1)):
        lvl_shape = spatial.level_shape(shape, factor)
        lvl_images = jnp.stack([spatial.downsample(im, factor, ndim=nd) for im in images]) if factor > 1 else images
        u = jax.vmap(lambda f: spatial.resize_disp(f, lvl_shape))(fields)
        u = _joint_level(lvl_images, u, int(it), opts.metric, tuple(sorted((opts.metric_options or {}).items())),
                         opts.regularizer, float(opts.reg_weight), float(opts.learning_rate))
        fields = jax.vmap(lambda f: spatial.resize_disp(f, shape))(u)
    return np.asarray(fields, np.float32)


@functools.partial(jax.jit, static_argnames=("iterations", "metric", "metric_options", "regularizer"))
def _joint_level(images, u, iterations, metric, metric_options, regularizer, reg_weight, learning_rate):
    sim = losses.SIMILARITIES[metric]
    reg = losses.REGULARIZERS[regularizer] if regularizer else None
    kw = dict(metric_options)

    def loss(u):
        warped = jax.vmap(spatial.warp)(images, u)
        mean = warped.mean(0)
        value = jax.vmap(lambda w: sim(mean, w, **kw))(warped).sum()
        if reg is not None:
            value = value + reg_weight * jax.vmap(reg)(u).sum()
        return value

    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max(iterations, 1), 0.1))

    def step(_, carry):
        u, state = carry
        g = jax.grad(loss)(u)
        upd, state = opt.update(g, state, u)
        u = optax.apply_updates(u, upd)
        return u - u.mean(0, keepdims=True), state

    u, _ = jax.lax.fori_loop(0, iterations, step, (u - u.mean(0, keepdims=True), opt.init(u)))
    return u


def majority_vote(label_maps) -> np.ndarray:
    """Per-voxel most frequent label of ``label_maps`` ``(K, *S)`` int (ties: the smallest label). ``(*S)`` int32."""
    maps = np.asarray(label_maps)
    values = np.unique(maps)
    best = np.zeros(maps.shape[1:], np.int32)
    count = np.full(maps.shape[1:], -1, np.int32)
    for v in values:
        c = (maps == v).sum(0, dtype=np.int32)
        better = c > count
        best[better], count[better] = v, c[better]
    return best


def template_labels(template: Template, subjects: Sequence, labels: Sequence) -> np.ndarray:
    """The subjects' label maps (paths or ``io.Volume``, on their images' grids, in ``template.names`` order)
    pulled into template space and fused by majority vote: ``(*S)`` int32 on the template grid."""
    if len(labels) != len(template.names) or len(subjects) != len(template.names):
        raise ValueError(f"labels: one label map per template subject ({len(template.names)}), got {len(labels)}")
    maps = []
    for i, (img, lab) in enumerate(zip(subjects, labels)):
        vol = world.as_volume(lab, f"labels[{i}]", labels=True)
        ref = world.as_volume(img, f"subjects[{i}]")
        if vol.shape != ref.shape:
            raise ValueError(f"labels[{i}]: shape {vol.shape} is not its image's {ref.shape}")
        maps.append(template.warp(i, vol, labels=True))
    return majority_vote(np.stack(maps))


def propagate_labels(template: Template, atlas_labels, target, *, options=None) -> world.Registration:
    """Segment ``target`` through the template: register it (fixed) to ``template.template`` (moving) with
    ``options`` [``optimize.PRESETS["default"]``] and pull ``atlas_labels`` (``(*S)`` int on the template grid,
    e.g. ``template_labels``) onto it; the result's ``warped_labels`` is the segmentation."""
    labels = io.Volume(np.asarray(atlas_labels, np.int32), template.template.affine)
    return world.register_images(target, template.template, options=options or optimize.PRESETS["default"],
                                 moving_labels=labels)
