"""Process start-up shared by the entry points: multi-process JAX, a quiet TensorFlow, and
`run`, which ends a user's mistake in one line instead of a traceback."""
import functools
import logging as std_logging
import math
import os
import re
import sys
import traceback
from typing import Any, Callable

import jax
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging
from ml_collections.config_flags import config_flags  # is_config_flag, ConfigFileFlagParser

from cfdg_jax import validation
from cfdg_jax import errors

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

flags.DEFINE_bool("traceback", False, "Also print the Python traceback of a user error (a bad "
                  "config field, flag, path or checkpoint); by default its message alone is the "
                  "last line. Other errors always print theirs.")

FLAGS = flags.FLAGS


MAX_CPU_DEVICES = 8


def cpu_devices() -> int | None:
  """XLA CPU devices for a single-process run: one per core (a power of two, at most
  MAX_CPU_DEVICES), unless XLA_FLAGS or JAX_NUM_CPU_DEVICES set the count (then None).

  One XLA CPU device does not keep several cores busy on networks of this size; with one per
  core, the data-parallel mesh splits each batch over them (README: 1.13× faster training and
  1.64× faster sampling on 2 cores). More than 8 would leave each too small a share of a batch.
  """
  if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
      or "JAX_NUM_CPU_DEVICES" in os.environ):
    return None
  cores = min(len(os.sched_getaffinity(0)), MAX_CPU_DEVICES)
  return 2 ** int(math.log2(max(cores, 1)))


def cpu_when_no_accelerator() -> None:
  """On a machine with no TPU chip and no GPU, use the CPU backend directly: with libtpu or the
  CUDA plugin installed (for AOT compilation), JAX would first try their runtimes, slower and
  noisier. JAX_PLATFORMS, when set, decides instead."""
  from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
  if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
      or hardware_utils.num_available_tpu_chips_and_device_id()[0]
      or hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus()):
    return
  jax.config.update("jax_platforms", "cpu")


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's INFO lines (~15 a checkpoint) unless --verbosity >= 1; warnings stay."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or logging.get_verbosity() >= 1
            or f"{os.sep}orbax{os.sep}" not in record.pathname)


def initialize() -> None:
  """Call first in main(): before anything touches a JAX device."""
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # tf.data only runs the input pipeline; keep TensorFlow off the accelerators JAX uses.
  tf.config.set_visible_devices([], "GPU")
  cpu_when_no_accelerator()
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id go together "
                         f"(got {explicit}); or pass --distributed on a cluster JAX detects.")
  distributed = FLAGS.distributed or FLAGS.coordinator_address is not None
  if not distributed and (count := cpu_devices()):
    # Only the CPU backend reads it: on a GPU or TPU the accelerators still do the work.
    jax.config.update("jax_num_cpu_devices", count)
  if distributed:
    # Collectives between processes' CPU devices (local runs, host-side arrays on pods).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*explicit, local_device_ids=FLAGS.local_device_ids and [
        int(i) for i in FLAGS.local_device_ids])
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # Process 0 alone logs progress and metrics.
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)`, but a user's mistake (UserError, app.UsageError, a bad or unknown flag) or a
  JobError prints `error: <message>` last on stderr and exits with status 1; --traceback prints
  the traceback before it. Any other exception is a bug and keeps its traceback."""
  if main.__module__ != "__main__":  # A console script (pyproject.toml), e.g. cfdg-train:
    # --help and --helpshort then show that module's doc and flags, as `python -m` does.
    sys.modules["__main__"].__doc__ = sys.modules[main.__module__].__doc__
    sys.argv[0] = main.__module__
  app.run(functools.partial(_run_main, main), flags_parser=_parse_flags)


def _run_main(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  try:
    return main(argv)
  except (errors.UserError, errors.JobError, app.UsageError) as e:
    _exit_with_error(str(e), FLAGS.traceback)
  except KeyboardInterrupt:  # Ctrl-C outside training (which saves first: preemption.py).
    _exit_with_error("Interrupted (Ctrl-C).", FLAGS.traceback, status=130)


def _exit_with_error(message: str, show_traceback: bool, status: int = 1) -> None:
  if show_traceback:
    traceback.print_exc()
  sys.stdout.flush()
  sys.stderr.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  # Not sys.exit: at exit, Orbax's and asyncio's failed background writes would print their
  # own tracebacks after the message.
  os._exit(status)  # pylint: disable=protected-access


def _parse_flags(argv: list[str]) -> list[str]:
  """FLAGS(argv), with the config flags' mistakes said in one line."""
  show_traceback = "--traceback" in argv
  try:
    for name, path in _config_files(argv).items():
      if not os.path.isfile(path.split(":", 1)[0]):
        raise errors.UserError(f"--{name}={path}: no such config file; pass one of configs/*.py.")
    return FLAGS(argv)
  except errors.UserError as e:
    _exit_with_error(str(e), show_traceback)
  except flags.Error as e:  # A bad value, e.g. --config.batch_size=abc, or a missing flag.
    _exit_with_error(f"{e}{_field_type(argv, str(e))} (--helpshort lists the flags)",
                     show_traceback)
  except (AttributeError, KeyError) as e:
    # ml_collections' bare AttributeError('name') for an unknown --config.<field>.
    try:
      _check_overrides(argv)
    except errors.UserError as unknown:
      _exit_with_error(str(unknown), show_traceback)
    raise e


def _config_files(argv: list[str]) -> dict[str, str]:
  """{config flag name: its file} as given in argv: --config=PATH or --config PATH."""
  names = [name for name in FLAGS if "." not in name and config_flags.is_config_flag(FLAGS[name])]
  files = {}
  for i, arg in enumerate(argv[1:], 1):
    for name in names:
      for dashes in ("--", "-"):
        if arg.startswith(f"{dashes}{name}="):
          files[name] = arg.split("=", 1)[1]
        elif arg == f"{dashes}{name}" and i + 1 < len(argv):
          files[name] = argv[i + 1]
  return files


def _field_type(argv: list[str], message: str) -> str:
  """'; config.batch_size takes a value of type int, e.g. 64' for a config override's error."""
  match = re.search(r"--(\w+)\.([\w.]+)=", message)
  path = _config_files(argv).get(match and match.group(1))
  if path is None:
    return ""
  value = config_flags.ConfigFileFlagParser(match.group(1)).parse(path)
  for key in match.group(2).split("."):
    value = value.get(key) if hasattr(value, "get") else None
  return "" if value is None else (f"; {match.group(1)}.{match.group(2)} takes a value of "
                                   f"type {type(value).__name__}, e.g. {value!r}")


def _check_overrides(argv: list[str]) -> None:
  """UserError for the first --<config flag>.<field> of argv that names no field."""
  for name, path in _config_files(argv).items():
    config = config_flags.ConfigFileFlagParser(name, lock_config=False).parse(path)
    for arg in argv[1:]:
      for dashes in ("--", "-"):
        if arg.startswith(f"{dashes}{name}."):
          validation.check_override(config, arg[len(dashes) + len(name) + 1:].split("=", 1)[0],
                                    name)
