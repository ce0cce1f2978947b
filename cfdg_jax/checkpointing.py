"""Orbax checkpoints of a training workdir.

Each step directory <workdir>/checkpoints/<step>/ holds four items:
  train_state  {step, params, opt_state}: what training resumes from;
  ema_params   the EMA weights, which sampling and evaluation read alone;
  config       the run's config as JSON, so a checkpoint is self-describing;
  checksums    {train_state: {path: checksum}, ema_params: ...} (cfdg_jax/checksums.py), which
               every restore verifies, so that a flipped bit is not restored as a weight.
Saves are asynchronous and atomic (written to a temporary directory, then renamed), so a reader
never sees a half-written step. A step that cannot be read (truncated, missing files, arrays that
fail their checksums) is reported and skipped for the newest good one. Every process calls these
functions: Orbax coordinates them.
"""
import os
import re
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from cfdg_jax import checksums
from cfdg_jax import config_changes
from cfdg_jax import errors
from cfdg_jax import guidance
from cfdg_jax import job as job_lib
from cfdg_jax import samplers
from cfdg_jax import sharding

ITEMS = ("train_state", "ema_params", "config", "checksums")
# Config fields a resumed run must share with its checkpoint (they fix the parameters), less those
# that only say how the same parameters are computed (config_changes.HOW_COMPUTED).
_ARCHITECTURE_FIELDS = ("model", "data.image_size", "data.channels", "data.num_classes",
                        "diffusion.prediction")
_MAX_ROWS = 12  # Parameters listed when a checkpoint holds another model.


def checkpoint_dir(workdir: str) -> str:
  """<workdir>/checkpoints; local paths made absolute (Orbax wants them so), gs:// kept as is."""
  return os.path.join(workdir if "://" in workdir else os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, *, save_every: int = 1, keep: int | None = None,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A manager for <workdir>/checkpoints that saves every `save_every` steps, keeping `keep`."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else save_every, max_to_keep=keep, create=not read_only,
      read_only=read_only, enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
  """Starts an asynchronous save of `state` (a TrainState) at `step`; returns whether it saves.

  Raises JobError when this or the previous save failed (a full disk, a failed write).
  """
  train_state = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
  sums = {"train_state": checksums.compute(train_state),
          "ema_params": checksums.compute(state.ema_params)}
  try:
    return manager.save(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardSave(train_state),
        ema_params=ocp.args.StandardSave(state.ema_params),
        config=ocp.args.JsonSave(config.to_dict()), checksums=ocp.args.JsonSave(sums)),
                        force=force)
  except Exception as e:  # pylint: disable=broad-except
    raise _write_error(manager, e) from e


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Blocks until the pending save is committed; JobError when it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _write_error(manager, e) from e


def _reason(e: BaseException) -> str:
  """The gist of a (possibly chained, TensorStore-wrapped) I/O exception, on one line."""
  chain = []
  while e is not None and len(chain) < 8:
    chain.append(f"{type(e).__name__}: {e}")
    e = e.__cause__ or e.__context__
  text = " | ".join(chain)
  os_error = re.search(r"([^:\"|]+\[os_error_code='?\d+'?\])", text)  # A failed write's errno.
  if os_error:
    return os_error.group(1).strip()
  if 'local file "' in text:  # TensorStore names the file it failed to read last.
    path, _, rest = text.rsplit('local file "', 1)[1].partition('": ')
    return path + ": " + re.split(r" \[tensorstore| \| ", rest)[0]
  return chain[-1].splitlines()[0][:300]


def _write_error(manager: ocp.CheckpointManager, e: Exception) -> errors.JobError:
  steps = sorted(manager.all_steps(read=True))
  intact = (f"the checkpoints already there (steps {', '.join(map(str, steps))}) are intact and "
            f"a rerun resumes from step {steps[-1]}" if steps else "no earlier checkpoint exists")
  return errors.JobError(f"Writing a checkpoint to {manager.directory} failed ({_reason(e)}); "
                         f"{intact}. Free disk space or fix the path, then rerun.")


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """Restores a TrainState laid out (shapes, dtypes, shardings) like `abstract_state`."""
  target = {"step": abstract_state.step, "params": abstract_state.params,
            "opt_state": abstract_state.opt_state}
  restored = manager.restore(step, args=ocp.args.Composite(
      train_state=ocp.args.StandardRestore(target),
      ema_params=ocp.args.StandardRestore(abstract_state.ema_params)))
  _verify(manager, step, train_state=restored.train_state, ema_params=restored.ema_params)
  return abstract_state.replace(**restored.train_state, ema_params=restored.ema_params)


def restore_ema_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Restores only the EMA parameters (the optimizer state is never read)."""
  restored = manager.restore(step, args=ocp.args.Composite(
      ema_params=ocp.args.StandardRestore(abstract_params)))
  _verify(manager, step, ema_params=restored.ema_params)
  return restored.ema_params


def _verify(manager: ocp.CheckpointManager, step: int, **items: Any) -> None:
  """checksums.Mismatch unless the restored `items` are the arrays that were saved."""
  if not (epath.Path(manager.directory) / str(step) / "checksums").exists():
    logging.info("Checkpoint %d has no checksums (saved by an earlier version): not verified.",
                 step)
    return
  saved = manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))
  for name, tree in items.items():
    checksums.verify(saved.checksums[name], tree, f"checkpoints/{step}/{name}")


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return upgrade_config(ml_collections.ConfigDict(restored.config))


def upgrade_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config saved by an earlier version, in today's layout.

  Before rematerialisation, config.model had no remat (nor attention, before blockwise
  attention); before gradient accumulation, there was no config.microbatches. Before the mesh section,
  config.sharding held {fsdp: bool, fsdp_min_size}. Before the sampler and guidance sections,
  config.sample held {num_steps, v, clip_x, guidance: the grid's w,
  num_per_class} and config.eval {guidance: the w, num_steps, v, step_sweep_guidance, ...}.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for field, default in (("remat", "none"), ("attention", "auto")):
    if "model" in config and field not in config.model:
      config.model[field] = default
  if "batch_size" in config and "microbatches" not in config:
    config.microbatches = 1
  if "sharding" in config:
    old = config.sharding
    config.mesh = ml_collections.ConfigDict(
        {"data": 1 if old.fsdp else -1, "fsdp": -1 if old.fsdp else 1,
         "fsdp_min_size": old.fsdp_min_size})
    del config["sharding"]
  sample = config.get("sample")
  if sample is not None and "sampler" in sample and "batch_size" not in sample:
    sample.batch_size = None  # Before grids were drawn in batches: all at once.
  if sample is None or "sampler" in sample:
    return config
  old = config.sample
  config.sample = ml_collections.ConfigDict({
      "sampler": samplers.config_section("ancestral", old.num_steps, ancestral={"v": old.v}),
      "guidance": guidance.config_section(clip_x=old.clip_x), "w": old.guidance,
      "num_per_class": old.num_per_class, "batch_size": None})
  if "eval" in config and "guidance" in config.eval and "w" not in config.eval:
    e = config.eval.to_dict()
    v = old.v if e.pop("v") is None else e["v"]
    e.update(w=e.pop("guidance"), samplers=(f"ancestral(num_steps={e.pop('num_steps')},v={v})",),
             guidance=("cfg",), step_sweep_w=e.pop("step_sweep_guidance"), labels="balanced")
    config.eval = ml_collections.ConfigDict(e)
  return config


def param_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a checkpoint's EMA parameters, from its metadata (no array is read)."""
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(manager.directory) / str(step) /
                                                  "ema_params")
  return _shapes(getattr(meta, "item_metadata", meta))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(saved_config: ml_collections.ConfigDict,
                     saved_shapes: dict[str, tuple[int, ...]], job: job_lib.Job,
                     workdir: str) -> None:
  """UserError, with the differing config fields and parameters, unless a checkpoint of
  `saved_config` with `saved_shapes` holds the parameters of `job`'s model."""
  saved, here = (config_changes.flatten(saved_config.to_dict()),
                 config_changes.flatten(job.config.to_dict()))
  fields = [k for k in sorted(saved.keys() | here.keys())
            if any(k == f or k.startswith(f + ".") for f in _ARCHITECTURE_FIELDS)
            and k not in config_changes.HOW_COMPUTED and saved.get(k) != here.get(k)]
  shapes = _shapes(job.abstract_state.ema_params)
  rows = [(k, saved_shapes.get(k), shapes.get(k)) for k in sorted(saved_shapes.keys() | shapes)
          if saved_shapes.get(k) != shapes.get(k)]
  if not fields and not rows:
    return
  lines = [f"{workdir} holds checkpoints of another model than this config's:"]
  lines += [f"  config.{k} = {saved.get(k, '(absent)')} there, {here.get(k, '(absent)')} here"
            for k in fields]
  if rows:
    width = max(len(k) for k, _, _ in rows[:_MAX_ROWS]) + 2
    lines.append(f"  {'parameter':<{width}}{'checkpoint':<20}this config")
    lines += [f"  {k:<{width}}{str(a or '(absent)'):<20}{b or '(absent)'}"
              for k, a, b in rows[:_MAX_ROWS]]
    if len(rows) > _MAX_ROWS:
      lines.append(f"  … and {len(rows) - _MAX_ROWS} more of {len(saved_shapes | shapes)}.")
  lines.append("Use a new --workdir for a different model, or this workdir's config.json.")
  raise errors.UserError("\n".join(lines))


def _on_every_process(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.array(ok)).all())


def _newest_readable(manager: ocp.CheckpointManager, read: Callable[[int], Any], *,
                     set_aside: bool) -> tuple[int | None, Any]:
  """(step, read(step)) for the newest step that `read` reads on every process; (None, None).

  A step that does not read (truncated or missing files, bad metadata) is reported by path with
  the reason, and with `set_aside` moved to <workdir>/checkpoints_damaged/ (never deleted), so
  that training can write that step again. UserError (another model) is raised at once.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      result, reason = read(step), None
    except errors.UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      result, reason = None, _reason(e)
    if _on_every_process(reason is None):
      return step, result
    path = epath.Path(manager.directory) / str(step)
    logging.error("Skipping the checkpoint %s: it cannot be read (%s).", path,
                  reason or "on another process")
    if set_aside:
      _set_aside(manager, path)
  return None, None


def _set_aside(manager: ocp.CheckpointManager, path: epath.Path) -> None:
  if jax.process_index() == 0:
    dest = path.parent.parent / "checkpoints_damaged" / f"{path.name}.{int(time.time())}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
      path.rename(dest)
    except OSError as e:
      raise errors.JobError(f"Could not move the damaged checkpoint {path} to {dest} ({e}); "
                            f"move it out of {path.parent} by hand, then rerun.") from e
    logging.warning("Moved it to %s (nothing was deleted).", dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set aside {path}")
  manager.reload()


def restore_newest(manager: ocp.CheckpointManager, job: job_lib.Job,
                   workdir: str) -> tuple[int, Any]:
  """(step, TrainState on job's mesh) of the newest checkpoint that reads whole, or (0, None).

  Damaged steps are reported and set aside (see `_newest_readable`); a checkpoint of another
  model raises UserError with a table of the differing parameters.
  """
  def read(step):
    check_compatible(restore_config(manager, step), param_shapes(manager, step), job, workdir)
    return restore_train_state(manager, step, job.abstract_state)
  step, state = _newest_readable(manager, read, set_aside=True)
  return step or 0, state


def load_ema_params(workdir: str, mesh: jax.sharding.Mesh | None = None,
                    step: int | None = None, *, fsdp: int | None = None
                    ) -> tuple[job_lib.Job, int, Any]:
  """The job (the checkpoint's config on `mesh`), step and EMA parameters of a workdir.

  `step` defaults to the newest that reads (damaged ones are reported and skipped). The
  parameters are laid out for `mesh`, whatever mesh saved them; the default mesh is the
  checkpoint's config.mesh over every device, or data × `fsdp` (sharding.job_mesh). Raises
  UserError naming what is missing.
  """
  manager = create_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise errors.UserError(f"No checkpoints in {checkpoint_dir(workdir)}; train first "
                           "(python -m cfdg_jax.train) or give the workdir of a training run.")
  if step is not None and (not isinstance(step, (int, np.integer)) or isinstance(step, bool)):
    raise errors.UserError(f"step={step!r}: give a checkpoint's step as an int (available: "
                           f"{sorted(steps)}), or None for the newest.")
  if step is not None and step not in steps:
    raise errors.UserError(f"step={step}: no such checkpoint in {checkpoint_dir(workdir)}; "
                           f"available: {sorted(steps)}.")

  def read(s):
    config = restore_config(manager, s)
    job = job_lib.create_job(config, mesh or sharding.job_mesh(config.mesh, fsdp=fsdp))
    return job, restore_ema_params(manager, s, job.abstract_state.ema_params)
  if step is not None:
    try:
      job, params = read(step)
    except errors.UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise errors.JobError(
          f"The checkpoint {epath.Path(manager.directory) / str(step)} cannot be read "
          f"({_reason(e)}); use another step (available: {sorted(steps)}).") from e
    return job, step, params
  step, result = _newest_readable(manager, read, set_aside=False)
  if step is None:
    raise errors.UserError(f"No checkpoint in {checkpoint_dir(workdir)} can be read (see the "
                           "errors above).")
  return result[0], step, result[1]
