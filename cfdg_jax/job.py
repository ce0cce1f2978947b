"""A job's model, optimizer, train state and shardings, built from a config and a mesh.

Training, sampling, evaluation, tests and benchmarks all start from `create_job` (flax's
`create_train_state`), so they agree on what a checkpoint holds and how it is laid out:

  mesh = sharding.create_mesh(config.mesh)
  job = create_job(config, mesh)
  state = job.init_state(jax.random.key(config.seed))   # Or restored onto job.abstract_state.
"""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cfdg_jax import sharding
from cfdg_jax import unet


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  ema_params: Any
  opt_state: Any


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, then constant (the ADM/CFG recipe).

  Update n = count + 1 uses learning_rate · min(1, n / warmup_steps): the first update is not
  wasted on a rate of 0, and update warmup_steps is the first at the full rate.
  """
  o = config.optimizer
  return lambda count: o.learning_rate * jnp.minimum(1.0, (count + 1) / max(o.warmup_steps, 1))


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay))


@dataclasses.dataclass(frozen=True)
class Job:
  """What every job of one config on one mesh shares."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: unet.UNet
  tx: optax.GradientTransformation
  # ShapeDtypeStructs of the TrainState, each carrying its sharding: the target of a restore
  # (from a checkpoint saved on any mesh) and of init_state.
  abstract_state: TrainState

  @property
  def state_sharding(self) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  def _init(self, rng: jax.Array) -> TrainState:
    params = unet.init_params(rng, self.model, self.config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=self.tx.init(params))

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state, created directly in its shardings (never whole on one device)."""
    return jax.jit(self._init, out_shardings=self.state_sharding)(rng)


def create_job(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Job:
  """The model, optimizer and sharded abstract state of `config` on `mesh` (no device memory)."""
  # The mesh's platform, not the default backend's: a job compiled ahead of time for a TPU on a
  # CPU (cfdg_jax/aot.py) computes what it would compute on the TPU.
  model = unet.create_model(config, platform=mesh.devices.flat[0].platform)
  tx = create_optimizer(config)
  job = Job(config, mesh, model, tx, abstract_state=None)
  # Traces the model without computing: config errors surface here, before any compilation.
  shapes = jax.eval_shape(job._init, jax.random.key(0))  # pylint: disable=protected-access
  shardings = sharding.tree_shardings(shapes, mesh, config.mesh.fsdp_min_size)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return dataclasses.replace(job, abstract_state=abstract)
