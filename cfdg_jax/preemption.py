"""Preemption: all processes agree on one step at which to save a checkpoint and stop.

Cloud TPU, GKE and SLURM send SIGTERM some time before they evict a job. In a multi-process run
JAX's distributed runtime catches it on whichever process gets it and agrees, through its
coordination service, on the step to stop at (the largest step any process has reached, plus
one); `multihost_utils.reached_preemption_sync_point` must then be asked at every step. A single
process catches SIGTERM here.
"""
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Watcher:
  """`watcher.reached(step)` is True at the step where every process should save and stop.

  Use as a context manager: a single process's SIGTERM handler is put back on exit.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None

  def __enter__(self) -> "Watcher":
    if jax.process_count() == 1:
      if threading.current_thread() is threading.main_thread():
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      else:  # Python lets only the main thread set handlers.
        logging.warning("Not on the main thread: SIGTERM will not save a checkpoint.")
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled.set()

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()
