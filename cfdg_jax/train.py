"""Trains a class-conditional diffusion model with classifier-free guidance.

  python -m cfdg_jax.train --config configs/digits.py --workdir /tmp/cfdg_digits

Any config field can be overridden, e.g. --config.num_train_steps=10000. Re-running with the same
--workdir resumes from its newest checkpoint (and exits at once if training is complete). A bad
config, flag or workdir stops it at once with one line, `error: ...` (--traceback for more).
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from cfdg_jax import runtime
from cfdg_jax import trainer

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and sample grids.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  runtime.run(main)
