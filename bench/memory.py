"""Per-device memory of a config's compiled train step, by mesh, rematerialisation policy and
attention, on host CPU devices or, ahead of time, on a TPU slice's chips.

  python bench/memory.py --config configs/imagenet64.py --devices 8 --fsdp 1,8 \
      --remat none,blocks --per_device_batch 16
  python bench/memory.py --config configs/imagenet64.py --topology v4:2x2x2 --fsdp 8 \
      --remat none,blocks --attention xla,blockwise --per_device_batch 256   # libtpu

Compiles (never runs) the real train step (cfdg_jax/programs.py, as python -m cfdg_jax.aot) for
each (fsdp, remat, attention) and prints one JSON line per setting with the compiler's memory
analysis of one device: the arguments (the train state's share on that device and the batch),
the temporaries (activations kept for the backward pass, gradients, workspace), the peak
arguments + temporaries + outputs − aliased (donated) bytes (for a program over a TPU chip's
memory, the total from the compiler's out-of-memory message) and the activations JAX saves for
the backward pass of one device's batch before XLA sees them, then one JSON line of ratios
against the first setting. On host CPU devices the temporaries differ from a TPU's or GPU's
(another compiler and scheduler); the state's share does not.
"""
import argparse
import json
import os
import pathlib
import runpy
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RATIOS = ("argument_gb", "temp_gb", "peak_gb", "jax_residuals_gb")


def measure(config_path: str, fsdp: int, remat: str, attention: str, per_device_batch: int,
            topology_name: str | None, fast: bool) -> dict:
  """In the worker process (XLA_FLAGS already set): one setting's figures."""
  # pylint: disable=import-outside-toplevel
  import jax

  from cfdg_jax import costs, programs, topology

  config = runpy.run_path(config_path)["get_config"]()
  config.mesh.data, config.mesh.fsdp = -1, fsdp
  config.model.remat, config.model.attention = remat, attention
  devices = topology.devices(topology_name) if topology_name else jax.devices()
  config.batch_size = per_device_batch * len(devices)
  step, _ = programs.train_programs(config, devices)
  tic = time.perf_counter()
  try:
    report = costs.measure(step.lower().compile(
        compiler_options={"exec_time_optimization_effort": -1.0 if fast else 0.0}))
  except Exception as e:  # pylint: disable=broad-except  (XLA's out-of-memory JaxRuntimeError)
    if (oom := topology.out_of_memory(str(e))) is None:
      raise
    report = {"total_bytes": oom[0], "out_of_memory": True}
  params = sum(x.size for x in jax.tree.leaves(step.args[0].params))
  report["residual_bytes"] = _residual_bytes(config, per_device_batch, devices[0].platform)
  gb = {f"{k.removesuffix('_bytes')}_gb": report[k] / 1e9
        for k in ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes") if k in report}
  return {"config": pathlib.Path(config_path).name, "devices": len(devices),
          "device_kind": devices[0].device_kind, "topology": topology_name,
          "mesh": {"data": len(devices) // fsdp, "fsdp": fsdp}, "remat": remat,
          "attention": attention, "dtype": config.model.dtype,
          "per_device_batch": per_device_batch, "params": params, **gb,
          "peak_gb": report["total_bytes"] / 1e9,
          "jax_residuals_gb": report["residual_bytes"] / 1e9,
          "out_of_memory": bool(report.get("out_of_memory")), "fast": fast,
          "compile_s": time.perf_counter() - tic}


def _residual_bytes(config, batch: int, platform: str) -> int:
  """Bytes JAX saves for the UNet's backward pass at `batch` images (one device's), before XLA
  (which fuses, schedules and may rematerialise more on its own)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from jax._src import ad_checkpoint  # saved_residuals: not public API.

  from cfdg_jax import unet
  model = unet.create_model(config, platform=platform)
  size, channels = config.data.image_size, config.data.channels
  inputs = (jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
  params = jax.eval_shape(lambda: unet.init_params(jax.random.key(0), model, config))

  def loss(p, x, logsnr, labels):
    out = model.apply({"params": p}, x, logsnr, labels, train=True,
                      rngs={"dropout": jax.random.key(0)})
    return jnp.sum(out**2)
  return sum(aval.size * aval.dtype.itemsize
             for aval, why in ad_checkpoint.saved_residuals(loss, params, *inputs)
             if "argument" not in why)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--config", default=str(REPO / "configs" / "imagenet64.py"))
  parser.add_argument("--devices", type=int, default=8, help="Host CPU devices (no --topology).")
  parser.add_argument("--topology", help="A TPU slice (v4:2x2x2, v5e:2x4, ...; needs libtpu).")
  parser.add_argument("--fsdp", default="1,8")
  parser.add_argument("--remat", default="none,blocks")
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--per_device_batch", type=int, default=16)
  parser.add_argument("--fast", action="store_true", help="XLA's least optimisation effort.")
  parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # fsdp remat attention
  args = parser.parse_args()
  if args.worker:
    fsdp, remat, attention = args.worker
    print(json.dumps(measure(args.config, int(fsdp), remat, attention, args.per_device_batch,
                             args.topology, args.fast)))
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
  rows = []
  for fsdp in (int(f) for f in args.fsdp.split(",")):
    for remat in args.remat.split(","):
      for attention in args.attention.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--config", args.config, "--per_device_batch",
             str(args.per_device_batch), *(["--topology", args.topology] if args.topology else []),
             *(["--fast"] if args.fast else []), "--worker", str(fsdp), remat, attention],
            env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
  name = lambda r: f"fsdp={r['mesh']['fsdp']},remat={r['remat']},attention={r['attention']}"
  print(json.dumps({"ratios_vs": name(rows[0]), **{
      name(r): {k: round(r[k] / rows[0][k], 3) for k in RATIOS if k in r and k in rows[0]}
      for r in rows[1:]}}))


if __name__ == "__main__":
  main()
