"""Train a learned registration method: ``python train.py --config configs/NAME.py --workdir DIR``.

``config.method`` picks the method (``jaxreg.methods``: voxelmorph, learned_metric, supervised, translation); every
method trains through ``jaxreg.training.fit``. Any config field can be overridden, e.g. ``--config.train.steps=100``
(the config is locked: a misspelt field is an error). Rerunning with the same ``--workdir`` resumes from the latest
checkpoint. Writes ``DIR/config.json``, ``DIR/checkpoints/`` and ``DIR/metrics.jsonl``. For several hosts, call
``jax.distributed.initialize()`` before training (``--distributed``).
"""
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/NAME.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the saved config")
flags.DEFINE_integer("stop_at", None, "stop after this step (as if interrupted); rerun to resume")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host)")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    from jaxreg import methods

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.distributed:
        jax.distributed.initialize()
    state = methods.get(FLAGS.config.method).fit(FLAGS.config, FLAGS.workdir, stop_at=FLAGS.stop_at,
                                                 progress=FLAGS.progress)
    print(f"trained to step {int(state.step)}; checkpoints and metrics.jsonl in {FLAGS.workdir}")


if __name__ == "__main__":
    app.run(main)
