"""FID, Inception Score and improved precision/recall on Inception features, in float64 numpy.

References: FID, Heusel et al. 2017 (computed as pytorch-fid and TTUR do); Inception Score,
Salimans et al. 2016 (as the improved-GAN code: 10 splits); precision/recall, Kynkäänniemi et al. 2019
(k = 3 nearest-neighbour balls, as NVlabs' implementation).
"""
import functools
from typing import Iterator, Mapping

import numpy as np
from etils import epath
from scipy import linalg
from scipy import special

# Precision/recall rows per distance block: a [1000, 10000] float64 block is 80 MB.
_PR_BATCH = 1000


def stats_from_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features [N, D] -> (mu [D], sigma [D, D]), float64, sigma with N - 1 in the denominator."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"Expected features [N, D] with N >= 2; got shape {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise ValueError(f"{name}: expected mu [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}.")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"{name}: the statistics contain NaN or infinity.")
  return mu, sigma


def _sqrt_eigh(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """sigma = V diag(w) V^T -> (sqrt(w), V) over the numerical range of sigma only.

  Eigenvalues below numpy's matrix_rank tolerance (max·D·eps) are rounding noise around 0 (a
  covariance of N < D samples has D - N + 1 of them); dropping them is exact up to that noise.
  """
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)  # numpy's syevd: much faster than scipy's syevr.
  keep = w > np.abs(w).max(initial=0) * len(w) * np.finfo(w.dtype).eps
  return np.sqrt(w[keep]), v[:, keep]


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                   sigma2_factors: tuple[np.ndarray, np.ndarray] | None = None) -> float:
  """Fréchet distance ||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½).

  pytorch-fid (and ADM's evaluator) take scipy.linalg.sqrtm of the non-symmetric product
  sigma1·sigma2, retry with eps·I added when that fails, and drop small imaginary parts. Here:
  sigma1·sigma2 is similar to A^T A with A = sigma2^½ sigma1^½, so tr((sigma1 sigma2)^½) is the sum
  of the singular values of A, i.e. of W2^½ (V2^T V1) W1^½ where sigma_i = V_i W_i V_i^T. This
  gives the same value (1e-12 relative on full-rank statistics) without complex arithmetic or
  squaring the condition number, stays accurate for singular covariances (fewer samples than
  dimensions) where sqrtm can fail, and then needs only a rank x rank SVD.

  `sigma2_factors`: _sqrt_eigh(sigma2), when already computed (`Reference` keeps its own).
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
  mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
  if mu1.shape != mu2.shape:
    raise ValueError(f"The statistics have different dimensions: {mu1.size} and {mu2.size}.")
  r1, v1 = _sqrt_eigh(sigma1)
  r2, v2 = _sqrt_eigh(sigma2) if sigma2_factors is None else sigma2_factors
  core = r2[:, None] * (v2.T @ v1) * r1[None, :]
  tr_covmean = linalg.svdvals(core).sum() if core.size else 0.0  # Empty if a covariance is 0.
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits_or_probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score (mean, std) over `splits` equal chunks, as the improved-GAN reference.

  Per chunk: exp(mean over x of KL(p(y|x) || p(y))), with p(y) the chunk's mean prediction.

  Args:
    logits_or_probs: [N, K]. Rows that are non-negative and sum to 1 (to 1e-4) are taken as
      probabilities; anything else as logits, which are softmaxed (the reference's 1008 outputs:
      pass all of them).
    splits: number of chunks; chunk i is rows [i·N // splits, (i + 1)·N // splits).
  """
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2 or len(x) < splits or splits < 1:
    raise ValueError(f"Expected predictions [N, K] with N >= splits >= 1; got shape {x.shape}, "
                     f"splits={splits}.")
  is_probs = (x >= 0).all() and np.allclose(x.sum(axis=1), 1, rtol=0, atol=1e-4)
  p = x if is_probs else special.softmax(x, axis=1)
  n = len(p)
  scores = []
  for i in range(splits):
    part = p[i * n // splits:(i + 1) * n // splits]
    py = part.mean(axis=0, keepdims=True)
    # xlogy: 0·log 0 = 0, so one-hot predictions are fine (the reference gives NaN there).
    kl = (special.xlogy(part, part) - special.xlogy(part, py)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  d = (a * a).sum(axis=1)[:, None] + b_sq[None, :] - 2 * a @ b.T
  return np.maximum(d, 0)  # Rounding can make ||a - a||² slightly negative.


def _knn_radii_sq(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance from each row to its k-th nearest other row."""
  x_sq = (x * x).sum(axis=1)
  radii = np.empty(len(x))
  for start in range(0, len(x), batch_size):
    d = _squared_distances(x[start:start + batch_size], x, x_sq)
    radii[start:start + batch_size] = np.partition(d, k, axis=1)[:, k]  # Index 0 is the row itself.
  return radii


def _coverage(points: np.ndarray, centers: np.ndarray, radii_sq: np.ndarray, batch_size: int) -> float:
  """Fraction of `points` inside at least one ball (center, radius), boundaries included."""
  c_sq = (centers * centers).sum(axis=1)
  inside = 0
  for start in range(0, len(points), batch_size):
    d = _squared_distances(points[start:start + batch_size], centers, c_sq)
    inside += int((d <= radii_sq[None, :]).any(axis=1).sum())
  return inside / len(points)


def _check_pr_shapes(real_shape: tuple[int, ...], fake_shape: tuple[int, ...], k: int) -> None:
  if len(real_shape) != 2 or len(fake_shape) != 2 or real_shape[1] != fake_shape[1]:
    raise ValueError(f"Expected real [N, D] and fake [M, D] features; got {real_shape} and {fake_shape}.")
  if min(real_shape[0], fake_shape[0]) <= k or k < 1:
    raise ValueError(f"k={k} needs more than k samples in each set; got {real_shape[0]} real and "
                     f"{fake_shape[0]} fake. Use more samples or a smaller k.")


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     batch_size: int = _PR_BATCH, *,
                     real_radii_sq: np.ndarray | None = None) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al., 2019).

  Each sample's ball has the radius of its k-th nearest neighbour within its own set. Precision is
  the fraction of fake samples inside some real ball; recall the fraction of real samples inside
  some fake ball. Distances are computed `batch_size` rows at a time, so 10k x 10k sets need
  ~batch_size·N·8 bytes at once.

  Args:
    real_features: [N, D].
    fake_features: [M, D].
    k: neighbourhood size (the paper uses 3); needs N, M > k.
    batch_size: rows per distance block.
    real_radii_sq: [N] the real samples' squared k-NN radii (_knn_radii_sq), when already
      computed (`Reference` keeps its own).

  Returns:
    (precision, recall) in [0, 1].
  """
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  _check_pr_shapes(real.shape, fake.shape, k)
  if real_radii_sq is None:
    real_radii_sq = _knn_radii_sq(real, k, batch_size)
  precision = _coverage(fake, real, real_radii_sq, batch_size)
  recall = _coverage(real, fake, _knn_radii_sq(fake, k, batch_size), batch_size)
  return precision, recall


class Reference(Mapping[str, np.ndarray]):
  """Reference arrays that many sample sets are compared with: "mu", "sigma" [D, D] and, for
  precision/recall, "features" [N, D] (networks.load_or_compute_reference's).

  What FID and precision/recall need of the reference alone (the covariance's eigendecomposition,
  the features' k-NN radii) is computed on first use and kept: for 2048-d features of 50k images
  that is seconds and minutes each later comparison skips. The results are fid_from_stats' and
  precision_recall's.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = dict(arrays)
    self._radii_sq = {}  # k -> the features' squared k-NN radii.

  def __getitem__(self, key: str) -> np.ndarray:
    return self._arrays[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._arrays)

  def __len__(self) -> int:
    return len(self._arrays)

  @functools.cached_property
  def _sigma_factors(self) -> tuple[np.ndarray, np.ndarray]:
    return _sqrt_eigh(_check_stats(self["mu"], self["sigma"], "reference statistics")[1])

  def fid(self, mu: np.ndarray, sigma: np.ndarray) -> float:
    """fid_from_stats(mu, sigma, the reference's mu, the reference's sigma)."""
    return fid_from_stats(mu, sigma, self["mu"], self["sigma"], sigma2_factors=self._sigma_factors)

  def precision_recall(self, fake_features: np.ndarray, k: int = 3) -> tuple[float, float]:
    """precision_recall(the reference's features, fake_features, k)."""
    real = self["features"]
    _check_pr_shapes(np.shape(real), np.shape(fake_features), k)  # Its message, not partition's.
    if k not in self._radii_sq:
      self._radii_sq[k] = _knn_radii_sq(np.asarray(real, np.float64), k, _PR_BATCH)
    return precision_recall(real, fake_features, k, real_radii_sq=self._radii_sq[k])


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes pytorch-fid-style statistics: an .npz with `mu` [D] and `sigma` [D, D] (float64)."""
  mu, sigma = _check_stats(mu, sigma, str(path))
  with epath.Path(path).open("wb") as f:
    np.savez(f, mu=mu, sigma=sigma)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu, sigma) from a pytorch-fid statistics .npz or an ADM reference batch.

  ADM's reference batches (e.g. VIRTUAL_imagenet64_labeled.npz) hold `mu` and `sigma` next to the
  images in `arr_0`; only the statistics are read.
  """
  with epath.Path(path).open("rb") as f:
    with np.load(f) as data:
      keys = set(data.files)
      if {"mu", "sigma"} <= keys:
        return _check_stats(data["mu"], data["sigma"], str(path))
  if keys & {"arr_0", "images"}:
    raise ValueError(f"{path} holds images ({sorted(keys)}) but no mu/sigma statistics; compute them with "
                     "python -m cfdg_jax.eval.fid (--save_stats).")
  raise ValueError(f"{path} has no FID statistics: expected arrays mu and sigma, found {sorted(keys)}.")
