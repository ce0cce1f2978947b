"""Accelerators without the accelerator: a TPU slice's or a GPU host's chips, their published
figures, and compile-only devices for XLA's compiler of that chip.

  devices = topology.devices("v5e:4x4")        # or "v5litepod-16": 16 compile-only TPU chips
  topology.chip("v5e:4x4").peak_flops          # 1.97e14 (bf16, per chip)
  topology.usable_hbm("v5e:4x4")               # 16.9e9: what the compiler lets a program use

TPU names (libtpu, requirements-tpu.txt): GENERATION:SHAPE ("v4:2x2x4", "v5e:16x16", "v5p:4x4x4",
"v6e:4x4") or a Cloud TPU accelerator type ("v4-32", "v5litepod-16", "v5p-128", "v6e-256"; v4
and v5p count two TensorCores per chip there). Each device is one chip: v4 and v5p run as JAX
runs them, one "megacore" device per chip. GPU names (the CUDA plugin and ptxas,
requirements-gpu-aot.txt): "h100:8" (8 GPUs on one host) or "h100:4x8" (4 hosts of 8).
"""
import dataclasses
import functools
import math
import os
import pathlib
import re

from cfdg_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's published figures (`source`)."""
  generation: str
  hbm_bytes: float  # Nominal memory per chip; what a program may use is `usable_hbm`.
  peak_flops: float  # Dense bf16 FLOP/s per chip.
  hbm_bandwidth: float  # Bytes/s per chip.
  # Bytes/s each chip sends (and receives) in a collective: half the bidirectional interconnect
  # bandwidth per chip where the source gives it, else the pod's all-reduce bandwidth per chip.
  ici_bandwidth: float
  dims: int  # TPU: 2 for a 2-D torus of chips (v5e, v6e), 3 for 3-D (v4, v5p). GPU: 0.
  cores_per_chip: int  # TensorCores per chip, as TPU accelerator types count them.
  source: str
  platform: str = "tpu"


CHIPS = {c.generation: c for c in (
    # 275 TFLOP/s, 32 GiB at 1200 GB/s; all-reduce bandwidth 1.1 PB/s over a 4096-chip pod.
    Chip("v4", 32 * 2**30, 275e12, 1200e9, 1.1e15 / 4096, 3, 2,
         "https://cloud.google.com/tpu/docs/v4"),
    # 197 TFLOP/s, 16 GB at 819 GB/s; ICI 400 GB/s bidirectional per chip.
    Chip("v5e", 16 * 2**30, 197e12, 819e9, 400e9 / 2, 2, 1,
         "https://cloud.google.com/tpu/docs/v5e"),
    # 459 TFLOP/s, 95 GiB at 2765 GB/s; ICI 1200 GB/s bidirectional per chip.
    Chip("v5p", 95 * 2**30, 459e12, 2765e9, 1200e9 / 2, 3, 2,
         "https://cloud.google.com/tpu/docs/v5p"),
    # 918 TFLOP/s, 32 GB at 1638 GB/s; ICI 800 GB/s bidirectional per chip.
    Chip("v6e", 32 * 2**30, 918e12, 1638e9, 800e9 / 2, 2, 1,
         "https://cloud.google.com/tpu/docs/v6e"),
    # H100 SXM: 989 TFLOP/s dense bf16 (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink
    # 900 GB/s bidirectional per GPU (within a host; hosts talk over their NICs).
    Chip("h100", 80e9, 989e12, 3.35e12, 900e9 / 2, 0, 1,
         "https://www.nvidia.com/en-us/data-center/h100/", platform="cuda"),
)}
_ACCELERATOR_TYPES = {"v4": "v4", "v5litepod": "v5e", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
# XLA's description of each GPU (openxla/xla, xla/backends/gpu/target_config/specs).
_GPU_TARGETS = {"h100": "h100_sxm.txtpb"}
# The share of a GPU's memory JAX takes for its pool by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
_GPU_MEMORY_FRACTION = 0.75


def parse(name: str) -> tuple[str, tuple[int, ...]]:
  """(generation, chip grid) of a topology name (GPUs: (hosts, GPUs per host)); UserError if it
  names none."""
  valid = ("use GENERATION:SHAPE (e.g. v5e:4x4, v4:2x2x2, v5p:4x4x4, v6e:16x16), an accelerator "
           "type (v4-32, v5litepod-16, v5p-128, v6e-256) or GPUs (h100:8, h100:2x8); chips "
           f"{list(CHIPS)}")
  if match := re.fullmatch(r"([a-z]\w*):(\d+(?:x\d+)*)", name):
    generation, shape = match.group(1), tuple(int(s) for s in match.group(2).split("x"))
    chip_ = CHIPS.get(generation)
    if chip_ and chip_.platform == "cuda" and len(shape) <= 2 and min(shape) >= 1:
      return generation, (1,) * (2 - len(shape)) + shape
    if chip_ and len(shape) == chip_.dims and min(shape) >= 1:
      return generation, shape
  if (match := re.fullmatch(r"(v\w+)-(\d+)", name)) and match.group(1) in _ACCELERATOR_TYPES:
    chip_ = CHIPS[_ACCELERATOR_TYPES[match.group(1)]]
    count, rest = divmod(int(match.group(2)), chip_.cores_per_chip)
    if count >= 1 and not rest and count & (count - 1) == 0:
      return chip_.generation, _grid(count, chip_.dims)
  raise UserError(f"--topology={name}: {valid}.")


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """The usual slice shape of `chips` (a power of two): 2-D 16 -> 4x4, 32 -> 4x8; 3-D 4 -> 2x2x1,
  16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4."""
  k = int(math.log2(chips))
  if dims == 2:
    return 2 ** (k // 2), 2 ** (k - k // 2)
  if k < 3:
    return 2 ** (k >= 1), 2 ** (k >= 2), 1
  e, r = divmod(k, 3)
  return 2**e, 2 ** (e + (r >= 2)), 2 ** (e + (r >= 1))


def canonical(name: str) -> str:
  """"v5litepod-16" -> "v5e:4x4", "h100:8" -> "h100:1x8": the name of a topology."""
  generation, shape = parse(name)
  return f"{generation}:{'x'.join(map(str, shape))}"


def chip(name: str) -> Chip:
  return CHIPS[parse(name)[0]]


@functools.lru_cache(maxsize=None)
def devices(name: str) -> tuple:
  """Compile-only devices, one per chip, in the order the runtime would list them."""
  # pylint: disable=import-outside-toplevel  (libtpu or the CUDA plugin load only here)
  from jax.experimental import topologies
  generation, shape = parse(name)
  if CHIPS[generation].platform == "cuda":
    target = (pathlib.Path(__file__).with_name("gpu_targets") / _GPU_TARGETS[generation])
    make = functools.partial(topologies.get_topology_desc, topology_name=generation,
                             platform="cuda", target_config=target.read_text(),
                             topology=f"1x{shape[0]}x{shape[1]}")
    needs = "the CUDA plugin and ptxas; pip install -r requirements-gpu-aot.txt"
  else:
    options = {"chip_config_name": "megacore"} if CHIPS[generation].cores_per_chip == 2 else {}
    # A host drives a 2x2(x1) block of chips; smaller slices are one host.
    host = tuple(min(2, s) for s in shape[:2]) + (1,)
    make = functools.partial(topologies.get_topology_desc, topology_name=canonical(name),
                             platform="tpu", chips_per_host_bounds=host, **options)
    needs = "libtpu; pip install -r requirements-tpu.txt"
  try:
    return tuple(make().devices)
  except Exception as e:  # pylint: disable=broad-except  (ImportError, JaxRuntimeError, ...)
    if isinstance(e, (ImportError, NotImplementedError)) or re.search(
        r"libtpu|plugin|not implemented|Unable to", str(e), re.I):
      raise UserError(f"--topology={name}: compiling for {generation} needs {needs} ({e}).") from e
    raise


@functools.lru_cache(maxsize=None)
def usable_hbm(name: str) -> int:
  """Bytes of memory one program may use on a chip of topology `name`, below the nominal HBM.

  TPU: the compiler's own limit (the runtime keeps a share), read from its out-of-memory message
  for a program that cannot fit. GPU: the pool JAX takes, XLA_PYTHON_CLIENT_MEM_FRACTION (0.75
  by default) of the device's memory as XLA describes the GPU.
  """
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  generation, _ = parse(name)
  if CHIPS[generation].platform == "cuda":
    target = pathlib.Path(__file__).with_name("gpu_targets") / _GPU_TARGETS[generation]
    memory = int(re.search(r"device_memory_size: (\d+)", target.read_text()).group(1))
    return int(memory * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                             _GPU_MEMORY_FRACTION)))
  where = jax.sharding.SingleDeviceSharding(devices(name)[0])
  too_big = jax.ShapeDtypeStruct((2**40,), jnp.int8, sharding=where)
  try:
    jax.jit(lambda x: x + 1, out_shardings=where).lower(too_big).compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA's JaxRuntimeError)
    if (available := out_of_memory(str(e))) is not None:
      return available[1]
    raise
  raise RuntimeError(f"A 1 TiB program fit on {name}: cannot read its usable HBM.")


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(message: str) -> tuple[int, int] | None:
  """(bytes required, bytes available) from the TPU compiler's out-of-memory error, else None.

  E.g. "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
  temporaries (25.81G) exceeds available HBM (15.75G)." The compiler's G is 2**30 bytes.
  """
  size = r"([\d.]+)([KMGT]?)"
  match = re.search(rf"required[^(]*\({size}\)[^(]*available HBM \({size}\)", message)
  if not match:
    match = re.search(rf"Used {size} of {size} hbm", message)
  if not match or "RESOURCE_EXHAUSTED" not in message:
    return None
  used, available = (round(float(match.group(i)) * _UNITS[match.group(i + 1)]) for i in (1, 3))
  return used, available
