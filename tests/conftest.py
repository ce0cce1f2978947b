"""Shared test setup.

Two virtual CPU devices let the tests exercise the sharded (data-parallel) code paths on a laptop;
the flag must be set before JAX initialises its backend.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # The tests are CPU tests, libtpu installed or not.

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data (MNIST, Fashion-MNIST, FID Inception); skipped only outside CI when absent."""
  if not SHARED_DATA.is_dir():
    if os.environ.get("CI"):
      pytest.fail(f"{SHARED_DATA} is missing; CI must run with ../shared beside the checkout.")
    pytest.skip(f"{SHARED_DATA} is absent: these tests need the offline data files.")
  return SHARED_DATA


def _needs(module: str, requirements: str) -> None:
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec(module) is None:
    if os.environ.get("CI"):
      pytest.fail(f"{module} is missing; CI installs {requirements}.")
    pytest.skip(f"{module} is not installed (pip install -r {requirements}).")


@pytest.fixture(scope="session")
def libtpu() -> None:
  """XLA's TPU compiler, for AOT compilation; skipped only outside CI."""
  _needs("libtpu", "requirements-tpu.txt")


@pytest.fixture(scope="session")
def cuda_plugin() -> None:
  """XLA's GPU compiler (the CUDA plugin), for AOT compilation; skipped only outside CI."""
  _needs("jax_plugins.xla_cuda12", "requirements-gpu-aot.txt")


@pytest.fixture
def info_log(caplog):
  """caplog, with Python's and absl's logging at INFO (whatever an earlier test left them at)."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  caplog.set_level("INFO")
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  yield caplog
  absl_logging.set_verbosity(verbosity)
