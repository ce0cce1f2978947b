"""The paper's guided ancestral sampler (Ho & Salimans 2022, Algorithm 2), one jitted loop.

`sample` takes any ε-function, so it can be driven by a closed-form denoiser in tests;
`make_sample_fn` binds it to the UNet and a device mesh, and `generate` feeds it host labels.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cfdg_jax import diffusion
from cfdg_jax import guidance
from cfdg_jax import sharding


def sampling_logsnrs(num_steps: int, logsnr_min: float, logsnr_max: float) -> jnp.ndarray:
  """λ_1 < … < λ_T at uniformly spaced u, λ_1 = λ_min (noisiest, first), λ_T = λ_max; [T]."""
  if num_steps < 2:
    raise ValueError(f"The sampler needs num_steps >= 2 (got {num_steps}): "
                     "λ_1 = λ_min and λ_T = λ_max are distinct steps.")
  u = jnp.linspace(1.0, 0.0, num_steps)
  return diffusion.logsnr_schedule_cosine(u, logsnr_min, logsnr_max)


def sample(eps_fn: guidance.EpsFn, rng: jax.Array, labels: jnp.ndarray, w: jnp.ndarray, *,
           image_shape: tuple[int, int, int], num_steps: int, v: float, null_label: int,
           logsnr_min: float = -20.0, logsnr_max: float = 20.0, clip_x: bool = True,
           ids: jnp.ndarray | None = None) -> jnp.ndarray:
  """Algorithm 2: z_1 ~ N(0, I), T guided ancestral steps, returns x̃_T.

  Args:
    eps_fn: (z [2B,H,W,C], λ [2B], labels [2B]) -> ε̂ [2B,H,W,C]; called once per step on [c, ∅].
    rng: key; the same key gives the same samples.
    labels: [B] int class ids.
    w: scalar or [B] guidance strengths.
    image_shape: (H, W, C).
    num_steps: T.
    v: variance exponent: (σ̃²_{λ'|λ})^(1−v) (σ²_{λ|λ'})^v.
    null_label: K.
    clip_x: clip each x̃_t to [−1, 1] before forming the posterior mean (the data's range).
    ids: [B] ints (default 0..B−1). Example i's noise depends only on (rng, ids[i]), so a sample
      does not change with the batch it is in, and equal ids share their noise (a w sweep of the
      same draws).
  Returns:
    float32 [B, H, W, C], x̃ at λ_T = λ_max.
  """
  logsnrs = sampling_logsnrs(num_steps, logsnr_min, logsnr_max)
  ids = jnp.arange(labels.shape[0]) if ids is None else ids
  rng_init, rng_steps = jax.random.split(rng)

  def noise(key):  # [B, H, W, C]
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape))(ids)

  def predict_x(z, logsnr):
    eps = guidance.guided_eps(eps_fn, z, logsnr, labels, w, null_label)
    x = diffusion.x_from_eps(z, eps, logsnr)
    return jnp.clip(x, -1.0, 1.0) if clip_x else x

  def step(t, z):
    logsnr, logsnr_next = logsnrs[t], logsnrs[t + 1]
    mean, _ = diffusion.posterior_mean_var(z, predict_x(z, logsnr), logsnr, logsnr_next)
    std = jnp.exp(0.5 * diffusion.sampler_log_var(logsnr, logsnr_next, v))
    return mean + std * noise(jax.random.fold_in(rng_steps, t))

  z = jax.lax.fori_loop(0, num_steps - 1, step, noise(rng_init))
  return predict_x(z, logsnrs[-1])


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
  """[−1, 1] floats -> uint8 [0, 255] (round to nearest)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def class_sweep(num_classes: int, num_per_class: int, guidance: tuple[float, ...]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Labels, w and noise ids for a grid: for each w, classes 0..K−1 each num_per_class times.

  The ids repeat across w, so every panel of the grid shows the same draws at another w. All [N].
  """
  labels = np.repeat(np.arange(num_classes), num_per_class)
  return (np.tile(labels, len(guidance)),
          np.repeat(np.asarray(guidance, np.float32), labels.size),
          np.tile(np.arange(labels.size), len(guidance)))


SampleFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def make_sample_fn(model, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   params_sharding: Any, *, num_steps: int | None = None,
                   v: float | None = None) -> SampleFn:
  """Jitted (params, rng, labels [B], w [B], ids [B]) -> uint8 [B, H, W, C], sharded over `mesh`.

  T and v default to config.sample; labels and w are traced, so one compilation serves every
  class/guidance sweep of the same batch size.
  """
  d = config.diffusion
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)

  def sample_fn(params, rng, labels, w, ids):
    def eps_fn(z, logsnr, c):
      out = model.apply({"params": params}, z, logsnr, c, train=False)
      return diffusion.eps_from_output(out, z, logsnr, d.prediction)

    x = sample(eps_fn, rng, labels, w, image_shape=image_shape,
               num_steps=num_steps or config.sample.num_steps,
               v=config.sample.v if v is None else v, null_label=config.data.num_classes,
               logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max, clip_x=config.sample.clip_x,
               ids=ids)
    return to_uint8(x)

  batch = sharding.data_sharding(mesh)
  return jax.jit(sample_fn,
                 in_shardings=(params_sharding, sharding.replicated(mesh), batch, batch, batch),
                 out_shardings=batch)


def generate(sample_fn: SampleFn, params: Any, rng: jax.Array, labels: np.ndarray,
             w: np.ndarray | float, mesh: jax.sharding.Mesh,
             ids: np.ndarray | None = None) -> np.ndarray:
  """Runs `sample_fn` on host labels, w and ids (the same on every process); uint8 [N, H, W, C].

  ids default to 0..N−1. The batch is padded to a multiple of the device count so any N works;
  every process gets all N.
  """
  labels = np.asarray(labels, np.int32)
  n = labels.shape[0]
  w = np.broadcast_to(np.asarray(w, np.float32), (n,))
  ids = np.arange(n, dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
  pad = -n % mesh.size
  labels, w, ids = (np.pad(a, (0, pad)) for a in (labels, w, ids))
  images = sample_fn(params, rng, *(sharding.global_array(a, mesh) for a in (labels, w, ids)))
  return np.asarray(multihost_utils.process_allgather(images, tiled=True))[:n]

