"""Evaluate a trained method against its baselines: ``python evaluate.py --config configs/NAME.py --workdir DIR``.

``config.method``'s ``evaluation`` says what is compared (see ``jaxreg.methods``); ``jaxreg.evaluation.evaluate``
runs every compared method on ``config.eval.num_pairs`` held-out pairs (after one untimed warm-up pair, so
compilation is excluded from the seconds) and writes ``DIR/eval/results.csv`` (one row per pair and method),
``results.json`` (rows, mean ± std per method, paired tests, the config) and ``results.md`` (the tables), and with
matplotlib ``DIR/eval/figures/`` for the first ``config.eval.figures`` pairs; the tables are printed. Override any
field, e.g. ``--config.eval.num_pairs=5``; ``--out`` writes elsewhere.

A bad config, data set or workdir (no checkpoint, another model's) is one line ``evaluate.py: error: ...`` naming
the field or file, exit status 2; ``--debug`` shows the traceback instead.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/NAME.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "training directory (checkpoints/ inside)")
flags.DEFINE_string("out", None, "output folder (default: WORKDIR/eval)")
flags.DEFINE_bool("debug", False, "on an error, show the traceback instead of one line")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

#: what a bad config, data set or workdir raises: reported in one line (exit 2) unless --debug
ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError, FloatingPointError)


def main(argv):
    del argv
    try:
        from jaxreg import atlas, evaluation

        logging.set_verbosity(logging.WARNING)
        atlas.prepare(FLAGS.config)  # a "subjects" learning set is aligned and cached on first use
        result = evaluation.evaluate(FLAGS.config, FLAGS.workdir, out=FLAGS.out, progress=True)
    except ERRORS as err:
        if FLAGS.debug:
            raise
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"evaluate.py: error: {' '.join(text.split()) or type(err).__name__}", file=sys.stderr)
        sys.exit(2)
    print(result["markdown"])


if __name__ == "__main__":
    app.run(main)
