"""Scores a training workdir's checkpoints over a guidance sweep: FID, IS, precision/recall.

  python -m cfdg_jax.evaluate --workdir /tmp/cfdg_digits --config configs/digits.py \
      --config.eval.classifier_dir=/tmp/cls_digits [--step N] [--watch] [--poll_seconds 30]

Every checkpoint not yet evaluated (or only --step's) is scored, oldest first, at the points of
the config's `eval` section (configs/common.py): its samplers × guidance settings × w, and a
sweep of the first sampler's num_steps. The sampler flags (--sampler NAME --steps N
--ddim.eta=..., cfdg_jax/sampling_flags.py) replace eval.samplers with one setting, the guidance
flags (--rescale=..., --interval_lo=..., --guide_workdir=...) eval.guidance. With --watch the job runs beside
training: it waits for new checkpoints (and for the workdir to appear) and exits once the
checkpoint at the run's num_train_steps (or --step's) is scored. Without --config, each
checkpoint's own config supplies `eval`; with it, only the file's `eval` section is used (plus
any --config.eval.* overrides).

Results go to <workdir>/eval/: results.jsonl (one row per checkpoint and point, keyed by the
settings' canonical forms, the label protocol, num_samples, seed and the metric networks'
weights; a restart recomputes nothing recorded there), TensorBoard scalars, tradeoff.png and
nfe.png.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from cfdg_jax import runtime
from cfdg_jax import sampling_flags
from cfdg_jax import specs
from cfdg_jax import validation
from cfdg_jax.eval import evaluator

config_flags.DEFINE_config_file(
    "config", None, "Optional config file (configs/*.py) whose `eval` section replaces the "
    "checkpoints' own, e.g. --config configs/digits.py --config.eval.num_samples=2000.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_integer("step", None, "Score only the checkpoint of this step (default: every one).")
flags.DEFINE_bool("watch", False, "Keep waiting for new checkpoints until the final one is scored.")
flags.DEFINE_float("poll_seconds", 30.0, "Seconds between looks for new checkpoints (--watch).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.poll_seconds <= 0:
    raise app.UsageError("--poll_seconds must be positive.")
  if FLAGS.step is not None and FLAGS.step < 1:
    raise app.UsageError(f"--step={FLAGS.step}: checkpoint steps are positive.")
  if FLAGS.config is not None and "eval" not in FLAGS.config:
    raise app.UsageError("The --config file has no `eval` section; use one of configs/*.py.")
  sampler_spec = sampling_flags.sampler_spec(default_name=None)
  overrides = sampling_flags.guidance_overrides()
  guidance_spec = specs.format_spec("cfg", overrides) if overrides else None
  validation.check_guidance_flags(overrides)
  runtime.initialize()
  validation.check_fsdp_flag(FLAGS.fsdp)
  validation.check_workdir(FLAGS.workdir)  # <workdir>/eval is written; with --watch it may wait.
  if not FLAGS.watch:
    validation.check_checkpoint(FLAGS.workdir, FLAGS.step, hint=", or pass --watch to wait for "
                                "them")
  if overrides.get("guide_workdir"):
    validation.check_checkpoint(overrides["guide_workdir"], overrides.get("guide_step"),
                                workdir_flag="--guide_workdir", step_flag="--guide_step")
  evaluator.evaluate_workdir(FLAGS.workdir, FLAGS.config.eval if FLAGS.config else None,
                             step=FLAGS.step, watch=FLAGS.watch, poll_seconds=FLAGS.poll_seconds,
                             sampler_specs=sampler_spec and (sampler_spec,),
                             guidance_specs=guidance_spec and (guidance_spec,),
                             fsdp=FLAGS.fsdp)


def cli() -> None:
  """The `cfdg-evaluate` command (pyproject.toml)."""
  runtime.run(main)


if __name__ == "__main__":
  cli()
