"""This machine's ceiling, measured: dense matmul and 3×3 convolution FLOP/s at UNet-like shapes.

  python bench/peak.py [--dtypes float32,bfloat16] [--batch 16] [--repeats 10] [--out peak.json]

Every op runs on all local devices at once (its batch split over them, as the train step's is),
so the figure is what this process's devices deliver together: on a CPU, where XLA's devices
share the cores, that is the machine's ceiling, not a multiple of one device's. Prints one JSON
line: each shape's median time and FLOP/s, the best FLOP/s of each (kind, dtype) as `peak`, and
the convolution/matmul ratio. bench/train.py divides by `peak["conv3x3_<dtype>"]` for its MFU.
Default dtypes: float32, plus bfloat16 on GPU and TPU (a CPU emulates bfloat16 matmuls).
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# (rows per device, in, out): attention projections and MLPs at UNet widths; tokens = B·H·W.
MATMULS = ((4096, 128, 128), (4096, 256, 256), (1024, 512, 512))
# (H = W, C_in = C_out): the levels of a 32×32 UNet with base 64 and mult 1-2-4.
CONVS = ((32, 64), (16, 128), (8, 256))


def _time(fn, args, repeats: int) -> float:
  """Median seconds of fn(*args) after one warm-up call (which compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tic)
  return statistics.median(times)


def measure(dtype: str, batch: int, repeats: int, scale: float = 1.0) -> list[dict]:
  """FLOP/s of each MATMULS and CONVS shape in `dtype`, on all local devices together.

  batch: images per device for the convolutions; scale shrinks the matmul rows (tests).
  """
  devices = jax.local_devices()
  mesh = jax.make_mesh((len(devices),), ("d",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)

  def array(shape, sharding):
    return jax.device_put(jnp.asarray(rng.standard_normal(shape), dtype), sharding)

  results = []
  for rows, k, n in MATMULS:
    rows = max(1, int(rows * scale))
    x, w = array((rows * len(devices), k), split), array((k, n), whole)
    seconds = _time(jax.jit(jnp.matmul), (x, w), repeats)
    flops = 2 * rows * len(devices) * k * n
    results.append({"kind": "matmul", "dtype": dtype, "shape": [rows, k, n], "flops": flops,
                    "median_s": seconds, "flops_per_s": flops / seconds})
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  for size, channels in CONVS:
    x = array((batch * len(devices), size, size, channels), split)
    w = array((3, 3, channels, channels), whole)
    seconds = _time(conv, (x, w), repeats)
    flops = 2 * batch * len(devices) * size * size * channels * channels * 9
    results.append({"kind": "conv3x3", "dtype": dtype, "shape": [batch, size, size, channels],
                    "flops": flops, "median_s": seconds, "flops_per_s": flops / seconds})
  return results


def report(dtypes: list[str], batch: int, repeats: int, scale: float = 1.0) -> dict:
  results = [r for dtype in dtypes for r in measure(dtype, batch, repeats, scale)]
  peak = {}
  for r in results:
    key = f"{r['kind']}_{r['dtype']}"
    peak[key] = max(peak.get(key, 0.0), r["flops_per_s"])
  return {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
          "local_devices": jax.local_device_count(), "results": results, "peak": peak,
          "conv_vs_matmul": {d: peak[f"conv3x3_{d}"] / peak[f"matmul_{d}"] for d in dtypes}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--dtypes", default=None,
                      help="comma-separated (default: float32, plus bfloat16 off the CPU)")
  parser.add_argument("--batch", type=int, default=16, help="images per device (convolutions)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--scale", type=float, default=1.0,
                      help="matmul rows × this (a quick run: 0.05)")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args()
  dtypes = (args.dtypes.split(",") if args.dtypes else
            ["float32"] + (["bfloat16"] if jax.devices()[0].platform != "cpu" else []))
  for name in ("batch", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)}: use a positive integer.")
  for dtype in dtypes:
    if dtype not in ("float32", "bfloat16", "float16"):
      parser.error(f"--dtypes: {dtype!r} is not one of float32, bfloat16, float16.")
  result = report(dtypes, args.batch, args.repeats, args.scale)
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
