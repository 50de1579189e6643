"""Train a learned registration method: ``python train.py --config configs/NAME.py --workdir DIR``.

``config.method`` picks the method (``jaxreg.methods``: voxelmorph, learned_metric, supervised, translation); every
method trains through ``jaxreg.training.fit``. Any config field can be overridden, e.g. ``--config.train.steps=100``
(the config is locked: a misspelt field is an error). Rerunning with the same ``--workdir`` resumes from the latest
checkpoint. Writes ``DIR/config.json``, ``DIR/checkpoints/`` and ``DIR/metrics.jsonl``. For several hosts, call
``jax.distributed.initialize()`` before training (``--distributed``).

A bad config or data set (a field out of range, a missing file, a workdir holding another model's checkpoints) is
one line ``train.py: error: ...`` naming the field or file, exit status 2, before anything is compiled; ``--debug``
shows the traceback instead.
"""
import math
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/NAME.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the saved config")
flags.DEFINE_integer("stop_at", None, "stop after this step (as if interrupted); rerun to resume")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host)")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_string("export", None, "after training, write the model folder here (jaxreg.atlas.export_workdir: "
                    "data.kind 'subjects' configs), for 'jaxreg register --model DIR'")
flags.DEFINE_bool("debug", False, "on an error, show the traceback instead of one line")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

#: what a bad config, data set or workdir raises: reported in one line (exit 2) unless --debug
ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError, FloatingPointError)


def check_train(config, stop_at=None) -> None:
    """Raise ``ValueError`` naming the field when ``config.train``'s counts or learning rate are out of range (the
    fields a config has; every method's ``train`` block uses these names)."""
    train = config.get("train") or {}
    for name, low in (("steps", 1), ("batch_size", 1), ("log_every", 1), ("checkpoint_every", 1),
                      ("keep_checkpoints", 1)):
        value = train.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"config.train.{name} must be an int >= {low}, got {value!r}")
    lr = train.get("learning_rate")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise ValueError(f"config.train.learning_rate must be a finite number > 0, got {lr!r}")
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"--stop_at must be >= 1, got {stop_at}")


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with line breaks folded (a ``KeyError``'s quotes dropped)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def main(argv):
    del argv
    try:
        check_train(FLAGS.config, FLAGS.stop_at)
        import jax

        from jaxreg import methods

        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        if FLAGS.distributed:
            jax.distributed.initialize()
        from jaxreg import atlas

        atlas.prepare(FLAGS.config)  # a "subjects" learning set is aligned and cached on first use
        state = methods.get(FLAGS.config.method).fit(FLAGS.config, FLAGS.workdir, stop_at=FLAGS.stop_at,
                                                     progress=FLAGS.progress)
        print(f"trained to step {int(state.step)}; checkpoints and metrics.jsonl in {FLAGS.workdir}")
        if FLAGS.export:
            atlas.export_workdir(FLAGS.config, FLAGS.workdir, FLAGS.export)
            print(f"model folder written to {FLAGS.export}")
    except ERRORS as err:
        if FLAGS.debug:
            raise
        print(f"train.py: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
