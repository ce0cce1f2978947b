"""Checksums of a checkpoint's arrays, the same whatever mesh holds them.

Orbax checks a checkpoint's container (files, manifests, sizes), not its numbers: a flipped bit
in a data file restores as a wrong weight without a word. Each array's checksum is the sum,
modulo 2**32, over its elements of a mix of the element's bits with its position, taken with two
seeds (64 bits in all). A sum does not depend on how the array is split over devices and
processes, so a checkpoint saved on one mesh is checked on another; and because the mix is a
bijection of 32-bit words, changing any one element changes its term and so the sum.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


class Mismatch(Exception):
  """Restored arrays that differ from the checksums saved with them."""


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection of uint32 in which every bit moves every other."""
  h ^= h >> 16
  h *= jnp.uint32(0x85EBCA6B)
  h ^= h >> 13
  h *= jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """x's bits as uint32 words: one per element up to 32 bits, [..., 2] for 64-bit types."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = min(8 * x.dtype.itemsize, 32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


@jax.jit
def _array_sums(x: jax.Array) -> jax.Array:
  """[2] uint32: x's checksum under each seed."""
  words = _words(jnp.asarray(x))
  position, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):  # Row-major positions, built from iotas to shard.
    iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    position, stride = position + iota * jnp.uint32(stride % 2**32), stride * words.shape[axis]
  return jnp.stack([jnp.sum(_mix(words ^ _mix(position + jnp.uint32(seed))), dtype=jnp.uint32)
                    for seed in _SEEDS])


def compute(tree: Any) -> dict[str, str]:
  """{array path: 16 hex digits} for every array of `tree` (sharded or not; a device pass).

  One small program per shape, dtype and sharding, compiled once: a model has a few dozen, and
  one program over the whole tree took 4x as long to compile (seconds, at every start).
  """
  flat = jax.tree_util.tree_leaves_with_path(tree)
  sums = jax.device_get([_array_sums(leaf) for _, leaf in flat])
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          "".join(f"{int(s):08x}" for s in np.asarray(value))
          for (path, _), value in zip(flat, sums)}


def verify(expected: dict[str, str], tree: Any, what: str) -> None:
  """Raises Mismatch, naming the first arrays, unless `tree` has the checksums `expected`."""
  actual = compute(tree)
  differ = [k for k in sorted(expected.keys() | actual.keys()) if expected.get(k) != actual.get(k)]
  if differ:
    shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    raise Mismatch(f"{len(differ)} of {len(expected)} arrays of {what} differ from the checksums "
                   f"saved with them: {shown}")
