"""A learned method's real-data evaluation (``evaluate.py``'s harness, ``jaxreg.evaluation.evaluate``) with peer
toolkits run on the same held-out pairs, the raw per-pair rows written to ``benchmarks/results/`` (issue #16).

    python benchmarks/bench_learned_real.py --config configs/learned_metric_real.py \\
        --workdir runs/metric_real_t2 --peers ants_mi --out benchmarks/results/metric_real_t2_DATE.json

``--config`` and ``--config.FIELD=VALUE`` overrides work as in ``evaluate.py``. Peers (run with a Python that has
antspyx): ``ants_mi``: ANTsPy ``SyN`` with Mattes MI in the affine and deformable stages, on the pair's arrays with
their voxel spacing (identity direction); its composed field becomes voxels and is scored like every method. Each
peer is paired with the method's baselines (``Evaluation.paired``). The output JSON holds the command, commit,
versions, rows, summary, paired tests and the markdown table.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_real  # noqa: E402

config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/NAME.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "training directory of the method")
flags.DEFINE_list("peers", [], "peer methods to add: ants_mi")
flags.DEFINE_string("out", None, "raw results JSON (benchmarks/results/NAME.json)")
flags.mark_flags_as_required(["config", "workdir", "out"])
FLAGS = flags.FLAGS


def ants_mi(pair) -> dict:
    """ANTsPy SyN with Mattes MI on one pair (``(*S)`` arrays, ``spacing`` mm): ``{"disp": (*S, nd) voxels}``."""
    import ants

    spacing = tuple(float(s) for s in pair["spacing"])
    fi, mo = (ants.from_numpy(np.ascontiguousarray(np.asarray(pair[k], np.float32)), spacing=spacing)
              for k in ("fixed", "moving"))
    scratch = tempfile.mkdtemp(prefix="bench_learned_real_")
    reg = ants.registration(fixed=fi, moving=mo, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes",
                            outprefix=os.path.join(scratch, "reg_"))
    composed = ants.apply_transforms(fixed=fi, moving=mo, transformlist=reg["fwdtransforms"],
                                     compose=os.path.join(scratch, "c_"))
    field = ants.image_read(composed).numpy()
    return {"disp": bench_real._physical_to_voxels(field, fi.direction, fi.spacing)}


PEERS = {"ants_mi": ants_mi}


def main(argv):
    del argv
    from jaxreg import evaluation
    from jaxreg.data import io

    unknown = sorted(set(FLAGS.peers) - set(PEERS))
    if unknown:
        raise app.UsageError(f"--peers: unknown {unknown}; choose from {sorted(PEERS)}")
    config = FLAGS.config
    out_dir = tempfile.mkdtemp(prefix="bench_learned_real_eval_")
    result = evaluation.evaluate(config, FLAGS.workdir, out=out_dir, progress=True,
                                 extra={name: PEERS[name] for name in FLAGS.peers})
    record = {"command": " ".join(["python"] + sys.argv), "date": datetime.date.today().isoformat(),
              "git": bench_real._git(), "versions": bench_real._versions(), "config": json.loads(config.to_json()),
              **{k: result[k] for k in ("rows", "summary", "tests")}, "table_md": result["markdown"]}
    io.write_json(FLAGS.out, record)
    print(result["markdown"])


if __name__ == "__main__":
    app.run(main)
