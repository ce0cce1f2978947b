"""Device mesh and shardings (what pjit became: `jax.jit` with `NamedSharding` on a `Mesh`).

One mesh axis, "data", over every device of every process: the global batch is split along it.
Parameters (and their EMA and optimizer moments) are replicated, or, with `config.sharding.fsdp`,
each large one is split along its largest divisible dimension over the same axis (ZeRO-3 style),
and the compiler inserts the all-gathers.
"""
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices (all processes), in the topology-aware order of `make_mesh`."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], mesh: Mesh, fsdp: bool, fsdp_min_size: int) -> P:
  """Replicated, or (FSDP) split along the largest dimension divisible by the data-axis size."""
  n = mesh.shape[DATA_AXIS]
  if not fsdp or n == 1 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % n == 0:
      return P(*([None] * dim + [DATA_AXIS]))
  return P()


def tree_shardings(tree: Any, mesh: Mesh, sharding_config) -> Any:
  """NamedSharding for every array leaf of an (abstract) pytree, by `param_spec`."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(x.shape, mesh, sharding_config.fsdp,
                                               sharding_config.fsdp_min_size)), tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the global batch -> global arrays split over "data"."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def global_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array that is identical on every process -> a global array split over "data"."""
  return jax.make_array_from_callback(x.shape, data_sharding(mesh), lambda index: x[index])
