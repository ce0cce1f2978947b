"""A hung training step becomes a failure that a launcher can restart.

A collective whose peer is gone (a stopped or lost process, a wedged interconnect) blocks inside
XLA without a timeout of its own: one two-process run waited 10 minutes in gloo's all-reduce.
Every process runs a Watchdog; the training loop ticks it once a step. When no step completes
for the timeout, the process logs the step it waits in and the Python stack of every thread,
and exits with EXIT_CODE, so that launch/local.py, SLURM or a pod's scheduler restarts the run
from its last checkpoint. The timeout is `timeout_s`, or else FACTOR times the median step so far
and at least MIN_S; it runs only between steps (not while the first step compiles, nor while a
paused section such as a sample grid runs).
"""
import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from typing import Callable, Iterator

from absl import logging

EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, worth a restart.
MIN_S, FACTOR = 600.0, 10.0


def _exit(message: str) -> None:
  logging.error(message)
  logging.flush()
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  os._exit(EXIT_CODE)  # pylint: disable=protected-access  (the main thread is blocked in XLA)


class Watchdog:
  """`with Watchdog() as dog:` ... `dog.tick(step)` after each step; `with dog.paused():`."""

  def __init__(self, timeout_s: float | None = None, *,
               on_hang: Callable[[str], None] = _exit):
    self.timeout_s, self.on_hang = timeout_s, on_hang
    self._last, self._step, self._paused = None, None, 0
    self._intervals = deque(maxlen=101)
    self._stop = threading.Event()
    self._lock = threading.RLock()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")

  def __enter__(self) -> "Watchdog":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()

  def timeout(self) -> float:
    if self.timeout_s is not None:
      return self.timeout_s
    with self._lock:
      median = statistics.median(self._intervals) if self._intervals else 0.0
    return max(MIN_S, FACTOR * median)

  def tick(self, step: int) -> None:
    """Step `step` has completed."""
    now = time.monotonic()
    with self._lock:
      if self._last is not None and not self._paused:
        self._intervals.append(now - self._last)
      self._last, self._step = now, step

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    with self._lock:
      self._paused += 1
    try:
      yield
    finally:
      with self._lock:
        self._paused -= 1
        self._last = time.monotonic()  # The next step's time starts here.

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self.timeout() / 10)):
      with self._lock:
        if self._last is None or self._paused:
          continue
        waited, timeout, step = time.monotonic() - self._last, self.timeout(), self._step
      if waited > timeout:
        self.on_hang(
            f"No training step has completed for {waited:.0f} s (timeout {timeout:.0f} s): step "
            f"{step} was the last, step {step + 1} waits (a collective whose peer is gone, or a "
            "stalled file system). The Python stacks of this process follow; exiting with "
            f"status {EXIT_CODE} so that the launcher restarts the run from its last checkpoint.")
        return
