"""Training input pipeline for any TFDS image classification data set.

Each JAX process reads its own disjoint share of `config.data.split` and yields
its part of the global batch as numpy arrays:

  {'image': float32 [b, S, S, C] in [-1, 1], 'label': int32 [b]},

with b = global_batch_size // process_count and S = config.data.image_size.
"""

from collections.abc import Iterator
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Registers the project's own builders (`digits`) with TFDS.
from cfdg_jax import datasets  # pylint: disable=unused-import


def get_builder(
    data_config: ml_collections.ConfigDict,
) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder for `data_config.name`, prepared on first use.

  With `data_config.manual_dir` set, preparation is offline: the TFDS download
  manager takes each registered URL's file by name from that directory, and
  the GCS copy of the prepared data is not tried.

  Args:
    data_config: `config.data`; uses `name`, `data_dir` and `manual_dir`.

  Returns:
    A prepared builder (its `info.splits` are filled in).
  """
  # Process 0 prepares first; the others then find the data ready on a shared data dir (or
  # prepare their own copy on a host-local one) instead of racing to write the same files.
  is_first = jax.process_index() == 0
  if is_first:
    builder = _prepare(data_config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cfdg_jax: TFDS data prepared")
  return builder if is_first else _prepare(data_config)


def _prepare(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
  if data_config.manual_dir:
    # Extracted files are cached as <download_dir>/extracted/GZIP.<file name>,
    # so data sets with equal file names (mnist and fashion_mnist) sharing a
    # download_dir would silently reuse each other's images.
    builder.download_and_prepare(
        download_dir=os.path.join(
            builder.data_dir_root, "downloads", builder.name
        ),
        download_config=tfds.download.DownloadConfig(
            manual_dir=data_config.manual_dir, try_download_gcs=False
        ),
    )
  else:
    builder.download_and_prepare()
  return builder


def check_data_config(
    data_config: ml_collections.ConfigDict,
    builder: tfds.core.DatasetBuilder,
) -> None:
  """Checks `config.data` against the prepared data set; cheap, call early.

  Args:
    data_config: `config.data`.
    builder: The prepared builder from `get_builder(data_config)`.

  Raises:
    ValueError: naming the mismatch and the fix.
  """
  name = data_config.name
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(
        f"TFDS data set {name!r} has features {sorted(features.keys())}; the"
        " input pipeline needs an 'image' and a 'label' feature (an image"
        " classification data set)."
    )
  num_classes = features["label"].num_classes
  if data_config.num_classes != num_classes:
    raise ValueError(
        f"config.data.num_classes={data_config.num_classes} but TFDS data set"
        f" {name!r} has {num_classes} classes: set"
        f" config.data.num_classes={num_classes}."
    )
  channels = features["image"].shape[-1]
  if data_config.channels != channels:
    raise ValueError(
        f"config.data.channels={data_config.channels} but the images of TFDS"
        f" data set {name!r} have {channels} channel(s): set"
        f" config.data.channels={channels}."
    )
  try:
    builder.info.splits[data_config.split]
  except (KeyError, ValueError) as e:
    raise ValueError(
        f"config.data.split={data_config.split!r} does not exist in TFDS data"
        f" set {name!r} ({e}). Set config.data.split to one of"
        f" {sorted(builder.info.splits.keys())} or a slice of one, e.g."
        " 'train[:90%]'."
    ) from e
  size = data_config.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
    raise ValueError(
        f"config.data.image_size={size!r} must be a positive int (the side of"
        f" the square images fed to the model); {name!r} stores images of"
        f" shape {features['image'].shape}."
    )


def _center_crop_and_resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Crops [h, w, c] to its central square and resizes it to [size, size, c]."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(h, w)
  image = tf.image.crop_to_bounding_box(
      image, (h - side) // 2, (w - side) // 2, side, side
  )
  return tf.image.resize(image, (size, size), antialias=True)


def create_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Returns an endless iterator over this process's training batches.

  The same arguments give the same stream of batches.

  Args:
    data_config: `config.data`.
    global_batch_size: Batch size summed over all processes.
    seed: Seeds the shuffle and the random flips.
    process_index: This process's index; defaults to `jax.process_index()`.
    process_count: Number of processes; defaults to `jax.process_count()`.

  Returns:
    Iterator of {'image': float32 [b, S, S, C] in [-1, 1], 'label': int32 [b]}
    with b = global_batch_size // process_count, S = data_config.image_size and
    C = data_config.channels.

  Raises:
    ValueError: if global_batch_size is not divisible by process_count, or as
      `check_data_config`.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(
        f"The global batch size {global_batch_size} is not divisible by the"
        f" number of processes {process_count}: choose a multiple of"
        f" {process_count}."
    )
  batch_size = global_batch_size // process_count

  builder = get_builder(data_config)
  check_data_config(data_config, builder)
  split = tfds.split_for_jax_process(
      data_config.split,
      process_index=process_index,
      process_count=process_count,
  )
  ds = builder.as_dataset(
      split=split,
      shuffle_files=True,
      # config.data.cache decides on caching, not TFDS's size heuristic.
      read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
  )
  if data_config.cache:
    ds = ds.cache()
  ds = ds.repeat()
  # Numbering the endless stream gives each example occurrence its own flip.
  ds = ds.enumerate()
  ds = ds.shuffle(data_config.shuffle_buffer, seed=seed)

  size = data_config.image_size
  stored_shape = builder.info.features["image"].shape

  def preprocess(index, example):
    image = tf.cast(example["image"], tf.float32) / 127.5 - 1.0
    if data_config.random_flip:
      flip = tf.random.stateless_uniform(
          [], seed=tf.stack([tf.constant(seed, tf.int64), index])
      ) < 0.5
      image = tf.where(flip, image[:, ::-1], image)
    if tuple(stored_shape[:2]) != (size, size):
      image = _center_crop_and_resize(image, size)
      # Antialiased bilinear weights are convex; clip float round-off.
      image = tf.clip_by_value(image, -1.0, 1.0)
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds))
