"""Checkpoint checksums: the same on any mesh, and changed by any one flipped bit."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfdg_jax import checksums

DTYPES = [np.float32, jnp.bfloat16, np.int32, np.uint8, np.bool_]


def tree(dtype):
  values = np.random.default_rng(0).normal(size=(4, 6)) * 10
  return {"a": np.asarray(values, dtype), "b": {"c": np.asarray(values[0, :2] > 0, dtype)}}


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_single_bit_flip_changes_the_checksum(dtype):
  t = tree(dtype)
  expected = checksums.compute(t)
  bits = [0] if dtype == np.bool_ else range(8 * t["a"].dtype.itemsize)  # A bool has one.
  for flat, bit in itertools.product(range(t["a"].size), bits):
    flipped = t["a"].copy()
    flipped.view(np.uint8).reshape(t["a"].size, -1)[flat, bit // 8] ^= np.uint8(1 << bit % 8)
    with pytest.raises(checksums.Mismatch, match=r"^1 of 2 arrays of item differ from the "
                       r"checksums saved with them: a$"):
      checksums.verify(expected, {"a": flipped, "b": t["b"]}, "item")


@pytest.mark.parametrize("i, j", [((0, 0), (1, 0)), ((0, 1), (1, 0)), ((0, 5), (1, 0))])
def test_swapped_elements_change_the_checksum(i, j):
  t = tree(np.float32)
  expected = checksums.compute(t)
  swapped = t["a"].copy()
  swapped[i], swapped[j] = t["a"][j], t["a"][i]
  with pytest.raises(checksums.Mismatch):
    checksums.verify(expected, {"a": swapped, "b": t["b"]}, "item")


def test_a_missing_or_extra_array_is_a_mismatch():
  t = tree(np.float32)
  with pytest.raises(checksums.Mismatch, match=r"1 of 2 arrays .*: b/c$"):
    checksums.verify(checksums.compute(t), {"a": t["a"]}, "item")


def test_the_checksum_does_not_depend_on_the_sharding():
  t = tree(np.float32)
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
  spec = jax.sharding.PartitionSpec
  for a_spec in (spec("x"), spec(None, "x"), spec()):
    sharded = {"a": jax.device_put(t["a"], jax.sharding.NamedSharding(mesh, a_spec)),
               "b": t["b"]}
    assert checksums.compute(sharded) == checksums.compute(t)
  assert len(set(checksums.compute(t).values())) == 2
