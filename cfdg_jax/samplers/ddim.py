"""DDIM (Song et al. 2021) in λ: deterministic (η = 0) or stochastic (η > 0).

From level s to the cleaner t, with x̂ the guided prediction at (z_s, λ_s) and ε̂ = (z_s − α_s x̂)/σ_s:
  z_t = α_t x̂ + sqrt(σ_t² − c²) ε̂ + c ξ,  c² = η² σ̃²_{t|s} = η² (1 − e^(λ_s − λ_t)) σ_t².
η = 0 is the probability-flow ODE's first-order solver; η = 1 the ancestral sampler with the
posterior variance. One denoiser evaluation per step.
"""
import jax.numpy as jnp

from cfdg_jax import diffusion
from cfdg_jax.samplers import core


def _step(ctx: core.Context, i, state: core.State) -> core.State:
  logsnr, logsnr_next = ctx.logsnrs[i], ctx.logsnrs[i + 1]
  x, state = ctx.denoise(state, state.z, logsnr)
  alpha, sigma = diffusion.alpha_sigma(logsnr)
  alpha_next, sigma_next = diffusion.alpha_sigma(logsnr_next)
  eta = ctx.fields["eta"]
  # c² / σ_t² = η² (1 − e^(λ_s − λ_t)); the ε̂ term's coefficient is σ_t sqrt(1 − that).
  noise_frac = eta**2 * -jnp.expm1(logsnr - logsnr_next)
  z = alpha_next * x + sigma_next * jnp.sqrt(1.0 - noise_frac) * (state.z - alpha * x) / sigma
  if eta > 0:
    z = z + sigma_next * jnp.sqrt(noise_frac) * ctx.noise(i)
  return state.replace(z=z)


SAMPLER = core.Sampler("ddim", {"eta": 0.0}, _step,
                       check=core.check_range("eta", 0.0, 1.0, "DDIM's η (0: deterministic)"))
