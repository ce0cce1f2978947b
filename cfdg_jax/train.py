"""Trains a class-conditional diffusion model with classifier-free guidance.

  python -m cfdg_jax.train --config configs/digits.py --workdir /tmp/cfdg_digits

Any config field can be overridden, e.g. --config.num_train_steps=10000. Re-running with the same
--workdir resumes from its newest checkpoint (and exits at once if training is complete); a
config that would change the batches, the noise or the model is refused with a table unless
--allow_config_change is given, and other changes are logged in <workdir>/config_changes.jsonl.
A bad config, flag or workdir stops it at once with one line, `error: ...` (--traceback for more).
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from cfdg_jax import runtime
from cfdg_jax import trainer

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and sample grids.")
flags.DEFINE_float("hang_timeout", None, "Seconds without a completed step after which every "
                   "process logs its Python stacks and exits with status 75, for the launcher "
                   "to restart the run (default: 10x the median step, at least 600).")
flags.DEFINE_bool("allow_config_change", False, "Resume even though the config changes the "
                  "batches, the noise or the model (seed, batch_size, data, diffusion).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.hang_timeout is not None and FLAGS.hang_timeout <= 0:
    raise app.UsageError(f"--hang_timeout={FLAGS.hang_timeout}: give seconds > 0, or leave it "
                         "out for 10x the median step (at least 600).")
  runtime.initialize()
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                             allow_config_change=FLAGS.allow_config_change,
                             hang_timeout_s=FLAGS.hang_timeout)


def cli() -> None:
  """The `cfdg-train` command (pyproject.toml)."""
  runtime.run(main)


if __name__ == "__main__":
  cli()
