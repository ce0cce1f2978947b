"""The paper's guided ancestral sampler (Ho & Salimans 2022, Algorithm 2).

T levels λ_1 < … < λ_T (λ_T = λ_max); at each, x̃_t = the guided x̂ at (z_t, λ_t), then
z_{t+1} ~ N(μ̃_{λ_{t+1}|λ_t}(z_t, x̃_t), (σ̃²_{λ_{t+1}|λ_t})^(1−v) (σ²_{λ_t|λ_{t+1}})^v); the sample
is x̃_T. T denoiser evaluations. v interpolates the two variances in log space (the paper: 0.3 at
64×64, 0.2 at 128×128).
"""
import jax.numpy as jnp

from cfdg_jax import diffusion
from cfdg_jax.samplers import core


def _step(ctx: core.Context, i, state: core.State) -> core.State:
  """Level i: the guided x̂, then z at level i + 1; at the last level, x̂ itself."""
  last = len(ctx.logsnrs) - 1
  logsnr, logsnr_next = ctx.logsnrs[i], ctx.logsnrs[jnp.minimum(i + 1, last)]
  x, state = ctx.denoise(state, state.z, logsnr)
  mean, _ = diffusion.posterior_mean_var(state.z, x, logsnr, logsnr_next)
  std = jnp.exp(0.5 * diffusion.sampler_log_var(logsnr, logsnr_next, ctx.fields["v"]))
  # The last level has no transition (its variance is 0 or NaN there, unused): the sample is x̂.
  return state.replace(z=jnp.where(i < last, mean + std * ctx.noise(i), x))


SAMPLER = core.Sampler(
    "ancestral", {"v": 0.3}, _step, final_denoise=True, min_steps=2,
    check=core.check_range("v", 0.0, 1.0, "the variance exponent (the paper: 0.3, 0.2)"))
