"""Check that two checkouts of jaxreg train and evaluate the learned methods identically (a refactor's guard).

    git worktree add /tmp/before <commit>
    python benchmarks/check_equivalence.py --before /tmp/before --after . --out benchmarks/results/NAME.json

For each checkout (in a subprocess, so each imports its own ``jaxreg``), trains tiny 2-D versions of the four
learned methods (VoxelMorph unsupervised and semi-supervised, supervised, learned metric, translation) for a few
steps from the checkout's own ``configs/``, then evaluates all but the semi-supervised run on 2 held-out pairs (the
learned metric through the classical engine, against MI). Compares the ``metrics.jsonl`` rows (every logged term but ``steps_per_s``) and the per-pair evaluation
rows (Dice, Jaccard, HD95, ASSD, EPE, TRE, folding, T L1) and writes both with the verdict to ``--out``. Checkouts before
the one-shape refactor (no ``jaxreg.evaluation.evaluate``) are driven through their old entry points.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import importlib.util, json, os, sys
root, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import jaxreg
assert os.path.realpath(jaxreg.__file__).startswith(os.path.realpath(root)), jaxreg.__file__
new = os.path.isfile(f"{root}/jaxreg/evaluation.py") and "def evaluate(" in open(f"{root}/jaxreg/evaluation.py").read()

def cfg(name):
    spec = importlib.util.spec_from_file_location(name, f"{root}/configs/{name}.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m.get_config()

tiny_net = dict(preset=None, encoder=(4, 8), decoder=(8, 8, 4))
v = cfg("synthetic_2d"); v.data.shape = (32, 32); v.model.encoder, v.model.decoder = (4, 8), (8, 8, 4)
v.train.steps, v.train.batch_size, v.train.log_every = 6, 2, 1
v.eval.num_pairs, v.eval.instance_iterations, v.eval.figures = 2, 5, 0
v.eval.methods = ("network", "network+io", "affine")
semi = cfg("semisupervised"); semi.data.shape = (32, 32); semi.model.encoder, semi.model.decoder = (4, 8), (8, 8, 4)
semi.train.steps, semi.train.batch_size, semi.train.log_every = 4, 2, 1
t = cfg("translation"); t.data.shape = (32, 32)
t.model.update(dict(tiny_net, affine_encoder=(4, 8), affine_hidden=8, translation_encoder=(4, 8),
                    translation_decoder=(8, 8, 4)))
t.train.steps, t.train.batch_size, t.train.log_every = 4, 2, 1
t.eval.num_pairs, t.eval.landmarks, t.eval.classical_preset, t.eval.figures = 2, 20, "", 0
s = cfg("supervised"); s.data.kind, s.data.shape, s.data.num_labels, s.data.train_pairs = "synthetic", (32, 32), 8, 2
s.prealign = ""
s.model.update(dict(features=(4, 4), dilations=(1, 1), radius=1, sim_features=(), sim_out=4, head=4))
s.train.steps, s.train.batch_size, s.train.log_every = 4, 8, 1
s.eval.num_pairs, s.eval.methods = 2, ("identity", "affine", "demons", "supervised")
s.eval.demons = {"levels": (1,), "iterations": (5,)}
lm = cfg("learned_metric"); lm.data.kind, lm.data.shape, lm.data.foreground = "synthetic", (32, 32), "edges"
lm.data.num_train_pairs = 2; lm.model.features, lm.model.dilations, lm.model.hidden = (8, 8), (1, 1), (8,)
lm.train.ks, lm.train.steps, lm.train.batch_size, lm.train.scales, lm.train.log_every = (2,), 4, 8, (1,), 1
lm.eval.num_pairs, lm.eval.methods = 2, ("identity", "mi", "learned")
lm.eval.register = dict(transform="affine", deformable="disp", affine_levels=(1,), affine_iterations=(20,),
                        levels=(1,), iterations=(10,), reg_weight=10.0)
runs = {"voxelmorph": v, "voxelmorph_semi": semi, "translation": t, "supervised": s, "learned_metric": lm}
from jaxreg import methods
logs = {}
for name, c in runs.items():
    d = os.path.join(work, name)
    kind = name.replace("_semi", "")
    if kind == "voxelmorph" and not new:
        from jaxreg import training
        training.fit(c, d, progress=False)
    else:
        methods.get(kind).fit(c, d, progress=False)
    log = os.path.join(d, "k2" if kind == "learned_metric" else "", "metrics.jsonl")
    logs[name] = [{k: x for k, x in json.loads(line).items() if k != "steps_per_s"} for line in open(log)]
if new:
    from jaxreg import evaluation
    s.eval.figures = 0
    lm.eval.figures = 0
    ev = {k: evaluation.evaluate(c, os.path.join(work, k), out=os.path.join(work, k, "eval"))
          for k, c in (("voxelmorph", v), ("supervised", s), ("translation", t), ("learned_metric", lm))}
else:
    spec = importlib.util.spec_from_file_location("ev", f"{root}/evaluate.py")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    from jaxreg.methods import learned_metric, supervised, translation
    lm.eval.verbose = False
    ev = {"voxelmorph": old.run(v, os.path.join(work, "voxelmorph"), out=os.path.join(work, "ev_v")),
          "supervised": supervised.evaluate(s, os.path.join(work, "supervised"), out=os.path.join(work, "ev_s")),
          "translation": translation.evaluate(t, os.path.join(work, "translation"), out=os.path.join(work, "ev_t")),
          "learned_metric": learned_metric.evaluate(lm, os.path.join(work, "learned_metric"),
                                                    out=os.path.join(work, "ev_l"))}
same_name = {"hd95": "hd95_mean", "assd": "assd_mean", "tre": "tre_mm"}  # means renamed by the refactor
keep = ("dice_mean", "jaccard_mean", "assd_mean", "hd95_mean", "epe_mm", "folding_pct", "tre_mm", "t_l1")
rows = {k: [{"pair": r["pair"], "method": r["method"],
             **{same_name.get(m, m): x for m, x in r.items()
                if same_name.get(m, m) in keep and isinstance(x, (int, float))}} for r in out["rows"]]
        for k, out in ev.items()}
print(json.dumps({"training_logs": logs, "evaluation_rows": rows}))
'''


def run(root: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(root), work], capture_output=True,
                             text=True, cwd=work)
    if out.returncode:
        raise SystemExit(f"{root}: the child run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(a: dict, b: dict, tol: float) -> list[str]:
    """Differences between two runs' results (empty when equal within ``tol``)."""
    diffs = []
    for section in ("training_logs", "evaluation_rows"):
        for name in sorted(set(a[section]) | set(b[section])):
            ra, rb = a[section].get(name), b[section].get(name)
            if ra is None or rb is None or len(ra) != len(rb):
                diffs.append(f"{section}/{name}: present or row counts differ")
                continue
            for x, y in zip(ra, rb):
                for key in sorted(set(x) | set(y)):
                    u, v = x.get(key), y.get(key)
                    if isinstance(u, (int, float)) and isinstance(v, (int, float)):
                        if abs(u - v) > tol:
                            diffs.append(f"{section}/{name}/{x.get('step', x.get('pair'))}/{key}: {u} vs {v}")
                    elif u != v:
                        diffs.append(f"{section}/{name}/{key}: {u!r} vs {v!r}")
    return diffs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="checkout to compare against (e.g. a git worktree)")
    p.add_argument("--after", default=".", help="checkout under test")
    p.add_argument("--tol", type=float, default=0.0, help="largest accepted absolute difference")
    p.add_argument("--out", help="JSON file for both runs and the verdict")
    args = p.parse_args(argv)
    before, after = run(args.before), run(args.after)
    diffs = compare(before, after, args.tol)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=args.after).stdout.strip()
    base = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=args.before).stdout.strip()
    verdict = {"command": " ".join(["python", "benchmarks/check_equivalence.py", *(argv or sys.argv[1:])]),
               "before_commit": base, "after_commit": commit, "tolerance": args.tol, "identical": not diffs,
               "differences": diffs, "before": before, "after": after}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(verdict, f, indent=1)
    n_logs = sum(len(r) for r in after["training_logs"].values())
    n_rows = sum(len(r) for r in after["evaluation_rows"].values())
    print(f"{n_logs} training-log rows and {n_rows} evaluation rows compared: "
          + ("identical" if not diffs else f"{len(diffs)} differences, e.g. {diffs[:3]}"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
