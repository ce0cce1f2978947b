"""Orbax checkpoints of a training workdir.

Each step directory <workdir>/checkpoints/<step>/ holds three items:
  train_state  {step, params, opt_state}: what training resumes from;
  ema_params   the EMA weights, which sampling and evaluation read alone;
  config       the run's config as JSON, so a checkpoint is self-describing.
Saves are asynchronous and atomic (written to a temporary directory, then renamed), so a reader
never sees a half-written step. Every process calls these functions: Orbax coordinates them.
"""
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from cfdg_jax import guidance
from cfdg_jax import job as job_lib
from cfdg_jax import samplers

ITEMS = ("train_state", "ema_params", "config")


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
  """Starts an asynchronous save of `state` (a TrainState) at `step`; returns whether it saves."""
  train_state = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
  return manager.save(step, args=ocp.args.Composite(
      train_state=ocp.args.StandardSave(train_state),
      ema_params=ocp.args.StandardSave(state.ema_params),
      config=ocp.args.JsonSave(config.to_dict())), force=force)


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """Restores a TrainState laid out (shapes, dtypes, shardings) like `abstract_state`."""
  target = {"step": abstract_state.step, "params": abstract_state.params,
            "opt_state": abstract_state.opt_state}
  restored = manager.restore(step, args=ocp.args.Composite(
      train_state=ocp.args.StandardRestore(target),
      ema_params=ocp.args.StandardRestore(abstract_state.ema_params)))
  return abstract_state.replace(**restored.train_state, ema_params=restored.ema_params)


def restore_ema_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Restores only the EMA parameters (the optimizer state is never read)."""
  restored = manager.restore(step, args=ocp.args.Composite(
      ema_params=ocp.args.StandardRestore(abstract_params)))
  return restored.ema_params


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return upgrade_config(ml_collections.ConfigDict(restored.config))


def upgrade_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config saved by an earlier version, in today's layout.

  Before rematerialisation, config.model had no remat. Before the mesh section,
  config.sharding held {fsdp: bool, fsdp_min_size}. Before the sampler and guidance sections,
  config.sample held {num_steps, v, clip_x, guidance: the grid's w,
  num_per_class} and config.eval {guidance: the w, num_steps, v, step_sweep_guidance, ...}.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if "model" in config and "remat" not in config.model:
    config.model.remat = "none"
  if "sharding" in config:
    old = config.sharding
    config.mesh = ml_collections.ConfigDict(
        {"data": 1 if old.fsdp else -1, "fsdp": -1 if old.fsdp else 1,
         "fsdp_min_size": old.fsdp_min_size})
    del config["sharding"]
  sample = config.get("sample")
  if sample is None or "sampler" in sample:
    return config
  old = config.sample
  config.sample = ml_collections.ConfigDict({
      "sampler": samplers.config_section("ancestral", old.num_steps, ancestral={"v": old.v}),
      "guidance": guidance.config_section(clip_x=old.clip_x), "w": old.guidance,
      "num_per_class": old.num_per_class})
  if "eval" in config and "guidance" in config.eval and "w" not in config.eval:
    e = config.eval.to_dict()
    v = old.v if e.pop("v") is None else e["v"]
    e.update(w=e.pop("guidance"), samplers=(f"ancestral(num_steps={e.pop('num_steps')},v={v})",),
             guidance=("cfg",), step_sweep_w=e.pop("step_sweep_guidance"), labels="balanced")
    config.eval = ml_collections.ConfigDict(e)
  return config


def load_ema_params(workdir: str, mesh: jax.sharding.Mesh, step: int | None = None
                    ) -> tuple[job_lib.Job, int, Any]:
  """The job (the checkpoint's config on `mesh`), step and EMA parameters of a workdir.

  `step` defaults to the newest. The parameters are laid out for `mesh`, whatever mesh saved
  them. Raises FileNotFoundError / ValueError naming what is missing.
  """
  manager = create_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoints in {checkpoint_dir(workdir)}; train first "
                            "(python -m cfdg_jax.train) or point --workdir at a training run.")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f"No checkpoint at step {step} in {checkpoint_dir(workdir)}; "
                     f"available: {sorted(steps)}.")
  job = job_lib.create_job(restore_config(manager, step), mesh)
  return job, step, restore_ema_params(manager, step, job.abstract_state.ema_params)
