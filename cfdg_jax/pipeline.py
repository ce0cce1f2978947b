"""Sampling a trained model from Python, sharded over every device:

  import cfdg_jax
  pipe = cfdg_jax.load("/tmp/cfdg_digits")           # the newest checkpoint's EMA weights
  images = pipe.sample([0, 1, 2, 3], w=1.0, sampler="dpmpp_2m", num_steps=20, seed=0)
  # uint8 [4, 8, 8, 1]. w and every guidance option (guidance.OPTIONS) may be per example;
  # sampler is a name or "name(field=value,...)"; guide=another pipeline for autoguidance.

`make_sample_fn` and `generate` are the pieces underneath, which training uses for its grids.
One compilation serves every call with the same sampler setting and batch shape.
"""
import dataclasses
import datetime
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cfdg_jax import checkpointing
from cfdg_jax import diffusion
from cfdg_jax import guidance
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import unet
from cfdg_jax.errors import UserError

_LOG_EVERY_SECS = 30.0
_MAX_W, _MAX_STEPS = 100.0, 10_000  # Valid beyond, but almost surely a typo: warned.


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
  """[−1, 1] floats -> uint8 [0, 255] (round to nearest)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def class_sweep(num_classes: int, num_per_class: int, ws: tuple[float, ...]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Labels, w and noise ids for a grid: for each w, classes 0..K−1 each num_per_class times.

  The ids repeat across w, so every panel of the grid shows the same draws at another w. All [N].
  """
  labels = np.repeat(np.arange(num_classes), num_per_class)
  return (np.tile(labels, len(ws)), np.repeat(np.asarray(ws, np.float32), labels.size),
          np.tile(np.arange(labels.size), len(ws)))


@dataclasses.dataclass(frozen=True)
class Network:
  """A diffusion model bound to a config: what the sampler calls."""
  model: unet.UNet
  config: ml_collections.ConfigDict
  params_sharding: Any

  def eps_fn(self, params):
    prediction = self.config.diffusion.prediction

    def eps_fn(z, logsnr, labels):
      out = self.model.apply({"params": params}, z, logsnr, labels, train=False)
      return diffusion.eps_from_output(out, z, logsnr, prediction)
    return eps_fn


def make_sample_fn(network: Network, mesh: jax.sharding.Mesh, settings: samplers.Settings, *,
                   clip_x: bool = True, guide: Network | None = None):
  """Jitted (params, guide_params, rng, labels [B], options, ids [B]) -> (uint8 [B,H,W,C], stats).

  Sharded over `mesh` along the batch. guide_params is None without a guide network. stats:
  {"network_calls", "examples"} int32 for the batch.
  """
  config = network.config
  d = config.diffusion
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  sampler = samplers.get(settings.name)

  def sample_fn(params, guide_params, rng, labels, options, ids):
    x, stats = samplers.sample(
        sampler, settings, network.eps_fn(params), rng, labels, options, image_shape=image_shape,
        null_label=config.data.num_classes, logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max,
        clip_x=clip_x, ids=ids, guide_fn=guide.eps_fn(guide_params) if guide else None)
    return to_uint8(x), stats

  batch, replicated = sharding.data_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(sample_fn, in_shardings=(
      network.params_sharding, guide.params_sharding if guide else None, replicated, batch,
      batch, batch), out_shardings=(batch, replicated))


def generate(sample_fn, params: Any, rng: jax.Array, labels: np.ndarray,
             options: guidance.Options, mesh: jax.sharding.Mesh, ids: np.ndarray | None = None,
             guide_params: Any = None) -> tuple[np.ndarray, dict[str, int]]:
  """Runs `sample_fn` on host labels, options and ids (the same on every process).

  The batch is padded to a multiple of the device count (with w = 0, so padding never adds a
  guided call); every process gets all N images. Returns (uint8 [N, H, W, C], stats).
  """
  padded = jax.tree.map(lambda a: sharding.global_array(a, mesh),
                        padded_inputs(labels, options, ids, mesh.size))
  images, stats = sample_fn(params, guide_params, rng, *padded)
  images = np.asarray(multihost_utils.process_allgather(images, tiled=True))[:len(labels)]
  return images, {k: int(v) for k, v in stats.items()}


def padded_inputs(labels: np.ndarray, options: guidance.Options, ids: np.ndarray | None,
                  num_devices: int) -> tuple[np.ndarray, guidance.Options, np.ndarray]:
  """(labels, options, ids) padded to a multiple of `num_devices` examples (w = 0 in the padding,
  so it never adds a guided call): the batch `sample_fn` gets."""
  labels = np.asarray(labels, np.int32)
  ids = np.arange(len(labels), dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
  pad = -len(labels) % num_devices
  return jax.tree.map(lambda a: np.pad(a, (0, pad)), (labels, options, ids))


@dataclasses.dataclass
class Pipeline:
  """A trained model's EMA weights, ready to sample; make one with `load`."""
  network: Network
  params: Any
  mesh: jax.sharding.Mesh
  step: int | None = None
  workdir: str | None = None
  last_stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # Of the last sample().
  _fns: dict = dataclasses.field(default_factory=dict)  # Jitted samplers, by setting.

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.network.config

  @property
  def name(self) -> str:
    return f"{self.workdir}@{self.step}"

  def settings(self, sampler: str | samplers.Settings | None = None,
               num_steps: int | None = None) -> samplers.Settings:
    """The sampler setting: the config's, or `sampler` (a name or spec) on top of it."""
    section = self.config.sample.sampler
    if isinstance(sampler, samplers.Settings):
      sampler = sampler.canonical
    return samplers.parse(sampler or section.name, section, num_steps=num_steps)

  def sample(self, labels: Any, w: Any = 0.0, *, sampler: str | samplers.Settings | None = None,
             num_steps: int | None = None, seed: int | jax.Array = 0, ids: Any = None,
             guide: "Pipeline | None" = None, clip_x: bool | None = None,
             batch_size: int | None = None, progress: bool = False, **options: Any) -> np.ndarray:
    """uint8 [N, H, W, C] samples for `labels` [N] (ints in 0..K−1).

    Args:
      labels: class ids.
      w: guidance strength, a scalar or one per example (paper convention; s = 1 + w).
      sampler: a sampler name or spec, e.g. "ddim(eta=0.5)"; default config.sample.sampler.
      num_steps: overrides the setting's num_steps.
      seed: an int or a jax key; the same seed gives the same images.
      ids: noise ids [N] (default 0..N−1): equal ids share their noise draws.
      guide: autoguidance's guide, e.g. cfdg_jax.load(workdir, step=earlier); None: ε(z, ∅).
      clip_x: clip x̂ to [−1, 1]; default config.sample.guidance.clip_x.
      batch_size: images per compiled call (default: all N in one); the last call is padded.
      progress: log images/s and the ETA every 30 s.
      **options: guidance options (guidance.OPTIONS), scalars or one per example.
    Afterwards `last_stats` holds the sampler setting, its NFE per image, and the network calls,
    examples evaluated and seconds of this call.
    """
    labels = np.atleast_1d(np.asarray(labels))
    n = labels.shape[0]
    ids = np.arange(n, dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
    settings = self.settings(sampler, num_steps)
    batches = list(self.sample_batches(labels, guidance.make_options(n, w, **options), ids,
                                       settings=settings, seed=seed, guide=guide, clip_x=clip_x,
                                       batch_size=batch_size, progress=progress))
    return np.concatenate([images for _, images in batches])

  def sample_batches(self, labels: np.ndarray, options: guidance.Options, ids: np.ndarray, *,
                     settings: samplers.Settings, seed: int | jax.Array = 0,
                     guide: "Pipeline | None" = None, clip_x: bool | None = None,
                     batch_size: int | None = None, progress: bool = False,
                     description: str = "Sampling") -> Iterator[tuple[int, np.ndarray]]:
    """Yields (start, uint8 images) batch by batch; every batch has the same (padded) shape."""
    labels = np.asarray(labels)
    n, k = labels.shape[0] if labels.ndim == 1 else 0, self.config.data.num_classes
    if not n or not np.issubdtype(labels.dtype, np.integer) or np.shape(ids) != labels.shape:
      raise UserError(f"labels must be a non-empty list of class ids (and ids one per label); "
                      f"got labels of shape {labels.shape} ({labels.dtype}), ids of shape "
                      f"{np.shape(ids)}.")
    if bad := sorted(set(labels[(labels < 0) | (labels >= k)].tolist())):
      raise UserError(f"labels {bad[:5]} are not class ids of this model: use 0..{k - 1} "
                      f"({self.config.data.name}).")
    _check_arguments(seed, batch_size, guide, settings, options)
    clip_x = self.config.sample.guidance.clip_x if clip_x is None else clip_x
    sample_fn = self.sample_fn(settings, clip_x, guide)
    rng = jax.random.key(int(seed)) if _is_int(seed) else seed
    batch = self.call_size(n, batch_size)
    self.last_stats = {"sampler": settings.canonical, "nfe": samplers.get(
        settings.name).evaluations(settings.num_steps), "network_calls": 0, "examples": 0}
    start_time = last_log = time.perf_counter()
    first = None
    for start in range(0, n, batch):
      part = slice(start, min(start + batch, n))
      pad = batch - (part.stop - start)
      take = lambda a: np.pad(a[part], (0, pad))  # pylint: disable=cell-var-from-loop
      images, stats = generate(sample_fn, self.params, rng, take(labels),
                               jax.tree.map(take, options), self.mesh, take(ids),
                               guide.params if guide else None)
      for key, value in stats.items():
        self.last_stats[key] += value
      now = time.perf_counter()
      first = first or (part.stop, now)  # The first batch includes the compilation.
      if progress and (now - last_log >= _LOG_EVERY_SECS or part.stop == n):
        done, since = (part.stop - first[0], now - first[1]) if part.stop > first[0] else (
            part.stop, now - start_time)
        rate = done / max(since, 1e-9)
        logging.info("%s: %d/%d images (%.0f%%), %.1f images/s, ETA %s.", description, part.stop,
                     n, 100 * part.stop / n, rate,
                     datetime.timedelta(seconds=round((n - part.stop) / rate)))
        last_log = now
      yield start, images[:part.stop - start]
    self.last_stats["seconds"] = time.perf_counter() - start_time

  def restore(self, step: int) -> "Pipeline":
    """The same workdir's checkpoint `step`, sharing this pipeline's compilations."""
    _, step, params = checkpointing.load_ema_params(self.workdir, self.mesh, step)
    return dataclasses.replace(self, params=params, step=step, last_stats={})

  def call_size(self, n: int, batch_size: int | None = None) -> int:
    """Images per sampler call for n images, batch_size at a time (None: all, padded)."""
    return min(batch_size or n, -(-n // self.mesh.size) * self.mesh.size)

  def sample_fn(self, settings: samplers.Settings, clip_x: bool, guide: "Pipeline | None" = None):
    """The jitted sampler of a setting (make_sample_fn), compiled once per batch shape."""
    if guide is not None:
      check_guide(self.config, guide.config)
    key = (settings, clip_x, _model_key(guide.config) if guide else None)
    if key not in self._fns:
      self._fns[key] = make_sample_fn(self.network, self.mesh, settings, clip_x=clip_x,
                                      guide=guide.network if guide else None)
    return self._fns[key]


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_arguments(seed: Any, batch_size: Any, guide: Any, settings: samplers.Settings,
                     options: guidance.Options) -> None:
  """UserError for arguments of the wrong kind; a warning for values that are likely mistakes."""
  if not _is_int(seed) and not isinstance(seed, jax.Array):
    raise UserError(f"seed={seed!r}: give an int or a jax.random key.")
  if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
    raise UserError(f"batch_size={batch_size!r}: give a positive int (images per call), or None "
                    "for all at once.")
  if guide is not None and not isinstance(guide, Pipeline):
    raise UserError(f"guide={guide!r}: give a Pipeline, e.g. cfdg_jax.load(workdir, step=N), "
                    "or None.")
  w = np.asarray(options.w)
  if np.abs(w).max(initial=0.0) > _MAX_W:
    logging.warning("w = %g: guidance beyond %g saturates the images; the paper's w are 0.1-4.",
                    np.abs(w).max(), _MAX_W)
  if settings.num_steps > _MAX_STEPS:
    logging.warning("%s: %d steps per image is far beyond what any sampler here needs (the "
                    "paper's 256, 1,024 at most): this will take long.", settings.canonical,
                    settings.num_steps)


def _model_key(config: ml_collections.ConfigDict) -> str:
  return ml_collections.ConfigDict({k: config[k] for k in ("data", "model", "diffusion")}).to_json(
      sort_keys=True)


def check_guide(config: ml_collections.ConfigDict, guide_config: ml_collections.ConfigDict) -> None:
  """The guide must make the same images of the same classes (ValueError otherwise)."""
  for field in ("image_size", "channels", "num_classes"):
    if config.data[field] != guide_config.data[field]:
      raise ValueError(f"The autoguidance guide has data.{field}={guide_config.data[field]}, the "
                       f"model {config.data[field]}: guide with a model of the same data.")


def load(workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
         fsdp: int | None = None) -> Pipeline:
  """The EMA weights of `workdir`'s checkpoint `step` (default the newest), on `mesh`.

  The default mesh is the checkpoint's config.mesh over every device of every process (as it
  trained), or data × `fsdp` (the CLIs' --fsdp); see sharding.job_mesh.
  """
  job, step, params = checkpointing.load_ema_params(workdir, mesh, step, fsdp=fsdp)
  network = Network(job.model, job.config, job.state_sharding.ema_params)
  return Pipeline(network, params, job.mesh, step=step, workdir=workdir)
