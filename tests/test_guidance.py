"""Guidance in one batched call: w = 0, batching, per-example w."""
import jax
import jax.numpy as jnp
import numpy as np

from cfdg_jax import guidance

NULL = 5


def _eps_fn(calls=None):
  """A nonlinear ε-function whose output depends on z, λ and the label."""
  def eps_fn(z, logsnr, labels):
    if calls is not None:
      calls.append(z.shape[0])
    scale = (1.0 + labels.astype(jnp.float32))[:, None, None, None]
    return jnp.tanh(z * scale) + 0.1 * logsnr[:, None, None, None] - 0.3 * (labels == NULL)[:, None, None, None]
  return eps_fn


def _inputs(batch=4):
  z = jax.random.normal(jax.random.key(0), (batch, 3, 3, 2))
  logsnr = jnp.linspace(-3.0, 3.0, batch)
  labels = jnp.arange(batch) % NULL
  return z, logsnr, labels


def test_one_network_call_on_a_doubled_batch():
  calls = []
  z, logsnr, labels = _inputs()
  guidance.guided_eps(_eps_fn(calls), z, logsnr, labels, 2.0, NULL)
  assert calls == [2 * z.shape[0]]


def test_w_zero_is_exactly_the_conditional_prediction():
  z, logsnr, labels = _inputs()
  got = guidance.guided_eps(_eps_fn(), z, logsnr, labels, 0.0, NULL)
  np.testing.assert_array_equal(got, _eps_fn()(z, logsnr, labels))


def test_batched_call_equals_two_separate_calls():
  z, logsnr, labels = _inputs()
  eps_c = _eps_fn()(z, logsnr, labels)
  eps_u = _eps_fn()(z, logsnr, jnp.full_like(labels, NULL))
  for w in (0.3, 1.0, 4.0):
    got = guidance.guided_eps(_eps_fn(), z, logsnr, labels, w, NULL)
    np.testing.assert_allclose(got, (1 + w) * eps_c - w * eps_u, rtol=1e-6, atol=1e-6)
  assert not np.allclose(eps_c, eps_u)  # The test would notice a guidance that ignored ε_u.


def test_per_example_w_equals_separate_scalar_calls():
  z, logsnr, labels = _inputs(batch=6)
  w = jnp.array([0.0, 0.1, 0.5, 1.0, 2.0, 4.0])
  got = guidance.guided_eps(_eps_fn(), z, logsnr, labels, w, NULL)
  for i in range(6):
    single = guidance.guided_eps(_eps_fn(), z, logsnr, labels, float(w[i]), NULL)
    np.testing.assert_allclose(got[i], single[i], rtol=1e-6, atol=1e-6)


def test_every_channel_is_guided():
  z, logsnr, labels = _inputs()
  diff = guidance.guided_eps(_eps_fn(), z, logsnr, labels, 3.0, NULL) - _eps_fn()(z, logsnr, labels)
  assert np.all(np.abs(np.asarray(diff)).reshape(-1, diff.shape[-1]).max(axis=0) > 0)
  assert diff.shape == z.shape


def test_scalar_logsnr_is_broadcast():
  z, _, labels = _inputs()
  a = guidance.guided_eps(_eps_fn(), z, jnp.float32(1.5), labels, 1.0, NULL)
  b = guidance.guided_eps(_eps_fn(), z, jnp.full((4,), 1.5), labels, 1.0, NULL)
  np.testing.assert_array_equal(a, b)
