"""Attention: the blockwise implementation computes exactly softmax(q kᵀ/√H) v and its gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfdg_jax import attention
from cfdg_jax import unet

# (B, T, N, H): 8 blocks of 128 queries; 196 = 2 blocks of 98 (T not a multiple of 128); one block.
SHAPES = ((2, 1024, 1, 16), (2, 196, 2, 32), (3, 16, 2, 8))


def _qkv(shape, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  # Scaled up so that the softmax is far from uniform (a wrong normalisation shows).
  return tuple(jnp.asarray(3 * rng.standard_normal(shape), dtype) for _ in range(4))


def _reference(q, k, v):
  """The definition, in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", p, v)


@functools.cache
def _value_and_grad(implementation):
  def loss(q, k, v, g):
    return jnp.sum(attention.attention(q, k, v, implementation).astype(jnp.float32) * g)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_equals_the_definition_and_xla(shape):
  q, k, v, g = _qkv(shape)
  out = jax.jit(functools.partial(attention.attention, implementation="blockwise"))(q, k, v)
  expected = _reference(q, k, v)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
  # Gradients against autodiff of jax's XLA formulation (which keeps the probabilities).
  (value, grads), (ref_value, ref_grads) = (_value_and_grad(i)(q, k, v, g)
                                            for i in ("blockwise", "xla"))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for name, a, b in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=name)


def test_blockwise_bfloat16_is_as_accurate_as_xla():
  q, k, v = (a.astype(jnp.bfloat16) for a in _qkv((2, 256, 2, 32))[:3])
  expected = _reference(q, k, v)  # Of the rounded inputs: what bfloat16 arithmetic adds.
  errors = {}
  for i in ("blockwise", "xla"):
    out = jax.jit(functools.partial(attention.attention, implementation=i))(q, k, v)
    assert out.dtype == jnp.bfloat16
    error = np.asarray(out, np.float64) - expected
    errors[i] = np.abs(error).max(), np.sqrt(np.mean(error ** 2))
  assert all(b <= 1.25 * x for b, x in zip(errors["blockwise"], errors["xla"])), errors


def test_blockwise_backward_keeps_no_full_attention_matrix():
  """XLA's memory analysis: the step's temporaries, not a timing."""
  q, k, v, g = _qkv((4, 1024, 2, 16))
  temp = {i: _value_and_grad(i).lower(q, k, v, g).compile().memory_analysis().temp_size_in_bytes
          for i in ("blockwise", "xla")}
  full = 4 * 2 * 1024 * 1024 * 4  # One float32 [B, N, T, T] array: 32 MiB.
  # Blockwise holds a few [B, N, 128, T] blocks (4 MiB each) at a time, XLA several full arrays.
  assert temp["xla"] >= 2 * full and temp["blockwise"] < full / 2, temp


def test_auto_resolves_per_backend_and_size():
  assert attention.resolve("auto", 1024, 64, jnp.float32) == "blockwise"  # On this CPU.
  assert attention.resolve("auto", attention.BLOCK, 64, jnp.float32) == "xla"
  assert attention.resolve("cudnn", 16, 64, jnp.bfloat16) == "cudnn"
  # The platform of the devices a program is compiled for, not the default backend's.
  assert attention.resolve("auto", 1024, 64, jnp.bfloat16, "tpu") == "blockwise"
  assert attention.resolve("auto", 64, 64, jnp.bfloat16, "tpu") == "xla"
  assert attention.resolve("auto", 1024, 64, jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve("auto", 1024, 64, jnp.bfloat16, "cuda") == "cudnn"
  assert attention.resolve("auto", 1024, 64, jnp.float32, "gpu") == "xla"
  with pytest.raises(ValueError, match=r"attention='flash'; use one of \('auto', 'xla'"):
    attention.resolve("flash", 16, 64, jnp.float32)


def test_unet_computes_the_same_function_with_each_implementation():
  model = unet.UNet(num_classes=3, out_channels=1, base_channels=16, channel_mult=(1, 2),
                    num_res_blocks=1, attn_resolutions=(16,), head_channels=8, attention="xla")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)
  logsnr, labels = jnp.array([-2.0, 3.0]), jnp.array([0, 3])
  params = model.init(jax.random.key(0), x, logsnr, labels, train=False)["params"]
  # Non-zero output layers, so that the attention blocks reach the output.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)

  def loss(m, p):
    return jnp.sum(m.apply({"params": p}, x, logsnr, labels, train=False) ** 2)
  results = {i: jax.jit(jax.value_and_grad(functools.partial(loss, model.clone(attention=i))))(
      params) for i in ("xla", "blockwise")}
  (value, grads), (block_value, block_grads) = results["xla"], results["blockwise"]
  np.testing.assert_allclose(block_value, value, rtol=1e-5)
  scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale),
               block_grads, grads)
  with pytest.raises(ValueError, match="attention='flash'; use one of"):
    model.clone(attention="flash").init(jax.random.key(0), x, logsnr, labels, train=False)


def test_unet_resolves_auto_for_the_platform_it_is_built_for():
  """A job compiled ahead of time for a TPU or a GPU on this CPU computes what it would there."""
  model = unet.UNet(num_classes=3, out_channels=1, base_channels=16, channel_mult=(1, 2),
                    num_res_blocks=1, attn_resolutions=(16,), head_channels=8)
  x = jnp.zeros((2, 16, 16, 1))  # 256 positions at 16x16: more than one block of queries.
  logsnr, labels = jnp.zeros(2), jnp.zeros(2, jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, logsnr, labels,
                                             train=False)["params"])

  def full_logits(m):  # Whether the program makes the [B, N, T, T] = [2, 2, 256, 256] logits.
    hlo = jax.jit(lambda p: m.apply({"params": p}, x, logsnr, labels, train=False)).lower(
        params).as_text()
    return "2x2x256x256xf32" in hlo
  assert full_logits(model.clone(attention="xla"))
  assert not full_logits(model.clone(attention="blockwise"))
  assert full_logits(model.clone(platform="gpu"))  # float32: no cuDNN kernel.
  assert not full_logits(model.clone(platform="tpu"))
