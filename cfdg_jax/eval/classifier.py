"""A small CNN classifier per data set: classifier-FID, classifier-IS and guided-sample accuracy.

Inception features say little about 8x8 digits or 28x28 MNIST, so each data set gets its own
classifier, trained here on the training split and scored on the 'test' split:

* classifier-FID: the Fréchet distance between the 128-d penultimate `features` of real and
  generated images (`metrics.fid_from_stats`);
* classifier-IS: the Inception Score formula on its softmax (`metrics.inception_score` on `logits`);
* label accuracy: how often guided samples are classified as the label they were conditioned on.

Report its test accuracy beside these numbers. A trained classifier lives in a directory as
`classifier.msgpack` (flax.serialization of {"params": ...}) and `classifier.json` (metadata):

  python -m cfdg_jax.eval.train_classifier --config configs/digits.py --out_dir /tmp/cls_digits

Training augments each image with a random shift of up to `max_shift(image_size)` pixels
(edge-padded; ±1 px at 8x8, ±2 px at 28x28) and dropout before the logits, so that the classifier
does not hinge on exact pixel positions, which samples get slightly wrong.

With the defaults (seed 0) on a 2-core CPU: digits 97.0% test accuracy after 1,172 steps (~40 s;
other seeds 96-97.6%: a handful of the 297 test digits, by writers absent from the training
split, are ambiguous); MNIST 99.1-99.3% after 1,500 steps (~3.5 minutes).
"""
import functools
import json
import math
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from flax import serialization
from flax import traverse_util

from cfdg_jax import input_pipeline
from cfdg_jax.errors import UserError

FEATURE_DIM = 128  # Width of the penultimate "features" layer.
WEIGHTS_FILE = "classifier.msgpack"
METADATA_FILE = "classifier.json"
EVAL_SPLIT = "test"
_DATA_FIELDS = ("dataset", "image_size", "channels", "num_classes")  # What a classifier fits.
_METADATA_FIELDS = _DATA_FIELDS + ("width", "test_accuracy", "train_steps", "seed")
_DROPOUT = 0.1  # On the features, in training only.
_DEFAULT_BATCH_SIZE = 128
# Default training length: about this many epochs (digits: 1,172 steps; fewer give a less steady
# test accuracy), capped so that MNIST-sized data sets train in minutes on a CPU (the cap is 3.2
# epochs of MNIST at batch 128, enough for 99%).
_DEFAULT_EPOCHS = 100
_MAX_DEFAULT_STEPS = 1500
_LOG_EVERY = 100

# uint8 images [N, S, S, C] -> {"features": float32 [N, 128], "logits": float32 [N, K]}.
ClassifierFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def _conv_norm_act(x: jax.Array, channels: int, strides: int = 1) -> jax.Array:
  x = nn.Conv(channels, (3, 3), strides=strides)(x)
  # Per-example statistics only (no batch statistics), so variables are just params.
  x = nn.GroupNorm(num_groups=math.gcd(channels, 8))(x)
  return nn.swish(x)


def level_sizes(image_size: int) -> list[int]:
  """Feature-map sizes, one per level: halved (stride 2, rounded up) until at most 7 pixels.

  8 -> [8, 4]; 28 -> [28, 14, 7]; 32 -> [32, 16, 8, 4].
  """
  sizes = [image_size]
  while sizes[-1] > 7:
    sizes.append(-(-sizes[-1] // 2))
  return sizes


def level_channels(image_size: int, width: int) -> list[int]:
  """Channels per level: `width` on maps of at most 8 pixels, halved per doubling of the map
  beyond, but no fewer than min(16, width).

  8 -> [w, w]; 28 -> [w/4, w/2, w]; 32 -> [w/4, w/2, w, w].

  Narrow where the maps are large keeps a 28x28 classifier cheap on a CPU.
  """
  return [max(width >> max(0, math.ceil(math.log2(size / 8))), min(16, width))
          for size in level_sizes(image_size)]


def level_depths(image_size: int) -> list[int]:
  """3x3 convolutions per level: two, and at the coarsest level as many more as it takes for every
  position to see the whole image, so that the global average pool loses no layout.

  8 -> [2, 2]; 28 -> [2, 2, 3]; 32 -> [2, 2, 2, 2].
  """
  num_levels = len(level_sizes(image_size))
  # A 3x3 convolution on a map whose pixels are `step` input pixels apart widens the receptive
  # field by 2 * step; each level doubles the step. Two per level reach 5 + 3 * (2^L - 2) pixels.
  field = 5 + 3 * (2**num_levels - 2)
  extra = max(0, math.ceil((image_size - field) / 2**num_levels))
  return [2] * (num_levels - 1) + [2 + extra]


def max_shift(image_size: int) -> int:
  """Largest random shift (pixels) of the training augmentation: ±1 at 8x8, ±2 at 28x28."""
  return max(1, image_size // 14)


class Classifier(nn.Module):
  """Conv levels (GroupNorm, swish) -> global average pool -> 128-d features -> logits.

  Each level is `level_depths` 3x3 convolutions (the first with stride 2, except at the input
  level) with `level_channels` channels, until the map is at most 7 pixels wide (`level_sizes`).

  Attributes:
    num_classes: K, the number of logits.
    width: channels of the levels whose maps are at most 8 pixels wide.
  """
  num_classes: int
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Maps images x float32 [N, S, S, C] in [-1, 1] to their features and logits.

    Args:
      x: images, float32 [N, S, S, C] in [-1, 1].
      train: apply dropout (needs a "dropout" rng).

    Returns:
      {"features": float32 [N, 128], "logits": float32 [N, K]}.
    """
    size = x.shape[1]
    for level, (channels, depth) in enumerate(zip(level_channels(size, self.width),
                                                  level_depths(size))):
      x = _conv_norm_act(x, channels, strides=2 if level else 1)
      for _ in range(depth - 1):
        x = _conv_norm_act(x, channels)
    x = jnp.mean(x, axis=(1, 2))
    features = nn.swish(nn.Dense(FEATURE_DIM)(x))
    h = nn.Dropout(_DROPOUT, deterministic=not train)(features)
    return {"features": features, "logits": nn.Dense(self.num_classes)(h)}


def _random_shift(rng: jax.Array, images: jax.Array, shift: int) -> jax.Array:
  """Shifts each image [N, S, S, C] by its own random (dy, dx) in [-shift, shift], edge-padded."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
  offsets = jax.random.randint(rng, (n, 2), 0, 2 * shift + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def _train_step(params, opt_state, batch, rng, *, model: Classifier,
                tx: optax.GradientTransformation, shift: int):
  """One AdamW step on the cross-entropy of shifted images; returns (params, opt_state, metrics)."""
  rng_shift, rng_dropout = jax.random.split(rng)
  images = _random_shift(rng_shift, batch["image"], shift)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True,
                         rngs={"dropout": rng_dropout})["logits"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
  return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": accuracy}


@functools.partial(jax.jit, static_argnames=("model",))
def _apply(model: Classifier, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
  return model.apply(variables, images.astype(jnp.float32) / 127.5 - 1.0, train=False)


def _check_metadata(metadata: dict, source: str) -> None:
  missing = [k for k in _METADATA_FIELDS if k not in metadata]
  if missing:
    raise UserError(f"{source} lacks the classifier metadata {missing}; re-create it with "
                     "python -m cfdg_jax.eval.train_classifier.")


def _data_metadata(data_config: ml_collections.ConfigDict) -> dict:
  return {"dataset": data_config.name, "image_size": data_config.image_size,
          "channels": data_config.channels, "num_classes": data_config.num_classes}


def _expected_shapes(metadata: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
  model = Classifier(metadata["num_classes"], metadata["width"])
  size, channels = metadata["image_size"], metadata["channels"]
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, size, size, channels)))
  return {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}


def _classifier_fn(variables: dict, metadata: dict, batch_size: int) -> ClassifierFn:
  """The function `make_classifier_fn` returns, for in-memory variables."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  model = Classifier(metadata["num_classes"], metadata["width"])
  variables = jax.device_put(variables)
  size, channels = metadata["image_size"], metadata["channels"]
  expected = (f"uint8 images [N, {size}, {size}, {channels}] (the {metadata['dataset']!r}"
              " classifier's)")

  def classifier_fn(images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"Expected {expected}; got dtype {images.dtype}. Convert float images in "
                       "[-1, 1] with np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8).")
    if images.ndim != 4 or images.shape[1:] != (size, size, channels) or not len(images):
      raise ValueError(f"Expected {expected} with N >= 1; got shape {images.shape}.")
    outputs = []
    for start in range(0, len(images), batch_size):
      batch = images[start:start + batch_size]
      n = len(batch)
      if n < batch_size:  # Pad with copies of the last image: one shape, one compilation.
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
      # Full float32 on GPUs/TPUs too: their default TF32/bfloat16 passes would move the metrics.
      with jax.default_matmul_precision("float32"):
        out = _apply(model, variables, batch)
      outputs.append({k: np.asarray(v[:n], np.float32) for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

  return classifier_fn


def _test_batches(builder: tfds.core.DatasetBuilder, data_config: ml_collections.ConfigDict,
                  batch_size: int):
  """Yields the test split as (uint8 images [b, S, S, C], int32 labels [b]), in stored order."""
  if EVAL_SPLIT not in builder.info.splits:
    raise ValueError(f"TFDS data set {data_config.name!r} has no {EVAL_SPLIT!r} split to score the "
                     f"classifier on (it has {sorted(builder.info.splits.keys())}).")
  yield from input_pipeline.read_split(builder, EVAL_SPLIT, data_config.image_size,
                                       batch_size=batch_size)


def _write_atomically(path: epath.Path, data: bytes) -> None:
  # A reader never sees a half-written file, even if training is interrupted while writing.
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def default_num_steps(data_config: ml_collections.ConfigDict,
                      batch_size: int = _DEFAULT_BATCH_SIZE) -> int:
  """About 100 epochs of `data_config.split`, at most 1,500 steps (digits 1,172, MNIST 1,500)."""
  builder = input_pipeline.get_builder(data_config)
  input_pipeline.check_data_config(data_config, builder)
  num_examples = builder.info.splits[data_config.split].num_examples
  return min(math.ceil(_DEFAULT_EPOCHS * num_examples / batch_size), _MAX_DEFAULT_STEPS)


def train(data_config: ml_collections.ConfigDict, out_dir: str, *, num_steps: int,
          batch_size: int = _DEFAULT_BATCH_SIZE, learning_rate: float = 1e-3, seed: int = 0,
          width: int = 64) -> dict:
  """Trains a `Classifier` on `data_config.split`, scores it on 'test' and saves it in `out_dir`.

  AdamW (weight decay 1e-4) with a linear warm-up and cosine decay to 0, on batches from
  `input_pipeline.create_train_iterator` (with its random flips if `data_config.random_flip`),
  each image randomly shifted by up to `max_shift` pixels. Deterministic for a seed. Runs on one
  device; every process of a multi-process job would train the same classifier.

  Args:
    data_config: `config.data` of the data set.
    out_dir: Directory for classifier.msgpack and classifier.json (created if needed).
    num_steps: Optimizer steps; `default_num_steps` gives a sensible number.
    batch_size: Training examples per step.
    learning_rate: Peak learning rate.
    seed: Seeds the initialization, the data order and the augmentation.
    width: `Classifier.width`.

  Returns:
    The metadata written to classifier.json: {"dataset", "image_size", "channels", "num_classes",
    "width", "test_accuracy" (fraction of the test split classified correctly), "train_steps",
    "seed"}.
  """
  for name, value in (("num_steps", num_steps), ("batch_size", batch_size), ("width", width)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int.")
  builder = input_pipeline.get_builder(data_config)
  input_pipeline.check_data_config(data_config, builder)
  size, channels = data_config.image_size, data_config.channels
  model = Classifier(data_config.num_classes, width)
  rng_init, rng_train = jax.random.split(jax.random.key(seed))
  params = jax.jit(functools.partial(model.init, train=False))(
      rng_init, jnp.zeros((1, size, size, channels)))["params"]
  logging.info("Classifier for %s (%dx%dx%d, %d classes): width %d, %.3fM parameters.",
               data_config.name, size, size, channels, data_config.num_classes, width,
               sum(p.size for p in jax.tree.leaves(params)) / 1e6)

  warmup_steps = max(1, min(100, num_steps // 10))
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, num_steps),
                   weight_decay=1e-4)
  opt_state = tx.init(params)
  step_fn = jax.jit(functools.partial(_train_step, model=model, tx=tx, shift=max_shift(size)),
                    donate_argnums=(0, 1))
  # One process reads the whole split: the classifier is small and trains on one device.
  train_iter = input_pipeline.create_train_iterator(
      data_config, global_batch_size=batch_size, seed=seed, process_index=0, process_count=1)

  pending, last_time, last_step = [], time.time(), 0
  for step in range(1, num_steps + 1):
    params, opt_state, metrics = step_fn(params, opt_state, next(train_iter),
                                         jax.random.fold_in(rng_train, step))
    pending.append(metrics)  # Fetched (a host sync) only when logging.
    if step % _LOG_EVERY == 0 or step == num_steps:
      fetched = jax.device_get(pending)
      now = time.time()
      logging.info("Classifier step %d/%d: loss %.4f, train accuracy %.4f, %.1f steps/s.", step,
                   num_steps, np.mean([m["loss"] for m in fetched]),
                   np.mean([m["accuracy"] for m in fetched]),
                   (step - last_step) / (now - last_time))
      pending, last_time, last_step = [], now, step

  variables = {"params": jax.device_get(params)}
  metadata = _data_metadata(data_config) | {"width": width}
  classifier_fn = _classifier_fn(variables, metadata, batch_size=500)
  correct = total = 0
  for images, labels in _test_batches(builder, data_config, batch_size=500):
    correct += int((classifier_fn(images)["logits"].argmax(axis=-1) == labels).sum())
    total += len(labels)
  metadata |= {"test_accuracy": correct / total, "train_steps": num_steps, "seed": seed}
  logging.info("Classifier test accuracy on %s[%s]: %.4f (%d/%d).", data_config.name, EVAL_SPLIT,
               correct / total, correct, total)

  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # Weights first: classifier.json marks a complete classifier.
  _write_atomically(out / WEIGHTS_FILE, serialization.msgpack_serialize(variables))
  _write_atomically(out / METADATA_FILE, json.dumps(metadata, indent=2).encode())
  return metadata


def load(out_dir: str) -> tuple[dict, dict]:
  """Reads a classifier saved by `train`: ({"params": numpy arrays}, metadata)."""
  out = epath.Path(out_dir)
  weights_path, metadata_path = out / WEIGHTS_FILE, out / METADATA_FILE
  if not (weights_path.exists() and metadata_path.exists()):
    raise UserError(
        f"No trained classifier in {out} (expected {WEIGHTS_FILE} and {METADATA_FILE}). Create it "
        "with: python -m cfdg_jax.eval.train_classifier --config configs/DATASET.py"
        f" --out_dir {out}")
  try:
    metadata = json.loads(metadata_path.read_text())
  except ValueError as e:
    raise UserError(f"{metadata_path} is not JSON ({e}); re-create it with "
                    "python -m cfdg_jax.eval.train_classifier.") from e
  _check_metadata(metadata, str(metadata_path))
  try:
    variables = serialization.msgpack_restore(weights_path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on foreign files.
    raise UserError(f"{weights_path} is not a msgpack weights file ({e}); re-create it with "
                     "python -m cfdg_jax.eval.train_classifier.") from e
  expected = _expected_shapes(metadata)
  got = traverse_util.flatten_dict(variables) if isinstance(variables, dict) else {}
  bad = sorted("/".join(k) for k in expected.keys() | got.keys()
               if k not in expected or k not in got or np.shape(got[k]) != expected[k])
  if bad:
    raise UserError(f"{weights_path} does not fit the classifier that {metadata_path} describes "
                     f"({len(bad)} mismatched entries, e.g. {bad[:3]}); re-create it with "
                     "python -m cfdg_jax.eval.train_classifier.")
  return variables, metadata


def make_classifier_fn(out_dir: str, batch_size: int = 500) -> tuple[ClassifierFn, dict]:
  """Loads the classifier in `out_dir`: (fn(uint8 images [N, S, S, C]) -> outputs, metadata).

  fn returns {"features": float32 [N, 128], "logits": float32 [N, K]} as numpy arrays. It runs in
  fixed batches of `batch_size` (the last one padded), so it compiles once, and raises ValueError
  unless the images are uint8 [N, S, S, C] with the metadata's S and C.
  """
  variables, metadata = load(out_dir)
  return _classifier_fn(variables, metadata, batch_size), metadata


def ensure_classifier(data_config: ml_collections.ConfigDict, out_dir: str, **train_kwargs) -> dict:
  """Returns the metadata of the classifier cached in `out_dir`, training it first if absent.

  Args:
    data_config: `config.data`; a cached classifier must match its name, image_size, channels and
      num_classes.
    out_dir: The cache directory, one per data set.
    **train_kwargs: For `train` when there is nothing cached; num_steps defaults to
      `default_num_steps`. A cached classifier is reused whatever they say (with a warning where
      width, seed or num_steps differ from its own).

  Raises:
    ValueError: if `out_dir` holds a classifier of another data set or image format.
  """
  metadata_path = epath.Path(out_dir) / METADATA_FILE
  if metadata_path.exists():
    metadata = json.loads(metadata_path.read_text())
    _check_metadata(metadata, str(metadata_path))
    wanted = _data_metadata(data_config)
    cached = {k: metadata[k] for k in _DATA_FIELDS}
    if cached != wanted:
      raise ValueError(f"{out_dir} holds a classifier for {cached}, not for this config's data "
                       f"{wanted}. Use a separate out_dir per data set, or delete {out_dir} to "
                       "retrain it.")
    load(out_dir)  # Fails now, not at first use, if the weights are missing or do not fit.
    differing = {k: v for k, v in train_kwargs.items()
                 if k in ("width", "seed", "num_steps")
                 and metadata["train_steps" if k == "num_steps" else k] != v}
    if differing:
      logging.warning("Reusing the classifier in %s (%s) although %s was asked for.", out_dir,
                      {k: metadata[k] for k in ("width", "seed", "train_steps")}, differing)
    return metadata
  batch_size = train_kwargs.get("batch_size", _DEFAULT_BATCH_SIZE)
  train_kwargs.setdefault("num_steps", default_num_steps(data_config, batch_size))
  return train(data_config, out_dir, **train_kwargs)
