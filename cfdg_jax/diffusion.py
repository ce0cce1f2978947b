"""Continuous-time Gaussian diffusion in log-SNR λ (Kingma et al. 2021; Ho & Salimans 2022, §2).

Pure functions of arrays. λ = log(α²/σ²) with α² = sigmoid(λ), σ² = sigmoid(−λ); both come from
sigmoids (never 1 − α², which cancels to 0 in float32 at large λ), so everything here is finite over
the paper's range λ ∈ [−20, 20].

Shapes: x, z, eps are [B, H, W, C]; λ is [B] (or a scalar) and is broadcast over the pixel axes.
"""
from typing import Callable

import jax
import jax.numpy as jnp

PREDICTIONS = ("eps", "v")


def _bcast(a: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a per-example [B] (or scalar) array to broadcast against [B, ...]."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def alpha_sigma(logsnr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """α_λ = sqrt(sigmoid(λ)), σ_λ = sqrt(sigmoid(−λ)); same shape as λ."""
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def _cosine_ab(logsnr_min: float, logsnr_max: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
  return a, b


def logsnr_schedule_cosine(u: jnp.ndarray, logsnr_min: float = -20.0,
                           logsnr_max: float = 20.0) -> jnp.ndarray:
  """Truncated cosine schedule λ(u) = −2 log tan(a u + b); λ(0) = λ_max, λ(1) = λ_min.

  Near u = 1 the angle a u + b approaches π/2, where float32 tan loses digits; there λ is computed
  as 2 log tan(φ) from the complementary angle φ = a (1 − u) + arctan(e^(λ_min/2)), which is exact
  in form, so both ends come out at λ_max and λ_min to float32 precision.
  """
  a, b = _cosine_ab(logsnr_min, logsnr_max)
  u = jnp.asarray(u, jnp.float32)
  clean = -2.0 * jnp.log(jnp.tan(a * u + b))
  noisy = 2.0 * jnp.log(jnp.tan(a * (1.0 - u) + jnp.arctan(jnp.exp(0.5 * logsnr_min))))
  return jnp.where(u < 0.5, clean, noisy)


def logsnr_schedule_cosine_inverse(logsnr: jnp.ndarray, logsnr_min: float = -20.0,
                                   logsnr_max: float = 20.0) -> jnp.ndarray:
  """u(λ) = (arctan(e^(−λ/2)) − b) / a, the inverse of `logsnr_schedule_cosine`."""
  a, b = _cosine_ab(logsnr_min, logsnr_max)
  return (jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a


def q_sample(x: jnp.ndarray, logsnr: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
  """z_λ = α_λ x + σ_λ ε, a draw from q(z_λ | x) given ε ~ N(0, I)."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, x))
  return alpha * x + sigma * eps


def posterior_mean_var(z: jnp.ndarray, x: jnp.ndarray, logsnr: jnp.ndarray,
                       logsnr_next: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """q(z_λ' | z_λ, x) for λ < λ' (toward the clean end).

  μ̃ = e^(λ−λ') (α_λ'/α_λ) z + (1 − e^(λ−λ')) α_λ' x,  σ̃² = (1 − e^(λ−λ')) σ_λ'².
  Returns (mean [B, H, W, C], variance broadcastable to it).
  """
  logsnr, logsnr_next = _bcast(logsnr, z), _bcast(logsnr_next, z)
  alpha, _ = alpha_sigma(logsnr)
  alpha_next, sigma_next = alpha_sigma(logsnr_next)
  ratio = jnp.exp(logsnr - logsnr_next)
  one_minus_ratio = -jnp.expm1(logsnr - logsnr_next)
  mean = ratio * (alpha_next / alpha) * z + one_minus_ratio * alpha_next * x
  return mean, one_minus_ratio * sigma_next**2


def transition_var(logsnr: jnp.ndarray, logsnr_next: jnp.ndarray) -> jnp.ndarray:
  """σ²_{λ|λ'} = (1 − e^(λ−λ')) σ_λ², the variance of q(z_λ | z_λ') for λ < λ'."""
  return -jnp.expm1(logsnr - logsnr_next) * jax.nn.sigmoid(-logsnr)


def sampler_log_var(logsnr: jnp.ndarray, logsnr_next: jnp.ndarray, v: float) -> jnp.ndarray:
  """log of (σ̃²_{λ'|λ})^(1−v) (σ²_{λ|λ'})^v, the paper's interpolated sampler variance.

  Both variances share the factor (1 − e^(λ−λ')), so the interpolation is done in log space:
  log(1 − e^(λ−λ')) + (1−v) log σ_λ'² + v log σ_λ², with log σ² = −softplus(λ) (no underflow).
  """
  log_one_minus_ratio = jnp.log(-jnp.expm1(logsnr - logsnr_next))
  return (log_one_minus_ratio - (1.0 - v) * jax.nn.softplus(logsnr_next)
          - v * jax.nn.softplus(logsnr))


def x_from_eps(z: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
  """x̂ = (z − σ_λ ε̂) / α_λ."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return (z - sigma * eps) / alpha


def eps_from_output(output: jnp.ndarray, z: jnp.ndarray, logsnr: jnp.ndarray,
                    prediction: str) -> jnp.ndarray:
  """The network's ε̂ from its raw output: itself for "eps"; σ z + α v̂ for "v" (Salimans & Ho 2022)."""
  if prediction == "eps":
    return output
  if prediction == "v":
    alpha, sigma = alpha_sigma(_bcast(logsnr, z))
    return sigma * z + alpha * output
  raise ValueError(f"Unknown prediction {prediction!r}; use one of {PREDICTIONS}.")


def training_target(x: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray,
                    prediction: str) -> jnp.ndarray:
  """What the network regresses: ε (the paper's loss), or v = α ε − σ x."""
  if prediction == "eps":
    return eps
  if prediction == "v":
    alpha, sigma = alpha_sigma(_bcast(logsnr, x))
    return alpha * eps - sigma * x
  raise ValueError(f"Unknown prediction {prediction!r}; use one of {PREDICTIONS}.")


def sample_logsnr(rng: jax.Array, batch: int, logsnr_min: float, logsnr_max: float) -> jnp.ndarray:
  """λ(u), u ~ U[0, 1]: the training distribution of λ; [batch]."""
  u = jax.random.uniform(rng, (batch,))
  return logsnr_schedule_cosine(u, logsnr_min, logsnr_max)


def drop_labels(rng: jax.Array, labels: jnp.ndarray, p_uncond: float,
                null_label: int) -> jnp.ndarray:
  """Replaces each label by the null label with probability p_uncond; [B] -> [B]."""
  drop = jax.random.bernoulli(rng, p_uncond, labels.shape)
  return jnp.where(drop, null_label, labels)


ModelFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def loss_fn(model_fn: ModelFn, rng: jax.Array, x: jnp.ndarray, labels: jnp.ndarray, *,
            p_uncond: float, null_label: int, logsnr_min: float, logsnr_max: float,
            prediction: str = "eps") -> jnp.ndarray:
  """The classifier-free training loss (the paper's Algorithm 1), per example.

  model_fn(z [B,H,W,C], λ [B], labels [B]) -> raw network output [B,H,W,C].
  λ = λ(u) with u ~ U[0, 1] (truncated cosine); labels dropped to ∅ with probability p_uncond.
  Returns [B]: ||target − output||² averaged over pixels (target ε by default).
  """
  rng_u, rng_eps, rng_drop = jax.random.split(rng, 3)
  logsnr = sample_logsnr(rng_u, x.shape[0], logsnr_min, logsnr_max)
  eps = jax.random.normal(rng_eps, x.shape, x.dtype)
  z = q_sample(x, logsnr, eps)
  labels = drop_labels(rng_drop, labels, p_uncond, null_label)
  output = model_fn(z, logsnr, labels)
  target = training_target(x, eps, logsnr, prediction)
  return jnp.mean(jnp.square(output - target), axis=tuple(range(1, x.ndim)))
