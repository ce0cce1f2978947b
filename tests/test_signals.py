"""Signals to one training process: Ctrl-C saves and stops, every time; a signal during start-up,
or a second one, stops at once with one line; SIGTERM abandons a sample grid and saves first."""
import os
import re
import signal
import sys
import time

import pytest

from cfdg_jax import preemption
from test_resume import Run, checkpoint_steps, train_flags

TRAIN = [sys.executable, "-m", "cfdg_jax.train"]


def wait_for_line(run, pattern, timeout=600):
  deadline = time.monotonic() + timeout
  while not re.search(pattern, "".join(run.lines)):
    assert run.process.poll() is None and time.monotonic() < deadline, "".join(run.lines)[-4000:]
    time.sleep(0.01)


def assert_stopped_at_once(run, signum, why):
  code, output = run.finish()
  assert code == 128 + signum and "Traceback" not in output, output[-4000:]
  assert output.strip().splitlines()[-1] == (
      f"error: {signal.Signals(signum).name} {why}: stopped at once. The checkpoints committed "
      "before are intact; run the same command again to resume from the newest."), output[-4000:]


@pytest.mark.slow
def test_ctrl_c_saves_a_signal_in_start_up_or_a_second_one_stops_at_once_and_a_grid_gives_way(
    tmp_path):
  workdir = tmp_path / "run"
  command = [*TRAIN, *train_flags(tmp_path, workdir)]

  # Ctrl-C once: a checkpoint of the next step, exit 0 (JAX's gc callback used to swallow it).
  run = Run(command)
  run.wait_for_step(3)
  run.process.send_signal(signal.SIGINT)
  code, output = run.finish()
  saved = max(checkpoint_steps(workdir))
  assert code == 0 and re.search(
      rf"Stopped on request \(SIGINT\): the checkpoint of step {saved} is committed", output), (
          output[-4000:])

  # During start-up (here: before the first step compiles) there is nothing to save yet.
  run = Run(command)
  wait_for_line(run, rf"Resuming from step {saved}\b")
  run.process.send_signal(signal.SIGINT)
  assert_stopped_at_once(run, signal.SIGINT, "during start-up, before the first step")
  assert max(checkpoint_steps(workdir)) == saved

  # A preemption notice while the sample grid of step 8 is drawn (a long one: 240 images in 30
  # calls): the grid is abandoned and step 8, no checkpoint step, is saved at once.
  grid = ["--config.sample_every=8", "--config.sample.num_per_class=8",
          "--config.sample.batch_size=8", "--config.sample.sampler.num_steps=100"]
  run = Run([*command, *grid])
  run.wait_for_step(8)
  run.process.send_signal(signal.SIGTERM)
  code, output = run.finish()
  assert code == 0 and re.search(r"The sample grid of step 8 was abandoned after \d+ of 240 "
                                 r"images", output), output[-4000:]
  assert "Stopped on request (SIGTERM): the checkpoint of step 8 is committed" in output
  assert max(checkpoint_steps(workdir)) == 8 and not (workdir / "samples_00000008.png").exists()

  # Ctrl-C twice: at once, without a traceback; the committed checkpoints stay.
  run = Run(command)
  run.wait_for_step(10)
  run.process.send_signal(signal.SIGINT)
  time.sleep(0.3)  # Two signals sent at once may arrive as one (POSIX does not queue them).
  run.process.send_signal(signal.SIGINT)
  assert_stopped_at_once(run, signal.SIGINT, "a second time")
  assert 8 in checkpoint_steps(workdir)


def test_a_stop_request_is_seen_at_the_next_call_and_other_signals_are_none():
  with preemption.Watcher() as watcher:
    assert not watcher.reached()  # From here on a request saves instead of stopping.
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # Some library's handler.
    try:
      os.kill(os.getpid(), signal.SIGUSR1)
      time.sleep(0.5)
      assert not watcher.reached()
    finally:
      signal.signal(signal.SIGUSR1, previous)
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 10
    while not watcher.reached():
      assert time.monotonic() < deadline
      time.sleep(0.01)
    assert watcher.signal == "SIGINT"
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
