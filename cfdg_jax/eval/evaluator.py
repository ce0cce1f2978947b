"""Sample-quality evaluation of a training workdir: every checkpoint, at every point of config.eval.

A point is (sampler setting, guidance setting, w) (cfdg_jax/eval/plan.py). For each checkpoint
(oldest first) the EMA model samples `eval.num_samples` images per point, with the same labels
(`eval.labels`: class-balanced or uniformly random) and noise draws at every point; points that
share a sampler setting share batched calls (w and the guidance options are per example). Each
point gets one row of metrics:

  with `eval.inception_weights`: FID against the reference split's Inception statistics, the
    Inception Score (when the weights hold the logits layer) and precision/recall;
  with `eval.classifier_dir`: the same FID and IS on a data-set classifier's features and logits,
    the classifier's accuracy on the conditioning labels, and its own test accuracy;
  and what the point cost: denoiser evaluations per sample (nfe), network examples per sample
    (a guided step evaluates 2 per sample, an unguided one 1) and seconds.

Everything goes to <workdir>/eval/ (process 0 writes):
  results.jsonl       one JSON row per point and checkpoint (cfdg_jax/eval/results.py: keyed by
                      the settings' canonical forms and the metric networks' weights), appended
                      and fsynced as soon as it is computed; rows already there are never
                      recomputed;
  events.out.*        TensorBoard scalars such as classifier_fid/<sampler>/<guidance>/w=1.0;
  tradeoff.png        the w trade-off at the first sampler and guidance setting;
  nfe.png             FID against NFE per sampler (when the points have two or more NFE);
  reference_*.npz     reference statistics (the default eval.reference_cache), computed once.
"""
import datetime
import functools
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from cfdg_jax import checkpointing
from cfdg_jax import input_pipeline
from cfdg_jax import pipeline
from cfdg_jax.errors import UserError
from cfdg_jax.eval import networks as networks_lib
from cfdg_jax.eval import plan
from cfdg_jax.eval import plots
from cfdg_jax.eval import results as results_lib

_SCALARS = ("fid", "is", "precision", "recall", "classifier_fid", "classifier_is",
            "classifier_accuracy")


def sample_points(pipe: pipeline.Pipeline, group: Sequence[plan.Point], labels: np.ndarray, *,
                  seed: int, batch_size: int, guide: pipeline.Pipeline | None = None,
                  description: str = "") -> Iterator[tuple[plan.Point, np.ndarray, dict]]:
  """Samples len(labels) images for each point of a sampling group, in the same batched calls.

  Every point gets the same labels and noise ids 0..n−1, and every call has the same batch
  shape (the last is padded), so the sampler compiles once. Call it on every process.

  Yields:
    (point, uint8 images [n, H, W, C], cost) for each point in order, as soon as its images are
    complete; cost: {"sample_seconds": its share of the time, "examples_per_sample"}.
  """
  n, count = len(labels), len(group)
  options = plan.group_options(group, n)
  owner = np.repeat(np.arange(count), n)  # Index into `group` of each image.
  # Small sweeps use a smaller batch rather than mostly padding; it stays a multiple of the devices.
  batch = min(batch_size, -(-n * count // pipe.mesh.size) * pipe.mesh.size)
  seconds, examples = np.zeros(count), np.zeros(count)
  chunks, chunk_start, done, next_point = [], 0, 0, 0
  tic = time.perf_counter()
  batches = pipe.sample_batches(np.tile(labels, count), options, np.tile(np.arange(n), count),
                                settings=group[0].sampler, seed=seed, guide=guide,
                                clip_x=group[0].guidance.clip_x, batch_size=batch, progress=True,
                                description=description)
  for start, images in batches:
    now, real = time.perf_counter(), len(images)
    share = np.bincount(owner[start:start + real], minlength=count) / real
    seconds += share * (now - tic)
    # last_stats counts the call's examples so far; this batch's are shared like its time.
    examples += share * (pipe.last_stats["examples"] - examples.sum())
    tic = now
    chunks.append(images)
    done += real
    while next_point < count and (next_point + 1) * n <= done:
      block = np.concatenate(chunks)
      lo = next_point * n - chunk_start
      yield group[next_point], block[lo:lo + n], {
          "sample_seconds": float(seconds[next_point]),
          "examples_per_sample": float(examples[next_point] / n)}
      chunks, chunk_start = [block[lo + n:]], (next_point + 1) * n
      next_point += 1


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
  """TensorBoard scalars of a row, e.g. {"fid/<sampler>/<guidance>/w=1.0": ...}."""
  return {f"{name}/{row['sampler']}/{row['guidance']}/w={row['w']}": row[name]
          for name in _SCALARS if name in row}


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
               step: int | None = None, sampler_specs: Sequence[str] | None = None,
               guidance_specs: Sequence[str] | None = None,
               mesh: jax.sharding.Mesh | None = None, fsdp: int | None = None):
    self.workdir = workdir
    self.override = eval_override
    self.step = step
    self.specs = (sampler_specs, guidance_specs)
    if eval_override is not None:  # Checked before any checkpoint is read.
      plan.check_eval_config(self._eval_config(None), jax.device_count())
    self.is_chief = jax.process_index() == 0
    self.eval_dir = epath.Path(workdir) / "eval"
    # None until the first checkpoint is loaded: then its config.mesh (or data × fsdp).
    self.mesh, self.fsdp = mesh, fsdp
    self.manager = checkpointing.create_manager(workdir, read_only=True)
    self.results = self.writer = None
    if self.is_chief:
      self.results = results_lib.ResultsLog(self.eval_dir / "results.jsonl")
    self._configs = {}  # step -> its checkpoint config.
    self._finished = set()  # Steps with every planned row recorded.
    self._cache = {}  # Networks, references, builders and pipelines, by what defines them.

  def _eval_config(self, config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The eval section: the override's or the checkpoint config's, with the CLI's specs."""
    eval_config = plan.get_eval_config(config, self.override)
    sampler_specs, guidance_specs = self.specs
    if sampler_specs:
      eval_config.samplers = tuple(sampler_specs)
    if guidance_specs:
      eval_config.guidance = tuple(guidance_specs)
    return eval_config

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
        raise UserError(
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
    eval_config = self._eval_config(config)
    plan.check_eval_config(eval_config, jax.device_count(), config.sample)
    points = plan.resolve_guides(plan.plan_points(eval_config, config.sample), plan.newest_step)
    # Everything that can fail on bad input happens before the networks and the sampler compile.
    networks = self._networks(eval_config, config.data) if self.is_chief else []
    builder = self._reference_builder(config.data, eval_config.reference_split)
    identity = {n.name: n.digest for n in networks}
    points = self._pending(step, points, eval_config, identity)
    if not points:
      self._finished.add(step)
      return []
    try:
      pipe = self._pipeline(step)
    except (FileNotFoundError, ValueError):
      if self._deleted(step):
        return []
      raise
    references = self._references(builder, config.data, eval_config, networks)
    setup = {"dataset": config.data.name, "reference_split": eval_config.reference_split,
             "inception_weights": None, "classifier_dir": None, "metric_networks": identity}
    for network in networks:
      setup.update(network.info)
    labels = plan.eval_labels(eval_config.labels, eval_config.num_samples,
                              config.data.num_classes, eval_config.seed)

    written = []
    for group in plan.sampling_groups(points):
      g = group[0].guidance
      guide = self._guide(g.guide_workdir, g.guide_step) if g.guide_workdir else None
      sweep = sample_points(pipe, group, labels, seed=eval_config.seed,
                            batch_size=eval_config.batch_size, guide=guide,
                            description=f"Step {step}, {group[0].sampler.canonical}, "
                            f"{len(group)} point{'s' if len(group) > 1 else ''}")
      for point, images, cost in sweep:
        if not self.is_chief:  # The others only take part in sampling.
          continue
        tic = time.perf_counter()
        row = {"step": step, **plan.row_identity(point, eval_config), **setup, **cost,
               **networks_lib.compute_metrics(images, labels, networks, references,
                                              eval_config.precision_recall_k)}
        row["metric_seconds"] = time.perf_counter() - tic
        row.update(wall_seconds=row["sample_seconds"] + row["metric_seconds"],
                   time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.results.append(row)
        self._write_scalars(step, row)
        written.append(row)
    if self.is_chief:
      self.writer.flush()
      self._plot(config, eval_config, identity)
    self._finished.add(step)
    return written

  def _pending(self, step: int, points: Sequence[plan.Point], eval_config: ml_collections.ConfigDict,
               identity: dict[str, str]) -> list[plan.Point]:
    """The points of `step` whose rows are not yet recorded (process 0 decides for all)."""
    todo = np.zeros(len(points), np.int32)
    if self.is_chief:  # Process 0 alone reads results.jsonl.
      todo[:] = [self.results.get(results_lib.row_key(
          {"step": step, **plan.row_identity(p, eval_config), "metric_networks": identity})) is None
                 for p in points]
    todo = _broadcast(todo).astype(bool)
    return [p for p, needed in zip(points, todo) if needed]

  def _pipeline(self, step: int) -> pipeline.Pipeline:
    """The checkpoint's EMA weights; checkpoints of one run share the compiled samplers."""
    if "pipeline" not in self._cache:
      self._cache["pipeline"] = pipeline.load(self.workdir, step, mesh=self.mesh, fsdp=self.fsdp)
      self.mesh = self._cache["pipeline"].mesh
    elif self._cache["pipeline"].step != step:
      self._cache["pipeline"] = self._cache["pipeline"].restore(step)
    return self._cache["pipeline"]

  def _guide(self, workdir: str, step: int) -> pipeline.Pipeline:
    return self._cached(("guide", workdir, step),
                        lambda: pipeline.load(workdir, step, mesh=self.mesh))

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
                  networks: Sequence[networks_lib.Network]) -> list[Mapping[str, np.ndarray]]:
    """Each network's metrics.Reference: from the cache, or computed (and cached) now."""
    if not networks:
      return []
    self.eval_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = eval_config.reference_cache or self.eval_dir
    split, size = eval_config.reference_split, data_config.image_size
    get_images = functools.cache(  # Read once.
        lambda: networks_lib.reference_images(builder, split, size))
    references = []
    for network in networks:
      path = networks_lib.reference_path(cache_dir, data_config.name, split, size, network)
      references.append(self._cached(
          ("reference", os.fspath(path)),
          functools.partial(networks_lib.load_or_compute_reference, path, network, get_images)))
    return references

  def _plot(self, config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict,
            identity: dict[str, str]) -> None:
    """tradeoff.png at the first point's settings and nfe.png of the newest step, from every
    recorded row of this protocol (labels, num_samples, seed, metric networks)."""
    protocol = {"labels": eval_config.labels, "num_samples": eval_config.num_samples,
                "seed": eval_config.seed, "metric_networks": identity}
    rows = [r for r in self.results.rows if all(r.get(k) == v for k, v in protocol.items())]
    main = plan.plan_points(eval_config, config.sample)[0]
    first = [r for r in rows if (r["sampler"], r["guidance"])
             == (main.sampler.canonical, main.guidance.canonical)]
    described = (f"{eval_config.num_samples} samples per point, {eval_config.labels} labels, "
                 f"seed {eval_config.seed}")
    if plots.write_tradeoff_plot(self.eval_dir / "tradeoff.png", first, title=(
        f"{config.data.name}: guidance sweep, {main.sampler.canonical}, "
        f"{main.guidance.canonical}; {described}")):
      logging.info("Wrote %s.", self.eval_dir / "tradeoff.png")
    newest = max((r["step"] for r in rows), default=None)
    if plots.write_nfe_plot(self.eval_dir / "nfe.png", [r for r in rows if r["step"] == newest],
                            title=f"{config.data.name}, step {newest}: {described}"):
      logging.info("Wrote %s.", self.eval_dir / "nfe.png")

  def _deleted(self, step: int) -> bool:
    """Whether `step` is gone since it was listed (training keeps only the newest checkpoints)."""
    self.manager.reload()
    if step in self.manager.all_steps():
      return False
    logging.warning("Checkpoint %d was deleted (config.keep_checkpoints) before it could be "
                    "evaluated; skipping it.", step)
    self._finished.add(step)
    return True

  def _networks(self, eval_config: ml_collections.ConfigDict,
                data_config: ml_collections.ConfigDict) -> list[networks_lib.Network]:
    # Keyed by the weights' digest too: weights rewritten in place are loaded afresh.
    networks = []
    if eval_config.inception_weights:
      path = eval_config.inception_weights
      networks.append(networks_lib.checked("inception_weights", path, lambda: self._cached(
          ("inception", path, networks_lib.weights_digest(path)),
          lambda: networks_lib.inception_network(path))))
    if eval_config.classifier_dir:
      directory = eval_config.classifier_dir
      networks.append(networks_lib.checked("classifier_dir", directory, lambda: self._cached(
          ("classifier", directory, networks_lib.classifier_digest(directory),
           data_config.to_json(sort_keys=True)),
          lambda: networks_lib.classifier_network(directory, data_config))))
    return networks

  def _write_scalars(self, step: int, row: Mapping[str, Any]) -> None:
    if self.writer is None:
      self.eval_dir.mkdir(parents=True, exist_ok=True)
      self.writer = metric_writers.create_default_writer(os.fspath(self.eval_dir))
    self.writer.write_scalars(step, scalars(row))


def evaluate_workdir(workdir: str, eval_override: ml_collections.ConfigDict | None = None, *,
                     step: int | None = None, watch: bool = False, poll_seconds: float = 30.0,
                     sampler_specs: Sequence[str] | None = None,
                     guidance_specs: Sequence[str] | None = None,
                     mesh: jax.sharding.Mesh | None = None,
                     fsdp: int | None = None) -> list[dict]:
  """Evaluates `workdir`'s checkpoints (see the module docstring); returns the rows recorded.

  Args:
    workdir: a training workdir (holding checkpoints/ or, with `watch`, about to).
    eval_override: a config's `eval` section, used instead of each checkpoint's.
    step: evaluate only the checkpoint of this step (raises ValueError if there is none, or,
      with `watch`, once a later one appears without it).
    watch: keep polling for new checkpoints until the one at the run's num_train_steps (or
      `step`) is evaluated; without it, evaluate the checkpoints there now and return.
    poll_seconds: seconds between polls when watching.
    sampler_specs, guidance_specs: replace the eval section's samplers / guidance settings.
    mesh: the devices to sample on (default: the checkpoint's config.mesh, or data × `fsdp`).
  """
  return Evaluator(workdir, eval_override, step=step, sampler_specs=sampler_specs,
                   guidance_specs=guidance_specs, mesh=mesh, fsdp=fsdp).run(
                       watch=watch, poll_seconds=poll_seconds)
