"""Evaluation: summaries of per-pair results, tables, paired statistics, result files, figures, and the one
held-out evaluation loop every learned method uses.

Tables and files
    ``summarize`` turns per-pair dicts into mean/std/n per key; ``to_markdown``, ``write_csv`` and ``write_json``
    render and save them. Every write is atomic: the text goes to a temporary file in the target's folder, which
    then replaces the target with ``os.replace``; on error the temporary file is removed and the target is left as
    it was.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping

import numpy as np

from jaxreg.data.io import atomic_write


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


def _fmt(v, digits: int) -> str:
    if _is_number(v):
        return f"{float(v):.{digits}g}" if isinstance(v, (float, np.floating)) else str(int(v))
    return str(v)


def to_markdown(table, *, digits: int = 4) -> str:
    """Render a Markdown table.

    ``table`` is either a :func:`summarize` result (one row per key: ``mean ± std`` and ``n``) or a list of
    row dicts (one column per key, nested dicts flattened). Floats are printed with ``digits`` significant digits.
    """
    if isinstance(table, Mapping):
        lines = ["| metric | mean ± std | n |", "| --- | --- | --- |"]
        for k, s in table.items():
            lines.append(f"| {k} | {_fmt(s['mean'], digits)} ± {_fmt(s['std'], digits)} | {s['n']} |")
        return "\n".join(lines) + "\n"
    rows = [_flat(r) for r in table]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c], digits) if c in r else "" for c in cols) + " |")
    return "\n".join(lines) + "\n"


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


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path, obj) -> None:
    """Write ``obj`` as strict JSON atomically (indent 2).

    NumPy scalars and arrays become numbers and lists, dict keys become strings, and non-finite floats (NaN, inf)
    become ``null`` since JSON has no such numbers; use :func:`write_csv` to keep them distinguishable.
    """
    data = _jsonable(obj)
    _atomic_write(path, lambda f: (json.dump(data, f, indent=2, allow_nan=False), f.write("\n")))
