"""Sample-quality evaluation of a training workdir: a guidance sweep for every checkpoint.

For each checkpoint (oldest first) and each sampler setting (T, v) of `config.eval`, the EMA model
samples `eval.num_samples` class-balanced images per guidance strength w, all w of one T together
in batched calls (w is per example; every w sees the same noise draws). Each (checkpoint, w, T, v)
gets one row of metrics:

  with `eval.inception_weights`: FID against the reference split's Inception statistics, the
    Inception Score (when the weights hold the logits layer) and precision/recall;
  with `eval.classifier_dir`: the same FID and IS on a data-set classifier's features and logits,
    the classifier's accuracy on the conditioning labels, and its own test accuracy.

Everything goes to <workdir>/eval/ (process 0 writes):
  results.jsonl       one JSON row per (step, w, num_steps, v, num_samples, seed), appended and
                      fsynced as soon as it is computed; rows already there are never recomputed;
  events.out.*        TensorBoard scalars such as fid/w=1.0/T=128 at the checkpoint's step;
  tradeoff.png        FID against IS and accuracy against w, redrawn after each checkpoint;
  reference_*.npz     reference statistics (the default eval.reference_cache), computed once.
"""
import collections
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import os
import re
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import matplotlib
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from matplotlib import figure

from cfdg_jax import checkpointing
from cfdg_jax import input_pipeline
from cfdg_jax import sampler
from cfdg_jax import sharding
from cfdg_jax import unet
from cfdg_jax.eval import classifier
from cfdg_jax.eval import inception
from cfdg_jax.eval import metrics

EVAL_FIELDS = ("guidance", "num_steps", "step_sweep", "step_sweep_guidance", "v", "num_samples",
               "batch_size", "seed", "inception_weights", "classifier_dir", "reference_split",
               "reference_cache", "precision_recall_k")
# A row's identity: a row with the same values is never computed again.
KEY_FIELDS = ("step", "w", "num_steps", "v", "num_samples", "seed")
# How the metrics were measured; a recorded row measured otherwise is kept, with a warning.
_SETUP_FIELDS = ("reference_split", "inception_weights", "classifier_dir")
IS_SPLITS = 10  # The Inception Score's usual 10 chunks (metrics.inception_score).
MAX_REFERENCE_IMAGES = 50_000  # The usual size of FID reference sets.
_PLOT_CHECKPOINTS = 4  # Newest checkpoints drawn in tradeoff.png.
_LOG_EVERY_SECS = 30.0


@dataclasses.dataclass(frozen=True)
class Setting:
  """One sampler setting: T steps with variance exponent v, and the w sampled at it."""
  num_steps: int
  v: float
  guidance: tuple[float, ...]


def get_eval_config(config: ml_collections.ConfigDict,
                    override: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """`override` (the --config file's eval section) or else the checkpoint config's `eval`."""
  if override is not None:
    return ml_collections.ConfigDict(override.to_dict())
  if "eval" not in config:
    raise ValueError("This checkpoint's config has no `eval` section (it predates the evaluator): "
                     "pass the experiment's config file, e.g. --config configs/digits.py, whose "
                     "eval section is then used.")
  return ml_collections.ConfigDict(config.eval.to_dict())


def check_eval_config(eval_config: ml_collections.ConfigDict, device_count: int) -> None:
  """Cheap checks of `config.eval`, before any data loading or compilation; raises ValueError."""
  fields = set(eval_config.keys())
  if unknown := sorted(fields - set(EVAL_FIELDS)):
    raise ValueError(f"Unknown config.eval field(s) {unknown}; the fields are {list(EVAL_FIELDS)}.")
  if missing := sorted(set(EVAL_FIELDS) - fields):
    raise ValueError(f"config.eval lacks {missing}: pass the experiment's config file (e.g. "
                     "--config configs/digits.py), which defines every eval field.")
  e = eval_config
  if not e.inception_weights and not e.classifier_dir:
    raise ValueError("config.eval.inception_weights and config.eval.classifier_dir are both unset, "
                     "so there is nothing to measure: set at least one, e.g. --config "
                     "configs/digits.py --config.eval.classifier_dir=DIR (configs/digits.py says "
                     "how to train that classifier).")
  if not e.guidance:
    raise ValueError("config.eval.guidance is empty; give the w to sweep, e.g. (0.0, 1.0, 4.0).")
  for name, values in (("guidance", e.guidance), ("step_sweep_guidance", e.step_sweep_guidance)):
    if not all(isinstance(w, (int, float)) and np.isfinite(w) for w in values):
      raise ValueError(f"config.eval.{name}={values} must hold finite numbers.")
  for t in (e.num_steps, *e.step_sweep):
    if not isinstance(t, int) or t < 2:
      raise ValueError(f"config.eval.num_steps / step_sweep hold {t!r}: sampler steps T must be "
                       "integers >= 2.")
  if e.v is not None and not 0.0 <= e.v <= 1.0:
    raise ValueError(f"config.eval.v={e.v}: the variance exponent lies in [0, 1] (None: sample.v).")
  if e.precision_recall_k < 1:
    raise ValueError(f"config.eval.precision_recall_k={e.precision_recall_k} must be >= 1 (3 as "
                     "Kynkäänniemi et al.).")
  least = max(IS_SPLITS, e.precision_recall_k + 1)
  if e.num_samples < least:
    raise ValueError(f"config.eval.num_samples={e.num_samples}: the Inception Score's "
                     f"{IS_SPLITS} splits and k-NN precision/recall need at least {least}.")
  if e.batch_size < 1 or e.batch_size % device_count:
    raise ValueError(f"config.eval.batch_size={e.batch_size} must be a positive multiple of the "
                     f"{device_count} devices it is split over.")


def sampler_settings(eval_config: ml_collections.ConfigDict, default_v: float) -> list[Setting]:
  """The union of (num_steps, each guidance) and (each step_sweep T, each step_sweep_guidance).

  Equal (T, w) pairs are sampled once. The main T comes first (its trade-off curve is the one
  plotted), then the other T in increasing order; w increase within a setting.
  """
  pairs = {(int(eval_config.num_steps), float(w)) for w in eval_config.guidance}
  pairs |= {(int(t), float(w)) for t in eval_config.step_sweep
            for w in eval_config.step_sweep_guidance}
  by_steps = collections.defaultdict(list)
  for t, w in sorted(pairs):
    by_steps[t].append(w)
  v = float(default_v if eval_config.v is None else eval_config.v)
  order = sorted(by_steps, key=lambda t: (t != eval_config.num_steps, t))
  return [Setting(t, v, tuple(by_steps[t])) for t in order]


def row_key(row: Mapping[str, Any]) -> tuple:
  """The identity of a results row (KEY_FIELDS, with normalised types)."""
  types = {"step": int, "w": float, "num_steps": int, "v": float, "num_samples": int, "seed": int}
  return tuple(types[f](row[f]) for f in KEY_FIELDS)


def planned_keys(step: int, settings: Sequence[Setting],
                 eval_config: ml_collections.ConfigDict) -> list[tuple]:
  """Row keys of one checkpoint's evaluation, in sampling order."""
  return [row_key({"step": step, "w": w, "num_steps": s.num_steps, "v": s.v,
                   "num_samples": eval_config.num_samples, "seed": eval_config.seed})
          for s in settings for w in s.guidance]


class ResultsLog:
  """results.jsonl: one JSON row per line, each appended and flushed to disk when computed."""

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    self.rows = []
    text = self.path.read_text() if self.path.exists() else ""
    # A crash during a write leaves a partial last line: it is skipped, and the next row starts
    # on a fresh line.
    self._needs_newline = bool(text) and not text.endswith("\n")
    for number, line in enumerate(text.splitlines(), 1):
      try:
        row = json.loads(line)
        row_key(row)
      except (ValueError, KeyError, TypeError):
        logging.warning("%s line %d is not a complete results row; ignored (it is recomputed).",
                        self.path, number)
        continue
      self.rows.append(row)
    self._index = {row_key(row): row for row in self.rows}

  def get(self, key: tuple) -> dict | None:
    return self._index.get(key)

  def append(self, row: dict) -> None:
    line = ("\n" if self._needs_newline else "") + json.dumps(row, sort_keys=True) + "\n"
    if "://" in os.fspath(self.path):
      # Object stores cannot append: rewrite the (small) object whole, which is atomic there.
      self.path.write_text((self.path.read_text() if self.path.exists() else "") + line)
    else:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    self._needs_newline = False
    self.rows.append(row)
    self._index[row_key(row)] = row


def sample_sweep(sample_fn: sampler.SampleFn, params: Any, rng: jax.Array,
                 guidance: Sequence[float], num_samples: int, num_classes: int, batch_size: int,
                 mesh: jax.sharding.Mesh, description: str = ""
                 ) -> Iterator[tuple[float, np.ndarray, np.ndarray, float]]:
  """Samples `num_samples` images for each w, all w in the same batched calls.

  The images are laid out w by w (labels arange(N) % K and noise ids arange(N) for each w), and
  every call has the same batch shape (the last is padded), so `sample_fn` compiles once. Call it
  on every process.

  Yields:
    (w, labels int [N], images uint8 [N, H, W, C], seconds): for each w in order, as soon as its
    images are complete; seconds is its share of the sampling time.
  """
  n, count = num_samples, len(guidance)
  total = n * count
  labels = np.tile(np.arange(n) % num_classes, count)
  owner = np.repeat(np.arange(count), n)  # Index into `guidance` of each image.
  w = np.asarray(guidance, np.float32)[owner]
  ids = np.tile(np.arange(n), count)
  # Small sweeps use a smaller batch rather than mostly padding; it stays a multiple of the devices.
  batch = min(batch_size, -(-total // mesh.size) * mesh.size)
  pad = -total % batch
  padded = [np.pad(a, (0, pad)) for a in (labels, w, ids)]

  seconds = np.zeros(count)
  chunks, chunk_start, done, next_w = [], 0, 0, 0
  start_time = last_log = time.perf_counter()
  for start in range(0, total, batch):
    tic = time.perf_counter()
    batch_labels, batch_w, batch_ids = (a[start:start + batch] for a in padded)
    images = sampler.generate(sample_fn, params, rng, batch_labels, batch_w, mesh, batch_ids)
    real = min(batch, total - start)
    now = time.perf_counter()
    seconds += np.bincount(owner[start:start + real], minlength=count) * (now - tic) / real
    chunks.append(images[:real])
    done += real
    if start == 0:
      first_done, first_end = done, now
    if now - last_log >= _LOG_EVERY_SECS or done == total or start == 0:
      # The first batch includes compilation: the rate leaves it out once there are others.
      rate = ((done - first_done) / (now - first_end) if done > first_done
              else done / (now - start_time))
      eta = datetime.timedelta(seconds=round((total - done) / rate))
      logging.info("%s: %d/%d images (%.0f%%), %.1f images/s, ETA %s.", description, done, total,
                   100 * done / total, rate, eta)
      last_log = now
    while next_w < count and (next_w + 1) * n <= done:
      block = np.concatenate(chunks)
      lo = next_w * n - chunk_start
      yield (float(guidance[next_w]), labels[next_w * n:(next_w + 1) * n], block[lo:lo + n],
             float(seconds[next_w]))
      chunks, chunk_start = [block[lo + n:]], (next_w + 1) * n
      next_w += 1


@dataclasses.dataclass(frozen=True)
class Network:
  """A feature network for metrics: Inception ("" prefix) or the data-set classifier."""
  prefix: str  # Of the metric names: "" (fid, is) or "classifier_" (classifier_fid, ...).
  fn: Callable[[np.ndarray], dict[str, np.ndarray]]  # uint8 [N, H, W, C] -> outputs.
  feature_key: str  # The [N, D] features for FID and precision/recall.
  has_logits: bool
  cache_id: str  # Names its reference statistics: changes when the network does.
  info: dict  # Recorded in every row.


def inception_network(weights: str) -> Network:
  variables = inception.load_params(weights)
  has_logits = "fc" in variables["params"]
  if not has_logits:
    logging.warning("The Inception weights %s have no logits layer: the Inception Score is "
                    "omitted. Convert pytorch-fid's .pth to get it.", weights)
  digest = hashlib.sha1(epath.Path(weights).read_bytes()).hexdigest()[:10]
  return Network("", inception.make_feature_fn(variables), "pool", has_logits,
                 f"inception-{digest}", {"inception_weights": weights})


def classifier_network(classifier_dir: str, data_config: ml_collections.ConfigDict) -> Network:
  fn, meta = classifier.make_classifier_fn(classifier_dir)
  expected = {"dataset": data_config.name, "image_size": data_config.image_size,
              "channels": data_config.channels, "num_classes": data_config.num_classes}
  if got := {k: meta.get(k) for k in expected if meta.get(k) != expected[k]}:
    raise ValueError(f"config.eval.classifier_dir={classifier_dir} holds a classifier for {got}, "
                     f"but the checkpoint's model makes {expected}: point it at a classifier of "
                     "this data set (python -m cfdg_jax.eval.train_classifier trains one).")
  digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
  return Network("classifier_", fn, "features", True, f"classifier-{digest}",
                 {"classifier_dir": classifier_dir,
                  "classifier_test_accuracy": float(meta["test_accuracy"])})


def reference_images(builder: tfds.core.DatasetBuilder, split: str, image_size: int) -> np.ndarray:
  """uint8 [N, S, S, C]: the split's first MAX_REFERENCE_IMAGES images, as stored.

  Resized (central square, antialiased, as the training pipeline) only when S differs.
  """
  stored = builder.info.features["image"].shape

  def prepare(example):
    image = example["image"]
    if tuple(stored[:2]) != (image_size, image_size):
      image = input_pipeline._center_crop_and_resize(  # pylint: disable=protected-access
          tf.cast(image, tf.float32), image_size)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image

  # One pass over part of the split: TFDS's auto-cache would only warn about the unread rest.
  ds = builder.as_dataset(split=split, shuffle_files=False,
                         read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.take(MAX_REFERENCE_IMAGES)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(1000)
  return np.concatenate(list(tfds.as_numpy(ds)))


def reference_path(cache_dir: epath.PathLike, dataset: str, split: str, image_size: int,
                   network: Network) -> epath.Path:
  name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{dataset}_{split}_{image_size}px_{network.cache_id}")
  return epath.Path(cache_dir) / f"reference_{name}.npz"


def load_or_compute_reference(path: epath.Path, network: Network,
                              get_images: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
  """{"mu", "sigma", "features"} of the reference images, cached at `path` (written atomically)."""
  if path.exists():
    with path.open("rb") as f, np.load(f) as data:
      return dict(data)
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
  return reference


def compute_metrics(images: np.ndarray, labels: np.ndarray, networks: Sequence[Network],
                    references: Sequence[Mapping[str, np.ndarray]], k: int) -> dict[str, float]:
  """Metrics of uint8 images [N, H, W, C] sampled for `labels` [N], one set per network.

  fid, is, is_std, precision, recall for Inception; classifier_fid, classifier_is,
  classifier_is_std, classifier_accuracy (of argmax logits == labels) for the classifier.
  """
  row = {}
  for network, reference in zip(networks, references):
    out = network.fn(images)
    features = out[network.feature_key]
    p = network.prefix
    row[p + "fid"] = metrics.fid_from_stats(*metrics.stats_from_features(features),
                                            reference["mu"], reference["sigma"])
    if network.has_logits:
      row[p + "is"], row[p + "is_std"] = metrics.inception_score(out["logits"], IS_SPLITS)
    if p:
      row[p + "accuracy"] = float(np.mean(np.argmax(out["logits"], axis=-1) == labels))
    else:
      row["precision"], row["recall"] = metrics.precision_recall(reference["features"], features, k)
  return row


_SCALARS = ("fid", "is", "precision", "recall", "classifier_fid", "classifier_is",
            "classifier_accuracy")


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
  """TensorBoard scalars of a row, e.g. {"fid/w=1.0/T=128": ...}."""
  return {f"{name}/w={row['w']}/T={row['num_steps']}": row[name]
          for name in _SCALARS if name in row}


# (x, y, x label, y label) of the plot's left panel, in order of preference.
_PLOT_AXES = (("is", "fid", "Inception Score", "FID (Inception)"),
              ("classifier_is", "classifier_fid", "classifier Inception Score", "classifier FID"),
              ("w", "fid", "guidance strength w", "FID (Inception)"))


def write_tradeoff_plot(path: epath.PathLike, rows: Sequence[Mapping[str, Any]], *, dataset: str,
                        num_steps: int, v: float, num_samples: int, seed: int) -> bool:
  """Draws the w trade-off of the newest checkpoints at one sampler setting into a PNG.

  Left: FID against IS (Inception's when both exist, else the classifier's; FID against w when no
  IS exists), one point per w labelled with w. Right: classifier accuracy against w. One line per
  checkpoint, the newest _PLOT_CHECKPOINTS, darker when newer. Returns False (and writes nothing)
  when no row matches.
  """
  rows = [r for r in rows if (r["num_steps"], r["v"], r["num_samples"], r["seed"])
          == (num_steps, v, num_samples, seed)]
  if not rows:
    return False
  steps = sorted({r["step"] for r in rows})[-_PLOT_CHECKPOINTS:]
  rows = [r for r in rows if r["step"] in steps]
  # The first pair that the rows have (rows recorded with other metric settings may lack it).
  for x_name, y_name, x_label, y_label in _PLOT_AXES:
    if any(x_name in r and y_name in r for r in rows):
      break

  fig = figure.Figure(figsize=(12, 5), layout="constrained")
  left, right = fig.subplots(1, 2)
  colors = [matplotlib.colormaps["Blues"](1.0 - 0.6 * i / max(len(steps) - 1, 1))
            for i in reversed(range(len(steps)))]
  labelled = []
  for step, color in zip(steps, colors):
    points = sorted((r for r in rows if r["step"] == step), key=lambda r: r["w"])
    newest = step == steps[-1]
    style = {"color": color, "marker": "o", "linewidth": 2.0 if newest else 1.0,
             "label": f"step {step}"}
    quality = [r for r in points if x_name in r and y_name in r]
    if quality:
      left.plot([r[x_name] for r in quality], [r[y_name] for r in quality], **style)
      labelled = quality  # The newest line with points gets the w labels.
    accuracy = [r for r in points if "classifier_accuracy" in r]
    if accuracy:
      right.plot([r["w"] for r in accuracy], [r["classifier_accuracy"] for r in accuracy], **style)
  for r in labelled:
    left.annotate(f"w={r['w']:g}", (r[x_name], r[y_name]), textcoords="offset points",
                  xytext=(5, 5), fontsize=9)
  left.set(xlabel=x_label, ylabel=y_label, title="one point per w (lower FID is better)")
  left.ticklabel_format(useOffset=False)
  left.grid(alpha=0.3)
  left.legend(fontsize=9)
  test_accuracy = [r["classifier_test_accuracy"] for r in rows if "classifier_test_accuracy" in r]
  if test_accuracy:
    right.axhline(test_accuracy[-1], color="tab:red", linestyle="--", linewidth=1,
                  label=f"classifier on test images ({test_accuracy[-1]:.3f})")
    right.set(xlabel="guidance strength w", ylabel="classifier accuracy on the sampled class",
              title="samples recognised as their class")
    right.grid(alpha=0.3)
    right.legend(fontsize=9)
  else:
    right.text(0.5, 0.5, "no classifier:\nset config.eval.classifier_dir", ha="center",
               va="center", transform=right.transAxes)
    right.set_axis_off()
  fig.suptitle(f"{dataset}, newest checkpoint step {steps[-1]}: guidance sweep at T={num_steps}, "
               f"v={v:g}, {num_samples} samples per w (seed {seed})")
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  return True


def _broadcast(x: np.ndarray) -> np.ndarray:
  """Process 0's `x` on every process (a no-op with one process)."""
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


# What process 0 tells the others to do next.
_EVALUATE, _WAIT, _DONE, _NO_CHECKPOINTS, _NO_SUCH_STEP = range(5)


class Evaluator:
  """Evaluates the checkpoints of one workdir; keeps networks, references and samplers warm.

  With `step`, only that checkpoint is evaluated (others are neither read nor scored).
  """

  def __init__(self, workdir: str, eval_override: ml_collections.ConfigDict | None = None, *,
               step: int | None = None):
    self.workdir = workdir
    self.override = eval_override
    self.step = step
    if eval_override is not None:
      check_eval_config(eval_override, jax.device_count())  # Before any checkpoint is read.
    self.is_chief = jax.process_index() == 0
    self.eval_dir = epath.Path(workdir) / "eval"
    self.mesh = sharding.create_mesh()
    self.manager = checkpointing.create_manager(workdir, read_only=True)
    self.results = self.writer = None
    if self.is_chief:
      self.results = ResultsLog(self.eval_dir / "results.jsonl")
    self._configs = {}  # step -> its checkpoint config.
    self._finished = set()  # Steps with every planned row recorded.
    self._cache = {}  # Networks, references, builders and sample functions, by what defines them.
    self._warned_setup = False

  def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  def _config(self, step: int) -> ml_collections.ConfigDict:
    if step not in self._configs:
      self._configs[step] = checkpointing.restore_config(self.manager, step)
    return self._configs[step]

  def _plan(self, watch: bool) -> tuple[int, int]:
    """Process 0: (what to do, step): the oldest step not yet finished, or wait / done."""
    self.manager.reload()
    steps = sorted(self.manager.all_steps())
    if self.step is not None:
      if self.step in steps:
        return (_DONE if self.step in self._finished else _EVALUATE), self.step
      # It will not come when a later one exists (it was not saved, or was deleted) or when it
      # lies beyond the run's last step.
      done_waiting = not watch or bool(steps) and (
          steps[-1] > self.step or self.step > self._config(steps[-1]).num_train_steps)
      return (_NO_SUCH_STEP if done_waiting else _WAIT), self.step
    for step in steps:
      if step not in self._finished:
        return _EVALUATE, step
    if not steps:
      return (_WAIT if watch else _NO_CHECKPOINTS), 0
    final = self._config(steps[-1]).num_train_steps
    return (_DONE if not watch or final in self._finished else _WAIT), final

  def run(self, *, watch: bool = False, poll_seconds: float = 30.0) -> list[dict]:
    """Evaluates every checkpoint (or `step`'s), oldest first; with `watch`, until the final one
    (or `step`'s) is done.

    Returns the rows recorded by this call (process 0; others get []).
    """
    written, waiting = [], None
    while True:
      action, step = (int(x) for x in _broadcast(
          np.array(self._plan(watch) if self.is_chief else (0, 0), np.int64)))
      if action == _EVALUATE:
        waiting = None
        written += self.evaluate_checkpoint(step)
        continue
      if action == _NO_CHECKPOINTS:
        raise FileNotFoundError(
            f"No checkpoints in {checkpointing.checkpoint_dir(self.workdir)}: train first "
            "(python -m cfdg_jax.train), check --workdir, or pass --watch to wait for them.")
      if action == _NO_SUCH_STEP:
        self.manager.reload()
        raise ValueError(
            f"No checkpoint at step {step} in {checkpointing.checkpoint_dir(self.workdir)}; "
            f"available: {sorted(self.manager.all_steps())}. "
            + ("It lies beyond num_train_steps, or was not saved (checkpoint_every) or was "
               "deleted (keep_checkpoints)." if watch else
               "Choose one of those, or pass --watch to wait for it."))
      if action == _DONE:
        if self.writer is not None:
          self.writer.close()
        return written
      if waiting != step:
        logging.info("Waiting for checkpoints in %s (the %s step is %s); polling every %g s.",
                     checkpointing.checkpoint_dir(self.workdir),
                     "final" if self.step is None else "requested", step or "not known yet",
                     poll_seconds)
        waiting = step
      time.sleep(poll_seconds)

  def evaluate_checkpoint(self, step: int) -> list[dict]:
    """Records every row of `step` not already in results.jsonl (all processes call it)."""
    try:
      config = self._config(step)
    except FileNotFoundError:
      if self._deleted(step):
        return []
      raise
    eval_config = get_eval_config(config, self.override)
    check_eval_config(eval_config, jax.device_count())
    settings = self._pending_settings(step, config, eval_config)
    if not settings:
      self._finished.add(step)
      return []
    # Everything that can fail on bad input happens before the networks and the sampler compile.
    builder = self._reference_builder(config.data, eval_config.reference_split)
    networks = self._networks(eval_config, config.data) if self.is_chief else []
    try:
      _, _, params, params_sharding = checkpointing.load_ema_params(self.workdir, self.mesh, step)
    except (FileNotFoundError, ValueError):
      if self._deleted(step):
        return []
      raise
    references = self._references(builder, config.data, eval_config, networks)
    setup = {"dataset": config.data.name, "reference_split": eval_config.reference_split,
             "inception_weights": None, "classifier_dir": None}
    for network in networks:
      setup.update(network.info)

    model = unet.create_model(config)
    written = []
    for setting in settings:
      sample_fn = self._sample_fn(model, config, params_sharding, setting)
      sweep = sample_sweep(sample_fn, params, jax.random.key(eval_config.seed), setting.guidance,
                           eval_config.num_samples, config.data.num_classes,
                           eval_config.batch_size, self.mesh,
                           f"Step {step}, T={setting.num_steps}, w={list(setting.guidance)}")
      for w, labels, images, sample_seconds in sweep:
        if not self.is_chief:  # The others only take part in sampling.
          continue
        tic = time.perf_counter()
        row = {"step": step, "w": w, "num_steps": setting.num_steps, "v": setting.v,
               "num_samples": eval_config.num_samples, "seed": eval_config.seed, **setup,
               **compute_metrics(images, labels, networks, references,
                                 eval_config.precision_recall_k)}
        metric_seconds = time.perf_counter() - tic
        row.update(sample_seconds=sample_seconds, metric_seconds=metric_seconds,
                   wall_seconds=sample_seconds + metric_seconds,
                   time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.results.append(row)
        self._write_scalars(step, row)
        written.append(row)
    if self.is_chief:
      self.writer.flush()
      self._plot(config, eval_config)
    self._finished.add(step)
    return written

  def _pending_settings(self, step: int, config: ml_collections.ConfigDict,
                        eval_config: ml_collections.ConfigDict) -> list[Setting]:
    """The settings of `step`, each with only the w whose rows are not yet recorded."""
    settings = sampler_settings(eval_config, config.sample.v)
    keys = planned_keys(step, settings, eval_config)
    todo = np.zeros(len(keys), np.int32)
    if self.is_chief:  # Process 0 alone reads results.jsonl.
      todo[:] = [self._needs_row(key, eval_config) for key in keys]
    todo = iter(_broadcast(todo).astype(bool))
    pending = [Setting(s.num_steps, s.v, tuple(w for w in s.guidance if next(todo)))
               for s in settings]
    return [s for s in pending if s.guidance]

  def _reference_builder(self, data_config: ml_collections.ConfigDict,
                         split: str) -> tfds.core.DatasetBuilder:
    """The data set's builder (all processes: preparing it is collective); checks `split`."""
    builder = self._cached(("builder", data_config.to_json(sort_keys=True)),
                           lambda: input_pipeline.get_builder(data_config))
    input_pipeline.check_data_config(data_config, builder)
    try:
      builder.info.splits[split]
    except (KeyError, ValueError) as e:
      raise ValueError(f"config.eval.reference_split={split!r} is not a split of "
                       f"{data_config.name!r}: use one of {sorted(builder.info.splits)}.") from e
    return builder

  def _references(self, builder: tfds.core.DatasetBuilder,
                  data_config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict,
                  networks: Sequence[Network]) -> list[dict[str, np.ndarray]]:
    """Each network's reference statistics, from the cache or computed (and cached) now."""
    if not networks:
      return []
    self.eval_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = eval_config.reference_cache or self.eval_dir
    split, size = eval_config.reference_split, data_config.image_size
    get_images = functools.cache(lambda: reference_images(builder, split, size))  # Read once.
    references = []
    for network in networks:
      path = reference_path(cache_dir, data_config.name, split, size, network)
      references.append(self._cached(
          ("reference", os.fspath(path)),
          functools.partial(load_or_compute_reference, path, network, get_images)))
    return references

  def _plot(self, config: ml_collections.ConfigDict,
            eval_config: ml_collections.ConfigDict) -> None:
    main = sampler_settings(eval_config, config.sample.v)[0]
    path = self.eval_dir / "tradeoff.png"
    if write_tradeoff_plot(path, self.results.rows, dataset=config.data.name,
                           num_steps=main.num_steps, v=main.v,
                           num_samples=eval_config.num_samples, seed=eval_config.seed):
      logging.info("Wrote %s.", path)

  def _deleted(self, step: int) -> bool:
    """Whether `step` is gone since it was listed (training keeps only the newest checkpoints)."""
    self.manager.reload()
    if step in self.manager.all_steps():
      return False
    logging.warning("Checkpoint %d was deleted (config.keep_checkpoints) before it could be "
                    "evaluated; skipping it.", step)
    self._finished.add(step)
    return True

  def _needs_row(self, key: tuple, eval_config: ml_collections.ConfigDict) -> bool:
    row = self.results.get(key)
    if row is None:
      return True
    current = (eval_config.reference_split, eval_config.inception_weights,
               eval_config.classifier_dir)
    if tuple(row.get(f) for f in _SETUP_FIELDS) != current and not self._warned_setup:
      logging.warning("%s holds rows measured with other metric settings than now (%s); they are "
                      "kept, not recomputed. Delete them from the file to recompute them.",
                      self.results.path, dict(zip(_SETUP_FIELDS, current)))
      self._warned_setup = True
    return False

  def _networks(self, eval_config: ml_collections.ConfigDict,
                data_config: ml_collections.ConfigDict) -> list[Network]:
    networks = []
    if eval_config.inception_weights:
      networks.append(self._cached(("inception", eval_config.inception_weights),
                                   lambda: inception_network(eval_config.inception_weights)))
    if eval_config.classifier_dir:
      networks.append(self._cached(
          ("classifier", eval_config.classifier_dir, data_config.to_json(sort_keys=True)),
          lambda: classifier_network(eval_config.classifier_dir, data_config)))
    return networks

  def _sample_fn(self, model, config: ml_collections.ConfigDict, params_sharding: Any,
                 setting: Setting) -> sampler.SampleFn:
    # One jitted function per (T, v) for the whole run: checkpoints of one run share the model,
    # so only the first of them compiles.
    model_key = json.dumps({k: config[k].to_dict() for k in
                            ("data", "model", "diffusion", "sample", "sharding")}, sort_keys=True)
    return self._cached(("sample_fn", setting.num_steps, setting.v, model_key),
                        lambda: sampler.make_sample_fn(model, config, self.mesh, params_sharding,
                                                       num_steps=setting.num_steps, v=setting.v))

  def _write_scalars(self, step: int, row: Mapping[str, Any]) -> None:
    if self.writer is None:
      self.eval_dir.mkdir(parents=True, exist_ok=True)
      self.writer = metric_writers.create_default_writer(os.fspath(self.eval_dir))
    self.writer.write_scalars(step, scalars(row))


def evaluate_workdir(workdir: str, eval_override: ml_collections.ConfigDict | None = None, *,
                     step: int | None = None, watch: bool = False,
                     poll_seconds: float = 30.0) -> list[dict]:
  """Evaluates `workdir`'s checkpoints (see the module docstring); returns the rows recorded.

  Args:
    workdir: a training workdir (holding checkpoints/ or, with `watch`, about to).
    eval_override: a config's `eval` section, used instead of each checkpoint's.
    step: evaluate only the checkpoint of this step (raises ValueError if there is none, or,
      with `watch`, once a later one appears without it).
    watch: keep polling for new checkpoints until the one at the run's num_train_steps (or
      `step`) is evaluated; without it, evaluate the checkpoints there now and return.
    poll_seconds: seconds between polls when watching.
  """
  return Evaluator(workdir, eval_override, step=step).run(watch=watch, poll_seconds=poll_seconds)
