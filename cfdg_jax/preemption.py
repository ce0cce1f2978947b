"""Stop requests: all processes agree on one point at which to save a checkpoint and stop.

Cloud TPU, GKE and SLURM send SIGTERM some time before they evict a job; a person sends Ctrl-C
(SIGINT). In a multi-process run JAX's distributed runtime catches SIGTERM on whichever process
gets it and agrees, through its coordination service, on the point to stop at (the largest count
of `reached` calls any process has made, plus one); every process must ask at the same points, in
the same order. A single process catches both signals here, as does each process for Ctrl-C (passed
on to JAX as SIGTERM).

The signals are read by a thread, from the wakeup fd that Python's C-level handler writes at once,
so that they act while the main thread is inside XLA (compiling, or waiting in a step): a request
before the first `reached` call (start-up, the first compilation: nothing to save yet) and a second
request (e.g. Ctrl-C twice) end the process at once with one line and status 128 + the signal.
"""
import os
import signal
import sys
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


def _name(signum: int) -> str:
  return signal.Signals(signum).name


def _stop_now(signum: int, why: str) -> None:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(f"error: {_name(signum)} {why}: stopped at once. The checkpoints committed "
                   "before are intact; run the same command again to resume from the newest.\n")
  sys.stderr.flush()
  os._exit(128 + signum)  # pylint: disable=protected-access  (the main thread may be in XLA)


class Watcher:
  """`watcher.reached()` is True, on every process at the same call, once a stop was requested.

  Use as a context manager around the whole run (start-up included): the handlers are put back on
  exit. Call `reached()` once a step, and at points inside long sections (a sample grid) that can
  be abandoned; the first call marks the point from which a request saves instead of stopping.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self.signal = None  # The signal that asked to stop (on this process), e.g. "SIGINT".
    self._calls = 0
    self._lock = threading.Lock()
    self._previous, self._pipe, self._wakeup = {}, None, None

  def __enter__(self) -> "Watcher":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Not on the main thread: SIGTERM and Ctrl-C will not save a checkpoint.")
      return self
    self._pipe = os.pipe()
    os.set_blocking(self._pipe[1], False)
    self._wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
    # Multi-process: JAX's own handler keeps SIGTERM, which starts the agreement.
    signums = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
    for signum in signums:  # A Python handler, so that the C handler writes the wakeup fd.
      if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of `command &` in a script
        self._previous[signum] = signal.signal(signum, lambda *_: None)
    threading.Thread(target=self._read, daemon=True, name="stop-requests").start()
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    if self._pipe is not None:
      signal.set_wakeup_fd(self._wakeup)
      os.close(self._pipe[1])  # The reader thread sees end of file and returns.
    self._previous, self._pipe = {}, None

  def _read(self) -> None:
    read_end = self._pipe[0]
    while chunk := os.read(read_end, 64):
      for signum in chunk:
        if signum in self._previous:  # Any signal with a Python handler writes the fd.
          self._on_signal(signum)
    os.close(read_end)

  def _on_signal(self, signum: int) -> None:
    with self._lock:
      if not self._calls:
        _stop_now(signum, "during start-up, before the first step")
      if self._signalled.is_set():
        _stop_now(signum, "a second time")
      self.signal = _name(signum)
      self._signalled.set()
    logging.warning("%s: saving a checkpoint after the current step, then stopping (%s again "
                    "stops at once).", self.signal, "Ctrl-C" if signum == signal.SIGINT else
                    self.signal)
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's handler: every process agrees on a step.

  def reached(self) -> bool:
    with self._lock:
      self._calls += 1
      calls = self._calls
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(calls)
    return self._signalled.is_set()
