"""Device mesh and shardings (what pjit became: `jax.jit` with `NamedSharding` on a `Mesh`).

A 2-D mesh data × fsdp over every device of every process (`config.mesh`). The global batch is
split over both axes. Parameters, their EMA and the optimizer moments are split along "fsdp"
(each large array on its largest dimension divisible by the axis size, ZeRO-3 style) and
replicated along "data"; the compiler inserts the all-gathers and reduce-scatters.
"""
import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cfdg_jax.errors import UserError

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # The batch is split over the whole mesh.


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes of `config.mesh` for `num_devices`; −1 takes all remaining devices."""
  sizes = {axis: mesh_config[axis] for axis in (DATA_AXIS, FSDP_AXIS)}
  for axis, size in sizes.items():
    if not (size == -1 or size >= 1):
      raise UserError(f"config.mesh.{axis}={size}: use a positive axis size, or -1 for all "
                      "devices the other axis leaves.")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise UserError("config.mesh.data and config.mesh.fsdp are both -1: set one of them "
                    "(e.g. --config.mesh.fsdp=1).")
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if num_devices % fixed:
      raise UserError(f"config.mesh: {dict(sizes)} needs a device count divisible by {fixed}, "
                      f"but there are {num_devices} devices.")
    sizes[free[0]] = num_devices // fixed
  if sizes[DATA_AXIS] * sizes[FSDP_AXIS] != num_devices:
    raise UserError(
        f"config.mesh: data={sizes[DATA_AXIS]} × fsdp={sizes[FSDP_AXIS]} = "
        f"{sizes[DATA_AXIS] * sizes[FSDP_AXIS]} devices, but there are {num_devices}; set one "
        "axis to -1 (all remaining devices) or make the product the device count.")
  return sizes[DATA_AXIS], sizes[FSDP_AXIS]


def create_mesh(mesh_config: ml_collections.ConfigDict | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The data × fsdp mesh of `mesh_config` (config.mesh) over `devices` (default: every device of
  every process), in `make_mesh`'s topology-aware order. None: data parallel (fsdp = 1)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = (mesh_shape(mesh_config, len(devices)) if mesh_config is not None
           else (len(devices), 1))
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  try:
    return jax.make_mesh(shape, BATCH_AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError:  # E.g. fsdp = 8 on a 16x16 torus: each axis must be whole axes.
    return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True),
                BATCH_AXES, axis_types=axis_types)


def job_mesh(mesh_config: ml_collections.ConfigDict, *, fsdp: int | None = None,
             devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh a sampling or evaluation job runs on: its checkpoint's config.mesh, or data × fsdp
  with `fsdp` (the --fsdp flag) set.

  A checkpoint's mesh that these devices cannot form (fsdp = 8 on 2 devices) gives way, with a
  warning, to fsdp = gcd(its fsdp, devices): checkpoints restore onto any mesh.
  """
  n = len(jax.devices() if devices is None else devices)
  if fsdp is not None:
    if fsdp < 1 or n % fsdp:
      raise UserError(f"--fsdp={fsdp}: use a divisor of the {n} devices (the batch is split over "
                      "all of them, the parameters over fsdp).")
    return create_mesh({DATA_AXIS: -1, FSDP_AXIS: fsdp}, devices)
  try:
    return create_mesh(mesh_config, devices)
  except UserError as e:
    wanted = mesh_config[FSDP_AXIS] if mesh_config[FSDP_AXIS] > 0 else n
    fallback = math.gcd(wanted, n)
    logging.warning("%s Using fsdp=%d instead (--fsdp N chooses).", e, fallback)
    return create_mesh({DATA_AXIS: -1, FSDP_AXIS: fallback}, devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the whole mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], mesh: Mesh, fsdp_min_size: int) -> P:
  """Split along "fsdp" on the largest dimension divisible by its size; small arrays replicated."""
  n = mesh.shape[FSDP_AXIS]
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % n == 0:
      return P(*([None] * dim + [FSDP_AXIS]))
  return P()


def tree_shardings(tree: Any, mesh: Mesh, fsdp_min_size: int) -> Any:
  """NamedSharding for every array leaf of an (abstract) pytree, by `param_spec`."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, mesh, fsdp_min_size)),
                      tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the global batch -> global arrays split over the mesh."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def global_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array that is identical on every process -> a global array split over the mesh."""
  return jax.make_array_from_callback(x.shape, data_sharding(mesh), lambda index: x[index])
