"""Tests for the `digits` TFDS builder and the training input pipeline."""

import collections
import importlib.util
import pathlib

import numpy as np
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from cfdg_jax import input_pipeline

_CONFIG_PATH = (
    pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py"
)


def _default_data_config():
  spec = importlib.util.spec_from_file_location("digits_config", _CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  # Keeps the user's ~/tensorflow_datasets untouched.
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def data_config(data_dir):
  config = _default_data_config()
  config.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def digits_builder(data_dir):
  config = _default_data_config()
  config.data_dir = data_dir
  return input_pipeline.get_builder(config)


def _first_batches(config, num_batches, **kwargs):
  it = input_pipeline.create_train_iterator(config, **kwargs)
  return [next(it) for _ in range(num_batches)]


def _to_uint8(images):
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def test_digits_builder_info(digits_builder):
  info = digits_builder.info
  assert info.splits["train"].num_examples == 1500
  assert info.splits["test"].num_examples == 297
  assert info.features["label"].num_classes == 10
  assert info.features["image"].shape == (8, 8, 1)
  assert info.features["image"].np_dtype == np.uint8
  assert str(info.version) == "1.0.0"


def test_digits_splits_match_sklearn(digits_builder):
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)
  for split, indices in (("train", range(1500)), ("test", range(1500, 1797))):
    ds = digits_builder.as_dataset(split=split, batch_size=-1)
    got = tfds.as_numpy(ds)
    assert got["image"].dtype == np.uint8
    # Multisets of (image, label): TFDS stores examples in hashed-key order.
    expected = collections.Counter(
        (images[i].tobytes(), int(digits.target[i])) for i in indices
    )
    actual = collections.Counter(
        (image[..., 0].tobytes(), int(label))
        for image, label in zip(got["image"], got["label"])
    )
    assert actual == expected


def test_train_iterator_batches(data_config):
  batches = _first_batches(
      data_config, 3, global_batch_size=64, seed=0, process_index=0,
      process_count=1,
  )
  for batch in batches:
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (64, 8, 8, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (64,)
    assert batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() <= -0.99
    assert 0.99 <= batch["image"].max() <= 1.0
    assert 0 <= batch["label"].min() and batch["label"].max() <= 9
  labels = np.concatenate([b["label"] for b in batches])
  assert set(labels.tolist()) == set(range(10))


def test_train_iterator_is_deterministic(data_config):
  kwargs = dict(global_batch_size=32, process_index=0, process_count=1)
  first = _first_batches(data_config, 3, seed=1, **kwargs)
  again = _first_batches(data_config, 3, seed=1, **kwargs)
  other = _first_batches(data_config, 3, seed=2, **kwargs)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert any(
      not np.array_equal(a["label"], c["label"]) for a, c in zip(first, other)
  )


def test_random_flip_is_deterministic_and_mirrors_some(data_config):
  kwargs = dict(global_batch_size=64, seed=3, process_index=0, process_count=1)
  plain = _first_batches(data_config, 1, **kwargs)[0]["image"]
  data_config.random_flip = True
  flipped = _first_batches(data_config, 1, **kwargs)[0]["image"]
  again = _first_batches(data_config, 1, **kwargs)[0]["image"]
  np.testing.assert_array_equal(flipped, again)
  # The flip does not change the shuffle: each image is kept or mirrored.
  kept = np.all(flipped == plain, axis=(1, 2, 3))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(kept | mirrored)
  assert 8 < np.sum(mirrored & ~kept) < 56


def test_train_iterator_resizes(data_config):
  data_config.image_size = 16
  batch = _first_batches(
      data_config, 1, global_batch_size=16, seed=0, process_index=0,
      process_count=1,
  )[0]
  assert batch["image"].shape == (16, 16, 16, 1)
  assert batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_process_shares_are_disjoint_and_cover_the_split(
    data_config, digits_builder
):
  # One batch per process that holds its whole share, in stored order.
  data_config.shuffle_buffer = 1
  shares = []
  for process_index in range(2):
    batch = _first_batches(
        data_config, 1, global_batch_size=1500, seed=0,
        process_index=process_index, process_count=2,
    )[0]
    shares.append(collections.Counter(
        (image.tobytes(), int(label))
        for image, label in zip(_to_uint8(batch["image"]), batch["label"])
    ))
  whole = tfds.as_numpy(digits_builder.as_dataset(split="train", batch_size=-1))
  expected = collections.Counter(
      (image.tobytes(), int(label))
      for image, label in zip(whole["image"], whole["label"])
  )
  assert sum(shares[0].values()) == sum(shares[1].values()) == 750
  assert shares[0] + shares[1] == expected
  # The shares only share images that occur twice in the split.
  assert all(expected[k] > 1 for k in shares[0] & shares[1])


def test_global_batch_not_divisible_by_process_count(data_config):
  with pytest.raises(ValueError, match="not divisible by the number of"):
    input_pipeline.create_train_iterator(
        data_config, global_batch_size=63, seed=0, process_index=0,
        process_count=2,
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_classes", 11, r"set config.data.num_classes=10"),
        ("channels", 3, r"set config.data.channels=1"),
        ("split", "validation", r"split='validation' does not exist"),
        ("image_size", 0, r"image_size=0 must be a positive int"),
        ("image_size", None, r"image_size=None must be a positive int"),
    ],
)
def test_check_data_config_rejects(
    data_config, digits_builder, field, value, message
):
  input_pipeline.check_data_config(data_config, digits_builder)
  data_config[field] = value
  with pytest.raises(ValueError, match=message):
    input_pipeline.check_data_config(data_config, digits_builder)


def test_create_train_iterator_checks_config(data_config):
  data_config.num_classes = 100
  with pytest.raises(ValueError, match="num_classes"):
    input_pipeline.create_train_iterator(
        data_config, global_batch_size=8, seed=0, process_index=0,
        process_count=1,
    )


def _offline_config(name, data_dir, manual_dir):
  config = _default_data_config()
  config.update(
      name=name, data_dir=data_dir, manual_dir=str(manual_dir), image_size=28,
      cache=False, shuffle_buffer=1000,
  )
  return config


@pytest.fixture(scope="module")
def offline_builders(tmp_path_factory, shared_data):
  """mnist and fashion_mnist, prepared offline into one data dir."""
  data_dir = str(tmp_path_factory.mktemp("tfds_offline"))

  def no_download(*args, **kwargs):
    raise AssertionError(f"TFDS tried to download: {args}")

  builders = {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tfds.download.DownloadManager, "_download", no_download)
    for name in ("mnist", "fashion_mnist"):
      builders[name] = input_pipeline.get_builder(
          _offline_config(name, data_dir, shared_data / name)
      )
  return builders


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_offline_builder_info(offline_builders, name):
  info = offline_builders[name].info
  assert info.splits["train"].num_examples == 60_000
  assert info.splits["test"].num_examples == 10_000
  assert info.features["image"].shape == (28, 28, 1)
  assert info.features["label"].num_classes == 10


@pytest.mark.slow
def test_offline_data_sets_differ(offline_builders):
  first = {
      name: next(iter(tfds.as_numpy(b.as_dataset(split="train[:1]"))))["image"]
      for name, b in offline_builders.items()
  }
  assert not np.array_equal(first["mnist"], first["fashion_mnist"])


@pytest.mark.slow
def test_offline_mnist_train_iterator(offline_builders, shared_data):
  data_dir = str(offline_builders["mnist"].data_dir_root)
  config = _offline_config("mnist", data_dir, shared_data / "mnist")
  batch = _first_batches(
      config, 1, global_batch_size=32, seed=0, process_index=0,
      process_count=1,
  )[0]
  assert batch["image"].shape == (32, 28, 28, 1)
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  assert batch["label"].dtype == np.int32
