"""What a checkpoint's checksums cost beside the save and the restore they guard.

  python bench/checkpoint.py --config configs/imagenet64.py [--repeats 3] [--out ckpt.json]

Builds the config's train state (random values, the shapes, dtypes and shardings of
job.create_job's state on this host's devices and the config's mesh), then times, each after a
warm-up: the checksums of the arrays a step saves (cfdg_jax/checksums.py: train_state and
ema_params), a save of the step to a temporary directory until committed (checkpointing.save,
which computes them), and a restore (checkpointing.restore_train_state, which verifies them). Prints
ONE JSON line with the seconds of each (median; the checksums' first call, which compiles them,
apart), the state's bytes, and the checksums' share of the save and of the restore.
"""
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # bench/*.py, and the package from any cwd.
import common  # noqa: E402  (bench/common.py)

from cfdg_jax import checkpointing  # noqa: E402
from cfdg_jax import checksums  # noqa: E402
from cfdg_jax import job as job_lib  # noqa: E402
from cfdg_jax import sharding  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=False)
flags.DEFINE_integer("repeats", 3, "Timed repetitions of each operation (after one warm-up).")
flags.DEFINE_string("out", None, "Also write the JSON line to this file.")
FLAGS = flags.FLAGS


def random_state(abstract_state):
  """Random arrays laid out like `abstract_state` (integers: zeros), drawn on the host: one
  program over every leaf of a large model takes minutes to compile on a CPU."""
  rng = np.random.default_rng(0)

  def fill(x):
    value = (rng.random(x.shape, np.float32) if np.issubdtype(x.dtype, np.floating)
             else np.zeros(x.shape))
    return jax.device_put(value.astype(x.dtype), x.sharding)
  return jax.tree.map(fill, abstract_state)


def seconds(fn, repeats: int) -> tuple[float, float]:
  """(the first call's seconds, the median of the `repeats` calls after it)."""
  times = []
  for _ in range(repeats + 1):
    tic = time.perf_counter()
    fn()
    times.append(time.perf_counter() - tic)
  return times[0], statistics.median(times[1:])


def time_saves(manager, job, config) -> dict:
  """Seconds of the checksums of a random state and of saving it (the state freed after)."""
  state = random_state(job.abstract_state)
  train_state = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
  first_s, checksum_s = seconds(lambda: (checksums.compute(train_state),  # As save does.
                                         checksums.compute(state.ema_params)), FLAGS.repeats)
  step = iter(range(1, 10**6))

  def save():
    checkpointing.save(manager, next(step), state, config, force=True)
    checkpointing.wait_until_finished(manager)
  _, save_s = seconds(save, FLAGS.repeats)
  return {"state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
          "checksum_first_call_s": first_s, "checksum_s": checksum_s, "save_s": save_s}


def main(argv) -> None:
  del argv
  config = FLAGS.config
  job = job_lib.create_job(config, sharding.job_mesh(config.mesh))
  with tempfile.TemporaryDirectory() as tmp:
    manager = checkpointing.create_manager(tmp, keep=1)
    report = time_saves(manager, job, config)
    _, restore_s = seconds(lambda: jax.block_until_ready(checkpointing.restore_train_state(
        manager, manager.latest_step(), job.abstract_state)), FLAGS.repeats)
  common.emit({"config": pathlib.Path(FLAGS["config"].config_filename).name,
               "devices": jax.device_count(), "mesh": dict(job.mesh.shape), **report,
               "restore_s": restore_s,
               "checksum_share_of_save": report["checksum_s"] / report["save_s"],
               "checksum_share_of_restore": report["checksum_s"] / restore_s}, FLAGS.out)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
