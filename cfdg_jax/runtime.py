"""Process start-up shared by the entry points: multi-process JAX and a quiet TensorFlow."""
import jax
import tensorflow as tf
from absl import flags
from absl import logging

flags.DEFINE_bool("distributed", False,
                  "Join a multi-process run with jax.distributed.initialize(). On TPU pods and "
                  "SLURM/Open MPI GPU clusters the cluster is detected; elsewhere pass the three "
                  "flags below.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")

FLAGS = flags.FLAGS


def initialize() -> None:
  """Call first in main(): before anything touches a JAX device."""
  # tf.data only runs the input pipeline; keep TensorFlow off the accelerators JAX uses.
  tf.config.set_visible_devices([], "GPU")
  if FLAGS.distributed:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # Process 0 alone logs progress and metrics.
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
