"""Class-conditional Gaussian data, whose exact denoisers and sampler laws are known in closed form.

Class c: x ~ N(μ_c, s_c² I) with a per-pixel mean μ_c; classes equally likely. At level λ,
z = α x + σ ε, so ε's posterior mean given (z, c) is σ (z − α μ_c)/(α² s_c² + σ²), and given z
alone (the null label) it is the same averaged over p(c | z) ∝ N(z; α μ_c, (α² s_c² + σ²) I).

With the conditional denoiser (w = 0) every sampler step is affine in z and in fresh noise, so a
sampler's output law is Gaussian with a mean and variance that `exact_law` propagates in float64
numpy from the formulas of DESIGN.md §1 and §5, independently of cfdg_jax.
"""
import jax
import jax.numpy as jnp
import numpy as np

from cfdg_jax import diffusion

NUM_CLASSES = 3
SHAPE = (4, 4, 1)
MEANS = np.linspace(-0.6, 0.6, NUM_CLASSES * 16).reshape((NUM_CLASSES, *SHAPE))[::-1] + np.array(
    [-0.3, 0.0, 0.3])[:, None, None, None]  # μ_c, [K, H, W, C]
STDS = np.array([0.25, 0.4, 0.6])  # s_c


def eps_fn(z, logsnr, labels, means=MEANS, stds=STDS):
  """The exact ε̂(z, λ, c) for labels in 0..K−1, and the mixture's for the null label K."""
  means, stds = jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)
  logsnr = jnp.broadcast_to(logsnr, z.shape[:1])
  alpha, sigma = diffusion.alpha_sigma(logsnr[:, None, None, None])
  var = alpha**2 * stds[:, None, None, None, None]**2 + sigma**2  # [K, B, 1, 1, 1]
  resid = z[None] - alpha * means[:, None]
  eps = sigma * resid / var  # [K, B, H, W, C]
  log_lik = -0.5 * (jnp.sum(resid**2 / var, axis=(2, 3, 4))
                    + np.prod(z.shape[1:]) * jnp.log(var[..., 0, 0, 0]))  # [K, B]
  posterior = jax.nn.softmax(log_lik, axis=0)  # p(c | z)
  mixture = jnp.sum(posterior[..., None, None, None] * eps, axis=0)
  own = jnp.take_along_axis(eps, jnp.minimum(labels, len(stds) - 1)[None, :, None, None, None],
                            axis=0)[0]
  return jnp.where((labels < len(stds))[:, None, None, None], own, mixture)


# Exact laws. A value affine in the initial noise and the step noises ξ_j ~ N(0, 1) (independent,
# per pixel) is (b, a): b the per-pixel constant [P], a the coefficients of the ξ_j.

def _alpha_sigma(lam):
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def cosine_grid(num_levels, lo=-20.0, hi=20.0):
  b = np.arctan(np.exp(-hi / 2))
  a = np.arctan(np.exp(-lo / 2)) - b
  lams = -2 * np.log(np.tan(a * np.linspace(1.0, 0.0, num_levels) + b))
  lams[0], lams[-1] = lo, hi
  return lams


def grid(kind, num_levels, lo=-20.0, hi=20.0):
  if kind == "cosine":
    return cosine_grid(num_levels, lo, hi)
  if kind == "uniform":
    return np.linspace(lo, hi, num_levels)
  rho = 7.0  # "karras"
  s_max, s_min = np.exp(-lo / 2), np.exp(-hi / 2)
  t = np.linspace(0, 1, num_levels)
  return -2 * np.log((s_max ** (1 / rho) + t * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho)


def _add(*terms):
  """Σ c·(b, a) over (c, (b, a)) pairs, padding coefficient vectors to a common length."""
  n = max(len(a) for _, (_, a) in terms)
  b = sum(c * b for c, (b, _) in terms)
  a = sum(c * np.pad(a, (0, n - len(a))) for c, (_, a) in terms)
  return b, a


def _noise(v, std):
  b, a = v
  return b, np.append(a, std)


def _denoise(z, lam, mu, s):
  """x̂ = μ + k (z − α μ), k = α s² / (α² s² + σ²): the exact posterior mean."""
  al, sg = _alpha_sigma(lam)
  k = al * s**2 / (al**2 * s**2 + sg**2)
  return _add((k, z), (1.0, (mu * (1 - k * al), np.zeros(0))))


def exact_law(name, lams, mu, s, *, v=0.3, eta=0.0, lower_order_final=True):
  """Mean [P] and variance of a sampler's output on grid `lams` for data N(mu [P], s²) at w = 0."""
  z = (np.zeros_like(mu), np.ones(1))  # z ~ N(0, I)
  n = len(lams) - 1
  x_prev = None
  for i in range(n):
    lam, lam_n = lams[i], lams[i + 1]
    (al, sg), (al_n, sg_n) = _alpha_sigma(lam), _alpha_sigma(lam_n)
    x = _denoise(z, lam, mu, s)
    r = np.exp(lam - lam_n)
    if name == "ancestral":  # Posterior mean, then the interpolated variance.
      mean = _add((r * al_n / al, z), ((1 - r) * al_n, x))
      z = _noise(mean, np.sqrt(((1 - r) * sg_n**2) ** (1 - v) * ((1 - r) * sg**2) ** v))
    elif name == "ddim":
      c2 = eta**2 * (1 - r) * sg_n**2
      eps = _add((1 / sg, z), (-al / sg, x))
      z = _noise(_add((al_n, x), (np.sqrt(sg_n**2 - c2), eps)), np.sqrt(c2))
    elif name == "dpmpp_2m":
      h = (lam_n - lam) / 2
      d = x
      if i > 0 and not ((lower_order_final or n <= 10) and i == n - 1):
        ratio = ((lam - lams[i - 1]) / 2) / h
        d = _add((1 + 1 / (2 * ratio), x), (-1 / (2 * ratio), x_prev))
      z = _add((sg_n / sg, z), (-al_n * np.expm1(-h), d))
      x_prev = x
    elif name == "heun":  # In x = z/α and σ = e^(−λ/2).
      se, se_n = np.exp(-lam / 2), np.exp(-lam_n / 2)
      xz = _add((1 / al, z))
      d = _add((1 / se, xz), (-1 / se, x))
      x_next = _add((1.0, xz), (se_n - se, d))
      if i < n - 1:
        d_n = _add((1 / se_n, x_next), (-1 / se_n, _denoise(_add((al_n, x_next)), lam_n, mu, s)))
        x_next = _add((1.0, xz), (0.5 * (se_n - se), d), (0.5 * (se_n - se), d_n))
      z = _add((al_n, x_next))
  if name == "ancestral":  # Algorithm 2 returns x̂ at the last level.
    out = _denoise(z, lams[-1], mu, s)
  else:
    out = _add((1 / _alpha_sigma(lams[-1])[0], z))
  return out[0], float(np.sum(out[1] ** 2))
