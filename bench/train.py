"""Training throughput of a config's real train step, with XLA's FLOP count and the MFU.

  python bench/train.py --config configs/mnist.py [--config.batch_size=64 ...] \
      [--data synthetic|real] [--steps 20] [--out train.json]

Builds the job and train step that training uses (job.create_job, trainer.make_train_step),
compiles it once, runs --warmup steps, then times --steps steps one by one (each waits for its
result), and prints ONE JSON line: images_per_s, step_ms (median, min, max), compile_s,
flops_per_step (XLA's cost analysis of the step, all devices, with attention computed densely:
the model's FLOPs, whatever config.model.attention computes them with), achieved_flops, mfu
against bench/peak.py's 3×3-convolution peak of the model's dtype measured in the same run
(`mfu_peak` names it), peak_memory_bytes (the device's memory stats, else the process's peak
RSS: `peak_memory_source`), device, dtype, batch, params. Every timed step puts its batch on the
devices, as training does: with --data synthetic the same host batch each time, with --data real
the next one from the config's input pipeline (reading and decoding ahead in threads), so equal
step times with synthetic and real data mean that the pipeline keeps up.
"""
import pathlib
import statistics
import sys
import time

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # bench/*.py, and the package from any cwd.
import common  # noqa: E402  (bench/common.py)
import peak  # noqa: E402  (bench/peak.py)

from cfdg_jax import input_pipeline  # noqa: E402
from cfdg_jax import job as job_lib  # noqa: E402
from cfdg_jax import runtime  # noqa: E402
from cfdg_jax import sharding  # noqa: E402
from cfdg_jax import trainer  # noqa: E402
from cfdg_jax import validation  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_enum("data", "synthetic", ["synthetic", "real"], "Batches: one random batch, or the "
                  "config's data set through the input pipeline.")
flags.DEFINE_integer("steps", 20, "Timed steps.", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", lower_bound=0)
flags.DEFINE_float("peak_scale", 1.0, "bench/peak.py's --scale (a quick run: 0.02).")
flags.DEFINE_integer("peak_batch", 16, "bench/peak.py's --batch.", lower_bound=1)
flags.DEFINE_string("out", None, "Also write the JSON line here.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def run(config, data: str, steps: int, warmup: int, peak_scale: float, peak_batch: int) -> dict:
  """The measurement of `config`'s train step (see the module docstring)."""
  validation.check_config(config)
  mesh = sharding.create_mesh(config.mesh)
  job = job_lib.create_job(config, mesh)
  state = job.init_state(jax.random.key(config.seed))
  batches = (input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed)
             if data == "real" else common.synthetic_batches(config))
  rng = jax.random.key(0)
  batch = sharding.shard_batch(next(batches), mesh)

  tic = time.perf_counter()
  compiled = trainer.make_train_step(job).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - tic
  flops_per_step = common.train_step_flops(config, mesh, state, batch, rng)

  times = []
  for i in range(warmup + steps):
    tic = time.perf_counter()
    batch = sharding.shard_batch(next(batches), mesh)  # Host to devices, as in training.
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - tic)

  dtype = config.model.dtype
  peak_report = peak.report([dtype], peak_batch, repeats=5, scale=peak_scale)
  ceiling = peak_report["peak"][f"conv3x3_{dtype}"]
  median = statistics.median(times)
  memory, memory_source = common.peak_memory()
  return {
      "images_per_s": config.batch_size / median,
      "step_ms": common.summary_ms(times),
      "compile_s": compile_s, "flops_per_step": flops_per_step,
      "achieved_flops": flops_per_step / median, "mfu": flops_per_step / median / ceiling,
      "mfu_peak": f"bench/peak.py conv3x3_{dtype}: {ceiling:.4g} FLOP/s",
      "peak_memory_bytes": memory, "peak_memory_source": memory_source,
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "dtype": dtype,
      "batch": config.batch_size, "data": data, "steps": steps,
      "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "final_loss": float(metrics["loss"])}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common.emit(run(FLAGS.config, FLAGS.data, FLAGS.steps, FLAGS.warmup, FLAGS.peak_scale,
                   FLAGS.peak_batch), FLAGS.out)


if __name__ == "__main__":
  runtime.run(main)
