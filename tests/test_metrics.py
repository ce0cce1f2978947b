"""FID, Inception Score, precision/recall and the statistics files."""
import numpy as np
import pytest
from scipy import linalg

from cfdg_jax.eval import metrics


def _pytorch_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's calculate_frechet_distance: sqrtm of the product, eps·I retry, real part."""
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _random_stats(rng, d, n):
  """Statistics of n correlated Gaussian-ish features in d dimensions (full rank if n > d)."""
  features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
  return metrics.stats_from_features(features)


def test_stats_from_features_is_float64_mean_and_cov():
  features = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = metrics.stats_from_features(features)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    metrics.stats_from_features(features[0])


def test_fid_of_identical_stats_is_zero():
  mu, sigma = _random_stats(np.random.default_rng(1), 64, 500)
  assert abs(metrics.fid_from_stats(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fid_diagonal_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
  s1, s2 = rng.uniform(0.1, 3, size=32), rng.uniform(0.1, 3, size=32)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  np.testing.assert_allclose(metrics.fid_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)), expected, rtol=1e-10)


@pytest.mark.parametrize("d", [16, 128])
def test_fid_matches_pytorch_fid_formula(d):
  rng = np.random.default_rng(d)
  mu1, sigma1 = _random_stats(rng, d, 4 * d)
  mu2, sigma2 = _random_stats(rng, d, 4 * d)
  ours = metrics.fid_from_stats(mu1, sigma1, mu2, sigma2)
  reference = _pytorch_fid(mu1, sigma1, mu2, sigma2)
  assert abs(ours - reference) <= 1e-6 * abs(reference)


def test_fid_singular_covariances_are_finite():
  rng = np.random.default_rng(3)
  # Fewer samples than dimensions, as 1k samples of 2048-d features: both covariances are singular.
  mu1, sigma1 = _random_stats(rng, 64, 10)
  mu2, sigma2 = _random_stats(rng, 64, 12)
  fid = metrics.fid_from_stats(mu1, sigma1, mu2, sigma2)
  assert np.isfinite(fid) and fid > 0
  assert abs(metrics.fid_from_stats(mu1, sigma1, mu1, sigma1)) < 1e-8 * np.trace(sigma1)
  # Zero variances: the closed form still holds.
  s1, s2 = np.array([0., 1., 2., 0.]), np.array([0., 0., 2., 3.])
  expected = np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  np.testing.assert_allclose(metrics.fid_from_stats(np.zeros(4), np.diag(s1), np.zeros(4), np.diag(s2)),
                             expected, rtol=1e-12)


def test_fid_rejects_mismatched_stats():
  with pytest.raises(ValueError, match="different dimensions"):
    metrics.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="sigma"):
    metrics.fid_from_stats(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_reference_fid_from_its_kept_factors_matches_fid_from_stats():
  rng = np.random.default_rng(9)
  mu, sigma = _random_stats(rng, 96, 400)
  reference = metrics.Reference({"mu": mu, "sigma": sigma})
  # A full-rank and a singular (fewer samples than dimensions) sample covariance; the second
  # comparison reuses the factors the first computed.
  for n in (300, 40):
    mu1, sigma1 = _random_stats(rng, 96, n)
    want = metrics.fid_from_stats(mu1, sigma1, mu, sigma)
    np.testing.assert_allclose(reference.fid(mu1, sigma1), want, rtol=1e-6)
    np.testing.assert_allclose(metrics.fid_from_stats(
        mu1, sigma1, mu, sigma, sigma2_factors=metrics._sqrt_eigh(sigma)), want, rtol=1e-6)


def test_reference_precision_recall_from_its_kept_radii_equals_the_plain_call():
  rng = np.random.default_rng(10)
  real = rng.normal(size=(300, 16)).astype(np.float32)  # Stored as the reference cache stores it.
  reference = metrics.Reference({"features": real})
  # k alternates, so radii kept for the wrong k would show; the second of each k reuses them.
  for k, shift in ((3, 0.0), (1, 0.3), (3, 0.3), (1, 0.0)):
    fake = rng.normal(size=(120, 16)) + shift
    assert reference.precision_recall(fake, k) == metrics.precision_recall(real, fake, k)
    radii = metrics._knn_radii_sq(real.astype(np.float64), k, metrics._PR_BATCH)
    assert (metrics.precision_recall(real, fake, k, real_radii_sq=radii)
            == metrics.precision_recall(real, fake, k))
  with pytest.raises(ValueError, match="more than k samples"):
    reference.precision_recall(fake, 300)


def test_inception_score_of_one_hot_uniform_predictions_is_num_classes():
  probs = np.eye(10)[np.arange(1000) % 10]  # Every split holds each class equally often.
  mean, std = metrics.inception_score(probs)
  assert mean == pytest.approx(10, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_of_identical_predictions_is_one():
  probs = np.tile(np.random.default_rng(4).dirichlet(np.ones(1008)), (100, 1))
  mean, std = metrics.inception_score(probs)
  assert mean == pytest.approx(1, abs=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_matches_reference_on_logits():
  logits = np.random.default_rng(5).normal(scale=3, size=(1003, 1008))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  scores = []  # The improved-GAN reference loop.
  for i in range(10):
    part = probs[(i * probs.shape[0] // 10):((i + 1) * probs.shape[0] // 10), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  np.testing.assert_allclose(metrics.inception_score(logits), (np.mean(scores), np.std(scores)), rtol=1e-10)
  np.testing.assert_allclose(metrics.inception_score(probs), (np.mean(scores), np.std(scores)), rtol=1e-10)


def test_precision_recall_identical_and_far_apart_sets():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(200, 8))
  assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
  assert metrics.precision_recall(real, rng.normal(size=(150, 8)) + 100) == (0.0, 0.0)


def test_precision_recall_hand_computed_2d():
  # k = 1. Real radii: (0,0), (0,1) -> 1; (5,0), (5,2) -> 2.
  # Fake radii: (0,.5) -> |(3,0) - (0,.5)| = 3.04; (3,0), (3.5,1) -> 1.118; (20,0), (20,1) -> 1.
  real = np.array([[0, 0], [0, 1], [5, 0], [5, 2]], np.float64)
  fake = np.array([[0, .5], [3, 0], [3.5, 1], [20, 0], [20, 1]], np.float64)
  # Precision: (0,.5) in (0,0)'s ball; (3,0) on the boundary of (5,0)'s; (3.5,1) inside it -> 3/5.
  # Recall: (0,0), (0,1) in (0,.5)'s ball; (5,0) and (5,2) are 1.80+ from every fake sample -> 2/4.
  assert metrics.precision_recall(real, fake, k=1) == (0.6, 0.5)


def test_precision_recall_batching_matches_brute_force():
  rng = np.random.default_rng(7)
  real, fake = rng.normal(size=(50, 5)), rng.normal(size=(40, 5)) + 0.5

  def brute(a, b, k):
    radii = np.sort(linalg.norm(a[:, None] - a[None], axis=-1), axis=1)[:, k]
    return np.mean((linalg.norm(b[:, None] - a[None], axis=-1) <= radii).any(axis=1))

  expected = (brute(real, fake, 3), brute(fake, real, 3))
  np.testing.assert_allclose(metrics.precision_recall(real, fake, k=3, batch_size=7), expected)
  with pytest.raises(ValueError, match="more than k samples"):
    metrics.precision_recall(real[:3], fake, k=3)


def test_stats_files(tmp_path):
  rng = np.random.default_rng(8)
  mu, sigma = _random_stats(rng, 8, 20)
  metrics.save_stats(tmp_path / "stats.npz", mu, sigma)
  for got, want in zip(metrics.load_stats(tmp_path / "stats.npz"), (mu, sigma)):
    np.testing.assert_array_equal(got, want)
  # ADM reference batch: images in arr_0 next to the statistics.
  np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma)
  np.testing.assert_array_equal(metrics.load_stats(tmp_path / "adm.npz")[1], sigma)
  np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="images .* but no mu/sigma"):
    metrics.load_stats(tmp_path / "images.npz")
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="expected arrays mu and sigma"):
    metrics.load_stats(tmp_path / "other.npz")
