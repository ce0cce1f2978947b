"""What the benchmark scripts share: timing, peak memory, the JSON line."""
import json
import pathlib
import resource
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def synthetic_batches(config):
  """Endless copies of one random batch of config's shape: host {"image", "label"} arrays."""
  rng = np.random.default_rng(0)
  s, c, b = config.data.image_size, config.data.channels, config.batch_size
  batch = {"image": rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32),
           "label": rng.integers(0, config.data.num_classes, b).astype(np.int32)}
  while True:
    yield batch


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """Seconds of each of `repeats` calls of fn() (each waits for its result), after `warmup`."""
  times = []
  for i in range(warmup + repeats):
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    if i >= warmup:
      times.append(time.perf_counter() - tic)
  return times


def summary_ms(times: list[float]) -> dict[str, float]:
  """{"median", "min", "max"} of `times` (seconds) in milliseconds."""
  return {"median": 1e3 * statistics.median(times), "min": 1e3 * min(times),
          "max": 1e3 * max(times)}


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the device's peak memory in use where the backend counts it (GPU, TPU),
  else this process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_memory_stats"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"


def dense_attention(config):
  """A copy of `config` whose attention is XLA's dense formulation: the model's FLOPs.

  XLA's cost analysis counts a loop's body once, so the blockwise attention's loop over query
  blocks would be undercounted; the same function computed densely is counted in full.
  """
  config = config.copy_and_resolve_references()
  config.model.attention = "xla"
  return config


def train_step_flops(config, mesh, state, batch, rng) -> float:
  """The model's FLOPs of one train step of `config` (dense attention), all devices together."""
  # pylint: disable=import-outside-toplevel  (the package is on sys.path once a script runs)
  from cfdg_jax import costs
  from cfdg_jax import job as job_lib
  from cfdg_jax import trainer
  job = job_lib.create_job(dense_attention(config), mesh)
  return costs.lowered_flops(trainer.make_train_step(job).lower(state, batch, rng))


def emit(report: dict, out: str | None) -> None:
  """Prints `report` as one JSON line, and writes it to `out` too when given."""
  line = json.dumps(report)
  print(line, flush=True)
  if out:
    pathlib.Path(out).write_text(line + "\n")
