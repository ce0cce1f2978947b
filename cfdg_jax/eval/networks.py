"""The networks that measure samples (FID Inception, a data-set classifier), their reference
statistics, and the metrics of one set of samples.

A network is identified by the SHA-1 of its weights' bytes: results rows and cached reference
statistics are keyed by it, so retrained weights in the same place never reuse old numbers.
"""
import dataclasses
import hashlib
import io
import re
import time
import zipfile
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from cfdg_jax import input_pipeline
from cfdg_jax.errors import UserError
from cfdg_jax.eval import classifier
from cfdg_jax.eval import inception
from cfdg_jax.eval import metrics

IS_SPLITS = 10  # The Inception Score's usual 10 chunks (metrics.inception_score).
MAX_REFERENCE_IMAGES = 50_000  # The usual size of FID reference sets.


def weights_digest(path: epath.PathLike) -> str:
  """The first 16 hex digits of the SHA-1 of a weights file's bytes."""
  return hashlib.sha1(epath.Path(path).read_bytes()).hexdigest()[:16]


def classifier_digest(classifier_dir: str) -> str:
  return weights_digest(epath.Path(classifier_dir) / classifier.WEIGHTS_FILE)


@dataclasses.dataclass(frozen=True)
class Network:
  """A feature network for metrics: Inception ("" prefix) or the data-set classifier."""
  prefix: str  # Of the metric names: "" (fid, is) or "classifier_" (classifier_fid, ...).
  fn: Callable[[np.ndarray], dict[str, np.ndarray]]  # uint8 [N, H, W, C] -> outputs.
  feature_key: str  # The [N, D] features for FID and precision/recall.
  has_logits: bool
  name: str  # "inception" or "classifier".
  digest: str  # weights_digest of its weights: its identity in rows and reference caches.
  info: dict  # Recorded in every row.


def inception_network(weights: str) -> Network:
  variables = inception.load_params(weights)
  has_logits = "fc" in variables["params"]
  if not has_logits:
    logging.warning("The Inception weights %s have no logits layer: the Inception Score is "
                    "omitted. Convert pytorch-fid's .pth to get it.", weights)
  return Network("", inception.make_feature_fn(variables), "pool", has_logits, "inception",
                 weights_digest(weights), {"inception_weights": weights})


def classifier_network(classifier_dir: str, data_config: ml_collections.ConfigDict) -> Network:
  fn, meta = classifier.make_classifier_fn(classifier_dir)
  expected = {"dataset": data_config.name, "image_size": data_config.image_size,
              "channels": data_config.channels, "num_classes": data_config.num_classes}
  if got := {k: meta.get(k) for k in expected if meta.get(k) != expected[k]}:
    raise UserError(f"config.eval.classifier_dir={classifier_dir} holds a classifier for {got}, "
                     f"but the checkpoint's model makes {expected}: point it at a classifier of "
                     "this data set (python -m cfdg_jax.eval.train_classifier trains one).")
  return Network("classifier_", fn, "features", True, "classifier",
                 classifier_digest(classifier_dir),
                 {"classifier_dir": classifier_dir,
                  "classifier_test_accuracy": float(meta["test_accuracy"])})


MAKE_NETWORK = {
    "inception_weights": "convert the FID Inception with python -m "
                         "cfdg_jax.eval.convert_inception SRC OUT",
    "classifier_dir": "train one with python -m cfdg_jax.eval.train_classifier --config CONFIG "
                      "--out_dir DIR"}


def checked(field: str, value: str, load: Callable[[], Any]) -> Any:
  """load(); a missing, unreadable or foreign file is one UserError naming config.eval.<field>."""
  try:
    return load()
  except OSError as e:
    raise UserError(f"config.eval.{field}={value!r}: {e.strerror or e} ({e.filename}). Fix the "
                    f"path, or {MAKE_NETWORK[field]}.") from e
  except UserError as e:
    raise UserError(f"config.eval.{field}={value!r}: {e}") from e


def reference_images(builder: tfds.core.DatasetBuilder, split: str, image_size: int) -> np.ndarray:
  """uint8 [N, S, S, C]: the split's first MAX_REFERENCE_IMAGES images, in stored order.

  Prepared as the training images are (`input_pipeline.prepare_image`).
  """
  return np.concatenate([images for images, _ in input_pipeline.read_split(
      builder, split, image_size, limit=MAX_REFERENCE_IMAGES)])


def reference_path(cache_dir: epath.PathLike, dataset: str, split: str, image_size: int,
                   network: Network) -> epath.Path:
  name = re.sub(r"[^A-Za-z0-9_.-]", "_",
                f"{dataset}_{split}_{image_size}px_{network.name}-{network.digest}")
  return epath.Path(cache_dir) / f"reference_{name}.npz"


def load_or_compute_reference(path: epath.Path, network: Network,
                              get_images: Callable[[], np.ndarray]) -> metrics.Reference:
  """{"mu", "sigma", "features"} of the reference images, cached at `path` (written atomically).

  The file holds these arrays alone: what the metrics derive from them (metrics.Reference) is
  computed in memory when first needed, so the file never depends on config.eval.
  """
  if path.exists():
    try:
      with path.open("rb") as f, np.load(f) as data:
        reference = metrics.Reference(data)
      if missing := {"mu", "sigma", "features"} - set(reference):
        raise KeyError(f"it lacks {sorted(missing)}")
      return reference
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
      aside = path.parent / (path.name + ".damaged")
      try:
        path.rename(aside)
      except OSError as rename_error:
        raise UserError(f"The reference statistics {path} cannot be read ({e}) nor moved aside "
                        f"({rename_error}): delete the file, or set "
                        "config.eval.reference_cache to a writable directory.") from e
      logging.warning("The reference statistics %s cannot be read (%s): moved to %s; computing "
                      "them again.", path, e, aside)
  tic = time.perf_counter()
  images = get_images()
  features = network.fn(images)[network.feature_key]
  mu, sigma = metrics.stats_from_features(features)
  reference = {"mu": mu, "sigma": sigma, "features": features.astype(np.float32)}
  buffer = io.BytesIO()
  np.savez(buffer, **reference)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)
  logging.info("Wrote %s: statistics of %d reference images (%.0f s).", path, len(images),
               time.perf_counter() - tic)
  return metrics.Reference(reference)


def compute_metrics(images: np.ndarray, labels: np.ndarray, networks: Sequence[Network],
                    references: Sequence[Mapping[str, np.ndarray]], k: int) -> dict[str, float]:
  """Metrics of uint8 images [N, H, W, C] sampled for `labels` [N], one set per network.

  fid, is, is_std, precision, recall for Inception; classifier_fid, classifier_is,
  classifier_is_std, classifier_accuracy (of argmax logits == labels) for the classifier.
  A reference that is a metrics.Reference (load_or_compute_reference's) keeps what depends on it
  alone across calls; other mappings get it computed afresh.
  """
  row = {}
  for network, reference in zip(networks, references):
    if not isinstance(reference, metrics.Reference):
      reference = metrics.Reference(reference)
    out = network.fn(images)
    features = out[network.feature_key]
    p = network.prefix
    row[p + "fid"] = reference.fid(*metrics.stats_from_features(features))
    if network.has_logits:
      row[p + "is"], row[p + "is_std"] = metrics.inception_score(out["logits"], IS_SPLITS)
    if p:
      row[p + "accuracy"] = float(np.mean(np.argmax(out["logits"], axis=-1) == labels))
    else:
      row["precision"], row["recall"] = reference.precision_recall(features, k)
  return row


