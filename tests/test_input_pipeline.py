"""Tests for the `digits` TFDS builder, image preparation and the stateless input pipeline."""

import collections
import importlib.util
import pathlib
import shutil
import threading

import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from cfdg_jax import errors
from cfdg_jax import input_pipeline

_CONFIG_PATH = (
    pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py"
)
_NUM_TRAIN = 1500


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


@pytest.fixture(scope="module")
def stored_train(digits_builder):
  """The train split in stored order: (uint8 [1500, 8, 8, 1], labels [1500])."""
  source = digits_builder.as_data_source(split="train")
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e["image"] for e in examples]),
          np.array([e["label"] for e in examples]))


def _first_batches(config, num_batches, **kwargs):
  it = input_pipeline.create_train_iterator(config, **kwargs)
  return [next(it) for _ in range(num_batches)]


def _to_uint8(images):
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def _multiset(images, labels):
  return collections.Counter(
      (image.tobytes(), int(label)) for image, label in zip(images, labels)
  )


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_digits_builder_info(digits_builder):
  info = digits_builder.info
  assert info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert info.splits["train"].num_examples == _NUM_TRAIN
  assert info.splits["test"].num_examples == 297
  assert info.features["label"].num_classes == 10
  assert info.features["image"].shape == (8, 8, 1)
  assert info.features["image"].np_dtype == np.uint8
  assert str(info.version) == "1.0.0"


def test_digits_splits_match_sklearn(digits_builder):
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)
  for split, indices in (("train", range(1500)), ("test", range(1500, 1797))):
    source = digits_builder.as_data_source(split=split)
    got = [source[i] for i in range(len(source))]
    assert all(e["image"].dtype == np.uint8 for e in got)
    # Multisets of (image, label): TFDS stores examples in hashed-key order.
    expected = _multiset(images[indices], digits.target[indices])
    assert _multiset([e["image"][..., 0] for e in got],
                     [e["label"] for e in got]) == expected


def test_a_data_dir_prepared_as_tfrecord_is_refused(tmp_path, data_config):
  tfds.builder("digits", data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
  data_config.data_dir = str(tmp_path)
  prepared = tmp_path / "digits" / "1.0.0"
  with pytest.raises(ValueError, match=rf"{prepared} holds .* prepared as tfrecord files") as e:
    input_pipeline.get_builder(data_config)
  assert "Delete" in str(e.value) and "config.data.data_dir" in str(e.value)


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


def test_train_iterator_is_deterministic_and_seeds_differ(data_config):
  kwargs = dict(global_batch_size=32, process_index=0, process_count=1)
  first = _first_batches(data_config, 3, seed=1, **kwargs)
  _assert_batches_equal(_first_batches(data_config, 3, seed=1, **kwargs), first)
  other = _first_batches(data_config, 3, seed=2, **kwargs)
  assert all(
      not np.array_equal(a["label"], c["label"]) for a, c in zip(first, other)
  )


def test_batches_are_the_documented_function_of_seed_and_step(data_config, stored_train):
  # A slow restatement of the contract: global batch s holds positions s*B ... s*B+B-1 of the
  # per-epoch permutations, process p its p-th slice of b, flips drawn for the global batch.
  seed, global_batch, count = 5, 96, 2
  b = global_batch // count
  data_config.random_flip = True
  images, labels = stored_train
  for p in range(count):
    got = _first_batches(data_config, 17, global_batch_size=global_batch, seed=seed,
                         process_index=p, process_count=count)
    for s, batch in enumerate(got):  # Batch 15 holds positions 1440..1535: two epochs.
      positions = s * global_batch + p * b + np.arange(b)
      indices = np.array([
          np.random.default_rng([seed, 0, q // _NUM_TRAIN]).permutation(_NUM_TRAIN)[
              q % _NUM_TRAIN] for q in positions])
      flips = np.random.default_rng([seed, 1, s]).random(global_batch)[p * b:(p + 1) * b] < 0.5
      want = np.where(flips[:, None, None, None], images[indices][:, :, ::-1], images[indices])
      np.testing.assert_array_equal(_to_uint8(batch["image"]), want)
      np.testing.assert_array_equal(batch["label"], labels[indices])


def test_processes_concatenate_to_the_single_process_batches(data_config):
  # 96 does not divide 1500: batch 15 (positions 1440..1535) crosses into the second epoch.
  data_config.random_flip = True
  kwargs = dict(global_batch_size=96, seed=4)
  whole = _first_batches(data_config, 17, process_index=0, process_count=1, **kwargs)
  halves = [_first_batches(data_config, 17, process_index=p, process_count=2, **kwargs)
            for p in range(2)]
  _assert_batches_equal(
      [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)], whole)
  assert all(len(h["label"]) == 48 for h in halves[0] + halves[1])


def test_start_step_continues_where_a_run_stopped(data_config):
  data_config.random_flip = True
  kwargs = dict(global_batch_size=96, seed=6, process_index=1, process_count=2)
  from_zero = _first_batches(data_config, 18, **kwargs)
  resumed = _first_batches(data_config, 3, start_step=15, **kwargs)
  _assert_batches_equal(resumed, from_zero[15:])


def test_each_epoch_reads_the_split_once(data_config, stored_train):
  batches = _first_batches(data_config, 30, global_batch_size=100, seed=7, process_index=0,
                           process_count=1)
  expected = _multiset(*stored_train)
  epochs = [batches[:15], batches[15:]]
  for epoch in epochs:
    images = np.concatenate([_to_uint8(b["image"]) for b in epoch])
    labels = np.concatenate([b["label"] for b in epoch])
    assert _multiset(images, labels) == expected
  assert not np.array_equal(epochs[0][0]["image"], epochs[1][0]["image"])  # Reshuffled.


def test_random_flip_is_deterministic_and_mirrors_some(data_config):
  kwargs = dict(global_batch_size=64, seed=3, process_index=0, process_count=1)
  plain = _first_batches(data_config, 1, **kwargs)[0]["image"]
  data_config.random_flip = True
  flipped = _first_batches(data_config, 1, **kwargs)[0]["image"]
  again = _first_batches(data_config, 1, **kwargs)[0]["image"]
  np.testing.assert_array_equal(flipped, again)
  # The flip does not change the order: each image is kept or mirrored.
  kept = np.all(flipped == plain, axis=(1, 2, 3))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(kept | mirrored)
  assert 8 < np.sum(mirrored & ~kept) < 56


def test_train_iterator_resizes(data_config, stored_train):
  data_config.image_size = 16
  batch = _first_batches(
      data_config, 1, global_batch_size=16, seed=0, process_index=0,
      process_count=1,
  )[0]
  assert batch["image"].shape == (16, 16, 16, 1)
  assert batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  # Each one is a stored image through prepare_image.
  resized = {input_pipeline.prepare_image(image, 16).tobytes() for image in stored_train[0]}
  assert all(image.tobytes() in resized for image in _to_uint8(batch["image"]))


def _halve(image):
  """PIL's box filter on even sides: means of column pairs, then of row pairs, halves rounded up."""
  image = image.astype(np.int64)
  image = (image[:, 0::2] + image[:, 1::2] + 1) // 2
  return ((image[0::2] + image[1::2] + 1) // 2).astype(np.uint8)


def _reference_prepare(image, size):
  """ADM's preprocessing, step by step."""
  while min(image.shape[:2]) >= 2 * size:
    image = _halve(image)
  h, w = image.shape[:2]
  new_h, new_w = round(h * size / min(h, w)), round(w * size / min(h, w))
  image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return image[top:top + size, left:left + size]


@pytest.mark.parametrize("shape, size", [((40, 30, 3), 8), ((160, 120, 3), 8),
                                         ((30, 40, 3), 12)])
def test_prepare_image_follows_adm(shape, size):
  image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
  got = input_pipeline.prepare_image(image, size)
  assert got.shape == (size, size, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, _reference_prepare(image, size))
  # A grey-scale image: the same pixels, one channel kept.
  grey = input_pipeline.prepare_image(image[..., :1], size)
  assert grey.shape == (size, size, 1)
  np.testing.assert_array_equal(
      grey, input_pipeline.prepare_image(np.repeat(image[..., :1], 3, axis=-1), size)[..., :1])


def test_prepare_image_keeps_constants_and_images_of_the_right_size():
  constant = np.full((40, 30, 3), 77, np.uint8)
  np.testing.assert_array_equal(input_pipeline.prepare_image(constant, 8),
                                np.full((8, 8, 3), 77, np.uint8))
  image = np.random.default_rng(1).integers(0, 256, (8, 8, 1), np.uint8)
  assert input_pipeline.prepare_image(image, 8) is image


def test_read_split_reads_in_stored_order(digits_builder):
  source = digits_builder.as_data_source(split="test")
  stored = [source[i] for i in range(len(source))]
  batches = list(input_pipeline.read_split(digits_builder, "test", 8, batch_size=100))
  assert [len(labels) for _, labels in batches] == [100, 100, 97]
  images = np.concatenate([images for images, _ in batches])
  labels = np.concatenate([labels for _, labels in batches])
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(images, np.stack([e["image"] for e in stored]))
  np.testing.assert_array_equal(labels, [e["label"] for e in stored])

  first = list(input_pipeline.read_split(digits_builder, "test", 16, limit=150, batch_size=100))
  assert [len(labels) for _, labels in first] == [100, 50]
  np.testing.assert_array_equal(
      np.concatenate([images for images, _ in first]),
      np.stack([input_pipeline.prepare_image(e["image"], 16) for e in stored[:150]]))


def test_a_damaged_data_file_is_named_with_how_to_rebuild_it(digits_builder, data_dir, tmp_path):
  shutil.copytree(data_dir, tmp_path / "tfds")
  (path,) = (tmp_path / "tfds").glob("digits/*/digits-test.array_record-*")
  damaged = bytearray(path.read_bytes())
  middle = slice(len(damaged) // 3, len(damaged) // 3 + 64)
  damaged[middle] = bytes(b ^ 0xFF for b in damaged[middle])  # Size unchanged.
  path.write_bytes(damaged)
  config = _default_data_config()
  config.data_dir = str(tmp_path / "tfds")
  with pytest.raises(errors.JobError, match=rf"^{path} is damaged: example \d+ cannot be read "
                     rf"\(Corrupted .*\)\. Delete {path.parent} and run again: the data set is "
                     "prepared afresh"):
    list(input_pipeline.read_split(input_pipeline.get_builder(config), "test", 8))


def _next_within(iterator, seconds):
  """next(iterator), or a test failure if it takes longer than `seconds`."""
  result = {}

  def call():
    try:
      result["value"] = next(iterator)
    except Exception as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=call, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"next() still waits after {seconds} s."
  if "error" in result:
    raise result["error"]
  return result["value"]


def test_an_error_in_the_worker_thread_surfaces_in_the_consumer(data_config, monkeypatch):
  calls = []

  def fail_on_the_third_batch(image, size):
    calls.append(None)
    if len(calls) > 2 * 8:
      raise OSError("corrupt record")
    return image

  monkeypatch.setattr(input_pipeline, "prepare_image", fail_on_the_third_batch)
  data_config.num_workers = 1  # Counts calls in batch order.
  it = input_pipeline.create_train_iterator(
      data_config, global_batch_size=8, seed=0, process_index=0, process_count=1)
  for _ in range(2):
    assert _next_within(it, 30)["image"].shape == (8, 8, 8, 1)
  for _ in range(2):  # Raised again, not a hang, on each later call.
    with pytest.raises(OSError, match="corrupt record"):
      _next_within(it, 30)


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


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 100, "num_classes"),
    ("prefetch", 0, r"config.data.prefetch=0 must be at least 1"),
    ("num_workers", 0, r"config.data.num_workers=0 must be at least 1"),
])
def test_create_train_iterator_checks_config(data_config, field, value, message):
  data_config[field] = value
  with pytest.raises(ValueError, match=message):
    input_pipeline.create_train_iterator(
        data_config, global_batch_size=8, seed=0, process_index=0,
        process_count=1,
    )


def _offline_config(name, data_dir, manual_dir):
  config = _default_data_config()
  config.update(name=name, data_dir=data_dir, manual_dir=str(manual_dir), image_size=28)
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
  assert info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert info.splits["train"].num_examples == 60_000
  assert info.splits["test"].num_examples == 10_000
  assert info.features["image"].shape == (28, 28, 1)
  assert info.features["label"].num_classes == 10


@pytest.mark.slow
def test_offline_data_sets_differ(offline_builders):
  first = {name: b.as_data_source(split="train[:1]")[0]["image"]
           for name, b in offline_builders.items()}
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
