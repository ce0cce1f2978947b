"""The paper's sampler driven by the exact denoiser of Gaussian data."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfdg_jax import diffusion
from cfdg_jax import sampler

NUM_CLASSES = 3
MEANS = jnp.array([-0.5, 0.1, 0.6])  # μ_c per class (every pixel).
STD = 0.2  # Data std s.
SHAPE = (4, 4, 1)


def gaussian_eps(z, logsnr, labels):
  """Optimal ε for x ~ N(μ_c, s² I): ε̂ = σ (z − α μ_c) / (α² s² + σ²); ∅ uses μ = 0."""
  alpha, sigma = diffusion.alpha_sigma(logsnr[:, None, None, None])
  mu = jnp.where(labels < NUM_CLASSES, MEANS[jnp.minimum(labels, NUM_CLASSES - 1)], 0.0)
  mu = mu[:, None, None, None]
  return sigma * (z - alpha * mu) / (alpha**2 * STD**2 + sigma**2)


@functools.partial(jax.jit, static_argnames=("num_steps", "v", "clip_x"))
def run(rng, labels, w, num_steps=256, v=0.3, clip_x=False, ids=None):
  return sampler.sample(gaussian_eps, rng, labels, w, image_shape=SHAPE, num_steps=num_steps,
                        v=v, null_label=NUM_CLASSES, clip_x=clip_x, ids=ids)


def test_sampling_logsnrs_run_from_noisy_to_clean():
  logsnrs = sampler.sampling_logsnrs(8, -20.0, 20.0)
  assert logsnrs.shape == (8,)
  np.testing.assert_allclose([logsnrs[0], logsnrs[-1]], [-20.0, 20.0], atol=1e-4)
  assert np.all(np.diff(np.asarray(logsnrs)) > 0)
  with pytest.raises(ValueError, match="num_steps"):
    sampler.sampling_logsnrs(1, -20.0, 20.0)


def exact_sampler_moments(mu_c, w, num_steps, v, mu_u=0.0):
  """Mean and variance of Algorithm 2's output for Gaussian data, propagated exactly in float64.

  With the exact ε of N(μ, s²) (∅: N(μ_u, s²)) every step is affine in z plus Gaussian noise, so
  z's mean M and variance V follow M' = A M + B, V' = A² V + std². Written from the paper's
  formulas, independently of cfdg_jax.
  """
  lo, hi = -20.0, 20.0
  b = np.arctan(np.exp(-hi / 2))
  a = np.arctan(np.exp(-lo / 2)) - b
  lams = -2 * np.log(np.tan(a * np.linspace(1.0, 0.0, num_steps) + b))
  lams[-1] = hi

  def x_hat_affine(lam):  # x̂ = k z + m for the guided ε.
    al, sg = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
    d = al**2 * STD**2 + sg**2
    eps_k = sg / d  # ε = eps_k z − eps_m(μ), guided: (1+w) ε_c − w ε_u.
    eps_m = (1 + w) * sg * al * mu_c / d - w * sg * al * mu_u / d
    return (1 - sg * eps_k) / al, sg * eps_m / al

  mean, var = 0.0, 1.0
  for lam, lam_next in zip(lams[:-1], lams[1:]):
    k, m = x_hat_affine(lam)
    al, al_n = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(-lam_next)))
    s2, s2_n = 1 / (1 + np.exp(lam)), 1 / (1 + np.exp(lam_next))
    r = np.exp(lam - lam_next)
    coef_z, coef_x = r * al_n / al, (1 - r) * al_n
    var_step = ((1 - r) * s2_n) ** (1 - v) * ((1 - r) * s2) ** v
    mean = (coef_z + coef_x * k) * mean + coef_x * m
    var = (coef_z + coef_x * k) ** 2 * var + var_step
  k, m = x_hat_affine(lams[-1])
  return k * mean + m, k**2 * var


@pytest.mark.parametrize("v,w", [(0.0, 0.0), (0.3, 0.0), (1.0, 0.0), (0.3, 1.0)])
def test_sampler_output_matches_its_exact_gaussian_law(v, w):
  """For Gaussian data the sampler's law is known exactly at any T: match it within sampling error."""
  n = 3000  # Per class; 16 independent pixels each.
  labels = jnp.repeat(jnp.arange(NUM_CLASSES), n)
  x = np.asarray(run(jax.random.key(0), labels, w, v=v)).reshape(NUM_CLASSES, -1)
  m = x.shape[1]
  for c in range(NUM_CLASSES):
    mean, var = exact_sampler_moments(float(MEANS[c]), w, 256, v)
    assert abs(x[c].mean() - mean) < 5 * np.sqrt(var / m), (c, x[c].mean(), mean)
    assert abs(x[c].var() / var - 1) < 5 * np.sqrt(2 / m), (c, x[c].var(), var)


def test_sampler_law_converges_to_the_data_as_steps_grow():
  """w = 0: the mean is exact and the variance's discretisation bias shrinks with T."""
  errors = []
  for num_steps in (64, 256, 1024):
    mean, var = exact_sampler_moments(0.6, 0.0, num_steps, 0.3)
    np.testing.assert_allclose(mean, 0.6, atol=1e-6)
    errors.append(abs(var / STD**2 - 1))
  assert errors[0] > errors[1] > errors[2]
  assert errors[1] < 0.05 and errors[2] < 0.02  # At T = 256 within 5% of s², at T = 1024 within 2%.


def test_guidance_pushes_samples_away_from_the_unconditional_model():
  # With ∅ modelled as N(0, s²), guided samples of class c have mean (1 + w) μ_c (ε is linear in z).
  labels = jnp.full((4000,), 2)
  x = np.asarray(run(jax.random.key(1), labels, 1.0))
  assert abs(x.mean() - 2 * MEANS[2]) < 0.01


def test_same_key_same_samples_and_per_example_w():
  labels = jnp.array([0, 1, 2, 0])
  w = jnp.array([0.0, 0.5, 1.0, 4.0])
  a = run(jax.random.key(7), labels, w, num_steps=16)
  b = run(jax.random.key(7), labels, w, num_steps=16)
  c = run(jax.random.key(8), labels, w, num_steps=16)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # A w vector equals the same w given as a scalar to the whole batch, example by example.
  for i in range(4):
    single = run(jax.random.key(7), labels, float(w[i]), num_steps=16)
    np.testing.assert_allclose(a[i], single[i], atol=1e-5)


def test_clip_x_keeps_samples_in_range_and_uint8_conversion():
  x = run(jax.random.key(2), jnp.full((64,), 2), 4.0, num_steps=16, clip_x=True)
  assert float(jnp.max(x)) <= 1.0 and float(jnp.min(x)) >= -1.0
  u8 = sampler.to_uint8(jnp.array([-1.0, -0.999, 0.0, 0.999, 1.0, 1.5]))
  np.testing.assert_array_equal(u8, [0, 0, 128, 255, 255, 255])
  assert u8.dtype == jnp.uint8


def test_noise_follows_ids_not_batch_position():
  labels = jnp.array([0, 1, 2, 1])
  batch = run(jax.random.key(3), labels, 0.0, num_steps=8)
  alone = run(jax.random.key(3), labels[2:3], 0.0, num_steps=8, ids=jnp.array([2]))
  np.testing.assert_array_equal(alone[0], batch[2])
  # Equal ids share their noise: same id and label give the same sample, another id does not.
  shared = run(jax.random.key(3), labels, 0.0, num_steps=8, ids=jnp.array([5, 5, 6, 5]))
  np.testing.assert_array_equal(shared[1], shared[3])
  assert not np.allclose(shared[0], shared[2])


def test_class_sweep_layout():
  labels, w, ids = sampler.class_sweep(3, 2, (0.0, 1.5))
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2] * 2)
  np.testing.assert_array_equal(w, [0.0] * 6 + [1.5] * 6)
  np.testing.assert_array_equal(ids, list(range(6)) * 2)
