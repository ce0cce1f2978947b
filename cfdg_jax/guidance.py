"""Classifier-free guidance with one batched network call (Ho & Salimans 2022, eq. 6).

ε̃(z, c) = (1 + w) ε(z, c) − w ε(z, ∅). The paper's w = 0 is the plain conditional model. Libraries
that write ε_u + s (ε_c − ε_u) use s = 1 + w (so their s = 1 is our w = 0).
"""
from typing import Callable

import jax.numpy as jnp

EpsFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def guided_eps(eps_fn: EpsFn, z: jnp.ndarray, logsnr: jnp.ndarray, labels: jnp.ndarray,
               w: jnp.ndarray | float, null_label: int) -> jnp.ndarray:
  """Guided ε from ONE call of eps_fn on the stacked batch [z, z] with labels [c, ∅].

  Args:
    eps_fn: (z [2B,H,W,C], λ [2B], labels [2B]) -> ε̂ [2B,H,W,C].
    z: [B, H, W, C] latents.
    logsnr: [B] or scalar λ.
    labels: [B] int class ids in 0..K−1.
    w: guidance strength, a scalar or [B] (one per example, to sweep several w in one call).
    null_label: K, the id of ∅ (num_classes).
  Returns:
    [B, H, W, C] = (1 + w) ε̂(z, c) − w ε̂(z, ∅), over every channel.
  """
  batch = z.shape[0]
  logsnr = jnp.broadcast_to(logsnr, (batch,))
  eps = eps_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
               jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
  eps_cond, eps_uncond = eps[:batch], eps[batch:]
  w = jnp.broadcast_to(jnp.asarray(w, eps.dtype), (batch,)).reshape((batch,) + (1,) * (z.ndim - 1))
  return (1.0 + w) * eps_cond - w * eps_uncond
