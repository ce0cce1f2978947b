"""Input pipeline for any TFDS image classification data set, read by index from ArrayRecord files.

Training batches are a pure function of (seed, step): the examples are read in an endless
sequence of per-epoch permutations, global batch s holds the sequence's positions s*B ... s*B+B-1,
and each process reads its own slice of those by index. Stateless reads give every process count
the same global batches, let a resumed run replay the data order exactly from its step counter,
and leave no iterator state to checkpoint. A daemon thread prepares batches ahead of the
training step.

Every reader (training, FID reference images, classifier test batches) prepares images with
`prepare_image`.
"""

from collections.abc import Iterator, Sequence
import concurrent.futures
import itertools
import os
import queue
import threading
import weakref

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# Registers the project's own builders (`digits`) with TFDS.
from cfdg_jax import datasets  # pylint: disable=unused-import
from cfdg_jax.errors import JobError
from cfdg_jax.errors import UserError

_FILE_FORMAT = tfds.core.FileFormat.ARRAY_RECORD


def get_builder(
    data_config: ml_collections.ConfigDict,
) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder for `data_config.name`, prepared as ArrayRecord files on first use.

  With `data_config.manual_dir` set, preparation is offline: the TFDS download
  manager takes each registered URL's file by name from that directory, and
  the GCS copy of the prepared data is not tried.

  Args:
    data_config: `config.data`; uses `name`, `data_dir` and `manual_dir`.

  Returns:
    A prepared builder (its `info.splits` are filled in).

  Raises:
    ValueError: if the data dir holds the data set prepared in another file
      format (e.g. tfrecord, by an older version of this project).
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
  # Without a file format, the builder takes the one of the data it finds on disk; asking for
  # ArrayRecord straight away would fail on other files with a message that names no fix.
  builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
  if builder.is_prepared():
    _check_file_format(data_config, builder)
    return builder
  builder = tfds.builder(
      data_config.name, data_dir=data_config.data_dir, file_format=_FILE_FORMAT.value
  )
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


def _check_file_format(
    data_config: ml_collections.ConfigDict,
    builder: tfds.core.DatasetBuilder,
) -> None:
  if builder.info.file_format != _FILE_FORMAT:
    raise UserError(
        f"{builder.data_dir} holds TFDS data set {data_config.name!r} prepared as"
        f" {builder.info.file_format.value} files, but the input pipeline reads"
        f" {_FILE_FORMAT.value} files by index. Delete {builder.data_dir} (it is"
        " prepared again on the next run) or set config.data.data_dir to another"
        " directory."
    )


def check_data_config(
    data_config: ml_collections.ConfigDict,
    builder: tfds.core.DatasetBuilder,
) -> None:
  """Checks `config.data` against the data set's metadata; cheap, call early.

  The split and the file format are checked only once the data set is
  prepared: TFDS knows them from then on.

  Args:
    data_config: `config.data`.
    builder: A builder of `data_config.name`: from `get_builder(data_config)`
      (prepared) or `tfds.builder` (perhaps not yet).

  Raises:
    UserError: naming the mismatch and the fix.
  """
  name = data_config.name
  features = builder.info.features
  if ("image" not in features or "label" not in features
      or not hasattr(features["label"], "num_classes")):
    raise UserError(
        f"config.data.name={name!r}: the TFDS data set has features"
        f" {sorted(features.keys())}; the input pipeline needs an 'image' and a"
        " 'label' (ClassLabel) feature: an image classification data set."
    )
  num_classes = features["label"].num_classes
  if data_config.num_classes != num_classes:
    raise UserError(
        f"config.data.num_classes={data_config.num_classes} but TFDS data set"
        f" {name!r} has {num_classes} classes: set"
        f" config.data.num_classes={num_classes}."
    )
  channels = features["image"].shape[-1]
  if data_config.channels != channels:
    raise UserError(
        f"config.data.channels={data_config.channels} but the images of TFDS"
        f" data set {name!r} have {channels} channel(s): set"
        f" config.data.channels={channels}."
    )
  if builder.is_prepared():
    _check_file_format(data_config, builder)
    try:
      builder.info.splits[data_config.split]
    except (KeyError, ValueError) as e:
      raise UserError(
          f"config.data.split={data_config.split!r} does not exist in TFDS data"
          f" set {name!r} ({e}). Set config.data.split to one of"
          f" {sorted(builder.info.splits.keys())} or a slice of one, e.g."
          " 'train[:90%]'."
      ) from e
  size = data_config.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
    raise UserError(
        f"config.data.image_size={size!r} must be a positive int (the side of"
        f" the square images fed to the model); {name!r} stores images of"
        f" shape {features['image'].shape}."
    )


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
  """Returns a stored image as the model sees it: uint8 [h, w, C] -> uint8 [size, size, C].

  An image of size x size passes through untouched. Any other follows ADM's ImageNet
  preprocessing (Dhariwal & Nichol, 2021; guided-diffusion's `center_crop_arr`): halve it with a
  box filter while its short side is at least 2 * size, resize it bicubically to a short side of
  `size`, then crop the central size x size square.

  Args:
    image: uint8 [h, w, C], C = 1 or 3.
    size: The side of the square result.
  """
  height, width, channels = image.shape
  if (height, width) == (size, size):
    return image
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)  # Mode 'L' or 'RGB'.
  # Box-filter halvings average away the detail that one bicubic step from far above would alias.
  while min(pil.size) >= 2 * size:
    pil = pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(
      (round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BICUBIC
  )
  top, left = (pil.height - size) // 2, (pil.width - size) // 2
  out = np.asarray(pil)[top:top + size, left:left + size]
  return out.reshape(size, size, channels)


def _read_record(source: Sequence[dict], index: int) -> dict:
  """source[index]; a damaged data file (array_record's RuntimeError) is a JobError naming it."""
  try:
    return source[index]
  except RuntimeError as e:
    try:  # The file that holds the record: array_record's own bookkeeping, when it has it.
      records = source.data_source  # pytype: disable=attribute-error
      path = records._paths[records._reader_idx_and_position(index)[0]]  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      path = "a file of the prepared data set"
    raise JobError(f"{path} is damaged: example {index} cannot be read "
                   f"({str(e).splitlines()[0]}). Delete {os.path.dirname(path) or 'that directory'} "
                   "and run again: the data set is prepared afresh from its source files.") from e


def _read_examples(
    source: Sequence[dict],
    indices: np.ndarray,
    size: int,
    pool: concurrent.futures.ThreadPoolExecutor,
    num_chunks: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Reads the examples at `indices` [n]: (uint8 images [n, size, size, C], int32 labels [n]).

  Decoding and resizing run in `num_chunks` chunks on `pool`: PIL releases the GIL for both.
  """

  def read_chunk(chunk):
    examples = [_read_record(source, int(i)) for i in chunk]
    return (
        [prepare_image(e["image"], size) for e in examples],
        [e["label"] for e in examples],
    )

  chunks = list(pool.map(read_chunk, np.array_split(indices, num_chunks)))
  images = np.stack([image for chunk_images, _ in chunks for image in chunk_images])
  labels = np.array([label for _, chunk_labels in chunks for label in chunk_labels], np.int32)
  return images, labels


def read_split(
    builder: tfds.core.DatasetBuilder,
    split: str,
    image_size: int,
    *,
    limit: int | None = None,
    batch_size: int = 1000,
    num_workers: int = 4,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields a split in stored order: (uint8 images [b, S, S, C], int32 labels [b]).

  Args:
    builder: A prepared builder from `get_builder`.
    split: A split of it or a slice of one, e.g. 'test' or 'train[:90%]'.
    image_size: S; images go through `prepare_image`.
    limit: Read only the first `limit` examples (None: all).
    batch_size: b, except for a smaller last batch.
    num_workers: Threads that decode and resize.
  """
  source = builder.as_data_source(split=split)
  num_examples = len(source) if limit is None else min(limit, len(source))
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for start in range(0, num_examples, batch_size):
      indices = np.arange(start, min(start + batch_size, num_examples))
      yield _read_examples(source, indices, image_size, pool, num_workers)


def _epoch_permutation(seed: int, num_examples: int, epoch: int) -> np.ndarray:
  """The order of the examples [num_examples] in training epoch `epoch`."""
  return np.random.default_rng([seed, 0, epoch]).permutation(num_examples)


def _global_batch_flips(seed: int, step: int, global_batch_size: int) -> np.ndarray:
  """bool [B]: which images of global batch `step` (0-based) a random flip mirrors."""
  return np.random.default_rng([seed, 1, step]).random(global_batch_size) < 0.5


def _batch_plan(
    *,
    seed: int,
    num_examples: int,
    global_batch_size: int,
    process_index: int,
    batch_size: int,
    start_step: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (example indices [b], flips bool [b]) of this process for global batches
  start_step, start_step + 1, ... (0-based).

  Global batch s holds positions s*B ... s*B+B-1 of the endless sequence epoch 0's permutation,
  epoch 1's, ...; process p takes positions s*B + p*b ... s*B + (p+1)*b - 1, and the slice of
  the flips drawn for the whole global batch.
  """
  permutations = {}  # Epoch -> permutation, for the epochs that the current batch touches.
  offset = process_index * batch_size
  for step in itertools.count(start_step):
    positions = step * global_batch_size + offset + np.arange(batch_size)
    epochs, within = np.divmod(positions, num_examples)
    permutations = {
        e: permutations[e] if e in permutations else _epoch_permutation(seed, num_examples, e)
        for e in range(epochs[0], epochs[-1] + 1)
    }
    indices = np.empty(batch_size, np.int64)
    for epoch, permutation in permutations.items():
      in_epoch = epochs == epoch
      indices[in_epoch] = permutation[within[in_epoch]]
    flips = _global_batch_flips(seed, step, global_batch_size)[offset:offset + batch_size]
    yield indices, flips


class _Failure:
  """Carries an exception of the worker thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


def _fill(items: Iterator, out: queue.Queue, stop: threading.Event) -> None:
  """Puts `items` (then a _Failure if they raise) into `out` until `stop` is set."""

  def put(item) -> bool:
    # A timeout, so that a thread whose consumer is gone sees `stop` instead of blocking forever.
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  try:
    for item in items:
      if not put(item):
        return
  except BaseException as e:  # pylint: disable=broad-except  (re-raised by the consumer)
    put(_Failure(e))


class _Prefetcher:
  """Iterates over `items`, which a daemon thread computes up to `depth` ahead.

  An exception raised by `items` is re-raised by this iterator's next `next()` (and any after).
  """

  def __init__(self, items: Iterator, depth: int):
    self._queue = queue.Queue(maxsize=depth)
    self._error = None
    stop = threading.Event()
    # The thread holds no reference to self: once this iterator is garbage, it stops the thread.
    weakref.finalize(self, stop.set)
    threading.Thread(
        target=_fill, args=(items, self._queue, stop), daemon=True,
        name="cfdg_jax input pipeline",
    ).start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._error is None:
      item = self._queue.get()
      if not isinstance(item, _Failure):
        return item
      self._error = item.error
    raise self._error


def create_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Returns an endless iterator over this process's batches for steps start_step + 1, ...

  A pure function of the arguments: concatenated over processes, the batches of a step are
  those of one process with the same global batch size, and starting at step k yields what
  starting at 0 yields from its (k+1)-th batch on.

  Args:
    data_config: `config.data`; `prefetch` batches are prepared ahead, on
      `num_workers` threads.
    global_batch_size: B, the batch size summed over all processes.
    seed: Seeds the data order and the random flips.
    start_step: The training step done last (0 for a fresh run).
    process_index: This process's index; defaults to `jax.process_index()`.
    process_count: Number of processes; defaults to `jax.process_count()`.

  Returns:
    Iterator of {'image': float32 [b, S, S, C] in [-1, 1], 'label': int32 [b]}
    with b = global_batch_size // process_count, S = data_config.image_size and
    C = data_config.channels.

  Raises:
    ValueError: if global_batch_size is not divisible by process_count, if
      prefetch or num_workers is not positive, or as `get_builder` and
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
  for field in ("prefetch", "num_workers"):
    if data_config[field] < 1:
      raise ValueError(f"config.data.{field}={data_config[field]} must be at least 1.")
  batch_size = global_batch_size // process_count

  builder = get_builder(data_config)
  check_data_config(data_config, builder)
  source = builder.as_data_source(split=data_config.split)
  plan = _batch_plan(
      seed=seed, num_examples=len(source), global_batch_size=global_batch_size,
      process_index=process_index, batch_size=batch_size, start_step=start_step,
  )

  def batches():
    with concurrent.futures.ThreadPoolExecutor(data_config.num_workers) as pool:
      for indices, flips in plan:
        images, labels = _read_examples(
            source, indices, data_config.image_size, pool, data_config.num_workers
        )
        if data_config.random_flip:
          images[flips] = images[flips, :, ::-1]
        yield {"image": images.astype(np.float32) / 127.5 - 1.0, "label": labels}

  return _Prefetcher(batches(), depth=data_config.prefetch)
