"""Samples from a trained model's EMA weights (an Orbax checkpoint in a training workdir).

  python -m cfdg_jax.sample --workdir /tmp/cfdg_digits --w 0,1,3 --num_per_class 8 \
      --out grid.png [--npz samples.npz] [--step N] [--sampler dpmpp_2m --steps 20] [--seed 0]

Sampler and guidance flags (cfdg_jax/sampling_flags.py) override the checkpoint's config.sample,
e.g. --sampler ddim --ddim.eta=0.5, --rescale=0.7, --interval_lo=-3.4 --interval_hi=2.6, or
autoguidance with --guide_workdir DIR [--guide_step N]. The grid has one panel per guidance
strength w, one row per class. The .npz holds `images` (uint8 N×H×W×C), `labels` (int N) and `w`
(float N) for scoring by other tools.
"""
import io

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from etils import epath

from cfdg_jax import guidance
from cfdg_jax import images
from cfdg_jax import pipeline
from cfdg_jax import runtime
from cfdg_jax import sampling_flags
from cfdg_jax import validation

flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
flags.DEFINE_list("w", ["0", "1", "3"], "Guidance strengths w (paper convention; s = 1 + w).")
flags.DEFINE_integer("num_per_class", 8, "Samples per class and per w.")
flags.DEFINE_integer("batch_size", None, "Images per compiled call (default: the checkpoint's "
                     "config.sample.batch_size, else all at once).")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same images.")
flags.DEFINE_string("out", None, "PNG grid to write (default: <workdir>/sample_<step>.png).")
flags.DEFINE_string("npz", None, "Optional .npz of the samples, labels and w.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def parse_w(values: list[str]) -> tuple[float, ...]:
  try:
    ws = tuple(float(w) for w in values)
  except ValueError as e:
    raise app.UsageError(f"--w takes comma-separated numbers, e.g. 0,1,3; got {values}.") from e
  if not ws or not np.all(np.isfinite(ws)):
    raise app.UsageError(f"--w takes finite numbers, e.g. 0,1,3; got {values}.")
  return ws


def _default_out(step: int) -> str:
  return str(epath.Path(FLAGS.workdir) / f"sample_{step}.png")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  ws = parse_w(FLAGS.w)
  if FLAGS.num_per_class < 1:
    raise app.UsageError("--num_per_class must be at least 1.")
  if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
    raise app.UsageError("--batch_size must be at least 1.")
  overrides = sampling_flags.guidance_overrides()
  validation.check_guidance_flags(overrides)
  if FLAGS.out is not None:
    validation.check_output_file(FLAGS.out, "--out", ".png")
  if FLAGS.npz is not None:
    validation.check_output_file(FLAGS.npz, "--npz", ".npz")
  runtime.initialize()
  validation.check_fsdp_flag(FLAGS.fsdp)
  # Before anything is restored or compiled.
  step = validation.check_checkpoint(FLAGS.workdir, FLAGS.step)
  if FLAGS.out is None:
    validation.check_output_file(_default_out(step), "--out", ".png")
  if overrides.get("guide_workdir"):
    validation.check_checkpoint(overrides["guide_workdir"], overrides.get("guide_step"),
                                workdir_flag="--guide_workdir", step_flag="--guide_step")
  try:
    pipe = pipeline.load(FLAGS.workdir, FLAGS.step, fsdp=FLAGS.fsdp)
    config = pipe.config
    settings = pipe.settings(sampling_flags.sampler_spec(config.sample.sampler.name))
    section = {**config.sample.guidance, **overrides}
    guide = None
    if section["guide_workdir"]:
      guide = pipeline.load(section["guide_workdir"], section["guide_step"], mesh=pipe.mesh)
      pipeline.check_guide(config, guide.config)
    guide_settings = guidance.settings_from_config({**section, "guide_step": guide and guide.step})
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e

  labels, w, ids = pipeline.class_sweep(config.data.num_classes, FLAGS.num_per_class, ws)
  options = guidance.make_options(labels.size, w, **guide_settings.option_values())
  logging.info("Sampling %d images from step %d: %s, %s%s, w = %s.", labels.size, pipe.step,
               settings.canonical, guide_settings.canonical,
               f" (guide {guide.name})" if guide else "", ", ".join(f"{x:g}" for x in ws))
  samples = np.concatenate([batch for _, batch in pipe.sample_batches(
      labels, options, ids, settings=settings, seed=FLAGS.seed, guide=guide,
      clip_x=guide_settings.clip_x, batch_size=FLAGS.batch_size or config.sample.batch_size,
      progress=True)])
  stats = pipe.last_stats
  logging.info("%d images in %.1f s: %d denoiser evaluations per image; %d network calls on %d "
               "examples in all (a guided step is one call on 2B examples).", labels.size,
               stats["seconds"], stats["nfe"], stats["network_calls"], stats["examples"])

  if jax.process_index() == 0:
    out = FLAGS.out or _default_out(pipe.step)
    images.write_sample_grid(out, samples, config.data.num_classes, ws, FLAGS.num_per_class)
    logging.info("Wrote %s.", out)
    if FLAGS.npz:
      buffer = io.BytesIO()
      np.savez(buffer, images=samples, labels=labels, w=w)
      epath.Path(FLAGS.npz).write_bytes(buffer.getvalue())
      logging.info("Wrote %s (%d images).", FLAGS.npz, len(samples))


def cli() -> None:
  """The `cfdg-sample` command (pyproject.toml)."""
  runtime.run(main)


if __name__ == "__main__":
  cli()
