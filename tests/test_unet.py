"""Tests for cfdg_jax.unet: shapes, dtypes, parameter count, conditioning, dropout, validation."""
import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cfdg_jax import unet

K = 3  # Classes in the small test model; label K is the null label.
TINY = dict(num_classes=K, out_channels=1, base_channels=32, channel_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(4,), head_channels=16)


def _inputs(batch=4, size=8, channels=1, seed=0):
  kx, kl = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (batch, size, size, channels))
  logsnr = jax.random.uniform(kl, (batch,), minval=-10.0, maxval=10.0)
  labels = jnp.arange(batch, dtype=jnp.int32) % (K + 1)
  return x, logsnr, labels


def _perturb(params, scale=0.05, seed=1):
  """Adds Gaussian noise to every parameter so the zero-initialised layers stop hiding the input.

  NumPy noise: jitting JAX initialisers costs seconds of XLA compile time per model on CPU.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(p + scale * rng.standard_normal(p.shape), jnp.float32), params)


def _init_shapes(model, x):
  b = x.shape[0]
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x,
                        jnp.zeros((b,)), jnp.zeros((b,), jnp.int32))


@functools.lru_cache(maxsize=None)
def _apply_fn(model):
  """Jitted model.apply, cached per (hashable) model so tests share compilations."""
  return jax.jit(model.apply, static_argnames="train")


@pytest.fixture(scope="module")
def tiny():
  """(model, params at init, perturbed params, jitted apply) for a tiny model with dropout."""
  model = unet.UNet(**TINY, dropout=0.5)
  init = jax.jit(functools.partial(model.init, train=False))
  params = init(jax.random.key(0), *_inputs())["params"]
  return model, params, _perturb(params), _apply_fn(model)


# Independent parameter count, following the architecture (not the module's code).
def _conv(k, cin, cout):
  return k * k * cin * cout + cout


def _dense(din, dout):
  return din * dout + dout


def _norm(c):
  return 2 * c


def _res(cin, cout, emb):
  skip = _conv(1, cin, cout) if cin != cout else 0
  return (_norm(cin) + _conv(3, cin, cout) + _dense(emb, 2 * cout) + _norm(cout)
          + _conv(3, cout, cout) + skip)


def _attn(c):
  return _norm(c) + _dense(c, 3 * c) + _dense(c, c)


def _expected_num_params(num_classes, in_channels, out_channels, base_channels, channel_mult,
                         num_res_blocks, attn_resolutions, resblock_updown, size):
  emb = 4 * base_channels
  n = _dense(base_channels, emb) + _dense(emb, emb) + (num_classes + 1) * emb
  ch = base_channels * channel_mult[0]
  n += _conv(3, in_channels, ch)
  skips = [ch]
  resample = lambda c: _res(c, c, emb) if resblock_updown else _conv(3, c, c)
  for level, mult in enumerate(channel_mult):
    for _ in range(num_res_blocks):
      n += _res(ch, base_channels * mult, emb)
      ch = base_channels * mult
      n += _attn(ch) if size // 2**level in attn_resolutions else 0
      skips.append(ch)
    if level < len(channel_mult) - 1:
      n += resample(ch)
      skips.append(ch)
  n += 2 * _res(ch, ch, emb) + _attn(ch)
  for level, mult in reversed(list(enumerate(channel_mult))):
    for _ in range(num_res_blocks + 1):
      n += _res(ch + skips.pop(), base_channels * mult, emb)
      ch = base_channels * mult
      n += _attn(ch) if size // 2**level in attn_resolutions else 0
    n += resample(ch) if level > 0 else 0
  assert not skips
  return n + _norm(ch) + _conv(3, ch, out_channels)


@pytest.mark.parametrize("cfg, size, in_channels", [
    # Attention at two resolutions.
    (dict(num_classes=10, out_channels=3, base_channels=32, channel_mult=(1, 2),
          num_res_blocks=1, attn_resolutions=(8, 4), head_channels=16), 8, 3),
    # resblock_updown, three levels, non-power-of-two channel counts.
    (dict(num_classes=5, out_channels=2, base_channels=24, channel_mult=(1, 2, 3),
          num_res_blocks=2, attn_resolutions=(4,), head_channels=24, resblock_updown=True),
     16, 1),
    # configs/digits.py.
    (dict(num_classes=10, out_channels=1, base_channels=64, channel_mult=(1, 2),
          num_res_blocks=2, attn_resolutions=(4,), head_channels=32), 8, 1),
])
def test_param_count_matches_closed_form(cfg, size, in_channels):
  model = unet.UNet(**cfg)
  x = jnp.zeros((2, size, size, in_channels))
  shapes = _init_shapes(model, x)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
  expected = _expected_num_params(
      cfg["num_classes"], in_channels, cfg["out_channels"], cfg["base_channels"],
      cfg["channel_mult"], cfg["num_res_blocks"], cfg["attn_resolutions"],
      cfg.get("resblock_updown", False), size)
  assert num_params == expected
  assert set(shapes) == {"params"}  # No batch statistics or other mutable state.


@pytest.mark.parametrize("dtype, extra", [
    (jnp.float32, {}),
    (jnp.bfloat16, dict(base_channels=24, head_channels=24, resblock_updown=True)),
])
def test_output_shape_and_dtypes(dtype, extra):
  model = unet.UNet(**{**TINY, "out_channels": 2, **extra}, dtype=dtype)
  x, logsnr, labels = _inputs(channels=3)
  shapes = _init_shapes(model, x)
  for path, p in jax.tree_util.tree_leaves_with_path(shapes):
    assert p.dtype == jnp.float32, jax.tree_util.keystr(path)
  variables = _perturb(jax.tree.map(lambda p: np.zeros(p.shape), shapes), scale=0.2)
  out = _apply_fn(model)(variables, x, logsnr, labels, train=False)
  assert out.shape == (4, 8, 8, 2)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.any(out != 0)


def test_output_is_zero_at_init(tiny):
  _, params, _, apply = tiny
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    assert p.dtype == jnp.float32, jax.tree_util.keystr(path)
  out = apply({"params": params}, *_inputs(), train=False)
  assert out.shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(out, 0.0)


def test_bfloat16_compute_is_close_to_float32(tiny):
  model, _, params, apply = tiny
  x, logsnr, labels = _inputs()
  out32 = apply({"params": params}, x, logsnr, labels, train=False)
  bf16 = unet.UNet(**TINY, dropout=model.dropout, dtype=jnp.bfloat16)
  out16 = _apply_fn(bf16)({"params": params}, x, logsnr, labels, train=False)
  assert not np.array_equal(out16, out32)  # Really computed in bfloat16.
  scale = np.abs(out32).max()
  np.testing.assert_allclose(out16, out32, atol=0.05 * scale)


def test_conditioning_changes_output(tiny):
  _, _, params, apply = tiny
  x, logsnr, _ = _inputs()
  f = lambda lam, y: apply({"params": params}, x, lam, jnp.full((4,), y, jnp.int32), train=False)
  null, cls0, cls1 = f(logsnr, K), f(logsnr, 0), f(logsnr, 1)
  assert np.abs(null - cls0).max() > 1e-3
  assert np.abs(cls0 - cls1).max() > 1e-3
  assert np.abs(f(logsnr + 1.0, 0) - cls0).max() > 1e-3
  np.testing.assert_array_equal(f(logsnr, 0), cls0)  # Deterministic in eval mode.


def test_examples_are_independent(tiny):
  _, _, params, apply = tiny
  x, logsnr, labels = _inputs()
  out = apply({"params": params}, x, logsnr, labels, train=False)
  out2 = apply({"params": params}, x.at[0].set(0.0), logsnr.at[0].set(5.0),
               labels.at[0].set(K), train=False)
  assert np.abs(out2[0] - out[0]).max() > 1e-3
  np.testing.assert_allclose(out2[1:], out[1:], atol=1e-6)


def test_dropout_only_in_train_mode(tiny):
  _, _, params, apply = tiny
  x, logsnr, labels = _inputs()
  run = lambda train, seed: apply({"params": params}, x, logsnr, labels, train=train,
                                  rngs={"dropout": jax.random.key(seed)})
  eval_out = apply({"params": params}, x, logsnr, labels, train=False)
  np.testing.assert_array_equal(run(False, 0), eval_out)
  np.testing.assert_array_equal(run(False, 1), eval_out)
  train0 = run(True, 0)
  np.testing.assert_array_equal(run(True, 0), train0)
  assert np.abs(train0 - run(True, 1)).max() > 1e-3
  assert np.abs(train0 - eval_out).max() > 1e-3
  with pytest.raises(flax.errors.InvalidRngError):
    apply({"params": params}, x, logsnr, labels, train=True)


def test_invalid_labels_poison_output_under_jit(tiny):
  _, _, params, apply = tiny
  x, logsnr, _ = _inputs()
  out = apply({"params": params}, x, logsnr, jnp.array([0, -1, K + 1, K], jnp.int32),
              train=False)
  assert np.all(np.isfinite(out[0])) and np.all(np.isfinite(out[3]))
  assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2]))


def test_constant_labels_closed_over_by_jit_are_checked(tiny):
  model, _, params, _ = tiny
  x, logsnr, labels = _inputs()
  # A concrete array captured by a jitted function is not a tracer: checked with numpy.
  out = jax.jit(lambda p: model.apply(p, x, logsnr, labels, train=False))({"params": params})
  assert out.shape == x.shape
  bad = labels + K + 1
  with pytest.raises(ValueError, match=rf"labels must be in 0..{K}"):
    jax.jit(lambda p: model.apply(p, x, logsnr, bad, train=False))({"params": params})


def test_logsnr_to_time_and_embedding():
  t = unet.logsnr_to_time(jnp.array([-20.0, -5.0, 0.0, 5.0, 20.0]))
  assert t[0] > 0.999 and t[-1] < 1e-3
  np.testing.assert_allclose(t[2], 0.5, atol=1e-6)
  assert np.all(np.diff(t) < 0)  # More signal means earlier in the forward process.
  emb = unet.timestep_embedding(jnp.array([0.0, 500.0]), 7)
  assert emb.shape == (2, 7) and emb.dtype == jnp.float32
  np.testing.assert_array_equal(emb[0], [1, 1, 1, 0, 0, 0, 0])  # cos 0, sin 0, zero pad.
  assert [unet.num_groups(c) for c in (32, 96, 48, 40, 7)] == [32, 32, 24, 20, 7]


@pytest.mark.parametrize("cfg, shape, match", [
    (dict(channel_mult=(1, 2, 2, 2)), (2, 12, 12, 1), r"not divisible by 2\*\*"),
    (dict(attn_resolutions=(16,)), (2, 8, 8, 1), r"attn_resolutions has 16"),
    (dict(head_channels=24), (2, 8, 8, 1), r"head_channels=24"),
    (dict(attn_resolutions=(), head_channels=48), (2, 8, 8, 1), r"head_channels=48"),
    (dict(dropout=1.0), (2, 8, 8, 1), r"dropout"),
    (dict(channel_mult=()), (2, 8, 8, 1), r"channel_mult"),
    ({}, (2, 8, 4, 1), r"square"),
    ({}, (2, 8, 8), r"NHWC"),
])
def test_bad_config_raises_before_building(cfg, shape, match):
  model = unet.UNet(**{**TINY, **cfg})
  calls = []

  def record(next_fun, args, kwargs, context):
    calls.append(type(context.module).__name__)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record), pytest.raises(ValueError, match=match):
    model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32),
               train=False)
  assert set(calls) == {"UNet"}  # Failed before any submodule (parameter) was built.


@pytest.mark.parametrize("logsnr, labels, match", [
    (jnp.zeros((2, 1)), jnp.zeros((2,), jnp.int32), r"shape \[B\]"),
    (jnp.zeros((2,)), jnp.zeros((3,), jnp.int32), r"shape \[B\]"),
    (jnp.zeros((2,)), jnp.zeros((2,)), r"integers"),
    (jnp.zeros((2,)), jnp.array([0, K + 1]), rf"labels must be in 0..{K}"),
    (jnp.zeros((2,)), jnp.array([-1, 0]), rf"labels must be in 0..{K}"),
])
def test_bad_inputs_raise(logsnr, labels, match):
  model = unet.UNet(**TINY)
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), logsnr, labels, train=False)


def test_remat_blocks_computes_the_same_function_and_gradients(tiny):
  model, _, params, _ = tiny
  remat = model.clone(remat="blocks")
  x, logsnr, labels = _inputs()
  assert jax.tree.structure(_init_shapes(remat, x)) == jax.tree.structure({"params": params})

  def loss(m, p):
    out = m.apply({"params": p}, x, logsnr, labels, train=True,
                  rngs={"dropout": jax.random.key(3)})
    return jnp.sum(out ** 2)
  grad = lambda m: jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params)
  (value, grads), (remat_value, remat_grads) = grad(model), grad(remat)
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               remat_grads, grads)
  # The backward pass recomputes the blocks (a checkpoint per block) rather than storing them.
  count = lambda m: len(re.findall(r"\bremat\w*\[", str(
      jax.make_jaxpr(jax.grad(functools.partial(loss, m)))(params))))
  assert count(model) == 0 and count(remat) >= 5
  with pytest.raises(ValueError, match="remat='all'; use one of"):
    model.clone(remat="all").init(jax.random.key(0), x, logsnr, labels, train=False)
