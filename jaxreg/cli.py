"""The ``jaxreg`` command: register NIfTI images, apply saved transforms, run the demo.

    jaxreg register FIXED MOVING -o OUTDIR [options]   register MOVING onto FIXED, write results to OUTDIR
    jaxreg register FIXED MOVING_DIR -o OUTDIR [...]     every image of MOVING_DIR onto FIXED, into OUTDIR/NAME/
    jaxreg register --pairs PAIRS.csv -o OUTDIR [...]    every row's pair, into OUTDIR/NAME/, compiling once
    jaxreg register FIXED MOVING -o OUTDIR --model NAME  through a trained network (``jaxreg.atlas``) [--refine N]
    jaxreg models                                        the packaged models, one per line, name first
    jaxreg apply OUTDIR IMAGE -o OUT                     pull another image (any grid) through a saved result
    jaxreg apply AFFINE.txt IMAGE -o OUT --reference F   ... or through an ITK/ANTs affine file
    jaxreg demo -o OUTDIR                                make a brain pair from the embedded data and register it

A thin layer on ``jaxreg.world.register_images`` and ``Registration.save`` (their docstrings list the files and
conventions): registration in world space with the moving image on its own grid, results on the fixed grid with its
affine, world transforms as jaxreg files (``displacement.nii.gz``: the whole map; ``affine.json``) and as ITK/ANTs
files (``0GenericAffine.mat``, ``affine.txt``, ``1Warp.nii.gz``), ``report.json`` (options, times, Jacobian
statistics, Dice when labels are given, warnings, and ``files``: the manifest of what the run wrote). Files are
written to a staging folder and moved into OUTDIR only once everything succeeded.

Bad input is refused before anything is compiled, in one line naming the file or option, exit status 2, nothing
written: every option's range; each NIfTI header (declared size against the file, voxel type, orientation, affine;
``jaxreg.data.io.check_header``); masks and label maps on their image's grid; an OUTDIR that is a file, is not
writable, would overwrite an input, or holds an earlier run's results (``--overwrite`` replaces that whole set, so
no stale file remains). A mask too small to constrain the transform is an error (fewer voxels than parameters) or a
warning; so is a result that folds more than 1 % of its voxels or scales by less than 1/2 or more than 2 (warnings
go to stderr and report.json).

Many pairs in one process (``run_pairs``): a CSV with the columns ``fixed,moving`` and optionally
``moving_labels,fixed_labels,fixed_mask,moving_mask,name`` (paths relative to the CSV's folder), or one FIXED and a
folder MOVING_DIR (every ``*.nii``/``*.nii.gz`` in it, sorted; ``--moving-labels``/``--moving-mask`` are then folders
holding files of the same names). Each pair is one ``run_register`` call writing what a single call writes into
``OUTDIR/NAME/``; programs of the same shapes are compiled once. Every row is checked (files, headers, grids, output
folders) before the first pair is registered; a pair the engine refuses is recorded and the others go on (exit
status 2 at the end). ``OUTDIR/pairs.json`` holds each pair's Dice, folding and seconds, and s/pair.

``report.json``'s ``seconds``: ``startup`` (process start to ``main``, the same for every pair of a run: Linux
only, else None), ``compile`` (tracing,
lowering and XLA compilation or persistent-cache loads during the call, from JAX's monitoring events; the loads
alone: ``compile_cache_load``), ``register`` (the engine, its
compilation included), ``optimize`` (``register`` less the compilation in it), ``per_level``, ``io`` (reading and
checking the inputs, writing the results) and ``total`` (the call up to writing: not the writing itself).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

from jaxreg import losses, optimize, transforms

#: the columns of a --pairs CSV: the first two are required
PAIR_COLUMNS = ("fixed", "moving", "moving_labels", "fixed_labels", "fixed_mask", "moving_mask", "name")
NONE = "none"  # the command's spelling of None (skip a stage, no regulariser)
LEARNED = "learned"  # --metric learned: jaxreg.methods.learned_metric.metric with --metric-checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxreg", description="Differentiable image registration in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    r = sub.add_parser("register", help="register MOVING onto FIXED", formatter_class=fmt,
                       description="Register MOVING onto FIXED (NIfTI, 2-D or 3-D) and write the results to OUTDIR. "
                                   "Each engine option comes from --preset unless its flag is given; brackets "
                                   "show the option's default, then the presets that differ from it.")
    r.add_argument("fixed", nargs="?", help="fixed image (.nii/.nii.gz)")
    r.add_argument("moving", nargs="?",
                   help="moving image, on any grid: it keeps its own (no resampling before registering); or a folder: "
                        "each of its *.nii/*.nii.gz (sorted; FIXED itself skipped) is registered onto FIXED into "
                        "OUTDIR/NAME/ (NAME: the file name without .nii/.nii.gz), and --moving-labels/--moving-mask "
                        "are then folders holding files of the same names")
    r.add_argument("--pairs", metavar="PAIRS.csv",
                   help="register many pairs in one process (compiling once) instead of FIXED MOVING: a CSV with a "
                        "header, columns fixed,moving and optionally " + ",".join(PAIR_COLUMNS[2:]) + " (paths "
                        "relative to the CSV's folder); each pair's results go to OUTDIR/NAME/ (NAME: the name column, "
                        "else the moving file name without .nii/.nii.gz), a summary to OUTDIR/pairs.json")
    _register_options(r)

    a = sub.add_parser("apply", help="apply a saved result to another image", formatter_class=fmt)
    a.add_argument("transform", help="an OUTDIR written by 'jaxreg register', or an ITK/ANTs affine file "
                                     "(.txt/.tfm/.mat, fixed -> moving) with --reference")
    a.add_argument("image", help="image in the moving image's world space (any grid)")
    a.add_argument("-o", "--output", required=True, help="output NIfTI path")
    a.add_argument("--reference", help="fixed image: the output grid (needed for an affine file)")
    a.add_argument("--assume-identity-affine", action="store_true",
                   help="accept images whose header has no orientation (qform and sform codes 0): axis-aligned voxels "
                        "of the header's size, origin at voxel 0 [default: such a file is an error]")
    kind = a.add_mutually_exclusive_group()
    kind.add_argument("--labels", dest="labels", action="store_true", default=None,
                      help="IMAGE is a label map: nearest neighbour, integer output [default: when stored as integers]")
    kind.add_argument("--intensities", dest="labels", action="store_false",
                      help="IMAGE is an intensity image: linear interpolation, float output")

    sub.add_parser("models", help="list the packaged trained models (name, then description)")

    t = sub.add_parser("template", help="build an unbiased template of IMAGES (group-wise)", formatter_class=fmt,
                       description="Build an unbiased template of IMAGES (jaxreg.groupwise.build_template): affine "
                                   "then deformable rounds (each round's registrations one compiled batch on an "
                                   "accelerator, one after another on the CPU). "
                                   "Writes OUTDIR/template.nii.gz, template.json (subjects, world matrices, sharpness "
                                   "per round), NAME_disp.nii.gz per subject and, with --labels, labels.nii.gz "
                                   "(majority vote in template space). OUTDIR/state.npz keeps the state after every "
                                   "round: run the same command again to resume a build that was stopped.")
    t.add_argument("images", nargs="+", help="two or more images (.nii/.nii.gz, each on its own grid)")
    t.add_argument("-o", "--output", required=True, help="output folder")
    t.add_argument("--labels", nargs="+", metavar="LABELS", help="one label map per image, in the same order")
    t.add_argument("--initial", help="starting template: its grid is the template's [the mean of the centred images]")
    t.add_argument("--resolution", type=float, help="voxel size (mm) of the template grid without --initial "
                                                    "[the first image's]")
    t.add_argument("--affine-rounds", type=int, default=2, help="affine rounds")
    t.add_argument("--rounds", type=int, default=3, help="deformable rounds")
    t.add_argument("--mode", choices=("pairwise", "joint"), default="pairwise",
                   help="deformable rounds: each image registered to the template, or all optimised jointly")
    t.add_argument("--quiet", action="store_true", help="no progress lines")

    d = sub.add_parser("demo", help="register a brain pair made from the embedded data", formatter_class=fmt,
                       description="Build a moving brain from the MNI152 template (nilearn's packaged copy; "
                                   "synthetic shapes when nilearn is missing) by a random affine and deformation, "
                                   "then register it back and report Dice.")
    d.add_argument("-o", "--output", default="demo_out", help="output folder")
    d.add_argument("--contrast", choices=("t1", "t2"), default="t1", help="moving contrast (t2: multimodal)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random transform")
    d.add_argument("--synthetic", action="store_true", help="use the synthetic generator even if nilearn exists")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() else value


def _metrics():
    return sorted(losses.SIMILARITIES) + [LEARNED]


#: the engine options the command sets: RegisterOptions field -> (flag, choices or value type, help); the
#: similarity options (metric_options, affine_metric_options) come from --window, --bins and --metric-checkpoint
_FIELD_FLAGS = {
    "transform": ("--transform", lambda: sorted(transforms.PARAMETRIC) + [NONE], "parametric stage"),
    "init": ("--init", lambda: list(optimize.INITS) + [NONE],
             "start the parametric stage from the centres of mass (com) or of the two grids (centre)"),
    "deformable": ("--deformable", lambda: list(optimize.DEFORMABLE) + [NONE], "deformable model"),
    "metric": ("--metric", _metrics, "similarity of the deformable stage (learned: with --metric-checkpoint)"),
    "affine_metric": ("--affine-metric", _metrics, "similarity of the parametric stage (none: --metric)"),
    "levels": ("--levels", int, "deformable pyramid factors, coarse to fine"),
    "iterations": ("--iterations", int, "max iterations per deformable level (one value: every level)"),
    "affine_levels": ("--affine-levels", int, "parametric pyramid factors, coarse to fine"),
    "affine_iterations": ("--affine-iterations", int, "max iterations per parametric level (one value: every level)"),
    "regularizer": ("--regularizer", lambda: sorted(losses.REGULARIZERS) + [NONE], "regulariser of the field"),
    "reg_weight": ("--reg-weight", float, "regulariser weight"),
    "learning_rate": ("--learning-rate", float, "step of the deformable stage, voxels"),
    "affine_learning_rate": ("--affine-learning-rate", float,
                             "step of the parametric stage, radians / (max(shape)/20) voxels"),
    "optimizer": ("--optimizer", lambda: list(optimize.OPTIMIZERS), "optax optimiser of every level"),
    "tol": ("--tol", float, "relative loss change over --tol-window iterations that ends a level"),
    "window": ("--tol-window", int, "iterations over which --tol is measured"),
    "bspline_spacing": ("--bspline-spacing", _number, "B-spline control-point spacing, voxels (one or per axis)"),
    "steps": ("--steps", int, "scaling-and-squaring steps (svf)"),
    "field_sigma": ("--field-sigma", float, "Gaussian smoothing of the optimised field, level voxels"),
    "crop": ("--crop", bool, "deformable stage on the box around both images' foreground (--no-crop: whole grid)"),
}
_PER_LEVEL = ("iterations", "affine_iterations")


def _shown(value) -> str:
    """An option value as the command spells it."""
    if isinstance(value, (tuple, list)):
        return " ".join(_shown(v) for v in value)
    if value is None:
        return NONE
    return f"{value:g}" if isinstance(value, float) else str(_metric_name(value))


def _preset_values(name: str) -> str:
    """``VALUE[; PRESET: VALUE ...]``: a field's RegisterOptions default, then the presets that differ from it."""
    default = getattr(optimize.RegisterOptions(), name)
    differ = [f"{k}: {_shown(getattr(p, name))}" for k, p in optimize.PRESETS.items() if getattr(p, name) != default]
    return "; ".join([_shown(default)] + differ)


def _describe(preset: optimize.RegisterOptions) -> str:
    stages = []
    if preset.transform is not None:
        stages.append(f"{preset.transform} ({_shown(preset.affine_similarity()[0])})")
    if preset.deformable is not None:
        stages.append(f"{preset.deformable} ({_shown(preset.metric)})")
    def total(iterations, levels):
        return iterations * len(levels) if isinstance(iterations, int) else sum(iterations)

    iterations = total(preset.iterations, preset.levels) if preset.deformable is not None else 0
    if preset.transform is not None:
        iterations += total(preset.affine_iterations, preset.affine_levels)
    return f"{' + '.join(stages) or 'identity'}, <= {iterations} iterations"


def _register_options(r):
    r.add_argument("-o", "--output", required=True, help="output folder")
    presets = "; ".join(f"{k}: {_describe(p)}" for k, p in optimize.PRESETS.items())
    r.add_argument("--preset", choices=list(optimize.PRESETS), default="default",
                   help=f"engine option set ({presets}); the flags below replace single options")
    for name, (flag, kind, text) in _FIELD_FLAGS.items():
        given = {"dest": name, "default": argparse.SUPPRESS, "metavar": flag[2:].upper().replace("-", "_"),
                 "help": f"{text} [{_preset_values(name)}]"}
        if isinstance(getattr(optimize.RegisterOptions(), name), tuple) or name in _PER_LEVEL + ("bspline_spacing",):
            given.update(type=kind, nargs="+")
        elif kind is bool:
            given.update(action=argparse.BooleanOptionalAction)
            del given["metavar"]
        elif kind in (int, float, _number):
            given.update(type=kind)
        else:
            given.update(choices=kind(), metavar=None)
        r.add_argument(flag, **given)
    r.add_argument("--window", type=int, dest="lncc_window",  # --tol-window sets the field "window"
                   help="local NCC window (voxels) of the stage(s) using lncc [5 in the lncc presets]")
    r.add_argument("--bins", type=int, help="MI histogram bins of the stage(s) using mi or nmi [32]")
    r.add_argument("--metric-checkpoint", help="model folder of a trained learned metric (WORKDIR/k<K> of "
                                               "configs/learned_metric.py), for the stage(s) using learned "
                                               "(--metric and/or --affine-metric)")
    r.add_argument("--fixed-mask", help="fixed-image mask (NIfTI, > 0 inside)")
    r.add_argument("--moving-mask", help="moving-image mask (NIfTI, > 0 inside); a folder of them when MOVING is one")
    r.add_argument("--moving-labels", help="moving label map: warped with nearest neighbour; a folder of them (the "
                                           "moving images' file names) when MOVING is a folder")
    r.add_argument("--fixed-labels", help="fixed label map: Dice per label is reported")
    r.add_argument("--no-normalize", action="store_true", help="skip robust [0.5, 99.5] percentile scaling")
    r.add_argument("--seed", type=int, default=0, help="seed (kept in the report; the engine is deterministic)")
    r.add_argument("--initial-affine", metavar="FILE",
                   help="start from this ITK/ANTs affine (.txt/.tfm/.mat, fixed -> moving); the result includes it")
    r.add_argument("--uncertainty", choices=("laplace", "ensemble"),
                   help="also write uncertainty.nii.gz: the per-voxel displacement standard deviation (mm) by the "
                        "Laplace approximation at the optimum (relative scale) or a test-time ensemble of 8 "
                        "perturbed instance optimisations (jaxreg.uncertainty)")
    r.add_argument("--inverse", action="store_true", help="also write the inverse transform (moving -> fixed) and "
                                                           "its inverse-consistency error in report.json")
    r.add_argument("--l2r", nargs=2, metavar=("FIXED_ID", "MOVING_ID"),
                   help="also write Learn2Reg's disp_FIXED_ID_MOVING_ID.nii.gz (fixed-grid voxels)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in OUTDIR (all of them: none is left stale) "
                        "[default: such a folder is an error]")
    r.add_argument("--assume-identity-affine", action="store_true",
                   help="accept images whose header has no orientation (qform and sform codes 0): axis-aligned voxels "
                        "of the header's size, origin at voxel 0 [default: such a file is an error]")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--model", metavar="NAME_OR_PATH",
                   help="register through a trained network instead of the engine: a packaged model's name "
                        "('jaxreg models') or a model folder; both images are affinely aligned to its template, the "
                        "network's field is carried back to FIXED's grid (the engine options above are not used)")
    r.add_argument("--refine", type=int, default=0, metavar="N",
                   help="with --model: refine the network's field by the engine (the default preset's similarity "
                        "and regulariser) on the template grid: N iterations at half resolution, then N/2 at full")


def _metric_name(metric):
    """A similarity as the command and report.json name it: its key, "learned", or the callable's full name."""
    if metric is None or isinstance(metric, str) or not callable(metric):
        return metric
    learned = sys.modules.get("jaxreg.methods.learned_metric")
    if learned is not None and metric is learned.metric:
        return LEARNED
    return f"{getattr(metric, '__module__', '?')}.{getattr(metric, '__qualname__', repr(metric))}"


def _field_value(name, value):
    """A flag's value as the RegisterOptions field: "none" is None, "learned" the learned metric's function."""
    if value == NONE:
        return None
    if value == LEARNED:
        # the command is the top layer: it may import a method (lazily: flax and orbax load only when needed)
        from jaxreg.methods import learned_metric

        return learned_metric.metric
    if isinstance(value, list):
        return value[0] if len(value) == 1 and name in _PER_LEVEL + ("bspline_spacing",) else tuple(value)
    return value


def _options_from_args(args) -> optimize.RegisterOptions:
    """``--preset`` with the flags given replacing its fields; --window, --bins and --metric-checkpoint go to the
    similarity options of every stage whose metric takes them (an error when none does)."""
    preset = optimize.PRESETS[args.preset]
    flags = {name: _field_value(name, getattr(args, name)) for name in _FIELD_FLAGS if hasattr(args, name)}
    try:
        opts = dataclasses.replace(preset, **flags)
    except ValueError as err:
        raise ValueError(_with_flag(err)) from err
    # a preset's similarity options belong to its metrics: a stage whose metric a flag changed starts from none
    if opts.metric != preset.metric:
        opts = dataclasses.replace(opts, metric_options=None)
    if opts.affine_similarity()[0] != preset.affine_similarity()[0]:
        opts = dataclasses.replace(opts, affine_metric_options=None)
    deform, (affine_metric, affine) = dict(opts.metric_options or {}), opts.affine_similarity()
    stages = ((_metric_name(opts.metric), deform), (_metric_name(affine_metric), affine))
    got = f"got --metric {stages[0][0]} and affine metric {stages[1][0]}"
    if LEARNED in (stages[0][0], stages[1][0]) and args.metric_checkpoint is None:
        raise ValueError("--metric learned / --affine-metric learned needs --metric-checkpoint PATH")
    for flag, key, value, takes, where in (
            ("--window", "window", args.lncc_window, ("lncc",), "a stage using lncc"),
            ("--bins", "bins", args.bins, ("mi", "nmi"), "a stage using mi or nmi"),
            ("--metric-checkpoint", "checkpoint", args.metric_checkpoint, (LEARNED,),
             "--metric learned or --affine-metric learned")):
        if value is None:
            continue
        used = [options for name, options in stages if name in takes]
        if not used:
            raise ValueError(f"{flag} applies to {where}; {got}")
        for options in used:
            options[key] = value
    # the engine's rule for affine_metric_options=None keeps the options minimal (and report.json short)
    opts = dataclasses.replace(opts, metric_options=deform or None, affine_metric_options=None)
    return opts if opts.affine_similarity()[1] == affine else dataclasses.replace(opts, affine_metric_options=affine)


def _with_flag(err: Exception) -> str:
    """A RegisterOptions message (``"NAME must ..."``, ``"NAME=(...): ..."``) prefixed with the flag that sets
    NAME; other messages as they are."""
    text = str(err)
    for name in sorted(_FIELD_FLAGS, key=len, reverse=True):
        if text.startswith(name) and text[len(name):len(name) + 1] in (" ", "=", ":"):
            return f"{_FIELD_FLAGS[name][0]}: {text}"
    return text


def _options_json(opts: optimize.RegisterOptions) -> dict:
    """``opts`` for report.json: metrics by name, a custom optax optimiser as "custom"."""
    out = dataclasses.asdict(opts)
    out["metric"], out["affine_metric"] = _metric_name(opts.metric), _metric_name(opts.affine_metric)
    if not isinstance(opts.optimizer, str):
        out["optimizer"] = "custom"
    return out


def _progress(quiet):
    """``(callback, progress)`` for ``register_images``: on a terminal a tqdm bar per level that advances every
    ``optimize.PROGRESS_EVERY`` iterations (loss, elapsed time); else one plain line per level as it ends (clean logs)."""
    if quiet:
        return None, None
    last = [time.perf_counter()]

    def plain(name, history):
        h = np.asarray(history)
        h = h[~np.isnan(h)]
        now = time.perf_counter()
        loss = f", loss {h[-1]:.4f}" if len(h) else ""
        print(f"{name}: {len(h)} iterations{loss}, {now - last[0]:.1f} s", file=sys.stderr, flush=True)
        last[0] = now

    if not sys.stderr.isatty():
        return plain, None
    from tqdm import tqdm

    bars = {}

    def progress(name, iteration, total, loss):
        if name not in bars:
            bars[name] = tqdm(total=total, desc=f"{name:>14}", unit="it", file=sys.stderr)
        bars[name].update(iteration - bars[name].n)
        bars[name].set_postfix(loss=f"{loss:.4f}")

    def done(name, history):
        h = np.asarray(history)
        h = h[~np.isnan(h)]
        bar = bars.pop(name, None) or tqdm(total=len(h), desc=f"{name:>14}", unit="it", file=sys.stderr)
        bar.update(len(h) - bar.n)
        if len(h):
            bar.set_postfix(loss=f"{h[-1]:.4f}")
        bar.close()
    return done, progress


#: a mask should keep this many voxels per transform parameter at the coarsest pyramid level (else a warning)
MASK_VOXELS_PER_PARAMETER = 10
#: a result folding more than this fraction of its voxels gets a warning
FOLDING_WARNING = 0.01
#: a parametric stage scaling an axis by less / more than these gets a warning
SCALE_WARNING = (0.5, 2.0)


def _check_output(output, inputs, *, overwrite: bool, l2r=None) -> None:
    """Refuse, before registering, an OUTDIR that is a file, would overwrite an input, holds an earlier run's
    results (unless ``overwrite``) or cannot be written."""
    from jaxreg import world
    from jaxreg.data import itk

    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"-o {output} is an existing file, not a folder: give a folder for the results")
    earlier = world.earlier_results(output)
    names = set(world.FILES) | set(earlier)
    if l2r:
        name = itk.l2r_name(*l2r)
        names.add(name)
        if os.path.isfile(os.path.join(output, name)) and name not in earlier:
            earlier.append(name)
    clash = sorted(inputs & {os.path.abspath(os.path.join(output, name)) for name in names})
    if clash:
        raise ValueError(f"-o {output} would overwrite the input {clash[0]}: choose another output folder")
    if earlier and not overwrite:
        shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise ValueError(f"-o {output} holds an earlier run's results ({shown}): pass --overwrite to replace them "
                         f"all, or choose another folder")
    # the results are staged beside OUTDIR and moved in: both must be writable (missing folders are created)
    folder = os.path.abspath(output)
    where = os.path.dirname(folder)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise ValueError(f"-o {output}: {where} is a file, not a folder")
    for place in ([folder] if os.path.isdir(folder) else []) + [where]:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".jaxreg-check-", dir=place))
        except OSError as err:
            raise OSError(f"-o {output}: cannot write in {place} ({err.strerror or err})") from err


def _load(path, what: str, *, labels: bool = False, assume_identity_affine: bool = False):
    """A NIfTI input as an ``io.Volume`` (its header checked first, ``io.check_header``); one scalar per voxel."""
    from jaxreg.data import io

    vol = (io.load_labels if labels else io.load)(path, assume_identity_affine=assume_identity_affine)
    if vol.has_channels:
        raise ValueError(f"{what} {path}: a vector/multichannel image (shape {vol.data.shape}); jaxreg registers "
                         f"one scalar per voxel")
    return vol


def _same_grid(vol, path, what: str, image, image_path, image_what: str) -> None:
    """Refuse a mask or label map that does not lie on its image's grid (shape and voxel -> world affine)."""
    tol = 1e-3 * max(1.0, float(np.max(image.spacing)))
    if vol.shape != image.shape:
        where = f"shape {vol.shape} vs {image.shape}"
    elif not np.allclose(vol.affine, image.affine, rtol=0, atol=tol):
        where = f"voxel -> world affines differ by up to {np.abs(vol.affine - image.affine).max():.3g}"
    else:
        return
    raise ValueError(f"{what} {path}: its grid differs from the {image_what} image {image_path}'s ({where}): it "
                     f"must lie on its image's voxel grid (resample it first)")


def _mask_warnings(mask, path, what: str, opts: optimize.RegisterOptions) -> list:
    """Refuse a mask with fewer voxels than the transform has parameters; warn when it keeps fewer than
    ``MASK_VOXELS_PER_PARAMETER`` per parameter at the coarsest pyramid level or its bounding box covers less than
    ``4**-ndim`` of the image (the transform elsewhere is then extrapolated)."""
    inside = np.asarray(mask.data) > 0
    n, nd = int(inside.sum()), mask.ndim
    if n == 0:
        raise ValueError(f"{what} {path} is empty (no voxel > 0)")
    stage = opts.transform or "translation"
    params = transforms.num_params(stage, nd)
    if n < params:
        raise ValueError(f"{what} {path} has {n} voxel(s) inside, fewer than the {params} parameters of the {stage} "
                         f"transform: it cannot constrain the registration (give a larger mask, or none)")
    factors = ([opts.affine_levels[0]] if opts.transform else []) + ([opts.levels[0]] if opts.deformable else [])
    factor = max(factors, default=1)
    coarse = n / factor**nd
    out = []
    if coarse < MASK_VOXELS_PER_PARAMETER * params:
        out.append(f"{what} {path}: {n} voxels inside, about {coarse:.3g} at the coarsest pyramid level (factor "
                   f"{factor}), fewer than {MASK_VOXELS_PER_PARAMETER} per parameter of the {stage} transform "
                   f"({MASK_VOXELS_PER_PARAMETER * params}): the registration may collapse; give a larger mask or "
                   f"coarsest levels of a smaller factor")
    where = np.argwhere(inside)
    box = where.max(0) - where.min(0) + 1
    covers = math.prod(int(b) for b in box) / math.prod(mask.shape)
    if covers < 4.0**-nd:
        out.append(f"{what} {path}: its bounding box {tuple(int(b) for b in box)} covers {100 * covers:.2f} % of "
                   f"the image: the transform elsewhere is extrapolated from it")
    return out


def _result_warnings(reg, folding: float) -> list:
    """Warnings on a degenerate result: folding above ``FOLDING_WARNING``, a parametric scale out of
    ``SCALE_WARNING``."""
    out = []
    if folding > FOLDING_WARNING:
        out.append(f"the result folds {100 * folding:.2f} % of the voxels (Jacobian determinant <= 0, more than "
                   f"{100 * FOLDING_WARNING:g} %): it is not invertible there; raise --reg-weight, lower "
                   f"--learning-rate or use --deformable svf")
    nd = reg.fixed.ndim
    scales = np.linalg.svd(np.asarray(reg.matrix, np.float64)[:nd, :nd], compute_uv=False)
    low, high = SCALE_WARNING
    if scales.min() < low or scales.max() > high:
        out.append(f"the {reg.options.transform} stage scales the fixed grid by {scales.min():.2f} to "
                   f"{scales.max():.2f} (outside {low:g} to {high:g}): check the result (a mask too small? images "
                   f"that do not overlap?)")
    return out


def run_register(fixed_path, moving_path, output, opts: optimize.RegisterOptions, *, moving_labels=None,
                 fixed_labels=None, fixed_mask=None, moving_mask=None, normalize=True, quiet=False, seed=0,
                 inverse=False, l2r=None, initial_affine=None, overwrite=False,
                 assume_identity_affine=False, startup=None, model=None, refine=0, uncertainty=None) -> dict:
    """Register in world space (``jaxreg.world.register_images``: the moving image keeps its own grid) and write
    the results with ``Registration.save``; returns the report dict.

    Everything is checked before registering (module docstring): the output folder (``overwrite``: replace an
    earlier run's results), every input file, masks and label maps on their image's grid, masks large enough.
    ``assume_identity_affine``: accept files without orientation (``io.check_header``). ``startup``: the seconds
    from the process's start to ``main`` (``report["seconds"]["startup"]``; the module docstring lists the split).
    ``model``: a loaded ``jaxreg.atlas.Model`` to register through (``refine`` engine iterations from its field)
    instead of the engine's ``opts``. ``uncertainty``: "laplace" or "ensemble" (``jaxreg.uncertainty.estimate``):
    ``uncertainty.nii.gz`` and its summary in the report.
    """
    from jaxreg import metrics, spatial, world

    _listen_to_compiles()
    t_start, compiled = time.perf_counter(), _compile_mark()
    _labels_need_moving_labels(fixed_labels, moving_labels)
    inputs = {os.path.abspath(p) for p in (fixed_path, moving_path, moving_labels, fixed_labels, fixed_mask,
                                           moving_mask, initial_affine) if p}
    _check_output(output, inputs, overwrite=overwrite, l2r=l2r)
    flag = {"assume_identity_affine": assume_identity_affine}
    fixed, moving = _load(fixed_path, "FIXED", **flag), _load(moving_path, "MOVING", **flag)
    if fixed.ndim != moving.ndim:
        raise ValueError(f"FIXED {fixed_path} is {fixed.ndim}-D but MOVING {moving_path} is {moving.ndim}-D")
    given = {}
    warnings = []
    for what, path, image, image_path, image_what, labels in (
            ("--moving-labels", moving_labels, moving, moving_path, "moving", True),
            ("--fixed-labels", fixed_labels, fixed, fixed_path, "fixed", True),
            ("--fixed-mask", fixed_mask, fixed, fixed_path, "fixed", False),
            ("--moving-mask", moving_mask, moving, moving_path, "moving", False)):
        if path:
            vol = _load(path, what, labels=labels, **flag)
            _same_grid(vol, path, what, image, image_path, image_what)
            if not labels:
                warnings += _mask_warnings(vol, path, what, opts)
            given[what] = vol
    t_loaded = time.perf_counter()
    callback, progress = _progress(quiet)
    before = _compile_mark()
    try:
        if model is not None:
            reg = model.register(fixed, moving, refine=refine, moving_labels=given.get("--moving-labels"))
        else:
            reg = world.register_images(fixed, moving, options=opts, moving_labels=given.get("--moving-labels"),
                                        fixed_mask=given.get("--fixed-mask"), moving_mask=given.get("--moving-mask"),
                                        normalize=normalize, initial_affine=initial_affine, callback=callback,
                                        progress=progress)
    except ValueError as err:  # the pyramid checked against the image size names its option
        raise ValueError(_with_flag(err)) from err
    in_register = _compiled_since(before)[0]
    jac = np.asarray(spatial.jacobian_determinant(reg.disp))
    history = {k: np.asarray(h) for k, h in reg.history.items()}
    report = {
        "fixed": os.path.abspath(fixed_path), "moving": os.path.abspath(moving_path), "seed": seed,
        "options": _options_json(reg.options),
        "shape": list(reg.fixed.shape), "spacing_mm": [float(s) for s in reg.fixed.spacing],
        "moving_shape": list(reg.moving.shape), "moving_spacing_mm": [float(s) for s in reg.moving.spacing],
        "seconds": {"startup": startup, "register": reg.seconds["total"],
                    "optimize": max(0.0, reg.seconds["total"] - in_register),
                    "per_level": {k: v for k, v in reg.seconds.items() if k != "total"}},
        "final_loss": {k: float(h[~np.isnan(h)][-1]) if np.any(~np.isnan(h)) else None for k, h in history.items()},
        "iterations": {k: int(np.sum(~np.isnan(h))) for k, h in history.items()},
        "jacobian": {"folding_fraction": metrics.folding_fraction(jac), "sd_log_jacobian": metrics.sd_log_jacobian(jac),
                     "min": float(jac.min()), "max": float(jac.max())},
        "world_matrix": reg.world_matrix,
    }
    if model is not None:
        report["model"] = {"path": os.path.abspath(model.path), "refine": int(refine),
                           "description": model.meta.get("description", "")}
    sd = None
    if uncertainty:
        from jaxreg import uncertainty as unc

        t_unc = time.perf_counter()
        sd = unc.estimate(reg, method=uncertainty, normalize=normalize)
        inside = sd[optimize._foreground(np.asarray(reg.fixed.data))]
        report["uncertainty"] = {"method": uncertainty, "unit": "mm", "seconds": time.perf_counter() - t_unc,
                                 "foreground_median": float(np.median(inside)), "foreground_max": float(inside.max())}
    warnings += _result_warnings(reg, report["jacobian"]["folding_fraction"])
    report["warnings"] = warnings
    for text in warnings:
        print(f"jaxreg register: warning: {text}", file=sys.stderr, flush=True)
    if fixed_labels:
        labels_f = given["--fixed-labels"]  # on the fixed grid (checked above)
        if reg.warped_labels is not None:
            dice = metrics.dice(labels_f.data, reg.warped_labels.data)
            unmoved = dataclasses.replace(reg, matrix=np.eye(reg.fixed.ndim + 1), disp=np.zeros_like(reg.disp),
                                          initial=np.eye(4))
            before = metrics.dice(labels_f.data, unmoved.warped_labels.data)  # world space, no registration
            report["dice"] = {str(k): v for k, v in dice.items()}
            report["mean_dice"] = float(np.nanmean(list(dice.values()))) if dice else None
            report["mean_dice_before"] = float(np.nanmean(list(before.values()))) if before else None
    seconds = report["seconds"]
    seconds["total"] = time.perf_counter() - t_start  # up to writing, as before the time split
    seconds["compile"], seconds["compile_cache_load"] = _compiled_since(compiled)
    seconds["io"] = t_loaded - t_start  # reading; the writing is added below
    t_save = time.perf_counter()
    report["files"] = reg.save(output, inverse=inverse, l2r=tuple(l2r) if l2r else None, report=report,
                               uncertainty=sd)
    seconds["io"] += time.perf_counter() - t_save
    seconds["compile"], seconds["compile_cache_load"] = _compiled_since(compiled)  # with the writing's
    _update_report_seconds(output, seconds)
    return report


def _update_report_seconds(output, seconds) -> None:
    """Put the final ``seconds`` (the writing's time included) into ``output``'s report.json, atomically (the
    results are already in place: a failure here only warns)."""
    from jaxreg.data import io

    path = os.path.join(output, "report.json")
    try:
        with open(path, encoding="utf-8") as f:
            written = json.load(f)
        written["seconds"] = seconds
        io.write_json(path, written)
    except (OSError, ValueError) as err:
        print(f"jaxreg register: warning: {path}: could not add the writing time to seconds.io ({err})",
              file=sys.stderr, flush=True)


def _labels_need_moving_labels(fixed_labels, moving_labels) -> None:
    if fixed_labels and not moving_labels:
        raise ValueError(f"--fixed-labels {fixed_labels} is scored against the warped --moving-labels: give "
                         f"--moving-labels too (or drop --fixed-labels)")


#: JAX's monitoring events timing compilation (JAX 0.4 to 0.10: ``jax/_src/dispatch.py``, ``pjit.py``,
#: ``compiler.py``): tracing to a jaxpr (nested: an inner jit is traced inside its caller), lowering to MLIR, and
#: XLA's backend compile, which times ``compile_or_get_cached`` and so includes a persistent-cache load; that load
_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_LOAD_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"
_compile_seconds = {_COMPILE_EVENT: 0.0, _CACHE_LOAD_EVENT: 0.0}  # summed over the process by the listener
_compile_spans = []  # (start, end) of every tracing, lowering and backend compile, when JAX reports time spans
_listening = []


def _listen_to_compiles() -> None:
    """Register (once per process) ``jax.monitoring`` listeners for the compile events: their time spans (merged,
    since tracing nests) and, where JAX has no time-span listeners, the backend compile's durations."""
    if _listening:
        return
    from jax import monitoring

    def durations(event, duration, **_):
        if event in _compile_seconds:
            _compile_seconds[event] += float(duration)

    def spans(event, start, end, **_):
        if event == _COMPILE_EVENT or event in _TRACE_EVENTS:
            _compile_spans.append((float(start), float(end)))

    monitoring.register_event_duration_secs_listener(durations)
    _listening.append(durations)
    if hasattr(monitoring, "register_event_time_span_listener"):
        monitoring.register_event_time_span_listener(spans)
        _listening.append(spans)


def _union(spans) -> float:
    """The length of the union of ``(start, end)`` intervals (nested tracing counted once)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _compile_mark() -> tuple:
    """The compile counters now, for ``_compiled_since``."""
    return len(_compile_spans), _compile_seconds[_COMPILE_EVENT], _compile_seconds[_CACHE_LOAD_EVENT]


def _compiled_since(mark) -> tuple:
    """``(compile, cache_load)``: the seconds spent compiling since ``mark`` (tracing, lowering and XLA compilation;
    XLA compilation alone where JAX reports no time spans), and the part of it loading from the persistent cache."""
    n, compiled, loaded = mark
    spent = _union(_compile_spans[n:]) if len(_listening) > 1 else _compile_seconds[_COMPILE_EVENT] - compiled
    return spent, _compile_seconds[_CACHE_LOAD_EVENT] - loaded


def _process_age():
    """Seconds since this process started: ``/proc/self/stat``'s start time (field 22, clock ticks after boot)
    against ``/proc/uptime``; None where these do not exist (not Linux) or disagree."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        started = int(stat[stat.rindex(")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")  # fields from 3 on
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    age = uptime - started
    return age if age >= 0 else None


@dataclasses.dataclass(frozen=True)
class Pair:
    """One pair of a many-pairs run: its output folder's ``name``, ``where`` it was given (for messages: a CSV row
    or a file of MOVING_DIR) and its files (absolute paths; None: not given)."""
    name: str
    where: str
    fixed: str
    moving: str
    moving_labels: str | None = None
    fixed_labels: str | None = None
    fixed_mask: str | None = None
    moving_mask: str | None = None

    def files(self) -> dict:
        """``{what: path}`` of the files given, named as the command names them."""
        named = {"FIXED": self.fixed, "MOVING": self.moving, "--moving-labels": self.moving_labels,
                 "--fixed-labels": self.fixed_labels, "--fixed-mask": self.fixed_mask,
                 "--moving-mask": self.moving_mask}
        return {what: path for what, path in named.items() if path}


_NIFTI = (".nii.gz", ".nii")
PAIRS_JSON = "pairs.json"


def _stem(path) -> str:
    """A file's name without .nii/.nii.gz."""
    name = os.path.basename(path)
    for suffix in _NIFTI:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def pairs_from_csv(path) -> list:
    """The pairs of a CSV (header row; columns ``PAIR_COLUMNS``, ``fixed`` and ``moving`` required; empty cells
    are not given; paths relative to the CSV's folder). Errors name the file and the row (1: the first after the
    header)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pairs {path}: no such file")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"--pairs {path}: not a readable CSV file ({err})") from err
    unknown = [c for c in columns if c not in PAIR_COLUMNS]
    missing = [c for c in ("fixed", "moving") if c not in columns]
    if missing or unknown:
        raise ValueError(f"--pairs {path}: its header has the columns {columns}: "
                         + (f"{' and '.join(missing)} missing" if missing else f"unknown {unknown}")
                         + f" (expected fixed,moving and optionally {','.join(PAIR_COLUMNS[2:])})")
    pairs = []
    for i, row in enumerate(rows, 1):
        where = f"--pairs {path} row {i}"
        if None in row:  # more cells than header columns
            raise ValueError(f"{where}: {len(columns) + len(row[None])} cells, the header has {len(columns)}")
        cells = {k.strip(): (v or "").strip() for k, v in row.items()}
        for column in ("fixed", "moving"):
            if not cells.get(column):
                raise ValueError(f"{where}: the {column} cell is empty")
        given = {k: os.path.join(folder, os.path.expanduser(v)) for k, v in cells.items()
                 if v and k != "name"}  # an absolute path stays as it is
        pairs.append(Pair(name=cells.get("name") or _stem(given["moving"]), where=where,
                          **{k: os.path.abspath(v) for k, v in given.items()}))
    if not pairs:
        raise ValueError(f"--pairs {path}: no rows after the header")
    return pairs


def pairs_from_folder(fixed, moving_dir, *, moving_labels=None, fixed_labels=None, fixed_mask=None,
                      moving_mask=None) -> list:
    """One pair per ``*.nii``/``*.nii.gz`` file of ``moving_dir`` (sorted; ``fixed`` itself skipped), each onto
    ``fixed``. ``moving_labels``, ``moving_mask``: folders holding a file of the same name for every moving image;
    ``fixed_labels``, ``fixed_mask``: files (of the one fixed image)."""
    if os.path.isdir(fixed):
        raise ValueError(f"FIXED {fixed} is a folder: give one fixed image (many fixed images: --pairs PAIRS.csv)")
    for flag, path in (("--fixed-labels", fixed_labels), ("--fixed-mask", fixed_mask)):
        if path and os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a folder: with a MOVING folder it is one file, of FIXED")
    for flag, path in (("--moving-labels", moving_labels), ("--moving-mask", moving_mask)):
        if path and not os.path.isdir(path):
            raise ValueError(f"{flag} {path} is not a folder: with a MOVING folder, give a folder holding a file of "
                             f"the same name for every moving image")
    skip = os.path.abspath(fixed)
    names = sorted(n for n in os.listdir(moving_dir) if n.endswith(_NIFTI) and not n.startswith(".")
                   and os.path.isfile(os.path.join(moving_dir, n)) and os.path.abspath(os.path.join(moving_dir, n)) != skip)
    if not names:
        raise ValueError(f"MOVING {moving_dir}: a folder with no .nii/.nii.gz file")
    pairs = []
    for name in names:
        moving = os.path.abspath(os.path.join(moving_dir, name))
        extra = {}
        for flag, key, folder in (("--moving-labels", "moving_labels", moving_labels),
                                  ("--moving-mask", "moving_mask", moving_mask)):
            if folder:
                extra[key] = os.path.abspath(os.path.join(folder, name))
                if not os.path.isfile(extra[key]):
                    raise FileNotFoundError(f"{flag} {folder}: no file {name} for MOVING {moving}")
        pairs.append(Pair(name=_stem(name), where=f"MOVING {moving}", fixed=os.path.abspath(fixed), moving=moving,
                          fixed_labels=fixed_labels and os.path.abspath(fixed_labels),
                          fixed_mask=fixed_mask and os.path.abspath(fixed_mask), **extra))
    return pairs


def _header_grid(path, what, *, assume_identity_affine=False):
    """The voxel grid a NIfTI header declares, checked (``io.check_header``) without reading the voxels."""
    import types

    import nibabel as nib

    from jaxreg.data import io

    if not path.endswith(_NIFTI):
        raise ValueError(f"{what} {path}: expected a NIfTI file name ending in .nii or .nii.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        img = nib.load(path)
        nifti = isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))
        affine = io.check_header(path, img, assume_identity_affine=assume_identity_affine) if nifti else None
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError...)
        text = str(err) if str(err).startswith(path) else f"{path}: not a readable NIfTI file ({err})"
        raise ValueError(f"{what} {text}") from err
    if not nifti:
        raise ValueError(f"{what} {path}: not a NIfTI image ({type(img).__name__})")
    shape = tuple(int(n) for n in img.header.get_data_shape())
    while len(shape) > 2 and shape[-1] == 1:  # the storage layouts io.load squeezes
        shape = shape[:-1]
    nd = len(shape)
    return types.SimpleNamespace(shape=shape, ndim=nd, affine=affine,
                                 spacing=np.linalg.norm(affine[:3, :min(nd, 3)], axis=0))


def check_pairs(pairs, output, *, overwrite=False, assume_identity_affine=False) -> None:
    """Check every pair before the first is registered (a bad row fails at once, naming it): unique names usable as
    folder names; every file present with a readable header (``io.check_header``); FIXED and MOVING of the same
    dimension; label maps and masks on their image's grid; ``--fixed-labels`` with ``--moving-labels``; OUTDIR a
    folder and every ``OUTDIR/NAME`` writable, overwriting no input, free of an earlier run's results unless
    ``overwrite`` (as a single call checks its OUTDIR); ``OUTDIR/pairs.json`` likewise. Voxels are read by each
    pair's own ``run_register`` (NaN, constant images, masks too small are that pair's failure)."""
    seen = {}
    for pair in pairs:
        name = pair.name
        if name in ("", ".", "..", PAIRS_JSON) or name.startswith(".") or os.sep in name or "/" in name:
            raise ValueError(f"{pair.where}: name {name!r} cannot be a folder of OUTDIR (no path separator, not "
                             f"empty, not starting with '.', not {PAIRS_JSON})")
        if name in seen:
            raise ValueError(f"{pair.where}: name {name!r} is already taken by {seen[name]}: each pair needs its "
                             f"own output folder OUTDIR/NAME (give unique names, e.g. a name column in the CSV)")
        seen[name] = pair.where
    grids = {}
    flag = {"assume_identity_affine": assume_identity_affine}
    for pair in pairs:
        try:
            _labels_need_moving_labels(pair.fixed_labels, pair.moving_labels)
            for what, path in pair.files().items():
                if path not in grids:
                    grids[path] = _header_grid(path, what, **flag)
            fixed, moving = grids[pair.fixed], grids[pair.moving]
            if fixed.ndim != moving.ndim:
                raise ValueError(f"FIXED {pair.fixed} is {fixed.ndim}-D but MOVING {pair.moving} is {moving.ndim}-D")
            for what, path, image, image_path, image_what in (
                    ("--moving-labels", pair.moving_labels, moving, pair.moving, "moving"),
                    ("--fixed-labels", pair.fixed_labels, fixed, pair.fixed, "fixed"),
                    ("--fixed-mask", pair.fixed_mask, fixed, pair.fixed, "fixed"),
                    ("--moving-mask", pair.moving_mask, moving, pair.moving, "moving")):
                if path:
                    _same_grid(grids[path], path, what, image, image_path, image_what)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{pair.where}: {err}") from err
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"-o {output} is an existing file, not a folder: give a folder for the results")
    summary = os.path.join(output, PAIRS_JSON)
    if os.path.exists(summary) and not overwrite:
        raise ValueError(f"-o {output} holds an earlier run's {PAIRS_JSON}: pass --overwrite to replace the results, "
                         f"or choose another folder")
    inputs = set(grids)
    if os.path.abspath(summary) in inputs:
        raise ValueError(f"-o {output} would overwrite the input {os.path.abspath(summary)}")
    for pair in pairs:
        try:
            _check_output(os.path.join(output, pair.name), inputs, overwrite=overwrite)
        except (ValueError, OSError) as err:
            raise type(err)(f"{pair.where}: {err}") from err


def run_pairs(pairs, output, opts: optimize.RegisterOptions, *, quiet=False, overwrite=False,
              assume_identity_affine=False, startup=None, t_main=None, **register) -> dict:
    """Register each pair in one process with ``run_register`` (the same code as a single call) into
    ``output/NAME/``; programs of the same shapes are compiled once. Returns the summary written to
    ``output/pairs.json`` (after every pair, atomically; ``complete`` once all were tried).

    Every pair is checked first (``check_pairs``). A pair that fails with ``ValueError`` (the engine refusing its
    images: constant, NaN voxels, too small for the pyramid...) is recorded (``status``, ``error``) and the others
    go on. ``register``: the other keywords of ``run_register``, the same for every pair. ``t_main``: the
    ``time.perf_counter()`` at ``main``'s entry (the summary's wall time starts there; default: now).
    """
    from jaxreg.data import io

    t_main = time.perf_counter() if t_main is None else t_main
    flag = {"assume_identity_affine": assume_identity_affine}
    check_pairs(pairs, output, overwrite=overwrite, **flag)
    validated = time.perf_counter() - t_main
    os.makedirs(output, exist_ok=True)
    rows, n = [], len(pairs)
    summary = {"pairs": n, "done": 0, "failed": [], "complete": False, "options": _options_json(opts),
               "seconds": {}, "results": rows}
    for i, pair in enumerate(pairs, 1):
        if not quiet:
            print(f"[{i}/{n}] {pair.name}: {pair.moving} onto {pair.fixed}", file=sys.stderr, flush=True)
        row = {"name": pair.name, "output": os.path.abspath(os.path.join(output, pair.name)),
               **{k: getattr(pair, k) for k in PAIR_COLUMNS if k != "name"}}
        t_pair = time.perf_counter()
        try:
            report = run_register(pair.fixed, pair.moving, row["output"], opts, moving_labels=pair.moving_labels,
                                  fixed_labels=pair.fixed_labels, fixed_mask=pair.fixed_mask,
                                  moving_mask=pair.moving_mask, quiet=quiet, overwrite=overwrite, startup=startup,
                                  **flag, **register)
        except (ValueError, FileNotFoundError) as err:
            error = " ".join(str(err).split())
            row.update(status="failed", error=error, seconds={"wall": time.perf_counter() - t_pair})
            summary["failed"].append(pair.name)
            print(f"{pair.name}: failed after {_s(row['seconds']['wall'])}: {error}", flush=True)
        else:
            secs = {k: v for k, v in report["seconds"].items() if k not in ("startup", "per_level")}
            secs["wall"] = time.perf_counter() - t_pair
            row.update(status="ok", error=None, mean_dice_before=report.get("mean_dice_before"),
                       mean_dice=report.get("mean_dice"),
                       folding_percent=100 * report["jacobian"]["folding_fraction"],
                       warnings=report["warnings"], seconds=secs)
            print(f"{pair.name}: {_pair_line(row)}", flush=True)
        rows.append(row)
        summary["done"] = i
        summary["seconds"] = _pairs_seconds(rows, startup, validated, time.perf_counter() - t_main)
        io.write_json(os.path.join(output, PAIRS_JSON), summary)  # atomically: a temp file, then os.replace
    summary["complete"] = True
    io.write_json(os.path.join(output, PAIRS_JSON), summary)
    return summary


def _s(seconds) -> str:
    """Seconds as the summaries print them: 0.1 s resolution, two digits below 1 s."""
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2g} s"


def _pair_line(row) -> str:
    secs = row["seconds"]
    line = (f"{_s(secs['wall'])} (compilation {_s(secs['compile'])}, optimisation {_s(secs['optimize'])}, "
            f"I/O {_s(secs['io'])}); folding {row['folding_percent']:.3f} %")
    if row.get("mean_dice") is not None:
        line += f"; mean Dice {row['mean_dice_before']:.3f} -> {row['mean_dice']:.3f}"
    return line


def _pairs_seconds(rows, startup, validated, total) -> dict:
    """The summary's seconds: ``total`` (from ``main``, start-up not included) over all pairs tried, and over the
    pairs after the first that succeeded (that one compiled: the steady state); sums of each pair's split."""
    ok = [r for r in rows if r["status"] == "ok"]
    after = [r["seconds"]["wall"] for r in ok[1:]]
    out = {"startup": startup, "check": validated, "total": total, "per_pair": total / len(rows),
           "first_pair": ok[0]["seconds"]["wall"] if ok else None,
           "per_pair_after_first": sum(after) / len(after) if after else None}
    for key in ("compile", "compile_cache_load", "register", "optimize", "io"):
        out[key] = sum(r["seconds"][key] for r in ok)
    return out


def _pairs_final_line(summary) -> str:
    secs, n = summary["seconds"], summary["pairs"]
    done = n - len(summary["failed"])
    line = (f"registered {done} pairs" if done == n else f"registered {done} of {n} pairs") + \
        f" in {_s(secs['total'])}: {_s(secs['per_pair'])}/pair"
    if secs["first_pair"] is not None:
        line += f" (first pair {_s(secs['first_pair'])} incl. compilation"
        if secs["per_pair_after_first"] is not None:
            line += f"; {_s(secs['per_pair_after_first'])}/pair after"
        line += ")"
    return line


def run_apply(transform, image_path, output, *, labels=None, reference=None, assume_identity_affine=False):
    """Pull ``image_path`` (in the moving image's world space, any grid) onto the fixed grid, once; writes
    ``output`` atomically.

    ``transform``: an OUTDIR of ``jaxreg register`` (its ``displacement.nii.gz``: the whole map) or an ITK/ANTs
    affine file (``.txt``, ``.tfm``, ``.mat``; fixed -> moving in ITK's convention), which needs ``reference`` (the
    fixed image, for the output grid). ``labels``: nearest neighbour and an integer output; default: integer data.
    ``output`` is checked first (a NIfTI name in an existing folder, not an input). ``assume_identity_affine``:
    accept an image or reference without orientation (``io.check_header``).
    """
    from jaxreg import world
    from jaxreg.data import io, itk

    if not str(output).endswith((".nii", ".nii.gz")) or os.path.isdir(output):
        raise ValueError(f"-o {output}: expected a NIfTI file name ending in .nii or .nii.gz")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"-o {output}: its folder {parent} does not exist")
    inputs = [image_path, reference, transform if not os.path.isdir(transform) else
              os.path.join(transform, "displacement.nii.gz")]
    if os.path.abspath(output) in {os.path.abspath(p) for p in inputs if p}:
        raise ValueError(f"-o {output} would overwrite an input: choose another output file")
    flag = {"assume_identity_affine": assume_identity_affine}
    if os.path.isdir(transform):
        disp_path = os.path.join(transform, "displacement.nii.gz")
        if not os.path.exists(disp_path):
            raise FileNotFoundError(f"{transform}: no displacement.nii.gz (not an output folder of 'jaxreg register')")
        field = io.load_displacement(disp_path)
        fixed = io.Volume(np.zeros(field.shape, np.float32), field.affine)
        matrix, disp = np.eye(field.ndim + 1), field.data
    else:
        if reference is None:
            raise ValueError(f"{transform}: an affine transform file needs --reference FIXED (the output grid)")
        world_matrix = itk.read_affine(transform)
        fixed = _load(reference, "--reference", **flag)
        disp = world.affine_displacement(world_matrix, fixed)
        matrix = np.eye(fixed.ndim + 1)
    if labels is None:
        labels = world.stores_integers(image_path)
    image = _load(image_path, "IMAGE", labels=labels, **flag)
    reg = world.Registration(fixed, image, optimize.PRESETS["default"], matrix, np.asarray(disp, np.float32))
    io.save(output, reg.apply(image, labels=labels))


def run_demo(output, *, contrast="t1", seed=0, synthetic=False, quiet=False, startup=None) -> dict:
    """Write a moving/fixed pair (+ labels) to ``output/inputs`` and register it into ``output``."""
    from jaxreg.data import io, synthetic as synth

    use_mni = not synthetic
    if use_mni:
        try:
            pair = synth.mni_pair(seed, resolution=2, contrast=contrast)
            affine = pair["affine"]
            source = f"MNI152 2009 template (nilearn), 2 mm, {contrast.upper()} moving"
        except ImportError:
            use_mni = False
            print("jaxreg demo: nilearn not installed, using the synthetic generator (pip install 'jaxreg[data]')",
                  file=sys.stderr)
    if not use_mni:
        pair = synth.synthetic_pair(seed, shape=(64, 64, 64), same_contrast=contrast == "t1")
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        source = "synthetic label maps, 64³ at 2 mm"
    inputs = os.path.join(output, "inputs")
    os.makedirs(inputs, exist_ok=True)
    paths = {k: os.path.join(inputs, f"{k}.nii.gz") for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
    for k, path in paths.items():
        io.save(path, pair[k], affine)
    opts = optimize.PRESETS["multimodal" if contrast == "t2" else "default"]
    report = run_register(paths["fixed"], paths["moving"], output, opts, moving_labels=paths["moving_labels"],
                          fixed_labels=paths["fixed_labels"], quiet=quiet, seed=seed, overwrite=True,
                          startup=startup)
    report["source"] = source
    return report


def _enable_compilation_cache():
    """Persist compiled XLA programs across calls of the command (the entry point's choice, not the library's)."""
    import jax

    path = os.environ.get("JAXREG_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jaxreg", "xla"))
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        # every program, also those compiling in < 0.5 s: a warm call on a 2 mm brain pair loads them instead of
        # compiling ~70 small ones again (compile 9.8 -> 5.5 s, BENCHMARKS.md)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except OSError:
        pass  # a read-only home: run without the cache


def _pairs_of(args):
    """The pairs of ``--pairs`` or of a MOVING folder; None for a single pair (FIXED MOVING). Refuses a misuse of
    the positionals and the options that hold for a single pair only."""
    if args.pairs is not None and (args.fixed is not None or args.moving is not None):
        raise ValueError(f"--pairs {args.pairs} replaces FIXED MOVING: give one or the other")
    if args.pairs is None and (args.fixed is None or args.moving is None):
        raise ValueError("give FIXED MOVING (MOVING: an image, or a folder of images) or --pairs PAIRS.csv"
                         + (f" (FIXED {args.fixed} but no MOVING)" if args.fixed is not None else ""))
    if args.pairs is None and not os.path.isdir(args.moving):
        return None
    for flag, value in (("--l2r", args.l2r), ("--initial-affine", args.initial_affine)):
        if value:
            raise ValueError(f"{flag} is for a single pair (FIXED MOVING), not for many pairs")
    if args.pairs is None:
        return pairs_from_folder(args.fixed, args.moving, moving_labels=args.moving_labels,
                                 fixed_labels=args.fixed_labels, fixed_mask=args.fixed_mask,
                                 moving_mask=args.moving_mask)
    for flag, value in (("--moving-labels", args.moving_labels), ("--fixed-labels", args.fixed_labels),
                        ("--fixed-mask", args.fixed_mask), ("--moving-mask", args.moving_mask)):
        if value:
            raise ValueError(f"{flag}: with --pairs, give each pair's file in the CSV's column "
                             f"{flag[2:].replace('-', '_')}")
    return pairs_from_csv(args.pairs)


def _model_of(args, pairs) -> dict:
    """``{"model", "refine"}`` for ``run_register``: the model of ``--model`` (loaded and checked before any
    registration) or None; refuses ``--refine`` without it and the options a model does not use."""
    if args.refine < 0:
        raise ValueError(f"--refine must be >= 0 (iterations), got {args.refine}")
    if args.model is None:
        if args.refine:
            raise ValueError("--refine N refines a network's field: give --model")
        return {}
    for flag, value in (("--fixed-mask", args.fixed_mask), ("--moving-mask", args.moving_mask),
                        ("--initial-affine", args.initial_affine), ("--no-normalize", args.no_normalize)):
        if value:
            raise ValueError(f"{flag} is not used by --model (the model aligns and normalises the images itself)")
    if args.uncertainty:
        raise ValueError("--uncertainty estimates the classical engine's uncertainty: it is not available with "
                         "--model")
    if pairs is not None and any(p.fixed_mask or p.moving_mask for p in pairs):
        raise ValueError("the masks of the pairs are not used by --model: remove those columns or files")
    from jaxreg import atlas

    return {"model": atlas.load_model(args.model), "refine": args.refine}


def run_template(images, output, *, labels=None, initial=None, resolution=None, affine_rounds=2, rounds=3,
                 mode="pairwise", quiet=False) -> dict:
    """``jaxreg template``: every input checked (readable NIfTI, one label map per image on its grid) before the
    build; results written atomically into ``output``. Returns ``template.json``'s content."""
    from jaxreg import groupwise
    from jaxreg.data import io

    if len(images) < 2:
        raise ValueError(f"template: give at least 2 images, got {len(images)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"--labels: one label map per image ({len(images)}), got {len(labels)}")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"-o {output} is an existing file, not a folder: give a folder for the results")
    vols = [_load(path, f"image {i + 1}") for i, path in enumerate(images)]
    labs = None
    if labels is not None:
        labs = [_load(path, f"--labels {i + 1}", labels=True) for i, path in enumerate(labels)]
        for i, (lab, vol) in enumerate(zip(labs, vols)):
            _same_grid(lab, labels[i], f"--labels {i + 1}", vol, images[i], f"image {i + 1}")
    init = None if initial is None else _load(initial, "--initial")
    os.makedirs(output, exist_ok=True)
    names = groupwise._names(images)
    tpl = groupwise.build_template(vols, initial=init, resolution=resolution, affine_rounds=affine_rounds,
                                   deformable_rounds=rounds, mode=mode, checkpoint=output,
                                   progress=None if quiet else print)
    files = ["template.nii.gz"]
    io.atomic_write(os.path.join(output, files[0]), lambda tmp: io.save(tmp, tpl.template))
    for i, name in enumerate(names):
        path = os.path.join(output, f"{name}_disp.nii.gz")
        io.atomic_write(path, lambda tmp, i=i: io.save_displacement(tmp, tpl.fields[i], tpl.template.affine))
        files.append(os.path.basename(path))
    if labs is not None:
        fused = groupwise.template_labels(tpl, vols, labs)
        io.atomic_write(os.path.join(output, "labels.nii.gz"),
                        lambda tmp: io.save(tmp, io.Volume(fused, tpl.template.affine)))
        files.append("labels.nii.gz")
    info = {"images": [os.path.abspath(p) for p in images], "names": list(names), "mode": mode,
            "matrices": {n: np.asarray(m).tolist() for n, m in zip(names, tpl.matrices)},
            "sharpness": list(tpl.sharpness), "seconds": list(tpl.seconds),
            "convention": "template world point p lies at subject world point matrices[NAME] @ p' with p' the "
                          "template point moved by NAME_disp (pull, RAS mm)"}
    io.write_json(os.path.join(output, "template.json"), info)
    info["files"] = files + ["template.json"]
    return info


def _list_models() -> int:
    """``jaxreg models``: one line per packaged model, its name first."""
    from jaxreg import atlas

    found = atlas.available()
    for m in found:
        print(f"{m['name']}\t{m['description']}")
    if not found:
        print("jaxreg models: no packaged model found", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    startup, t_main = _process_age(), time.perf_counter()
    args = _parser().parse_args(argv)
    try:
        _enable_compilation_cache()
        if args.command == "models":
            return _list_models()
        if args.command == "template":
            info = run_template(args.images, args.output, labels=args.labels, initial=args.initial,
                                resolution=args.resolution, affine_rounds=args.affine_rounds, rounds=args.rounds,
                                mode=args.mode, quiet=args.quiet)
            print(f"template of {len(args.images)} images in {sum(info['seconds']):.1f} s; sharpness (mean NCC) "
                  f"{info['sharpness'][-1]:.4f}; wrote {', '.join(info['files'])} to {args.output}")
            return 0
        if args.command == "register":
            opts = _options_from_args(args)
            pairs = _pairs_of(args)
            common = {"normalize": not args.no_normalize, "quiet": args.quiet, "seed": args.seed,
                      "uncertainty": args.uncertainty,
                      "inverse": args.inverse, "overwrite": args.overwrite,
                      "assume_identity_affine": args.assume_identity_affine, "startup": startup,
                      **_model_of(args, pairs)}
            if pairs is not None:
                summary = run_pairs(pairs, args.output, opts, t_main=t_main, **common)
                print(_pairs_final_line(summary))
                print(f"wrote {len(pairs) - len(summary['failed'])} result folders and {PAIRS_JSON} to {args.output}")
                if summary["failed"]:
                    print(f"jaxreg register: error: {len(summary['failed'])} of {len(pairs)} pairs failed: "
                          f"{', '.join(summary['failed'])} (their errors: {os.path.join(args.output, PAIRS_JSON)})",
                          file=sys.stderr)
                    return 2
                return 0
            report = run_register(args.fixed, args.moving, args.output, opts, moving_labels=args.moving_labels,
                                  fixed_labels=args.fixed_labels, fixed_mask=args.fixed_mask,
                                  moving_mask=args.moving_mask, l2r=args.l2r, initial_affine=args.initial_affine,
                                  **common)
            _summary(report, args.output)
        elif args.command == "apply":
            run_apply(args.transform, args.image, args.output, labels=args.labels, reference=args.reference,
                      assume_identity_affine=args.assume_identity_affine)
            print(f"wrote {args.output}")
        else:
            report = run_demo(args.output, contrast=args.contrast, seed=args.seed, synthetic=args.synthetic,
                              quiet=args.quiet, startup=startup)
            print(f"demo pair: {report['source']}; inputs in {os.path.join(args.output, 'inputs')}")
            _summary(report, args.output)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        print(f"jaxreg {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        return 2
    return 0


def _summary(report, output):
    secs = report["seconds"]
    startup = "?" if secs.get("startup") is None else f"{secs['startup']:.1f} s"
    line = (f"registered in {secs['register']:.1f} s (total {secs['total']:.1f} s; start-up {startup}, compilation "
            f"{_s(secs['compile'])}, optimisation {_s(secs['optimize'])}, I/O {_s(secs['io'])})")
    line += f"; folding voxels {100 * report['jacobian']['folding_fraction']:.3f} %"
    if report.get("mean_dice") is not None:
        line += f"; mean Dice {report['mean_dice_before']:.3f} -> {report['mean_dice']:.3f}"
    print(line)
    names = sorted(name for name in report["files"].values() if name != "report.json")
    print(f"wrote {', '.join(names)} and report.json to {output}")


if __name__ == "__main__":
    sys.exit(main())
