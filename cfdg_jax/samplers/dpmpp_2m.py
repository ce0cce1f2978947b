"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): data prediction, multistep, in λ.

With h_i = (λ_i − λ_{i−1})/2 (DPM-Solver's λ is half ours) and x̂_{i−1} the guided prediction at
level i − 1:
  z_i = (σ_i/σ_{i−1}) z_{i−1} − α_i (e^(−h_i) − 1) D_i,
with D_i = x̂_{i−1} on the first step (and the last, see below), else
  D_i = (1 + 1/(2 r_i)) x̂_{i−1} − (1/(2 r_i)) x̂_{i−2},  r_i = h_{i−1}/h_i.
The last step is first order with `lower_order_final` or at <= 10 steps: it is usually the
longest in λ, where the extrapolation is unstable. One denoiser evaluation per step. By default
on uniformly spaced λ, as DPM-Solver: the cosine grid's last step, from λ ≈ 2 log(2N/π) to λ_max,
is so long that its first-order update blurs (it returns the posterior mean there).
"""
import jax.numpy as jnp

from cfdg_jax import diffusion
from cfdg_jax.samplers import core


def _step(ctx: core.Context, i, state: core.State) -> core.State:
  logsnr_prev, logsnr, logsnr_next = ctx.logsnrs[i - 1], ctx.logsnrs[i], ctx.logsnrs[i + 1]
  x, state = ctx.denoise(state, state.z, logsnr)
  h = 0.5 * (logsnr_next - logsnr)
  r = 0.5 * (logsnr - logsnr_prev) / h
  second_order = (1.0 + 0.5 / r) * x - (0.5 / r) * state.aux
  first_order = i == 0
  if ctx.fields["lower_order_final"] or ctx.num_steps <= 10:
    first_order |= i == ctx.num_steps - 1
  d = jnp.where(first_order, x, second_order)
  alpha_next, sigma_next = diffusion.alpha_sigma(logsnr_next)
  _, sigma = diffusion.alpha_sigma(logsnr)
  z = (sigma_next / sigma) * state.z - alpha_next * jnp.expm1(-h) * d
  return state.replace(z=z, aux=x)


SAMPLER = core.Sampler("dpmpp_2m", {"lower_order_final": True}, _step, init=jnp.zeros_like,
                       grid="uniform")
