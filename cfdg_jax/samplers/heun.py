"""EDM's second-order Heun solver of the probability-flow ODE (Karras et al. 2022, Alg. 1, no churn).

In x = z/α and σ = σ_λ/α_λ = e^(−λ/2) the ODE is dx/dσ = (x − x̂(x, σ))/σ. Each step takes an
Euler step to the next level, then corrects it with the trapezoidal rule from a second denoiser
evaluation there; the last step is Euler alone. 2N − 1 denoiser evaluations for N steps.

By default it runs on EDM's grid (σ_i^(1/ρ) evenly spaced, ρ = 7) over EDM's σ ∈ [0.002, 80], i.e.
λ ∈ [−8.76, 12.43]. Over the full λ ∈ [−20, 20] (σ up to 22026) the first step is so long that the
trapezoidal corrector overshoots.
"""
import math

import jax
import jax.numpy as jnp

from cfdg_jax import diffusion
from cfdg_jax.samplers import core


def _step(ctx: core.Context, i, state: core.State) -> core.State:
  logsnr, logsnr_next = ctx.logsnrs[i], ctx.logsnrs[i + 1]
  alpha, _ = diffusion.alpha_sigma(logsnr)
  alpha_next, _ = diffusion.alpha_sigma(logsnr_next)
  s, s_next = jnp.exp(-0.5 * logsnr), jnp.exp(-0.5 * logsnr_next)
  x = state.z / alpha
  x_hat, state = ctx.denoise(state, state.z, logsnr)
  d = (x - x_hat) / s
  x_euler = x + (s_next - s) * d

  def corrected(state):
    x_hat_next, state = ctx.denoise(state, alpha_next * x_euler, logsnr_next)
    d_next = (x_euler - x_hat_next) / s_next
    return x + (s_next - s) * 0.5 * (d + d_next), state

  x_next, state = jax.lax.cond(i < ctx.num_steps - 1, corrected, lambda st: (x_euler, st), state)
  return state.replace(z=alpha_next * x_next)


SAMPLER = core.Sampler("heun", {}, _step, evaluations=lambda num_steps: 2 * num_steps - 1,
                       grid="karras",
                       logsnr_range=(round(-2 * math.log(80.0), 4), round(-2 * math.log(0.002), 4)))
