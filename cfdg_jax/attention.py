"""Multi-head dot-product attention over all positions: one function, several implementations.

  xla        jax.nn.dot_product_attention's XLA formulation: the [B, N, T, T] logits and
             probabilities are materialised, and the probabilities kept for the backward pass.
  blockwise  the queries in blocks of `block` (FlashAttention's recipe, Dao et al. 2022, without
             splitting the keys, so each row's softmax is the usual one over all T keys): a block's
             [block, T] logits are made, used and dropped, so the memory is O(B·N·T·block) instead
             of O(B·N·T²), and on a CPU they stay in the core's cache. The backward pass
             recomputes them from q, k and the saved log-sum-exp instead of storing them.
  cudnn      jax.nn.dot_product_attention's fused cuDNN kernel (GPU; bfloat16 or float16).
  auto       cudnn on a GPU where it applies; blockwise on a CPU or a TPU when T > block (the
             logits of imagenet64's 32x32 attention at 256 images per chip are 6.4 GB a layer,
             docs/scaling.md); else xla.

All compute softmax(q kᵀ / √H) v, with the logits and softmax in float32.
Shapes: q, k, v [B, T, N, H] -> [B, T, N, H] (jax.nn.dot_product_attention's layout).
"""
import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn")
# Queries per block: a block's float32 logits for T = 1024 keys are 512 KiB, which fits in L2.
BLOCK = 128


def resolve(implementation: str, tokens: int, head_channels: int, dtype,
            platform: str | None = None) -> str:
  """The implementation that `implementation` ("auto" or a name) means on `platform` ("cpu",
  "tpu", "gpu" or "cuda"; None: the default backend). A program compiled ahead of time for a
  TPU or a GPU on a CPU names its target's platform."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention={implementation!r}; use one of {IMPLEMENTATIONS}.")
  if implementation != "auto":
    return implementation
  backend = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform) or jax.default_backend()
  if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_channels % 8 == 0 and head_channels <= 128):
    return "cudnn"
  if backend in ("cpu", "tpu") and tokens > BLOCK:
    return "blockwise"
  return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto",
              block: int = BLOCK, platform: str | None = None) -> jax.Array:
  """softmax(q kᵀ / √H) v per head: q, k, v [B, T, N, H] -> [B, T, N, H] in q's dtype."""
  b, t, n, h = q.shape
  implementation = resolve(implementation, t, h, q.dtype, platform)
  if implementation != "blockwise":
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  # The largest divisor of T up to `block`, so that the blocks tile the queries exactly.
  block = max(c for c in range(1, min(block, t) + 1) if t % c == 0)
  heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, t, h)  # [B*N, T, H]
  out = _blockwise(heads(q), heads(k), heads(v), block)
  return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _logits(q_block: jax.Array, k: jax.Array) -> jax.Array:
  """[BN, C, H] queries, [BN, T, H] keys -> [BN, C, T] float32 q kᵀ / √H (scaled in float32)."""
  return jnp.einsum("bch,bth->bct", q_block, k, preferred_element_type=jnp.float32) * (
      k.shape[-1] ** -0.5)


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """[BN, T, ...] -> [T / block, BN, block, ...]: the loop runs over the first axis."""
  return x.reshape(x.shape[0], -1, block, *x.shape[2:]).swapaxes(0, 1)


def _unblocks(x: jax.Array) -> jax.Array:
  """The inverse of _blocks."""
  x = x.swapaxes(0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _forward(q, k, v, block):
  """q, k, v [BN, T, H] -> (out [BN, T, H], log-sum-exp of the logits [BN, T] float32)."""
  def one_block(q_block):  # All heads at once: one loop of T / block steps.
    logits = _logits(q_block, k)
    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bct,bth->bch", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    return out.astype(q.dtype), (top + jnp.log(total))[..., 0]

  out, lse = jax.lax.map(one_block, _blocks(q, block))
  return _unblocks(out), _unblocks(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(q, k, v, block):
  return _forward(q, k, v, block)[0]


def _blockwise_fwd(q, k, v, block):
  out, lse = _forward(q, k, v, block)
  return out, (q, k, v, out, lse)


def _blockwise_bwd(block, residuals, g):
  """The gradients of the exact softmax attention, block by block of queries.

  With p = softmax(q kᵀ / √H) per row and o = p v: dv = pᵀ g, dp = g vᵀ,
  ds = p ∘ (dp − rowsum(g ∘ o)) / √H, dq = ds k, dk = dsᵀ q. dk and dv sum over the query blocks.
  """
  q, k, v, out, lse = residuals
  f32 = lambda x: x.astype(jnp.float32)
  delta = jnp.sum(f32(g) * f32(out), axis=-1)  # [BN, T]: rowsum(g ∘ o).
  k32, v32 = f32(k), f32(v)

  def one_block(carry, xs):
    dk, dv = carry
    q_block, g_block, lse_block, delta_block = (f32(x) for x in xs)
    p = jnp.exp(_logits(q_block, k32) - lse_block[..., None])  # [BN, C, T]
    dv = dv + jnp.einsum("bct,bch->bth", p, g_block)
    dp = jnp.einsum("bch,bth->bct", g_block, v32)
    ds = p * (dp - delta_block[..., None]) * q.shape[-1] ** -0.5
    dk = dk + jnp.einsum("bct,bch->bth", ds, q_block)
    return (dk, dv), jnp.einsum("bct,bth->bch", ds, k32)

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(one_block, (zeros, zeros),
                              tuple(_blocks(x, block) for x in (q, g, lse, delta)))
  return _unblocks(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
