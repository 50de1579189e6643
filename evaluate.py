"""Evaluate a trained network against baselines: ``python evaluate.py --config configs/NAME.py --workdir DIR``.

Configs whose ``method`` names one of ``jaxreg.methods`` are handed to that method's ``evaluate`` (its own table);
the rest of this docstring is about the registration network.

For each held-out pair (``config.data`` with ``split="test"``: generated kinds use ``data.test_seed``), and each
method of ``config.eval.methods``:

* ``identity``: no registration (reference);
* ``network``: one forward pass of the trained network (latest checkpoint in ``DIR/checkpoints``);
* ``network+io``: instance optimisation, ``optimize.register(..., initial_disp=<network field>)`` with the classical
  preset's metric, one full-resolution level of ``eval.instance_iterations`` iterations, no affine stage;
* ``affine``: the classical engine's affine stage only (``optimize.PRESETS[eval.affine_preset]``);
* ``classical``: the classical engine (``optimize.PRESETS[eval.classical_preset]``).

Measures: Dice per label (labels 1..K-1) and their mean, HD95 and ASSD (mm, mean over labels), % folding voxels
(``det J <= 0``), SD of log |J|, seconds per pair (after one untimed warm-up pair, so compilation is excluded).
Writes ``DIR/eval/results.csv`` (one row per pair and method), ``results.json`` (rows and mean ± std per method)
and ``results.md`` (the summary table); prints the table. With matplotlib installed, ``DIR/eval/figures/`` gets,
for the first ``eval.figures`` pairs and each method, one PNG: fixed/moving/warped, a checkerboard of fixed and
warped, the deformation grid and the Jacobian determinant (the middle slice of the last axis in 3-D).
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/NAME.py)", lock_config=False)
flags.DEFINE_string("workdir", None, "training directory (checkpoints/ inside)")
flags.DEFINE_integer("num_pairs", None, "number of test pairs (default: config.eval.num_pairs)")
flags.DEFINE_string("out", None, "output folder (default: WORKDIR/eval)")
flags.DEFINE_string("methods", None, "comma-separated subset of identity,network,network+io,affine,classical")

METHODS = ("identity", "network", "network+io", "affine", "classical")
COLUMNS = (("dice_mean", "Dice"), ("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)"), ("folding_pct", "% folding"),
           ("sdlogj", "SDlogJ"), ("seconds", "s / pair"))


def measure(fixed_labels, warped_labels, disp, labels, spacing) -> dict:
    """Per-pair measures of one registration (host NumPy)."""
    from jaxreg import metrics, spatial

    fl, wl = np.asarray(fixed_labels), np.asarray(warped_labels)
    dice = metrics.dice(fl, wl, labels=labels)
    jac = np.asarray(spatial.jacobian_determinant(disp))
    return {
        "dice_mean": float(np.nanmean(list(dice.values()))),
        "hd95": float(np.nanmean(list(metrics.hd95(fl, wl, labels=labels, spacing=spacing).values()))),
        "assd": float(np.nanmean(list(metrics.assd(fl, wl, labels=labels, spacing=spacing).values()))),
        "folding_pct": 100.0 * metrics.folding_fraction(jac),
        "sdlogj": metrics.sd_log_jacobian(jac),
        "dice": dice,
    }


def _methods(config, model, params):
    """``{name: fn(fixed, moving) -> disp}`` for the requested methods (each blocks until its result is ready)."""
    import jax
    import jax.numpy as jnp

    from jaxreg import optimize, training

    e = config.eval
    classical = dict(optimize.PRESETS[e.classical_preset])
    predict = training.make_predict(model) if model is not None else None

    def network(f, m):
        return jax.block_until_ready(predict(params, m, f)["disp"])

    def network_io(f, m):
        disp = predict(params, m, f)["disp"]
        opts = {**classical, "transform": None, "init": None, "deformable": "disp", "levels": (1,),
                "iterations": (int(e.instance_iterations),), "initial_disp": disp}
        return jax.block_until_ready(optimize.register(f, m, **opts).disp)

    def preset(name):
        return lambda f, m: jax.block_until_ready(optimize.register(f, m, **optimize.PRESETS[name]).disp)

    table = {"identity": lambda f, m: jnp.zeros(f.shape + (f.ndim,), f.dtype), "network": network,
             "network+io": network_io, "affine": preset(e.affine_preset), "classical": preset(e.classical_preset)}
    return table


def figure(path, fixed, moving, warped, disp, title):
    """Save a 6-panel PNG (fixed, moving, warped, checkerboard, deformation grid, Jacobian determinant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxreg import spatial

    jac = np.asarray(spatial.jacobian_determinant(disp))
    disp = np.asarray(disp)
    if disp.shape[-1] == 3:  # middle slice of the last axis; in-plane components
        k = disp.shape[2] // 2
        fixed, moving, warped, jac = (np.asarray(a)[:, :, k] for a in (fixed, moving, warped, jac))
        disp = disp[:, :, k, :2]
    fixed, moving, warped = (np.asarray(a) for a in (fixed, moving, warped))
    tiles = (np.add.outer(np.arange(fixed.shape[0]) // 8, np.arange(fixed.shape[1]) // 8) % 2).astype(bool)
    fig, ax = plt.subplots(1, 6, figsize=(18, 3.2))
    for a, img, name in zip(ax, (fixed, moving, warped, np.where(tiles, fixed, warped)),
                            ("fixed", "moving", "warped", "checkerboard")):
        a.imshow(img.T, cmap="gray", origin="lower")
        a.set_title(name)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in disp.shape[:2]], indexing="ij"), -1) + disp
    step = max(1, disp.shape[0] // 32)
    for i in range(0, disp.shape[0], step):
        ax[4].plot(grid[i, :, 0], grid[i, :, 1], "k", lw=0.5)
    for j in range(0, disp.shape[1], step):
        ax[4].plot(grid[:, j, 0], grid[:, j, 1], "k", lw=0.5)
    ax[4].set_aspect("equal")
    ax[4].set_title("deformation grid")
    im = ax[5].imshow(jac.T, cmap="RdBu", vmin=0, vmax=2, origin="lower")
    ax[5].set_title("det J (≤ 0: folding)")
    fig.colorbar(im, ax=ax[5], fraction=0.046)
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def run(config, workdir, *, num_pairs=None, methods=None, out=None) -> dict:
    """Evaluate and write the tables; returns ``{"rows": [...], "summary": {method: {key: {mean, std, n}}}}``."""
    import jax
    import jax.numpy as jnp

    from jaxreg import metrics, spatial, training
    from jaxreg.data import datasets

    methods = tuple(methods or config.eval.get("methods", METHODS))
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    methods = ("identity",) + tuple(m for m in methods if m != "identity")
    dataset = datasets.from_config(config.data, split="test")
    if not dataset.num_labels:
        raise ValueError("evaluation needs label maps (Dice, HD95, ASSD): the test data have none")
    n = int(num_pairs or config.eval.num_pairs)
    n = min(n, len(dataset))
    model = params = None
    if any(m.startswith("network") for m in methods):
        model, params, step = training.load_trained(config, workdir, dataset.shape)
        logging.info("restored step %d", step)
    fns = _methods(config, model, params)
    labels = list(range(1, dataset.num_labels))
    rows = []
    out = out or os.path.join(workdir, "eval")
    try:
        import matplotlib  # noqa: F401

        n_figures = int(config.eval.get("figures", 3))
    except ImportError:
        n_figures = 0
    fig_dir = os.path.join(out, "figures")
    if n_figures:
        os.makedirs(fig_dir, exist_ok=True)
    for i in range(-1, n):  # i = -1: warm-up (compilation), not recorded
        p = dataset.pair(max(i, 0))
        f, m = jnp.asarray(p["fixed"]), jnp.asarray(p["moving"])
        spacing = config.eval.get("spacing") or (tuple(p["spacing"]) if "spacing" in p else None)
        for name in methods:
            t0 = time.perf_counter()
            disp = fns[name](f, m)
            seconds = time.perf_counter() - t0
            if i < 0:
                continue
            warped = spatial.warp_labels(jnp.asarray(p["moving_labels"]), disp)
            row = {"pair": i, "name": p.get("name", f"pair{i}"), "method": name, "seconds": seconds}
            row.update(measure(p["fixed_labels"], warped, disp, labels, spacing))
            rows.append(row)
            if i < n_figures:
                figure(os.path.join(fig_dir, f"pair{i:03d}_{name.replace('+', '_')}.png"), f, m,
                       spatial.warp(m, disp), disp, f"{row['name']}: {name}, Dice {row['dice_mean']:.3f}")
    summary = {name: metrics.summarize([r for r in rows if r["method"] == name]) for name in methods}
    os.makedirs(out, exist_ok=True)
    metrics.write_csv(os.path.join(out, "results.csv"), rows)
    metrics.write_json(os.path.join(out, "results.json"), {"rows": rows, "summary": summary,
                                                           "num_pairs": n, "methods": list(methods)})
    table = markdown(summary)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(table)
    return {"rows": rows, "summary": summary, "markdown": table}


def markdown(summary) -> str:
    """One row per method, mean ± std of the main measures."""
    head = "| method | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, s in summary.items():
        cells = []
        for key, _ in COLUMNS:
            v = s.get(key)
            digits = 4 if key == "seconds" else 3
            cells.append("" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    method = FLAGS.config.get("method", "registration")
    if method != "registration":  # the other learned methods write their own tables (jaxreg.methods)
        from jaxreg import methods as registry

        print(registry.get(method).evaluate(FLAGS.config, FLAGS.workdir, out=FLAGS.out)["markdown"])
        return
    methods = FLAGS.methods.split(",") if FLAGS.methods else None
    result = run(FLAGS.config, FLAGS.workdir, num_pairs=FLAGS.num_pairs, methods=methods, out=FLAGS.out)
    print(result["markdown"])


FLAGS = flags.FLAGS
flags.mark_flags_as_required(["config", "workdir"])

if __name__ == "__main__":
    app.run(main)
