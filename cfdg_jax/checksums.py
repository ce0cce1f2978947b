"""Checksums of a checkpoint's arrays, the same whatever mesh holds them.

Orbax checks a checkpoint's container (files, manifests, sizes), not its numbers: a flipped bit
in a data file restores as a wrong weight without a word. Each array's checksum is the sum,
modulo 2**32, over its elements of a mix of the element's bits with its position, taken with two
seeds (64 bits in all). A sum does not depend on how the array is split over devices and
processes, so a checkpoint saved on one mesh is checked on another; and because the mix is a
bijection of 32-bit words, changing any one element changes its term and so the sum.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

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


@functools.partial(jax.jit, static_argnames="shape")
def _block_sums(x: jax.Array, start: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[2] uint32: the checksums under each seed of x, the block of an array of `shape` whose
  first element is at index `start` [ndim]."""
  words = _words(x)
  if words.ndim > x.ndim:  # A 64-bit type: two words an element.
    shape, start = (*shape, 2), jnp.concatenate([start, jnp.zeros(1, start.dtype)])
  position, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):  # Row-major positions in the whole array.
    index = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) + start[axis].astype(
        jnp.uint32)
    position, stride = position + index * jnp.uint32(stride % 2**32), stride * shape[axis]
  return jnp.stack([jnp.sum(_mix(words ^ _mix(position + jnp.uint32(seed))), dtype=jnp.uint32)
                    for seed in _SEEDS])


def compute(tree: Any) -> dict[str, str]:
  """{array path: 16 hex digits} for every array of `tree`, sharded over any mesh or not.

  Each device sums its own blocks (one copy of each: replica 0) in a program of its own, and
  the host adds the blocks' sums (and, across processes, the processes'): no collective runs on
  the devices, where many small ones beside a checkpoint's transfers could wait on each other.
  The programs are compiled once per block shape, dtype and array shape.
  """
  flat = jax.tree_util.tree_leaves_with_path(tree)
  blocks = []
  for _, leaf in flat:
    leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
    blocks.append([_block_sums(s.data, np.array([i.start or 0 for i in s.index], np.int32),
                               tuple(leaf.shape))
                   for s in leaf.addressable_shards if s.replica_id == 0])
  sums = np.array([np.sum(np.asarray(b, np.uint64).reshape(-1, 2), axis=0) % 2**32
                   for b in jax.device_get(blocks)], np.uint64).reshape(-1, 2)
  if jax.process_count() > 1:  # Each block is one process's (replica 0 is on one device).
    gathered = multihost_utils.process_allgather(sums.astype(np.uint32))
    sums = np.sum(np.asarray(gathered, np.uint64), axis=0) % 2**32
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          "".join(f"{int(v):08x}" for v in value) for (path, _), value in zip(flat, sums)}


def verify(expected: dict[str, str], tree: Any, what: str) -> None:
  """Raises Mismatch, naming the first arrays, unless `tree` has the checksums `expected`."""
  actual = compute(tree)
  differ = [k for k in sorted(expected.keys() | actual.keys()) if expected.get(k) != actual.get(k)]
  if differ:
    shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    raise Mismatch(f"{len(differ)} of {len(expected)} arrays of {what} differ from the checksums "
                   f"saved with them: {shown}")
