"""Training: the jitted train step, and the loop around it."""
import contextlib
import dataclasses
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from clu import metric_writers
from clu import periodic_actions
from jax.experimental import multihost_utils

from cfdg_jax import checkpointing
from cfdg_jax import config_changes
from cfdg_jax import diffusion
from cfdg_jax import errors
from cfdg_jax import guidance
from cfdg_jax import images
from cfdg_jax import input_pipeline
from cfdg_jax import job as job_lib
from cfdg_jax import lease as lease_lib
from cfdg_jax import pipeline
from cfdg_jax import preemption
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import unet
from cfdg_jax import validation
from cfdg_jax import watchdog

def train_step(state: job_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: unet.UNet, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict
               ) -> tuple[job_lib.TrainState, dict[str, jax.Array]]:
  """One AdamW step on the classifier-free loss, then the EMA update.

  batch: {'image': float32 [B, H, W, C] in [−1, 1], 'label': int32 [B]}, split over the mesh.
  With config.microbatches = k > 1 the gradient is the mean of k gradients on B/k examples each
  (microbatch j: examples j, j + k, ...; its keys folded with j), computed one after another:
  the activations of B/k examples are held at a time, and the update is that of the batch.
  """
  rng_loss, rng_dropout = jax.random.split(jax.random.fold_in(rng, state.step))
  d = config.diffusion

  def loss(params, batch, rng_loss, rng_dropout):
    def model_fn(z, logsnr, labels):
      return model.apply({"params": params}, z, logsnr, labels, train=True,
                         rngs={"dropout": rng_dropout})
    return diffusion.loss_fn(
        model_fn, rng_loss, batch["image"], batch["label"], p_uncond=d.p_uncond,
        null_label=config.data.num_classes, logsnr_min=d.logsnr_min,
        logsnr_max=d.logsnr_max, prediction=d.prediction).mean()

  grad_fn = jax.value_and_grad(loss)
  k = config.microbatches
  if k == 1:
    loss_value, grads = grad_fn(state.params, batch, rng_loss, rng_dropout)
  else:
    def accumulate(total, j_micro):
      j, micro = j_micro
      value = grad_fn(state.params, micro, jax.random.fold_in(rng_loss, j),
                      jax.random.fold_in(rng_dropout, j))
      return jax.tree.map(jnp.add, total, value), None
    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    total, _ = jax.lax.scan(accumulate, zero, (jnp.arange(k), split_microbatches(batch, k)))
    loss_value, grads = jax.tree.map(lambda x: x / k, total)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The (1+n)/(10+n) bound averages in early weights less, which matters for short runs.
  decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm = optax.global_norm(grads)
  # A non-finite loss or gradient leaves the state as it was: the loop stops, or skips the step
  # (config.max_nonfinite_steps), and no NaN ever reaches a checkpoint.
  finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
  keep_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = {"loss": loss_value, "grad_norm": grad_norm, "finite": finite,
             "learning_rate": job_lib.learning_rate_schedule(config)(state.step)}
  return state.replace(step=state.step + 1, params=keep_finite(params, state.params),
                       ema_params=keep_finite(ema_params, state.ema_params),
                       opt_state=keep_finite(opt_state, state.opt_state)), metrics


def split_microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...], microbatch j holding examples j, j + k, ...: every device's
  examples stay on it (the batch axis is split over the mesh in contiguous blocks of B/devices,
  each a multiple of k), so the split moves no data."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(job: job_lib.Job):
  """`train_step` jitted over the job's mesh: (state, batch, rng) -> (state, metrics), state
  donated."""
  replicated = sharding.replicated(job.mesh)
  return jax.jit(
      lambda s, b, r: train_step(s, b, r, model=job.model, tx=job.tx, config=job.config),
      in_shardings=(job.state_sharding, sharding.data_sharding(job.mesh), replicated),
      out_shardings=(job.state_sharding, replicated), donate_argnums=0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False,
                       hang_timeout_s: float | None = None) -> job_lib.TrainState | None:
  """Trains to config.num_train_steps in `workdir`, resuming from its newest good checkpoint.

  On SIGTERM (a preemption) or Ctrl-C every process saves at one agreed step and returns, within
  a step (a sample grid in progress is abandoned); before the first step, or on a second signal,
  the process ends at once (cfdg_jax/preemption.py). Returns the last
  state, or None when the workdir already holds the last step. Raises UserError for a bad config
  or a workdir that another live run holds (before any data loading or compilation), JobError
  when training diverges or a checkpoint cannot be written; the checkpoints already written stay
  intact. A resume that changes the batches, the noise or the model (cfdg_jax/config_changes.py)
  is refused unless `allow_config_change`. A step that hangs (cfdg_jax/watchdog.py: for
  `hang_timeout_s`, default 10x the median step and at least 10 minutes) ends the process with
  watchdog.EXIT_CODE.
  """
  validation.check_train_config(config, workdir)
  builder = input_pipeline.get_builder(config.data)
  input_pipeline.check_data_config(config.data, builder)
  with preemption.Watcher() as watcher, _held_lease(workdir) as lease:
    return _train(config, workdir, lease, watcher, allow_config_change, hang_timeout_s)


def _agreed(flag: bool) -> bool:
  """Process 0's `flag`, on every process."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


@contextlib.contextmanager
def _held_lease(workdir: str) -> Iterator[lease_lib.Lease | None]:
  """Process 0 holds the workdir's lease (cfdg_jax/lease.py) for the run; every process fails
  with it when another live run holds the workdir."""
  lease, error = None, None
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    try:
      lease = lease_lib.Lease(workdir).__enter__()
    except errors.UserError as e:
      error = e
  if not _agreed(error is None):
    raise error or errors.UserError(f"{workdir} is in use by another training run (process 0 "
                                    "names it).")
  try:
    yield lease
  finally:
    if lease is not None:
      lease.__exit__(None, None, None)


def _train(config: ml_collections.ConfigDict, workdir: str, lease: lease_lib.Lease | None,
           watcher: preemption.Watcher, allow_config_change: bool, hang_timeout_s: float | None
           ) -> job_lib.TrainState | None:
  is_chief = jax.process_index() == 0
  manager = checkpointing.create_manager(workdir, save_every=config.checkpoint_every,
                                         keep=config.keep_checkpoints)
  if (manager.latest_step() or 0) >= config.num_train_steps:
    logging.info("%s already holds step %d >= num_train_steps=%d; nothing to do.",
                 workdir, manager.latest_step(), config.num_train_steps)
    return None

  mesh = sharding.create_mesh(config.mesh)
  job = job_lib.create_job(config, mesh)
  rng_init, rng_train, rng_sample = jax.random.split(jax.random.key(config.seed), 3)
  # Onto this run's mesh, whatever mesh saved it; damaged steps are reported and set aside.
  start_step, state = checkpointing.restore_newest(manager, job, workdir)
  if state is None:
    state = job.init_state(rng_init)
  else:
    config_changes.check(checkpointing.restore_config(manager, start_step), config, start_step,
                         workdir, allow=allow_config_change, write=is_chief)
    logging.info("Resuming from step %d in %s.", start_step, workdir)
  if is_chief:
    (epath.Path(workdir) / "config.json").write_text(config.to_json(indent=2))
    param_count = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("UNet: %.2fM parameters; mesh %s over %d processes.", param_count / 1e6,
                 dict(mesh.shape), jax.process_count())

  # The batches are a function of (seed, step) and the step's keys of (seed, step): a resumed run
  # computes exactly what an uninterrupted one would have, whatever the number of processes.
  train_iter = input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step)
  step_fn = make_train_step(job)
  write_grid = _grid_writer(job, workdir, rng_sample)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                           every_steps=config.log_every, every_secs=None)
  pending, nonfinite = [], 0

  def save(step: int, force: bool) -> None:
    nonlocal pending, nonfinite
    if pending:  # A non-finite step stops the run here, before its state is written.
      nonfinite = _write_metrics(writer, step, jax.device_get(pending), nonfinite, config,
                                 manager)
      pending = []
    if _agreed(lease is not None and lease.lost):
      raise errors.JobError(f"Another training run took over {workdir} (its lease "
                            f"{lease_lib.NAME} names it); this run stopped without saving "
                            f"step {step}.")
    with report.timed("checkpoint", wait_jax_async_dispatch=False):
      checkpointing.save(manager, step, state, config, force=force)

  with watchdog.Watchdog(hang_timeout_s) as dog:
    for step in range(start_step + 1, config.num_train_steps + 1):
      batch = sharding.shard_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch, rng_train)
      pending.append(metrics)  # Device arrays: fetched (a host sync) only when logged or saved.
      stopping = watcher.reached()
      is_last = step == config.num_train_steps or stopping
      saving = step % config.checkpoint_every == 0 or is_last
      if step % config.log_every == 0 or saving:
        nonfinite = _write_metrics(writer, step, jax.device_get(pending), nonfinite, config,
                                   manager)
        pending = []
      report(step)  # Every step (clu requires it); it reports every log_every, after the sync.
      dog.tick(step)
      if saving:
        save(step, force=is_last)
      if not stopping and (step % config.sample_every == 0 or step == config.num_train_steps):
        with report.timed("sample"), dog.paused():  # Its first call compiles.
          # A stop request abandons the grid between two of its calls, and this step is saved.
          stopping = not write_grid(step, state.ema_params, abandon=watcher.reached)
        if stopping and not saving:
          save(step, force=True)
      if stopping:
        checkpointing.wait_until_finished(manager)
        logging.warning("Stopped on request (%s): the checkpoint of step %d is committed in %s; "
                        "run the same command again to resume.",
                        watcher.signal or "a preemption notice", step, workdir)
        break
  checkpointing.wait_until_finished(manager)
  writer.flush()
  return state


def _write_metrics(writer: metric_writers.MetricWriter, step: int, fetched: list[dict],
                   nonfinite: int, config: ml_collections.ConfigDict, manager) -> int:
  """Writes the mean metrics of the steps up to `step`; returns the run's non-finite steps.

  Raises JobError once they exceed config.max_nonfinite_steps (each was skipped in train_step).
  """
  first = step - len(fetched) + 1
  for s, m in enumerate(fetched, start=first):
    if m["finite"]:
      continue
    nonfinite += 1
    if nonfinite > config.max_nonfinite_steps:
      checkpointing.wait_until_finished(manager)  # A save in flight holds a good state.
      steps = manager.all_steps(read=True)
      newest = (f"the newest checkpoint (step {max(steps)}) is intact and a rerun resumes from it"
                if steps else "no checkpoint was written")
      raise errors.JobError(
          f"Step {s}: the loss is {m['loss']} and the gradient norm {m['grad_norm']}: training "
          f"diverged. Stopped without saving; {newest}. Lower config.optimizer.learning_rate, or "
          "let up to N such steps be skipped with --config.max_nonfinite_steps=N.")
    logging.warning("Step %d: the loss is %s and the gradient norm %s; the step was skipped "
                    "(%d of config.max_nonfinite_steps=%d).", s, m["loss"], m["grad_norm"],
                    nonfinite, config.max_nonfinite_steps)
  finite = [m for m in fetched if m["finite"]]
  if finite:
    writer.write_scalars(step, {k: float(np.mean([m[k] for m in finite]))
                                for k in ("loss", "grad_norm", "learning_rate")})
  return nonfinite


def grid_sampler(job: job_lib.Job):
  """The training run's sample grid (config.sample): (pipe, settings, clip_x, labels, options,
  ids), pipe a Pipeline of the job's model and mesh without weights, the rest the sampler
  setting and the grid's host arrays [N], drawn config.sample.batch_size images a call."""
  config = job.config
  settings = samplers.settings_from_config(config.sample.sampler)
  grid_guidance = guidance.settings_from_config(config.sample.guidance)
  pipe = pipeline.Pipeline(pipeline.Network(job.model, config, job.state_sharding.ema_params),
                           None, job.mesh)
  labels, w, ids = pipeline.class_sweep(config.data.num_classes, config.sample.num_per_class,
                                        tuple(config.sample.w))
  options = guidance.make_options(len(labels), w, **grid_guidance.option_values())
  return pipe, settings, grid_guidance.clip_x, labels, options, ids


def _grid_writer(job: job_lib.Job, workdir: str, rng: jax.Array):
  """write(step, ema_params, abandon) -> whether it wrote the sample grid of config.sample, as
  <workdir>/samples_<step>.png; it stops early when `abandon()`, asked between two calls, is True.

  The same draws every time, so successive grids show the model's progress.
  """
  config = job.config
  pipe, settings, clip_x, labels, options, ids = grid_sampler(job)
  sweep = tuple(config.sample.w)

  def write(step: int, ema_params, abandon: Callable[[], bool] = lambda: False) -> bool:
    batches = dataclasses.replace(pipe, params=ema_params).sample_batches(
        labels, options, ids, settings=settings, seed=rng, clip_x=clip_x,
        batch_size=config.sample.batch_size)
    parts = []
    for _, part in batches:
      parts.append(part)
      if len(parts) * len(part) < len(labels) and abandon():
        logging.warning("The sample grid of step %d was abandoned after %d of %d images.", step,
                        len(parts) * len(part), len(labels))
        return False
    samples = np.concatenate(parts)
    if jax.process_index() == 0:
      path = os.path.join(workdir, f"samples_{step:08d}.png")
      images.write_sample_grid(path, samples, config.data.num_classes, sweep,
                               config.sample.num_per_class)
      logging.info("Wrote %s (EMA samples, w = %s, %s).", path,
                   ", ".join(f"{x:g}" for x in sweep), settings.canonical)
    return True
  return write
