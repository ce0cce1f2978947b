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
  logsnr, logsnr_next = ctx.logsnrs[i], ctx.logsnrs[i + 1]
  x, state = ctx.denoise(state, state.z, logsnr)
  mean, _ = diffusion.posterior_mean_var(state.z, x, logsnr, logsnr_next)
  std = jnp.exp(0.5 * diffusion.sampler_log_var(logsnr, logsnr_next, ctx.fields["v"]))
  return state.replace(z=mean + std * ctx.noise(i))


SAMPLER = core.Sampler(
    "ancestral", {"v": 0.3}, _step, final_denoise=True, min_steps=2,
    check=core.check_range("v", 0.0, 1.0, "the variance exponent (the paper: 0.3, 0.2)"))
