"""Schedule maths against closed forms, computed independently in float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cfdg_jax import diffusion

LOGSNRS = np.linspace(-20.0, 20.0, 401, dtype=np.float32)


def _alpha2_sigma2_f64(logsnr):
  logsnr = np.asarray(logsnr, np.float64)
  return 1.0 / (1.0 + np.exp(-logsnr)), 1.0 / (1.0 + np.exp(logsnr))


def test_alpha_sigma_identities_float32():
  alpha, sigma = diffusion.alpha_sigma(jnp.asarray(LOGSNRS))
  assert alpha.dtype == sigma.dtype == jnp.float32
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  # λ = log(α²/σ²) is recovered over the whole range, including the clean end where α² → 1.
  np.testing.assert_allclose(2 * jnp.log(alpha) - 2 * jnp.log(sigma), LOGSNRS, atol=2e-5, rtol=1e-6)
  a2, s2 = _alpha2_sigma2_f64(LOGSNRS)
  np.testing.assert_allclose(sigma**2, s2, rtol=1e-5)  # No cancellation: σ² ≈ 2e-9 at λ = 20.
  np.testing.assert_allclose(alpha**2, a2, rtol=1e-5)


@pytest.mark.parametrize("lo,hi", [(-20.0, 20.0), (-10.0, 8.0)])
def test_cosine_schedule_endpoints_monotone_and_inverse(lo, hi):
  u = jnp.linspace(0.0, 1.0, 1001)
  logsnr = diffusion.logsnr_schedule_cosine(u, lo, hi)
  np.testing.assert_allclose(logsnr[0], hi, atol=1e-3)
  np.testing.assert_allclose(logsnr[-1], lo, atol=1e-3)
  assert np.all(np.diff(np.asarray(logsnr)) < 0)
  np.testing.assert_allclose(diffusion.logsnr_schedule_cosine_inverse(logsnr, lo, hi), u, atol=2e-5)
  # λ -> u -> λ is limited by u's float32 resolution near u = 1 (ulp 6e-8 times dλ/du ~ 6e4).
  grid = jnp.linspace(lo, hi, 101)
  np.testing.assert_allclose(
      diffusion.logsnr_schedule_cosine(diffusion.logsnr_schedule_cosine_inverse(grid, lo, hi), lo, hi),
      grid, atol=5e-3)


def _cosine_cdf(logsnr, lo, hi):
  """P(Λ ≤ l) = P(U ≥ u(l)) = 1 − u(l), with u(l) written out in float64."""
  b = np.arctan(np.exp(-hi / 2))
  a = np.arctan(np.exp(-lo / 2)) - b
  return 1.0 - (np.arctan(np.exp(-np.asarray(logsnr, np.float64) / 2)) - b) / a


@pytest.mark.parametrize("lo,hi", [(-20.0, 20.0), (-10.0, 8.0)])
def test_training_logsnr_distribution_ks(lo, hi):
  samples = np.asarray(diffusion.sample_logsnr(jax.random.key(0), 20_000, lo, hi), np.float64)
  assert samples.min() >= lo - 1e-3 and samples.max() <= hi + 1e-3
  assert stats.kstest(samples, lambda l: _cosine_cdf(l, lo, hi)).pvalue > 1e-3
  # The test has power: a uniform λ on the same interval is firmly rejected.
  assert stats.kstest(samples, stats.uniform(lo, hi - lo).cdf).pvalue < 1e-6


PAIRS = [(-20.0, -19.5), (-5.0, 0.0), (0.0, 0.01), (3.0, 12.0), (19.0, 20.0), (-20.0, 20.0)]


@pytest.mark.parametrize("lam,lam_next", PAIRS)
def test_posterior_matches_gaussian_conditioning(lam, lam_next):
  """q(z_λ'|z_λ,x) from the joint Gaussian of (z_λ', z_λ) given x, conditioned on z_λ."""
  rng = np.random.default_rng(0)
  x, z = rng.uniform(-1, 1, (2, 1, 4, 4, 1))
  a2, s2 = _alpha2_sigma2_f64(lam)
  a2n, s2n = _alpha2_sigma2_f64(lam_next)
  # z_λ = (α/α') z_λ' + noise, so Cov(z_λ', z_λ | x) = (α/α') σ'².
  cov = np.sqrt(a2 / a2n) * s2n
  mean = np.sqrt(a2n) * x + cov / s2 * (z - np.sqrt(a2) * x)
  var = s2n - cov**2 / s2
  got_mean, got_var = diffusion.posterior_mean_var(
      jnp.asarray(z, jnp.float32), jnp.asarray(x, jnp.float32),
      jnp.full((1,), lam), jnp.full((1,), lam_next))
  np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.ravel(got_var), var, rtol=1e-4, atol=1e-12)
  # Transition variance σ²_{λ|λ'} = σ² − (α/α')² σ'².
  np.testing.assert_allclose(diffusion.transition_var(lam, lam_next), s2 - a2 / a2n * s2n,
                             rtol=1e-4, atol=1e-12)
  # The sampler's log-variance interpolates these two exactly at v = 0 and v = 1.
  np.testing.assert_allclose(diffusion.sampler_log_var(lam, lam_next, 0.0), np.log(var), rtol=1e-4)
  np.testing.assert_allclose(diffusion.sampler_log_var(lam, lam_next, 1.0),
                             np.log(s2 - a2 / a2n * s2n), rtol=1e-4)
  np.testing.assert_allclose(diffusion.sampler_log_var(lam, lam_next, 0.3),
                             0.7 * np.log(var) + 0.3 * np.log(s2 - a2 / a2n * s2n), rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_parameterisations_round_trip(prediction):
  rng = jax.random.key(1)
  x = jax.random.uniform(rng, (3, 4, 4, 2), minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.key(2), x.shape)
  logsnr = jnp.array([-15.0, 0.0, 15.0])
  z = diffusion.q_sample(x, logsnr, eps)
  target = diffusion.training_target(x, eps, logsnr, prediction)
  eps_hat = diffusion.eps_from_output(target, z, logsnr, prediction)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
  # x̂ from ε̂ is exact wherever α is not tiny.
  np.testing.assert_allclose(diffusion.x_from_eps(z, eps, logsnr)[1:], x[1:], atol=1e-4)


def test_unknown_prediction_raises():
  with pytest.raises(ValueError, match="prediction"):
    diffusion.eps_from_output(jnp.zeros(2), jnp.zeros(2), jnp.zeros(()), "x0")


def test_loss_is_zero_for_the_exact_noise_predictor():
  # With x = 0, z = σ ε, so ε = z / σ is the exact predictor at every λ.
  x = jnp.zeros((64, 4, 4, 1))
  labels = jnp.zeros((64,), jnp.int32)
  oracle = lambda z, logsnr, c: z / diffusion.alpha_sigma(logsnr)[1][:, None, None, None]
  loss = diffusion.loss_fn(oracle, jax.random.key(0), x, labels, p_uncond=0.1, null_label=10,
                           logsnr_min=-20.0, logsnr_max=20.0)
  assert loss.shape == (64,)
  np.testing.assert_allclose(loss, 0.0, atol=1e-8)
  # And a useless predictor pays E||ε||²/d = 1.
  zero = lambda z, logsnr, c: jnp.zeros_like(z)
  loss = diffusion.loss_fn(zero, jax.random.key(0), jnp.zeros((4096, 2, 2, 1)),
                           jnp.zeros((4096,), jnp.int32), p_uncond=0.1, null_label=10,
                           logsnr_min=-20.0, logsnr_max=20.0)
  np.testing.assert_allclose(loss.mean(), 1.0, atol=0.03)


def test_label_dropout_rate_and_null_id():
  labels = jnp.arange(100_000) % 7
  for p in (0.0, 0.1, 0.5, 1.0):
    dropped = diffusion.drop_labels(jax.random.key(3), labels, p, null_label=7)
    is_null = np.asarray(dropped == 7)
    assert abs(is_null.mean() - p) < 4 * np.sqrt(p * (1 - p) / labels.size) + 1e-9
    np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])


def test_loss_sees_null_labels_at_rate_p_uncond():
  seen = []

  def model_fn(z, logsnr, c):
    seen.append(c)
    return jnp.zeros_like(z)

  labels = jnp.full((20_000,), 3, jnp.int32)
  diffusion.loss_fn(model_fn, jax.random.key(4), jnp.zeros((20_000, 1, 1, 1)), labels,
                    p_uncond=0.2, null_label=10, logsnr_min=-20.0, logsnr_max=20.0)
  c = np.asarray(seen[0])
  assert set(np.unique(c)) == {3, 10}
  assert abs((c == 10).mean() - 0.2) < 0.015
