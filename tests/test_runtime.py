"""Process start-up shared by the entry points (cfdg_jax/runtime.py)."""
import logging as std_logging
import os

from absl import logging

from cfdg_jax import runtime


def test_orbax_info_lines_are_dropped_unless_verbose():
  quiet = runtime._QuietOrbax()  # pylint: disable=protected-access
  orbax = os.path.join(os.sep, "venv", "site-packages", "orbax", "checkpoint", "atomicity.py")
  ours = os.path.join(os.sep, "repo", "cfdg_jax", "trainer.py")
  line = lambda level, path: std_logging.LogRecord("absl", level, path, 1, "text", None, None)
  assert not quiet.filter(line(std_logging.INFO, orbax))
  assert quiet.filter(line(std_logging.WARNING, orbax)) and quiet.filter(line(std_logging.INFO, ours))
  verbosity = logging.get_verbosity()
  try:
    logging.set_verbosity(1)  # --verbosity=1
    assert quiet.filter(line(std_logging.INFO, orbax))
  finally:
    logging.set_verbosity(verbosity)
