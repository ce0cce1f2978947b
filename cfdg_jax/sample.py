"""Samples from a trained model's EMA weights (an Orbax checkpoint in a training workdir).

  python -m cfdg_jax.sample --workdir /tmp/cfdg_digits --guidance 0,1,3 --num_per_class 8 \
      --out grid.png [--npz samples.npz] [--step N] [--steps T] [--v_exponent 0.3] [--seed 0]

The grid has one panel per guidance strength w, one row per class. The .npz holds `images`
(uint8 N×H×W×C), `labels` (int N) and `w` (float N) for scoring by other tools.
"""
import io

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from etils import epath

from cfdg_jax import checkpointing
from cfdg_jax import images
from cfdg_jax import runtime
from cfdg_jax import sampler
from cfdg_jax import sharding
from cfdg_jax import unet

flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
flags.DEFINE_list("guidance", ["0", "1", "3"], "Guidance strengths w (paper convention; s = 1 + w).")
flags.DEFINE_integer("num_per_class", 8, "Samples per class and per w.")
flags.DEFINE_integer("steps", None, "Sampling steps T (default: the config's sample.num_steps).")
flags.DEFINE_float("v_exponent", None, "Variance exponent v of Algorithm 2 (default: the "
                   "config's sample.v). Not --v: absl reserves that for log verbosity.")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same images.")
flags.DEFINE_string("out", None, "PNG grid to write (default: <workdir>/sample_<step>.png).")
flags.DEFINE_string("npz", None, "Optional .npz of the samples, labels and w.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def parse_guidance(values: list[str]) -> tuple[float, ...]:
  try:
    return tuple(float(w) for w in values)
  except ValueError as e:
    raise app.UsageError(f"--guidance takes comma-separated numbers, e.g. 0,1,3; got {values}.") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  guidance = parse_guidance(FLAGS.guidance)
  if FLAGS.num_per_class < 1:
    raise app.UsageError("--num_per_class must be at least 1.")
  if FLAGS.steps is not None and FLAGS.steps < 2:
    raise app.UsageError("--steps must be at least 2.")
  runtime.initialize()
  mesh = sharding.create_mesh()
  try:
    config, step, params, params_sharding = checkpointing.load_ema_params(
        FLAGS.workdir, mesh, FLAGS.step)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  model = unet.create_model(config)
  num_steps = FLAGS.steps or config.sample.num_steps
  v = config.sample.v if FLAGS.v_exponent is None else FLAGS.v_exponent
  sample_fn = sampler.make_sample_fn(model, config, mesh, params_sharding,
                                     num_steps=num_steps, v=v)
  labels, w, ids = sampler.class_sweep(config.data.num_classes, FLAGS.num_per_class, guidance)
  logging.info("Sampling %d images from step %d (T = %d, v = %g, w = %s).", labels.size, step,
               num_steps, v, FLAGS.guidance)
  samples = sampler.generate(sample_fn, params, jax.random.key(FLAGS.seed), labels, w, mesh, ids)

  if jax.process_index() == 0:
    out = FLAGS.out or str(epath.Path(FLAGS.workdir) / f"sample_{step}.png")
    images.write_sample_grid(out, samples, config.data.num_classes, guidance,
                             FLAGS.num_per_class)
    logging.info("Wrote %s.", out)
    if FLAGS.npz:
      buffer = io.BytesIO()
      np.savez(buffer, images=samples, labels=labels, w=w)
      epath.Path(FLAGS.npz).write_bytes(buffer.getvalue())
      logging.info("Wrote %s (%d images).", FLAGS.npz, len(samples))


if __name__ == "__main__":
  app.run(main)
