"""The Python API's arguments: the wrong kind is a UserError in the API's own terms (no CLI
flags), before anything is compiled; a likely mistake is one warning line."""
import jax
import numpy as np
import pytest

from cfdg_jax import checkpointing
from cfdg_jax import job as job_lib
from cfdg_jax import pipeline
from cfdg_jax import sharding
from cfdg_jax.errors import UserError
from test_train import count_compiles, tiny_config


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  """A pipeline of the tiny digits model, without weights (nothing here gets to sample)."""
  config = tiny_config(str(tmp_path_factory.mktemp("tfds")))
  job = job_lib.create_job(config, sharding.create_mesh(config.mesh))
  return pipeline.Pipeline(pipeline.Network(job.model, config, job.state_sharding.ema_params),
                           None, job.mesh)


@pytest.mark.parametrize("arguments, message", [
    ({"seed": "abc"}, r"^seed='abc': give an int or a jax.random key\.$"),
    ({"seed": 1.5}, r"^seed=1.5: "),
    ({"batch_size": 0}, r"^batch_size=0: give a positive int \(images per call\), or None for "
     r"all at once\.$"),
    ({"batch_size": -1}, r"^batch_size=-1: "),
    ({"batch_size": "8"}, r"^batch_size='8': "),
    ({"guide": "x"}, r"^guide='x': give a Pipeline, e.g. cfdg_jax.load\(workdir, step=N\), or "
     r"None\.$"),
])
def test_arguments_of_the_wrong_kind(pipe, arguments, message):
  with count_compiles() as compiles, pytest.raises(UserError, match=message) as error:
    pipe.sample([1, 2], **arguments)
  assert "--" not in str(error.value)  # Not a CLI flag.
  assert not compiles


@pytest.fixture
def keys_drawn(monkeypatch):
  """The sampler replaced by one that records its key and returns blank images."""
  keys = []
  monkeypatch.setattr(pipeline.Pipeline, "sample_fn", lambda *a: None)
  monkeypatch.setattr(pipeline, "generate", lambda fn, params, rng, labels, *a: keys.append(
      rng) or (np.zeros((len(labels), 8, 8, 1), np.uint8), {"network_calls": 0, "examples": 0}))
  return keys


@pytest.mark.parametrize("arguments, warning", [
    ({"w": 1e30}, "w = 1e+30: guidance beyond 100 saturates the images"),
    ({"w": [0.0, -500.0]}, "w = 500: guidance beyond 100"),
    ({"num_steps": 100_000_000}, "100000000 steps per image is far beyond"),
])
def test_likely_mistakes_warn_and_go_on(pipe, arguments, warning, info_log, keys_drawn):
  assert pipe.sample([1, 2], **arguments).shape == (2, 8, 8, 1)
  assert warning in info_log.text
  pipe.sample([1, 2], w=4.0)
  assert info_log.text.count("WARNING") == 1


def test_load_takes_a_step_as_an_int(tmp_path):
  (tmp_path / "checkpoints" / "3000").mkdir(parents=True)
  with pytest.raises(UserError, match=r"^step='3000': give a checkpoint's step as an int "
                     r"\(available: \[3000\]\), or None for the newest\.$"):
    pipeline.load(str(tmp_path), step="3000")
  with pytest.raises(UserError, match=r"^step=5: no such checkpoint in .*; available: \[3000\]"):
    pipeline.load(str(tmp_path), step=5)
  with pytest.raises(UserError, match=r"give the workdir of a training run\.$"):
    pipeline.load(str(tmp_path / "nothing"))
  assert checkpointing.create_manager(str(tmp_path), read_only=True).all_steps() == [3000]


def test_a_jax_key_and_numpy_ints_are_seeds(pipe, keys_drawn):
  pipe.sample([1, 2], seed=np.int64(7))
  pipe.sample([1, 2], seed=jax.random.key(7))
  assert jax.random.key_data(keys_drawn[0]).tolist() == jax.random.key_data(
      keys_drawn[1]).tolist()
