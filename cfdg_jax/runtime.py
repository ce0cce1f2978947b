"""Process start-up shared by the entry points: multi-process JAX and a quiet TensorFlow."""
import jax
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

flags.DEFINE_bool("distributed", False,
                  "Join a multi-process run with jax.distributed.initialize(), the cluster "
                  "detected by JAX (Cloud TPU pods, SLURM, Open MPI). Elsewhere pass the three "
                  "flags below instead (launch/local.py does).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordination service "
                    "(joins a multi-process run).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")

flags.DEFINE_list("local_device_ids", None, "The accelerators this process drives, e.g. 0,1,2,3 "
                  "(default: JAX's choice: under SLURM one GPU per process, else all).")

FLAGS = flags.FLAGS


def initialize() -> None:
  """Call first in main(): before anything touches a JAX device."""
  # tf.data only runs the input pipeline; keep TensorFlow off the accelerators JAX uses.
  tf.config.set_visible_devices([], "GPU")
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id go together "
                         f"(got {explicit}); or pass --distributed on a cluster JAX detects.")
  if FLAGS.distributed or FLAGS.coordinator_address is not None:
    # Collectives between processes' CPU devices (local runs, host-side arrays on pods).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*explicit, local_device_ids=FLAGS.local_device_ids and [
        int(i) for i in FLAGS.local_device_ids])
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # Process 0 alone logs progress and metrics.
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
