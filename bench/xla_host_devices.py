"""Training and sampling speed on a CPU with one XLA device against one XLA device per core.

  python bench/xla_host_devices.py [--config configs/digits.py] [--out bench/results.json]

XLA fixes its CPU device count (--xla_force_host_platform_device_count) when it starts, so each
count is measured in a fresh process: jitted train steps (the trainer's step at config.batch_size,
on a fixed random batch) and guided sampler calls (--sample_batch images at T = --sample_steps,
the evaluator's batch), each timed after a compiling warm-up call, the best of --repeats. Prints
one JSON object (and writes it to --out): the figures per device count and their ratios against
one device. Run it on an otherwise idle machine: other load skews the ratios.
"""
import argparse
import json
import os
import pathlib
import runpy
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def measure(config_path: str, train_steps: int, sample_batch: int, sample_steps: int,
            repeats: int) -> dict:
  """Runs in the worker process, after XLA_FLAGS is set; returns its figures."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  # pylint: disable=import-outside-toplevel
  from cfdg_jax import job as job_lib
  from cfdg_jax import pipeline, sharding, trainer

  config = runpy.run_path(config_path)["get_config"]()
  mesh = sharding.create_mesh(config.mesh)
  job = job_lib.create_job(config, mesh)
  state = job.init_state(jax.random.key(0))
  step_fn = trainer.make_train_step(job)
  size, channels, classes = config.data.image_size, config.data.channels, config.data.num_classes
  rng = np.random.default_rng(0)
  batch = sharding.shard_batch(
      {"image": rng.uniform(-1, 1, (config.batch_size, size, size, channels)).astype(np.float32),
       "label": rng.integers(0, classes, config.batch_size).astype(np.int32)}, mesh)

  def best_seconds(fn):
    fn()  # Compiles.
    times = []
    for _ in range(repeats):
      tic = time.perf_counter()
      fn()
      times.append(time.perf_counter() - tic)
    return min(times)

  def train():
    nonlocal state
    for _ in range(train_steps):
      state, _ = step_fn(state, batch, jax.random.key(1))
    jax.block_until_ready(state)

  pipe = pipeline.Pipeline(pipeline.Network(job.model, config, job.state_sharding.ema_params),
                           None, mesh)
  labels = np.arange(sample_batch) % classes

  def sample():
    pipe.params = state.ema_params  # The newest: each train step donates the previous state.
    pipe.sample(labels, 1.0, num_steps=sample_steps, seed=2)
  train_seconds, sample_seconds = best_seconds(train), best_seconds(sample)
  return {"devices": jax.device_count(), "train_steps_per_s": train_steps / train_seconds,
          "sample_image_steps_per_s": sample_batch * sample_steps / sample_seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(REPO / "configs" / "digits.py"))
  parser.add_argument("--device_counts", default=f"1,{os.cpu_count()}",
                      help="XLA CPU device counts to compare; the first is the baseline.")
  parser.add_argument("--train_steps", type=int, default=50, help="Train steps per timing.")
  parser.add_argument("--sample_batch", type=int, default=512)
  parser.add_argument("--sample_steps", type=int, default=16, help="Sampler steps T.")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", help="Also write the JSON here.")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  figures = (args.config, args.train_steps, args.sample_batch, args.sample_steps, args.repeats)
  if args.worker:
    print(json.dumps(measure(*figures)))
    return

  counts = [int(n) for n in args.device_counts.split(",")]
  if any(n < 1 for n in counts) or any(args.sample_batch % n for n in counts):
    parser.error(f"--device_counts={args.device_counts} must be positive and divide "
                 f"--sample_batch={args.sample_batch}.")
  results = []
  for n in counts:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env,
                         check=True, capture_output=True, text=True).stdout
    results.append(json.loads(out.strip().splitlines()[-1]))
  base = results[0]
  report = {
      "config": os.path.relpath(args.config, REPO), "cpu_count": os.cpu_count(),
      "train_steps": args.train_steps, "sample_batch": args.sample_batch,
      "sample_steps": args.sample_steps, "repeats": args.repeats, "results": results,
      "ratios_vs_first": [{"devices": r["devices"], **{
          k: r[k] / base[k] for k in ("train_steps_per_s", "sample_image_steps_per_s")}}
                          for r in results]}
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
