"""Per-device memory of a config's compiled train step, by mesh and rematerialisation policy.

  python bench/memory.py --config configs/imagenet64.py --devices 8 --fsdp 1,8 \
      --remat none,blocks --per_device_batch 16

Compiles (never runs) the real train step for each (fsdp, remat) on --devices host CPU devices
and prints one JSON line per setting with XLA's memory analysis of one device: the arguments
(the train state's share on that device and the batch), the temporaries (activations kept for
the backward pass, gradients, workspace) and the peak estimate arguments + temporaries +
outputs − aliased (donated) bytes, then one JSON line of ratios against the first setting.
On a GPU or TPU the temporaries differ (another compiler and scheduler); the state's share does not.
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


def measure(config_path: str, fsdp: int, remat: str, per_device_batch: int) -> dict:
  """In the worker process (XLA_FLAGS already set): one setting's figures."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp

  from cfdg_jax import job as job_lib
  from cfdg_jax import sharding, trainer

  config = runpy.run_path(config_path)["get_config"]()
  config.mesh.data, config.mesh.fsdp = -1, fsdp
  config.model.remat = remat
  config.batch_size = per_device_batch * jax.device_count()
  mesh = sharding.create_mesh(config.mesh)
  job = job_lib.create_job(config, mesh)
  size, channels = config.data.image_size, config.data.channels
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, channels), jnp.float32,
                                         sharding=sharding.data_sharding(mesh)),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                         sharding=sharding.data_sharding(mesh))}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  tic = time.perf_counter()
  compiled = trainer.make_train_step(job).lower(job.abstract_state, batch, rng).compile()
  analysis = compiled.memory_analysis()
  peak = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
          + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  params = sum(x.size for x in jax.tree.leaves(job.abstract_state.params))
  return {"config": pathlib.Path(config_path).name, "devices": jax.device_count(),
          "mesh": dict(mesh.shape), "remat": remat, "dtype": config.model.dtype,
          "per_device_batch": per_device_batch, "params": params,
          "argument_gb": analysis.argument_size_in_bytes / 1e9,
          "temp_gb": analysis.temp_size_in_bytes / 1e9,
          "output_gb": analysis.output_size_in_bytes / 1e9,
          "alias_gb": analysis.alias_size_in_bytes / 1e9, "peak_gb": peak / 1e9,
          "compile_s": time.perf_counter() - tic}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--config", default=str(REPO / "configs" / "imagenet64.py"))
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--fsdp", default="1,8")
  parser.add_argument("--remat", default="none,blocks")
  parser.add_argument("--per_device_batch", type=int, default=16)
  parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # fsdp remat (internal)
  args = parser.parse_args()
  if args.worker:
    fsdp, remat, _ = args.worker
    print(json.dumps(measure(args.config, int(fsdp), remat, args.per_device_batch)))
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
  rows = []
  for fsdp in (int(f) for f in args.fsdp.split(",")):
    for remat in args.remat.split(","):
      out = subprocess.run(
          [sys.executable, __file__, "--config", args.config, "--per_device_batch",
           str(args.per_device_batch), "--worker", str(fsdp), remat, "-"],
          env=env, check=True, capture_output=True, text=True).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
      print(json.dumps(rows[-1]), flush=True)
  base = rows[0]
  print(json.dumps({"ratios_vs": f"fsdp={base['mesh']['fsdp']},remat={base['remat']}",
                    **{f"fsdp={r['mesh']['fsdp']},remat={r['remat']}":
                       {k: round(r[k] / base[k], 3) for k in ("argument_gb", "temp_gb", "peak_gb")}
                       for r in rows[1:]}}))


if __name__ == "__main__":
  main()
