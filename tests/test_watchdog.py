"""The watchdog: a step that does not complete within the timeout ends the process."""
import threading
import time

from cfdg_jax import watchdog


def hangs():
  """(on_hang for a Watchdog, the messages it received, an event set at the first)."""
  messages, called = [], threading.Event()
  return lambda message: messages.append(message) or called.set(), messages, called


def test_a_step_that_does_not_complete_in_time_is_reported():
  on_hang, messages, called = hangs()
  with watchdog.Watchdog(0.3, on_hang=on_hang) as dog:
    for step in range(1, 6):
      dog.tick(step)
      time.sleep(0.05)
    assert called.wait(5)
  [message] = messages
  assert message.startswith("No training step has completed for 0 s (timeout 0 s): step 5 was "
                            "the last, step 6 waits")
  assert message.endswith(f"exiting with status {watchdog.EXIT_CODE} so that the launcher "
                          "restarts the run from its last checkpoint.")


def test_nothing_is_timed_before_the_first_step_nor_while_paused():
  on_hang, messages, _ = hangs()
  with watchdog.Watchdog(0.2, on_hang=on_hang) as dog:
    time.sleep(0.6)  # Compiling the first step.
    dog.tick(1)
    with dog.paused():
      time.sleep(0.6)  # A sample grid.
    dog.tick(2)
  assert not messages


def test_the_default_timeout_is_ten_median_steps_and_at_least_min_s(monkeypatch):
  monkeypatch.setattr(watchdog, "MIN_S", 0.5)
  dog = watchdog.Watchdog(on_hang=lambda message: None)
  assert dog.timeout() == 0.5
  for step in range(4):
    dog.tick(step)
    time.sleep(0.1)
  assert 1.0 <= dog.timeout() < 1.5
  monkeypatch.setattr(watchdog, "MIN_S", 600.0)
  assert dog.timeout() == 600.0
