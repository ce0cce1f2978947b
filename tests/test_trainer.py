"""The trainer's maths: learning-rate warm-up, EMA, per-step keys, the non-finite guard, a loss
that falls, and a restore that puts every field back where it was."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cfdg_jax import checkpointing
from cfdg_jax import costs
from cfdg_jax import diffusion
from cfdg_jax import job as job_lib
from cfdg_jax import programs
from cfdg_jax import sharding
from cfdg_jax import trainer
from test_train import tiny_config


@pytest.fixture(scope="module")
def job():
  config = tiny_config("/nonexistent", **{"optimizer.warmup_steps": 4, "ema_decay": 0.9})
  return job_lib.create_job(config, sharding.create_mesh(config.mesh))


@pytest.fixture(scope="module")
def state0(job):
  return job.init_state(jax.random.key(0))


@pytest.fixture(scope="module")
def step(job):
  """train_step, jitted once for the module (without the trainer's shardings)."""
  step_fn = jax.jit(functools.partial(trainer.train_step, model=job.model, tx=job.tx,
                                      config=job.config))
  return lambda state, b: step_fn(state, b, jax.random.key(0))


def batch(config, seed=0, size=8):
  rng = np.random.default_rng(seed)
  s, c = config.data.image_size, config.data.channels
  return {"image": jnp.asarray(rng.uniform(-1, 1, (size, s, s, c)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, config.data.num_classes, size), jnp.int32)}


def test_learning_rate_warms_up_from_a_nonzero_first_step(job, state0, step):
  o = job.config.optimizer
  schedule = job_lib.learning_rate_schedule(job.config)
  rates = [float(schedule(n)) for n in range(6)]
  np.testing.assert_allclose(rates, [o.learning_rate * f for f in (0.25, 0.5, 0.75, 1, 1, 1)],
                             rtol=1e-6)
  # The optimizer really applies it: the first update moves the parameters.
  new, metrics = step(state0, batch(job.config))
  assert float(metrics["learning_rate"]) == pytest.approx(o.learning_rate / 4)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, state0.params)
  assert max(jax.tree.leaves(moved)) > 0


def test_ema_follows_its_formula_and_warm_up(job, state0, step):
  # Distinct EMA and parameters, so that the weights of the average are visible.
  state = state0.replace(ema_params=jax.tree.map(lambda p: p + 1.0, state0.params))
  for n, seed in ((0, 1), (30, 2)):
    state = state.replace(step=jnp.asarray(n, jnp.int32))
    new, _ = step(state, batch(job.config, seed))
    decay = min(job.config.ema_decay, (1 + n) / (10 + n))  # 0.1 at step 0, then ema_decay.
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params,
                            new.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 new.ema_params, expected)
    assert int(new.step) == n + 1
    state = new


def test_each_step_draws_its_own_loss_and_dropout_keys(job, state0, monkeypatch):
  seen = {}
  loss_fn = diffusion.loss_fn

  def recording_loss_fn(model_fn, rng, *args, **kwargs):
    seen["loss"] = jax.random.key_data(rng).tobytes()
    return loss_fn(model_fn, rng, *args, **kwargs)

  def stand_in_apply(variables, z, logsnr, labels, *, train, rngs):  # A cheap network.
    del logsnr, labels, train
    seen["dropout"] = jax.random.key_data(rngs["dropout"]).tobytes()
    return z * variables["params"]["conv_in"]["bias"].mean()
  monkeypatch.setattr(diffusion, "loss_fn", recording_loss_fn)
  monkeypatch.setattr(type(job.model), "apply", lambda self, *a, **k: stand_in_apply(*a, **k))
  b, keys = batch(job.config), []
  for n in (0, 1, 0):  # Eager, so that the keys are concrete.
    trainer.train_step(state0.replace(step=jnp.asarray(n, jnp.int32)), b, jax.random.key(0),
                       model=job.model, tx=job.tx, config=job.config)
    keys.append(dict(seen))
  assert keys[0] == keys[2]  # A step's keys depend on the step alone (exact resume).
  assert keys[0]["loss"] != keys[1]["loss"] and keys[0]["dropout"] != keys[1]["dropout"]
  assert keys[0]["loss"] != keys[0]["dropout"]


def test_a_non_finite_step_leaves_the_state_unchanged(job, state0, step):
  state, b = state0, batch(job.config)
  b["image"] = b["image"].at[0, 0, 0, 0].set(jnp.nan)
  new, metrics = step(state, b)
  assert not bool(metrics["finite"])
  assert int(new.step) == 1  # The step is spent (the data order goes on) but changes nothing.
  for field in ("params", "ema_params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(new, field), getattr(state, field))


@pytest.mark.slow
def test_loss_falls_on_a_tiny_problem(job, state0):
  step_fn = trainer.make_train_step(job)
  state = jax.tree.map(jnp.copy, state0)  # The step donates its state; keep the fixture's.
  b = sharding.shard_batch(jax.device_get(batch(job.config, size=16)), job.mesh)
  losses = []
  for _ in range(150):
    state, metrics = step_fn(state, b, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  first, last = np.mean(losses[:15]), np.mean(losses[-15:])
  assert last < 0.5 * first, (first, last)


def test_restore_puts_every_field_back(job, state0, tmp_path):
  # Every field distinct: a restore that mixes them up cannot pass.
  state = state0.replace(
      step=jnp.asarray(7, jnp.int32),
      ema_params=jax.tree.map(lambda p: 2 * p + 1, state0.params),
      opt_state=jax.tree.map(lambda x: x + 3 if x.dtype == jnp.float32 else x + 5,
                             state0.opt_state))
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, 7, state, job.config, force=True)
  checkpointing.wait_until_finished(manager)
  restored = checkpointing.restore_train_state(manager, 7, job.abstract_state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  mu = state.opt_state[1][0].mu  # Adam's first moment: 3 everywhere, unlike every other field.
  assert all(np.all(np.asarray(x) == 3) for x in jax.tree.leaves(mu))


def test_microbatches_average_the_gradients_of_strided_microbatches(job, state0):
  """k = 2: the update of the mean gradient over examples 0, 2, 4, ... and 1, 3, 5, ..., each
  microbatch drawing its noise and dropout from its own keys; the loss is the batch's."""
  config = job.config.copy_and_resolve_references()
  config.microbatches = 2
  b, rng = batch(config, seed=4), jax.random.key(3)
  new, metrics = jax.jit(functools.partial(trainer.train_step, model=job.model, tx=job.tx,
                                           config=config))(state0, b, rng)
  rng_loss, rng_dropout = jax.random.split(jax.random.fold_in(rng, state0.step))
  d = config.diffusion

  def loss(params, micro, j):
    def model_fn(z, logsnr, labels):
      return job.model.apply({"params": params}, z, logsnr, labels, train=True,
                             rngs={"dropout": jax.random.fold_in(rng_dropout, j)})
    return diffusion.loss_fn(model_fn, jax.random.fold_in(rng_loss, j), micro["image"],
                             micro["label"], p_uncond=d.p_uncond,
                             null_label=config.data.num_classes, logsnr_min=d.logsnr_min,
                             logsnr_max=d.logsnr_max, prediction=d.prediction).mean()
  parts = [jax.jit(jax.value_and_grad(loss), static_argnums=2)(
      state0.params, jax.tree.map(lambda x, j=j: x[j::2], b), j) for j in range(2)]
  loss_value, grads = jax.tree.map(lambda a, c: (a + c) / 2, *parts)
  updates, _ = job.tx.update(grads, state0.opt_state, state0.params)
  expected = optax.apply_updates(state0.params, updates)
  assert float(metrics["loss"]) == pytest.approx(float(loss_value), rel=1e-5)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7), new.params,
               expected)


def test_microbatches_hold_a_fraction_of_the_activations_and_move_no_data(job):
  temps = {}
  for k in (1, 4):
    config = job.config.copy_and_resolve_references()
    config.batch_size, config.microbatches = 32, k
    compiled = programs.train_programs(config, jax.devices())[0].lower().compile()
    temps[k] = compiled.memory_analysis().temp_size_in_bytes
    # Each device keeps its own examples: the gradients' all-reduce is the only collective.
    assert set(costs.collectives(compiled.as_text())) == {"all-reduce"}
  assert temps[4] < 0.6 * temps[1], temps
