"""Tests for the evaluation classifier: training, saving, loading, the cache and input checks."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfdg_jax import input_pipeline
from cfdg_jax.errors import UserError
from cfdg_jax.eval import classifier

_CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py"
# Enough for >= 90% test accuracy in seconds; the default (1,172 steps) reaches ~97%.
_TEST_STEPS = 250


def _digits_data_config(data_dir):
  spec = importlib.util.spec_from_file_location("digits_config", _CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config().data
  config.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  # A private TFDS data dir keeps the user's ~/tensorflow_datasets untouched.
  return _digits_data_config(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def trained(data_config, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("classifier")
  metadata = classifier.train(data_config, str(out_dir), num_steps=_TEST_STEPS, seed=0)
  return out_dir, metadata


@pytest.fixture(scope="module")
def digits_test_split(data_config):
  source = input_pipeline.get_builder(data_config).as_data_source(split="test")
  examples = [source[i] for i in range(len(source))]
  return {"image": np.stack([e["image"] for e in examples]),
          "label": np.array([e["label"] for e in examples])}


def test_classifier_outputs_and_variables():
  model = classifier.Classifier(num_classes=7, width=32)
  for size, channels in ((8, 1), (28, 1), (32, 3)):
    x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert set(variables) == {"params"}  # No batch statistics.
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out["features"].shape == (2, classifier.FEATURE_DIM)
    assert out["logits"].shape == (2, 7)
    assert out["features"].dtype == out["logits"].dtype == jnp.float32


def test_architecture_per_image_size():
  assert classifier.level_sizes(8) == [8, 4]
  assert classifier.level_sizes(28) == [28, 14, 7]
  assert classifier.level_sizes(32) == [32, 16, 8, 4]
  assert classifier.level_channels(8, 64) == [64, 64]
  assert classifier.level_channels(28, 64) == [16, 32, 64]
  assert classifier.level_channels(32, 8) == [8, 8, 8, 8]
  # Receptive fields 11, 23 + 8 and 47 pixels: each covers its image.
  assert classifier.level_depths(8) == [2, 2]
  assert classifier.level_depths(28) == [2, 2, 3]
  assert classifier.level_depths(32) == [2, 2, 2, 2]


def test_random_shift_moves_each_image_within_bounds():
  images = np.full((64, 8, 8, 1), -1.0, np.float32)
  images[:, 4, 3] = 1.0  # One bright pixel away from the border.
  shifted = np.asarray(classifier._random_shift(jax.random.key(0), jnp.asarray(images), 1))
  offsets = set()
  for image in shifted:
    (y,), (x,) = np.nonzero(image[..., 0] == 1.0)
    assert abs(y - 4) <= 1 and abs(x - 3) <= 1
    offsets.add((y - 4, x - 3))
  assert len(offsets) == 9  # Every shift in [-1, 1]^2 occurs among 64 draws.


@pytest.mark.slow
def test_train_metadata_reload_and_accuracy(trained, digits_test_split):
  out_dir, metadata = trained
  assert metadata == json.loads((out_dir / classifier.METADATA_FILE).read_text())
  assert {k: v for k, v in metadata.items() if k != "test_accuracy"} == {
      "dataset": "digits", "image_size": 8, "channels": 1, "num_classes": 10, "width": 64,
      "train_steps": _TEST_STEPS, "seed": 0,
  }
  assert metadata["test_accuracy"] >= 0.9

  variables, loaded_metadata = classifier.load(str(out_dir))
  assert loaded_metadata == metadata
  assert set(variables) == {"params"}

  # A batch size that does not divide the 297 test images exercises the padding.
  fn, fn_metadata = classifier.make_classifier_fn(str(out_dir), batch_size=128)
  assert fn_metadata == metadata
  images, labels = digits_test_split["image"], digits_test_split["label"]
  assert images.shape == (297, 8, 8, 1) and images.dtype == np.uint8
  out = fn(images)
  assert out["features"].shape == (297, classifier.FEATURE_DIM)
  assert out["logits"].shape == (297, 10)
  assert out["features"].dtype == out["logits"].dtype == np.float32
  assert np.mean(out["logits"].argmax(axis=-1) == labels) == metadata["test_accuracy"]

  # Per-example outputs do not depend on the batching.
  alone = fn(images[:5])
  np.testing.assert_allclose(alone["logits"], out["logits"][:5], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ensure_classifier_reuses_cache_and_refuses_other_data(trained, data_config):
  out_dir, metadata = trained
  weights = out_dir / classifier.WEIGHTS_FILE
  mtime = weights.stat().st_mtime_ns
  assert classifier.ensure_classifier(data_config, str(out_dir), num_steps=1) == metadata
  assert weights.stat().st_mtime_ns == mtime  # Not retrained.

  for field, value in (("name", "mnist"), ("image_size", 16), ("num_classes", 9)):
    other = data_config.copy_and_resolve_references()
    other[field] = value
    with pytest.raises(ValueError, match="holds a classifier for"):
      classifier.ensure_classifier(other, str(out_dir))
  assert weights.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_ensure_classifier_trains_deterministically(data_config, tmp_path):
  first = classifier.ensure_classifier(data_config, str(tmp_path / "a"), num_steps=3, seed=5)
  second = classifier.train(data_config, str(tmp_path / "b"), num_steps=3, seed=5)
  assert first == second and first["train_steps"] == 3 and first["seed"] == 5
  assert ((tmp_path / "a" / classifier.WEIGHTS_FILE).read_bytes()
          == (tmp_path / "b" / classifier.WEIGHTS_FILE).read_bytes())
  third = classifier.train(data_config, str(tmp_path / "c"), num_steps=3, seed=6)
  assert third["seed"] == 6
  assert ((tmp_path / "a" / classifier.WEIGHTS_FILE).read_bytes()
          != (tmp_path / "c" / classifier.WEIGHTS_FILE).read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("images", [
    np.zeros((4, 8, 8, 1), np.float32),  # Wrong dtype.
    np.zeros((4, 28, 28, 1), np.uint8),  # Another data set's size.
    np.zeros((4, 8, 8, 3), np.uint8),  # Wrong channels.
    np.zeros((4, 8, 8), np.uint8),  # No channel axis.
    np.zeros((0, 8, 8, 1), np.uint8),  # Empty.
])
def test_classifier_fn_rejects_bad_images(trained, images):
  fn, _ = classifier.make_classifier_fn(str(trained[0]))
  with pytest.raises(ValueError, match=r"uint8 images \[N, 8, 8, 1\]"):
    fn(images)


def test_load_without_classifier_names_the_command(tmp_path):
  with pytest.raises(UserError, match="python -m cfdg_jax.eval.train_classifier"):
    classifier.load(str(tmp_path))


@pytest.mark.slow
def test_load_refuses_weights_that_do_not_fit(trained, tmp_path):
  out_dir, metadata = trained
  (tmp_path / classifier.WEIGHTS_FILE).write_bytes((out_dir / classifier.WEIGHTS_FILE).read_bytes())
  (tmp_path / classifier.METADATA_FILE).write_text(json.dumps(metadata | {"width": 32}))
  with pytest.raises(ValueError, match="does not fit"):
    classifier.load(str(tmp_path))
