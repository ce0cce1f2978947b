"""Checks of what a user gives (a config, flags, a workdir) before any data loading or compilation.

Each check raises `errors.UserError` naming the field, its value and what would be valid; the
entry points print that message alone as their last line (`runtime.run`). Nothing here compiles,
reads or prepares data, or writes a file: a failed check leaves the workdir as it was.

  check_train_config(config, workdir)   python -m cfdg_jax.train: all of the three below
    check_config(config)                the config's own fields (no file system)
    check_workdir(workdir)              a directory the run can write (or create)
    check_data(data_config)             config.data against the TFDS data set's metadata
  check_checkpoint(workdir, step)       sample / evaluate: the checkpoint to load exists
  check_output_file(path, flag, suffix) sample: a file that can be written where it is named
  check_fsdp_flag(fsdp)                 sample / evaluate: --fsdp divides the device count
  check_guidance_flags(overrides)       sample / evaluate: the guidance option flags
  check_override(config, path)          an unknown --config.<path> field, with near matches
"""
import difflib
import math
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from cfdg_jax import attention
from cfdg_jax import checkpointing
from cfdg_jax import diffusion
from cfdg_jax import guidance
from cfdg_jax import input_pipeline
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import unet
from cfdg_jax.errors import UserError

# Counts that must be >= 1: a training run of 0 steps, or logging every 0 steps, is a typo.
_POSITIVE_COUNTS = ("num_train_steps", "log_every", "checkpoint_every", "sample_every",
                    "keep_checkpoints", "data.prefetch", "data.num_workers",
                    "sample.num_per_class")


def check_train_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Every check of a training run: its config, data set and workdir. Cheap; call it first,
  after `runtime.initialize()` (the batch is checked against the devices of all processes)."""
  check_config(config)
  check_workdir(workdir)
  check_data(config.data)


def check_config(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
                 ) -> None:
  """The config's own fields: the batch over the mesh, the UNet, the diffusion, counts, sampling.

  Reads no file; the devices (default `jax.devices()`, or a TPU slice's for AOT compilation) are
  the only outside fact it uses.
  """
  _check_batch(config, jax.devices() if devices is None else devices)
  _check_model(config)
  _check_diffusion(config)
  for field in _POSITIVE_COUNTS:
    value = _get(config, field)
    if not _is_int(value) or value < 1:
      raise UserError(f"config.{field}={value!r} must be an integer >= 1.")
  skips = config.max_nonfinite_steps
  if not _is_int(skips) or skips < 0:
    raise UserError(f"config.max_nonfinite_steps={skips!r} must be an integer >= 0 (0: stop at "
                    "the first non-finite loss).")
  if config.optimizer.warmup_steps < 0:
    raise UserError(f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} must be an "
                    "integer >= 0 (0: no warm-up).")
  if not config.optimizer.learning_rate > 0:
    raise UserError(f"config.optimizer.learning_rate={config.optimizer.learning_rate} must be "
                    "positive, e.g. 1e-4.")
  if not 0.0 <= config.ema_decay <= 1.0:
    raise UserError(f"config.ema_decay={config.ema_decay} must lie in [0, 1], e.g. 0.9999.")
  _check_sample(config.sample, len(jax.devices() if devices is None else devices))


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  for key in dotted.split("."):
    config = config[key]
  return config


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_batch(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> None:
  n_dev, processes = len(devices), len({d.process_index for d in devices})
  data, fsdp = sharding.mesh_shape(config.mesh, n_dev)
  # Every process drives as many devices, so a multiple of the devices splits over processes too.
  if not _is_int(config.batch_size) or config.batch_size < 1 or config.batch_size % n_dev:
    raise UserError(
        f"config.batch_size={config.batch_size} must be a positive multiple of the {n_dev} "
        f"devices (mesh data={data} × fsdp={fsdp}, {processes} processes) it is split "
        f"over; e.g. {max(1, round(config.batch_size / n_dev)) * n_dev}.")
  k, per_device = config.microbatches, config.batch_size // n_dev
  if not _is_int(k) or k < 1 or per_device % k:
    fits = [d for d in range(1, per_device + 1) if not per_device % d]
    raise UserError(f"config.microbatches={k!r} must divide the {per_device} examples per device "
                    f"(batch_size={config.batch_size} over {n_dev} devices), so that each device "
                    f"holds its share of every microbatch; e.g. one of {fits[:8]}.")


def _check_model(config: ml_collections.ConfigDict) -> None:
  """What unet.UNet would refuse when it is first traced, said in config fields."""
  m, size = config.model, config.data.image_size
  for field, value in (("model.base_channels", m.base_channels),
                       ("model.head_channels", m.head_channels),
                       ("data.channels", config.data.channels),
                       ("data.num_classes", config.data.num_classes),
                       ("data.image_size", size)):
    if not _is_int(value) or value < 1:
      raise UserError(f"config.{field}={value!r} must be an integer >= 1.")
  mult = tuple(m.channel_mult)
  if not mult or not all(_is_int(c) and c >= 1 for c in mult):
    raise UserError(f"config.model.channel_mult={mult} must be a non-empty sequence of positive "
                    "integers, one per UNet level, e.g. (1, 2, 2).")
  if not _is_int(m.num_res_blocks) or m.num_res_blocks < 0:
    raise UserError(f"config.model.num_res_blocks={m.num_res_blocks!r} must be an integer >= 0.")
  if not 0.0 <= m.dropout < 1.0:
    raise UserError(f"config.model.dropout={m.dropout} must lie in [0, 1), e.g. 0.1.")
  if m.remat not in unet.REMAT:
    raise UserError(f"config.model.remat={m.remat!r}; use one of {unet.REMAT}.")
  if m.attention not in attention.IMPLEMENTATIONS:
    raise UserError(f"config.model.attention={m.attention!r}; use one of "
                    f"{attention.IMPLEMENTATIONS} (auto: the fastest that applies here).")
  try:
    jnp.dtype(m.dtype)
  except TypeError as e:
    raise UserError(f"config.model.dtype={m.dtype!r} is not a dtype; use 'float32' or "
                    "'bfloat16'.") from e
  if size % 2 ** (len(mult) - 1):
    raise UserError(f"config.data.image_size={size} must be divisible by "
                    f"2**(len(channel_mult)-1) = {2 ** (len(mult) - 1)} for {len(mult)} UNet "
                    f"levels (config.model.channel_mult={mult}); resize the data or use fewer "
                    "levels.")
  sizes = [size // 2**level for level in range(len(mult))]  # Feature-map side at each level.
  for r in m.attn_resolutions:
    if r not in sizes:
      raise UserError(f"config.model.attn_resolutions={tuple(m.attn_resolutions)} has {r}, but "
                      f"the feature maps of image_size={size} with {len(mult)} levels are "
                      f"{sizes} pixels; pick from those, e.g. ({sizes[-1]},).")
  # GroupNorm needs no check: unet.num_groups takes a divisor of each layer's channels. The
  # heads split the channels of every attention level, and the middle block (last level) attends.
  levels = sorted({len(mult) - 1} | {sizes.index(r) for r in m.attn_resolutions})
  widths = [m.base_channels * mult[level] for level in levels]
  for level, width in zip(levels, widths):
    if width % m.head_channels:
      common = math.gcd(*widths)
      fit = max(d for d in range(1, min(common, m.head_channels) + 1) if common % d == 0)
      raise UserError(f"config.model.head_channels={m.head_channels} must divide the {width} "
                      f"channels of the attention at level {level} (base_channels="
                      f"{m.base_channels} × channel_mult[{level}]={mult[level]}); e.g. "
                      f"head_channels={fit}.")


def _check_diffusion(config: ml_collections.ConfigDict) -> None:
  d = config.diffusion
  if not 0.0 <= d.p_uncond <= 1.0:
    raise UserError(f"config.diffusion.p_uncond={d.p_uncond} is a probability; use a value in "
                    "[0, 1] (the paper uses 0.1, 0.2 or 0.5).")
  if d.prediction not in diffusion.PREDICTIONS:
    raise UserError(f"config.diffusion.prediction={d.prediction!r}; use one of "
                    f"{diffusion.PREDICTIONS}.")
  if not (math.isfinite(d.logsnr_min) and math.isfinite(d.logsnr_max)
          and d.logsnr_min < d.logsnr_max):
    raise UserError(f"config.diffusion.logsnr_min={d.logsnr_min} must be below "
                    f"config.diffusion.logsnr_max={d.logsnr_max}, both finite (defaults -20, 20).")


def _check_sample(sample: ml_collections.ConfigDict, num_devices: int) -> None:
  size = sample.batch_size
  if size is not None and (not _is_int(size) or size < 1 or size % num_devices):
    raise UserError(f"config.sample.batch_size={size!r} must be a positive multiple of the "
                    f"{num_devices} devices (images per sampler call of the grids), or None for "
                    "a whole grid in one call.")
  for name, check in (("sampler", samplers.settings_from_config),
                      ("guidance", guidance.settings_from_config)):
    try:
      check(sample[name])
    except ValueError as e:
      raise UserError(f"config.sample.{name}: {e}") from e
  ws = tuple(sample.w)
  if not ws or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in ws):
    raise UserError(f"config.sample.w={ws} must be a non-empty tuple of finite guidance "
                    "strengths, e.g. (0.0, 1.0, 3.0).")


def check_data(data_config: ml_collections.ConfigDict) -> None:
  """config.data against the TFDS data set's metadata, without preparing or reading the data.

  The split is checked only when the data set is prepared: before that, TFDS does not know it.
  """
  name = data_config.name
  try:
    builder = tfds.builder(name, data_dir=data_config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    near = difflib.get_close_matches(str(name), tfds.list_builders(
        with_community_datasets=False), n=3)
    raise UserError(f"config.data.name={name!r} is not a TFDS data set; "
                    + (f"did you mean {' or '.join(map(repr, near))}?" if near else
                       "use an image classification data set such as 'digits' or 'mnist'.")
                    ) from e
  except ValueError as e:  # E.g. an unknown version or builder config: 'mnist:9.9.9'.
    raise UserError(f"config.data.name={name!r}: {str(e).splitlines()[0]}") from e
  manual_dir = data_config.manual_dir
  if manual_dir and not builder.is_prepared() and not epath.Path(manual_dir).is_dir():
    raise UserError(f"config.data.manual_dir={manual_dir!r} is not a directory; give the one "
                    f"that holds {name!r}'s original files.")
  if not builder.is_prepared() and "://" not in str(builder.data_dir):
    existing = pathlib.Path(builder.data_dir)
    while not existing.exists():  # Where preparing would create its first folder.
      existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
      raise UserError(f"config.data.data_dir={data_config.data_dir!r}: {name!r} is not prepared "
                      f"there, and preparing it needs write permission on {existing}; give a "
                      "data_dir you can write, or one where it is prepared.")
  input_pipeline.check_data_config(data_config, builder)


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """`workdir` is a writable directory, or one that can be created. Creates nothing.

  Cloud paths (gs://...) are not checked: only a write would tell.
  """
  if not workdir:
    raise UserError(f"{flag} is empty; give a directory, e.g. {flag}=/tmp/cfdg_digits.")
  if "://" in workdir:
    return
  path = pathlib.Path(workdir).absolute()
  for sub in (path, path / "checkpoints"):
    if sub.exists() and not sub.is_dir():
      raise UserError(f"{flag}={workdir}: {sub} is a file, not a directory; pass another "
                      f"{flag} (a new or existing directory).")
  existing = path
  while not existing.exists():  # The directory the run would create its first folder in.
    existing = existing.parent
  if not existing.is_dir():
    raise UserError(f"{flag}={workdir} cannot be created: {existing} is a file.")
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "is not writable" if existing == path else f"cannot be created in {existing}"
    raise UserError(f"{flag}={workdir} {what}: no write permission; pass a directory you can "
                    "write.")


def check_output_file(path: str, flag: str, suffix: str) -> None:
  """`path` names a `suffix` file that can be written (created or replaced); creates nothing.

  Cloud paths (gs://...) are not checked beyond their name: only a write would tell.
  """
  if path and "://" not in path and pathlib.Path(path).is_dir():
    raise UserError(f"{flag}={path} is a directory; give a file name in it, e.g. "
                    f"{flag}={os.path.join(path, 'samples' + suffix)}.")
  if not path or pathlib.PurePath(path).suffix.lower() != suffix:
    raise UserError(f"{flag}={path}: the file is written as {suffix[1:].upper()}; give a "
                    f"{suffix} file name, e.g. {flag}=samples{suffix}.")
  if "://" in path:
    return
  file = pathlib.Path(path).absolute()
  if not file.parent.is_dir():
    raise UserError(f"{flag}={path}: the directory {file.parent} does not exist; create it or "
                    "write elsewhere.")
  writable = os.access(file, os.W_OK) if file.exists() else os.access(file.parent,
                                                                         os.W_OK | os.X_OK)
  if not writable:
    raise UserError(f"{flag}={path} cannot be written: no write permission on "
                    f"{file if file.exists() else file.parent}; write elsewhere.")


def check_checkpoint(workdir: str, step: int | None = None, *, workdir_flag: str = "--workdir",
                     step_flag: str = "--step", hint: str = "") -> int:
  """The checkpoint step to load from a training workdir: `step`, or else its newest.

  Call after `runtime.initialize()` (Orbax lists the steps). hint: what else the user may do
  when there are no checkpoints, e.g. "or pass --watch to wait for them".
  """
  path = epath.Path(workdir)
  if not workdir or not path.is_dir():
    what = "is a file" if workdir and path.exists() else "does not exist"
    raise UserError(f"No checkpoints: {workdir_flag}={workdir} {what}; point it at the workdir of "
                    f"a training run (python -m cfdg_jax.train --workdir ...){hint}.")
  steps = sorted(checkpointing.create_manager(workdir, read_only=True).all_steps())
  if not steps:
    raise UserError(f"No checkpoints in {checkpointing.checkpoint_dir(workdir)} "
                    f"({workdir_flag}={workdir}); train first (python -m cfdg_jax.train){hint}.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise UserError(f"{step_flag}={step}: {workdir} has no checkpoint at step {step}; the "
                    f"steps are {steps}.")
  return step


def check_fsdp_flag(fsdp: int | None) -> None:
  """--fsdp N of sample / evaluate: a divisor of the device count (None: the checkpoint's mesh)."""
  if fsdp is not None and (fsdp < 1 or jax.device_count() % fsdp):
    raise UserError(f"--fsdp={fsdp}: use a divisor of the {jax.device_count()} devices (the "
                    "batch is split over all of them, the parameters over fsdp), or leave it "
                    "out for the checkpoint's config.mesh.")


def check_guidance_flags(overrides: Mapping[str, Any]) -> None:
  """The guidance flags that are set (config.sample.guidance fields), on the default section."""
  try:
    guidance.settings_from_config({**guidance.config_section(), **overrides})
  except ValueError as e:
    flags = " ".join(f"--{k}={v}" for k, v in overrides.items())
    raise UserError(f"{flags}: {e}") from e


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every field of a config as a dotted path, sections too: ['batch_size', 'data', 'data.name']."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      names += field_names(value, f"{prefix}{key}.")
  return names


def check_override(config: ml_collections.ConfigDict, path: str, flag: str = "config") -> None:
  """--<flag>.<path> names a field of `config`; else UserError listing the near matches."""
  node = config
  for key in re.sub(r"\[[^]]*\]", "", path).split("."):  # 'w[0]' indexes the field w.
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      break
    node = node[key]
  else:
    return
  names = field_names(config)
  leaf = path.rsplit(".", 1)[-1]
  near = difflib.get_close_matches(path, names, n=3, cutoff=0.75) + [
      n for n in names if difflib.get_close_matches(leaf, [n.rsplit(".", 1)[-1]], cutoff=0.8)]
  near = list(dict.fromkeys(near))[:4]
  hint = (f"did you mean {' or '.join(f'--{flag}.{n}' for n in near)}?" if near else
          f"the top-level fields are {sorted(config.keys())}.")
  raise UserError(f"--{flag}.{path}: the config has no field {path!r}; {hint}")
