"""Evaluation: summaries of per-pair results, tables, paired statistics, result files, figures, and the one
held-out evaluation loop every learned method uses.

Tables and files
    ``summarize`` turns per-pair dicts into mean/std/n per key; ``markdown`` renders a summary (and paired tests)
    as tables; ``write_csv``, ``write_json`` and ``write_text`` save them. Every write is atomic: the text goes to a temporary file in the target's folder, which
    then replaces the target with ``os.replace``; on error the temporary file is removed and the target is left as
    it was.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np

from jaxreg.data.io import atomic_write, write_json  # noqa: F401  (write_json: part of this module's API)


# ----------------------------------------------------------------------------------------------- tables
def _flat(row: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def summarize(rows: Iterable[Mapping], *, ddof: int = 0) -> dict[str, dict[str, float]]:
    """Aggregate per-pair result dicts into ``{key: {"mean", "std", "n"}}``.

    Nested dicts are flattened to ``"outer/inner"`` keys (e.g. ``{"dice": {3: 0.8}}`` → ``"dice/3"``). Only
    numeric values count; non-numeric ones (names, paths) are skipped. NaN values are left out (``n`` counts the
    rest); +inf values are kept and propagate. ``std`` uses ``ddof`` (default 0, NumPy's). Keys keep the order in
    which they first appear.
    """
    values: dict[str, list[float]] = {}
    for row in rows:
        for k, v in _flat(row).items():
            if _is_number(v):
                values.setdefault(k, []).append(float(v))
    table = {}
    for k, vs in values.items():
        x = np.array([v for v in vs if not math.isnan(v)], dtype=np.float64)
        n = int(x.size)
        mean = float(x.mean()) if n else math.nan
        with np.errstate(invalid="ignore"):  # inf - inf inside std: NaN, as expected
            std = float(x.std(ddof=ddof)) if n > ddof else math.nan
        table[k] = {"mean": mean, "std": std, "n": n}
    return table


# ----------------------------------------------------------------------------------------------- atomic files
def _atomic_write(path, write) -> None:
    """Call ``write(file)`` on a temporary text file next to ``path``, then move it onto ``path``."""
    def write_text(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            write(f)

    atomic_write(os.fspath(path), write_text)


def write_csv(path, rows: Iterable[Mapping]) -> None:
    """Write row dicts to a CSV file atomically; columns are the union of keys (nested dicts flattened)."""
    rows = [_flat(r) for r in rows]
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([r.get(c, "") for c in cols])

    _atomic_write(path, write)


# ----------------------------------------------------------------------------------------------- measures
#: what ``measure`` can compute from a field and a pair: label overlaps, surface distances (mm), Jacobian
#: statistics, end-point error against a true field (mm) and landmark TRE (mm)
MEASURES = ("dice", "jaccard", "hd95", "assd", "jacobian", "epe", "tre")


def measure(pair, disp, *, measures, label_names, spacing) -> dict:
    """Per-pair measures of one registration (host NumPy, float64).

    ``pair``: as ``jaxreg.methods.Evaluation.pairs`` gives it; ``disp`` ``(*S, ndim)`` the field (voxels, pull:
    the moving labels are warped by it with nearest neighbour); ``label_names`` ``{label: name}``; ``spacing``
    mm per axis. Returns ``dice``/``jaccard``/``hd95``/``assd`` as ``{name: value}`` with their ``*_mean`` over
    labels (NaN-ignoring): the labels present in the fixed map (Dice, Jaccard; a region lost by the warp scores 0)
    and in both maps (HD95, ASSD); ``folding_pct`` (% of voxels with det J <= 0) and ``sdlogj`` (``"jacobian"``);
    ``epe_mm`` (mean end-point error over the fixed foreground, when the pair has the true ``disp``); ``tre_mm``,
    ``tre_p90_mm`` (when it has ``landmarks``, ``(N, ndim)`` voxel positions on the fixed grid, and either their
    ``moving_landmarks`` ``(N, ndim)`` or the true ``disp``: ``|p + disp(p) - q|`` mm, ``disp(p)`` interpolated
    linearly, ``q`` the moving landmark or ``p + disp_true(p)``).
    """
    import jax.numpy as jnp

    from jaxreg import metrics, spatial

    unknown = sorted(set(measures) - set(MEASURES))
    if unknown:
        raise ValueError(f"unknown measures {unknown}; choose from {MEASURES}")
    fl = np.asarray(pair["fixed_labels"])
    warped = np.asarray(spatial.warp_labels(jnp.asarray(pair["moving_labels"]), jnp.asarray(disp)))
    in_fixed = set(np.unique(fl).tolist())
    labels = [k for k in label_names if k in in_fixed]  # a label the fixed map lacks is not scored
    in_both = [k for k in labels if k in set(np.unique(warped).tolist())]  # distances need both surfaces
    row = {}
    per_label = {"dice": lambda: metrics.dice(fl, warped, labels=labels),
                 "jaccard": lambda: metrics.jaccard(fl, warped, labels=labels),
                 "hd95": lambda: metrics.hd95(fl, warped, labels=in_both, spacing=spacing),
                 "assd": lambda: metrics.assd(fl, warped, labels=in_both, spacing=spacing)}
    for name, fn in per_label.items():
        if name in measures:
            values = fn()
            row[name] = {label_names[k]: v for k, v in values.items()}
            row[f"{name}_mean"] = float(np.nanmean(list(values.values()))) if values else math.nan
    disp64 = np.asarray(disp, np.float64)
    if "jacobian" in measures:
        jac = np.asarray(spatial.jacobian_determinant(jnp.asarray(disp)))
        row["folding_pct"] = 100.0 * metrics.folding_fraction(jac)
        row["sdlogj"] = metrics.sd_log_jacobian(jac)
    true = pair.get("disp")
    if "epe" in measures and true is not None:
        err = (disp64 - np.asarray(true, np.float64)) * np.asarray(spacing, np.float64)
        row["epe_mm"] = float(np.linalg.norm(err, axis=-1)[fl > 0].mean())
    if "tre" in measures and pair.get("landmarks") is not None and (
            true is not None or pair.get("moving_landmarks") is not None):
        p = np.asarray(pair["landmarks"], np.float64)
        if pair.get("moving_landmarks") is not None:  # corresponding points, e.g. a real case's landmarks
            target = np.asarray(pair["moving_landmarks"], np.float64)
        else:  # the true field at the points
            target = p + _at(np.asarray(true, np.float64), p)
        if target.shape != p.shape:
            raise ValueError(f"the pair's moving_landmarks {target.shape} do not match its landmarks {p.shape}")
        err = metrics.tre(p + _at(disp64, p), target, spacing=spacing)
        row.update(tre_mm=float(err.mean()), tre_p90_mm=float(np.percentile(err, 90)), landmarks=len(p))
    return row


def _at(field, points):
    """``field`` ``(*S, C)`` at ``points`` ``(N, ndim)`` voxel positions: linear interpolation (exact at integer
    points), edge values outside."""
    from scipy import ndimage

    return np.stack([ndimage.map_coordinates(field[..., c], points.T, order=1, mode="nearest")
                     for c in range(field.shape[-1])], -1)


def paired_tests(rows, *, pairs, keys) -> list[dict]:
    """For each ``(method, baseline)`` of ``pairs`` and measure of ``keys``: the per-pair difference
    ``method - baseline`` (mean, std, number of pairs where it is > 0), a paired t-test and a Wilcoxon signed-rank
    test (two-sided p-values; NaN with fewer than 2 pairs or all differences 0).

    ``rows``: per-pair dicts with ``pair``, ``method`` and the measures (nested ones as ``"dice/GM"``). Pairs
    missing either value, or with a non-finite one, are left out.
    """
    from scipy import stats

    by = {(r["method"], r["pair"]): _flat(r) for r in rows}
    ids = sorted({r["pair"] for r in rows})
    tests = []
    for method, base in pairs:
        for key in keys:
            x, y = [], []
            for i in ids:
                a, b = by.get((method, i), {}).get(key), by.get((base, i), {}).get(key)
                if _is_number(a) and _is_number(b) and math.isfinite(a) and math.isfinite(b):
                    x.append(a)
                    y.append(b)
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            d = x - y
            p_t = p_w = math.nan
            if d.size >= 2 and np.any(d != 0):
                p_t = float(stats.ttest_rel(x, y).pvalue)
                p_w = float(stats.wilcoxon(x, y).pvalue)
            tests.append({"method": method, "baseline": base, "measure": key, "n": int(d.size),
                          "mean_diff": float(d.mean()) if d.size else math.nan,
                          "std_diff": float(d.std()) if d.size else math.nan, "wins": int((d > 0).sum()),
                          "p_ttest": p_t, "p_wilcoxon": p_w})
    return tests


def _fmt_p(p):
    return "nan" if not math.isfinite(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def markdown(summary, columns, *, tests=(), num_pairs=None) -> str:
    """The summary table (one row per method: mean ± std over pairs of each ``(key, title, digits)`` column,
    "–" where not measured) and, with ``tests``, the paired-test table (mean difference, pairs won, p t-test /
    p Wilcoxon)."""
    lines = [] if num_pairs is None else [f"Held-out pairs: {num_pairs}; mean ± std over pairs.", ""]
    lines += ["| method | " + " | ".join(c[1] for c in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for method, s in summary.items():
        cells = []
        for key, _, digits in columns:
            v = s.get(key)
            cells.append("–" if v is None or not v["n"] else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if tests:
        keys = list(dict.fromkeys(t["measure"] for t in tests))
        lines += ["", "Paired per-pair differences, method − baseline: mean (pairs where higher / n; p paired t-test / "
                  "p Wilcoxon).", "", "| comparison | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
        for method, base in dict.fromkeys((t["method"], t["baseline"]) for t in tests):
            cells = []
            for key in keys:
                t = next(t for t in tests if (t["method"], t["baseline"], t["measure"]) == (method, base, key))
                cells.append(f"{t['mean_diff']:+.3f} ({t['wins']}/{t['n']}; {_fmt_p(t['p_ttest'])} / "
                             f"{_fmt_p(t['p_wilcoxon'])})")
            lines.append(f"| {method} vs {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text))


# ----------------------------------------------------------------------------------------------- figures
def figure(path, fixed, moving, warped, disp, title) -> None:
    """Save a 6-panel PNG (fixed, moving, warped, checkerboard of fixed and warped, deformation grid, Jacobian
    determinant); 3-D: the middle slice of the last axis. Needs matplotlib."""
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- the loop
def run(spec, *, figures: int = 0, figure_dir=None, progress=None) -> list[dict]:
    """Run every method of ``spec`` (a ``jaxreg.methods.Evaluation``) on every test pair; per-pair rows.

    Pair 0 is run once first, untimed and unrecorded (compilation), so ``seconds`` (each method's wall time on a
    pair, its result ready) excludes compilation. Each row: ``pair``, ``method``, ``seconds``, the method's own
    extra measures and ``measure``'s. The first ``figures`` pairs get a PNG per method in ``figure_dir``.
    """
    import time

    import jax

    from jaxreg import spatial

    rows = []
    for i in range(-1, spec.num_pairs):  # -1: warm-up (compilation), not recorded
        p = spec.pairs(max(i, 0))
        for name, fn in spec.methods.items():
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(p))
            seconds = time.perf_counter() - t0
            if i < 0:
                continue
            disp = out["disp"]
            row = {"pair": i, "method": name, "seconds": seconds, **{k: v for k, v in out.items() if k != "disp"}}
            row.update(measure(p, disp, measures=spec.measures, label_names=spec.label_names,
                               spacing=tuple(float(s) for s in p["spacing"])))
            rows.append(row)
            if i < figures and figure_dir:
                dice = f", Dice {row['dice_mean']:.3f}" if "dice_mean" in row else ""
                slug = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")
                figure(os.path.join(figure_dir, f"pair{i:03d}_{slug}.png"),
                       p["fixed"], p["moving"], spatial.warp(p["moving"], disp), disp, f"pair {i}: {name}{dice}")
        if progress and i >= 0:
            progress(i, [r for r in rows if r["pair"] == i])
    return rows


def evaluate(config, workdir, *, out=None, progress: bool = False, extra=None) -> dict:
    """Evaluate the method of ``config`` (``config.method``) trained in ``workdir`` on held-out pairs.

    The method's ``evaluation(config, workdir)`` says what to run (``jaxreg.methods.Evaluation``); this runs it
    (``run``), summarises per method (``summarize``), runs the paired tests and writes, under ``out`` (default
    ``workdir/eval``), ``results.csv`` (one row per pair and method), ``results.json`` (rows, summary, tests, the
    method's info and the config) and ``results.md`` (the tables), each atomically, and with matplotlib
    ``figures/`` for the first ``config.eval.figures`` pairs. Returns ``{"rows", "summary", "tests",
    "markdown"}``. ``extra``: ``{name: fn(pair) -> {"disp": ...}}``, further methods run on the same pairs (e.g. a
    peer toolkit, from a benchmark script), each paired with every baseline of the method's paired tests.
    """
    from jaxreg import methods

    spec = methods.get(config.method).evaluation(config, workdir)
    if extra:
        baselines = tuple(dict.fromkeys(b for _, b in spec.paired))
        spec = spec._replace(methods={**spec.methods, **extra},
                             paired=spec.paired + tuple((name, b) for name in extra for b in baselines))
    out = os.fspath(out or os.path.join(workdir, "eval"))
    try:
        import matplotlib  # noqa: F401

        n_figures = int(config.eval.figures)
    except ImportError:
        n_figures = 0

    def show(i, rows):
        cells = ", ".join(f"{r['method']} {r['dice_mean']:.3f}" for r in rows if "dice_mean" in r)
        print(f"pair {i + 1}/{spec.num_pairs}: {cells}", flush=True)

    rows = run(spec, figures=n_figures, figure_dir=os.path.join(out, "figures"), progress=show if progress else None)
    summary = {name: summarize([{k: v for k, v in r.items() if k != "pair"} for r in rows if r["method"] == name])
               for name in spec.methods}
    tests = paired_tests(rows, pairs=spec.paired, keys=spec.paired_keys) if spec.num_pairs >= 2 else []
    table = markdown(summary, spec.columns, tests=tests, num_pairs=spec.num_pairs)
    if spec.note:
        table += f"\n{spec.note}\n"
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "results.csv"), rows)
    write_json(os.path.join(out, "results.json"), {
        "method": config.method, "rows": rows, "summary": summary, "tests": tests, "num_pairs": spec.num_pairs,
        "methods": list(spec.methods), **dict(spec.info), "config": json.loads(config.to_json())})
    write_text(os.path.join(out, "results.md"), table)
    return {"rows": rows, "summary": summary, "tests": tests, "markdown": table}
