"""Training: the jitted train step, and the loop around it."""
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from clu import metric_writers
from clu import periodic_actions

from cfdg_jax import checkpointing
from cfdg_jax import diffusion
from cfdg_jax import guidance
from cfdg_jax import images
from cfdg_jax import input_pipeline
from cfdg_jax import job as job_lib
from cfdg_jax import pipeline
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import unet

# Config fields a resumed run must share with the checkpoint it resumes (they fix the parameters).
_ARCHITECTURE_FIELDS = ("model", "data.image_size", "data.channels", "data.num_classes",
                        "diffusion.prediction")
_HOW_COMPUTED = ("dtype", "remat")  # Fields of config.model that leave the parameters as they are.


def train_step(state: job_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: unet.UNet, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict
               ) -> tuple[job_lib.TrainState, dict[str, jax.Array]]:
  """One AdamW step on the classifier-free loss, then the EMA update.

  batch: {'image': float32 [B, H, W, C] in [−1, 1], 'label': int32 [B]}, split over the mesh.
  """
  rng_loss, rng_dropout = jax.random.split(jax.random.fold_in(rng, state.step))
  d = config.diffusion

  def loss(params):
    def model_fn(z, logsnr, labels):
      return model.apply({"params": params}, z, logsnr, labels, train=True,
                         rngs={"dropout": rng_dropout})
    return diffusion.loss_fn(
        model_fn, rng_loss, batch["image"], batch["label"], p_uncond=d.p_uncond,
        null_label=config.data.num_classes, logsnr_min=d.logsnr_min,
        logsnr_max=d.logsnr_max, prediction=d.prediction).mean()

  loss_value, grads = jax.value_and_grad(loss)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The (1+n)/(10+n) bound averages in early weights less, which matters for short runs.
  decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {"loss": loss_value, "grad_norm": optax.global_norm(grads),
             "learning_rate": job_lib.learning_rate_schedule(config)(state.step)}
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state), metrics


def make_train_step(job: job_lib.Job):
  """`train_step` jitted over the job's mesh: (state, batch, rng) -> (state, metrics), state
  donated."""
  replicated = sharding.replicated(job.mesh)
  return jax.jit(
      lambda s, b, r: train_step(s, b, r, model=job.model, tx=job.tx, config=job.config),
      in_shardings=(job.state_sharding, sharding.data_sharding(job.mesh), replicated),
      out_shardings=(job.state_sharding, replicated), donate_argnums=0)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Cheap checks of a config, before any data loading or compilation."""
  n_dev = jax.device_count()
  data, fsdp = sharding.mesh_shape(config.mesh, n_dev)
  if config.batch_size < 1 or config.batch_size % n_dev:
    raise ValueError(
        f"config.batch_size={config.batch_size} must be a positive multiple of the {n_dev} "
        f"devices (mesh data={data} × fsdp={fsdp}, {jax.process_count()} processes) it is split "
        f"over; e.g. {max(1, round(config.batch_size / n_dev)) * n_dev}.")
  if config.data.image_size % 2 ** (len(config.model.channel_mult) - 1):
    raise ValueError(f"config.data.image_size={config.data.image_size} must be divisible by "
                     f"2**(len(channel_mult)-1) for {len(config.model.channel_mult)} UNet levels; "
                     "resize the data or use fewer levels.")
  if not 0.0 <= config.diffusion.p_uncond <= 1.0:
    raise ValueError(f"config.diffusion.p_uncond={config.diffusion.p_uncond} is a probability; "
                     "use a value in [0, 1] (the paper uses 0.1, 0.2 or 0.5).")
  if config.diffusion.prediction not in diffusion.PREDICTIONS:
    raise ValueError(f"config.diffusion.prediction={config.diffusion.prediction!r}; "
                     f"use one of {diffusion.PREDICTIONS}.")
  if not config.diffusion.logsnr_min < config.diffusion.logsnr_max:
    raise ValueError("config.diffusion.logsnr_min must be below logsnr_max (defaults −20, 20).")
  for field in ("num_train_steps", "log_every", "checkpoint_every", "sample_every",
                "keep_checkpoints"):
    if config[field] <= 0:
      raise ValueError(f"config.{field}={config[field]} must be a positive integer.")
  for name, check in (("sampler", samplers.settings_from_config),
                      ("guidance", guidance.settings_from_config)):
    try:
      check(config.sample[name])
    except ValueError as e:
      raise ValueError(f"config.sample.{name}: {e}") from e
  try:
    jnp.dtype(config.model.dtype)
  except TypeError as e:
    raise ValueError(f"config.model.dtype={config.model.dtype!r} is not a dtype; "
                     "use 'float32' or 'bfloat16'.") from e


def _get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  for key in dotted.split("."):
    config = config[key]
  if dotted == "model":
    return {k: v for k, v in config.to_dict().items() if k not in _HOW_COMPUTED}
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def check_resume_compatible(saved: ml_collections.ConfigDict,
                            config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a checkpoint whose architecture differs from the config's."""
  for field in _ARCHITECTURE_FIELDS:
    a, b = _get_field(saved, field), _get_field(config, field)
    if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
      raise ValueError(
          f"{workdir} holds checkpoints trained with config.{field}={a}, but this run has {b}. "
          "Use a new --workdir for a different architecture, or the checkpoint's config.")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> job_lib.TrainState | None:
  """Trains to config.num_train_steps in `workdir`, resuming from its newest checkpoint.

  Returns the final state, or None when the workdir already holds the last step.
  """
  check_config(config)
  is_chief = jax.process_index() == 0
  manager = checkpointing.create_manager(workdir, save_every=config.checkpoint_every,
                                         keep=config.keep_checkpoints)
  start_step = manager.latest_step() or 0
  if start_step >= config.num_train_steps:
    logging.info("%s already holds step %d >= num_train_steps=%d; nothing to do.",
                 workdir, start_step, config.num_train_steps)
    return None
  if start_step:
    check_resume_compatible(checkpointing.restore_config(manager, start_step), config, workdir)

  builder = input_pipeline.get_builder(config.data)
  input_pipeline.check_data_config(config.data, builder)

  mesh = sharding.create_mesh(config.mesh)
  job = job_lib.create_job(config, mesh)
  rng_init, rng_train, rng_sample = jax.random.split(jax.random.key(config.seed), 3)
  if start_step:
    logging.info("Resuming from step %d in %s.", start_step, workdir)
    # Onto this run's mesh, whatever mesh saved it.
    state = checkpointing.restore_train_state(manager, start_step, job.abstract_state)
  else:
    state = job.init_state(rng_init)
  if is_chief:
    (epath.Path(workdir) / "config.json").write_text(config.to_json(indent=2))
    param_count = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("UNet: %.2fM parameters; mesh %s over %d processes.", param_count / 1e6,
                 dict(mesh.shape), jax.process_count())

  # The batches are a function of (seed, step): a resumed run reads what an uninterrupted one
  # would have read, whatever the number of processes.
  train_iter = input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step)
  step_fn = make_train_step(job)
  settings = samplers.settings_from_config(config.sample.sampler)
  grid_guidance = guidance.settings_from_config(config.sample.guidance)
  sample_fn = pipeline.make_sample_fn(
      pipeline.Network(job.model, config, job.state_sharding.ema_params), mesh, settings,
      clip_x=grid_guidance.clip_x)
  sweep = tuple(config.sample.w)
  sweep_labels, sweep_w, sweep_ids = pipeline.class_sweep(config.data.num_classes,
                                                          config.sample.num_per_class, sweep)
  sweep_options = guidance.make_options(len(sweep_labels), sweep_w,
                                        **grid_guidance.option_values())

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                           every_steps=config.log_every, every_secs=None)
  pending_metrics = []
  for step in range(start_step + 1, config.num_train_steps + 1):
    batch = sharding.shard_batch(next(train_iter), mesh)
    state, metrics = step_fn(state, batch, rng_train)
    pending_metrics.append(metrics)  # Device arrays: fetched (a host sync) only every log_every.
    is_last = step == config.num_train_steps
    if step % config.log_every == 0 or is_last:
      fetched = jax.device_get(pending_metrics)
      writer.write_scalars(step, {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]})
      pending_metrics = []
    report(step)  # Every step (clu requires it); it reports every log_every, after the sync above.
    if step % config.checkpoint_every == 0 or is_last:
      with report.timed("checkpoint", wait_jax_async_dispatch=False):
        checkpointing.save(manager, step, state, config, force=is_last)
    if step % config.sample_every == 0 or is_last:
      with report.timed("sample"):
        # The same draws every time, so successive grids show the model's progress.
        samples, _ = pipeline.generate(sample_fn, state.ema_params, rng_sample, sweep_labels,
                                       sweep_options, mesh, sweep_ids)
        if is_chief:
          path = os.path.join(workdir, f"samples_{step:08d}.png")
          images.write_sample_grid(path, samples, config.data.num_classes, sweep,
                                   config.sample.num_per_class)
          logging.info("Wrote %s (EMA samples, w = %s, %s).", path,
                       ", ".join(f"{w:g}" for w in sweep), settings.canonical)
  manager.wait_until_finished()
  writer.flush()
  return state
