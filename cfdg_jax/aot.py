"""Compiles a config's jobs for a TPU slice ahead of time, on a CPU: does each fit, and what does a
step cost? (Needs libtpu: pip install -r requirements-tpu.txt.)

  python -m cfdg_jax.aot --topology v5e:4x4 --config configs/imagenet64.py \
      [--config.mesh.fsdp=8 --config.model.remat=blocks ...] [--jobs train,sample,eval] \
      [--suggest] [--fast] [--sample_batch N]

The programs are the jobs' own jitted functions (cfdg_jax/programs.py) on the config's mesh over
the slice's compile-only devices, compiled by XLA's TPU compiler as on the pod. It prints a table,
then one JSON line: per job and program, the bytes per chip (arguments: the state's share and the
batch; temporaries; outputs; aliased, i.e. donated; held: what the job keeps beside the program),
their peak against the HBM the compiler allows, FLOPs, HBM bytes and collectives per call, compile
seconds, and a roofline estimate (cfdg_jax/costs.py). It exits 0 when every job fits, 1 when one
does not, its last line saying which, by how much, and what to change; --suggest then searches the
mesh's fsdp, rematerialisation and last the batch for the cheapest setting that fits.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compile-only: no accelerator is touched,
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # so several may run at once.

# pylint: disable=wrong-import-position
import json
import math
import sys
from typing import Any

import jax
import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from cfdg_jax import fit
from cfdg_jax import programs
from cfdg_jax import runtime
from cfdg_jax import sharding
from cfdg_jax import topology
from cfdg_jax import validation
from cfdg_jax.eval import plan

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("topology", None, "The TPU slice: GENERATION:SHAPE (v5e:4x4, v4:2x2x4, "
                    "v5p:4x4x4, v6e:16x16) or an accelerator type (v5litepod-16, v4-32).")
flags.DEFINE_list("jobs", list(programs.JOBS), "Jobs to compile: train, sample, eval.")
flags.DEFINE_bool("suggest", False, "When a job does not fit, search config.mesh.fsdp, "
                  "config.model.remat and last the batch for the cheapest setting that fits.")
flags.DEFINE_bool("fast", False, "Compile with XLA's least optimisation effort: several times "
                  "faster, but memory and cost figures are approximate (docs/scaling.md).")
flags.DEFINE_integer("threads", None, "Programs compiled at once; default: as many as the cores "
                     "and the free memory allow (one compile of imagenet64 took 17 GB here).")
flags.DEFINE_integer("sample_batch", None, "Images per call of the sample job (the sample CLI's "
                     "--batch_size); default, as there: config.sample.batch_size, else the "
                     "whole grid of config.sample.")
flags.mark_flags_as_required(["config", "topology"])
FLAGS = flags.FLAGS

GIB = 2**30


def _gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def table(header: dict[str, Any], report: dict[str, Any]) -> str:
  """The report as text: one row per program, then the estimates."""
  usable = header["chip"]["usable_hbm_bytes"]
  lines = [f"{header['config']} on {header['topology']}: {header['chips']} chips "
           f"({header['device_kind']}, {header['hosts']} hosts), mesh {header['mesh']}, remat "
           f"{header['remat']}, batch {header['batch_size']} ({header['per_chip_batch']:g} per "
           f"chip); GiB per chip, {_gib(usable)} usable of {_gib(header['chip']['hbm_bytes'])} "
           "HBM" + (" (--fast: approximate)" if header["fast"] else ""),
           f"{'job/program':<34}{'args':>7}{'temp':>7}{'out':>7}{'alias':>7}{'held':>7}"
           f"{'peak':>7}  fits  {'GFLOP':>9} {'HBM GB':>7}  {'est. ms':>8} {'compile':>8}  "
           "collectives (count × GB)"]
  for job_name, job in report["jobs"].items():
    for name, p in job["programs"].items():
      label = f"{job_name}/{name}"[:33]
      if p.get("out_of_memory"):
        lines.append(f"{label:<34}{'':>35}{_gib(p['peak_bytes']):>7}  no    out of memory (the "
                     f"compiler's total), compiled in {p['compile_s']:.0f} s")
        continue
      ms = p["estimate"]["call_s"] * 1e3
      coll = ", ".join(f"{k} {v['count']}×{v['bytes'] / 1e9:.2f}"
                       for k, v in p["collectives"].items()) or "none"
      lines.append(
          f"{label:<34}" + "".join(f"{_gib(p[k]):>7}" for k in (
              "argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "held_bytes",
              "peak_bytes")) + f"  {'yes' if p['fits'] else 'no ':<4}  {p['flops'] / 1e9:>9.1f} "
          f"{p['bytes_accessed'] / 1e9:>7.2f}  {ms:>8.2f} {p['compile_s']:>7.0f}s  {coll}")
  lines.append("Estimates (roofline lower bounds from the published chip figures, not measured):")
  for job_name, job in report["jobs"].items():
    for name, p in job["programs"].items():
      if "estimate" not in p:
        continue
      e = p["estimate"]
      lines.append(f"  {job_name}/{name}: {e['images_per_s']:.1f} images/s ("
                   f"{'compute' if e['compute_s'] >= e['hbm_s'] else 'HBM'}-bound; collectives "
                   f"{e['collective_s'] * 1e3:.2f} ms of ICI time per call)")
    if "estimate" in job:
      e = job["estimate"]
      lines.append(f"  train: {e['step_s']:.3f} s/step, {e['images_per_s']:.0f} images/s, "
                   f"{e['days']:.1f} days for config.num_train_steps")
  return "\n".join(lines)


def verdict(header: dict[str, Any], report: dict[str, Any]) -> str:
  """The last line when a job does not fit: which, by how much, what to change."""
  usable = header["chip"]["usable_hbm_bytes"]
  worst = max((j for j in report["jobs"].items() if not j[1]["fits"]),
              key=lambda j: j[1]["peak_bytes"])
  hints = []
  if header["mesh"]["fsdp"] < header["chips"]:
    hints.append(f"--config.mesh.data=-1 --config.mesh.fsdp={2 * header['mesh']['fsdp']}")
  if worst[0] == "train" and header["remat"] == "none":
    hints.append("--config.model.remat=blocks")
  hints.append({"train": "--config.microbatches=2", "eval": "a smaller --config.eval.batch_size",
                "sample": "a smaller --config.sample.batch_size"}[worst[0]])
  return (f"does not fit: {worst[0]} needs {_gib(worst[1]['peak_bytes'])} GiB per chip on "
          f"{header['topology']}, {_gib(worst[1]['peak_bytes'] - usable)} GiB over the "
          f"{_gib(usable)} GiB usable; try {' or '.join(hints)}, a larger slice, or --suggest.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if unknown := sorted(set(FLAGS.jobs) - set(programs.JOBS)):
    raise app.UsageError(f"--jobs={','.join(FLAGS.jobs)}: {unknown} are not jobs; use "
                         f"{','.join(programs.JOBS)}.")
  if FLAGS.threads is not None and FLAGS.threads < 1:
    raise app.UsageError(f"--threads={FLAGS.threads} must be >= 1.")
  if FLAGS.sample_batch is not None and FLAGS.sample_batch < 1:
    raise app.UsageError(f"--sample_batch={FLAGS.sample_batch} must be >= 1.")
  config = FLAGS.config
  # As many CPU devices as chips: each program's CPU twin counts its FLOPs (fit.Compiler).
  jax.config.update("jax_num_cpu_devices", math.prod(topology.parse(FLAGS.topology)[1]))
  compiler = fit.Compiler(FLAGS.topology, fast=FLAGS.fast,
                      threads=FLAGS.threads or fit.default_threads(config))
  # Every mistake in the config, for this slice, before anything compiles.
  validation.check_config(config, compiler.devices)
  if "eval" in FLAGS.jobs:
    plan.check_eval_config(config.eval, len(compiler.devices), config.sample,
                           need_networks=False)
  header = {"config": _config_path(), **describe(compiler, config)}
  report = compiler.check(config, FLAGS.jobs, FLAGS.sample_batch)
  print(table(header, report), flush=True)
  result = {**header, **report}
  if not report["fits"] and FLAGS.suggest:
    found = fit.suggest(compiler, config, report, FLAGS.jobs, FLAGS.sample_batch)
    result["suggestion"] = found and {"flags": fit.flags_of(found[0]), **found[1]}
    if found:
      print(f"Suggestion: {fit.flags_of(found[0])}", flush=True)
      print(table({**header, **describe(compiler, fit.with_overrides(
          config, {k: v for k, v in found[0].items() if not k.startswith("--")}))}, found[1]))
  print(json.dumps(result), flush=True)
  if not report["fits"]:
    sys.stdout.flush()
    print(verdict(header, report) + (f" Suggested: {result['suggestion']['flags']}"
                                     if result.get("suggestion") else ""), flush=True)
    sys.exit(1)


def describe(compiler: fit.Compiler, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The slice, its chips' published figures, and the job settings the table heads."""
  devices, chip = compiler.devices, compiler.chip
  data, fsdp = sharding.mesh_shape(config.mesh, len(devices))
  return {"topology": compiler.name, "chips": len(devices),
          "hosts": len({d.process_index for d in devices}), "device_kind": devices[0].device_kind,
          "chip": {"hbm_bytes": chip.hbm_bytes, "usable_hbm_bytes": compiler.usable,
                   "peak_bf16_flops": chip.peak_flops, "hbm_bytes_per_s": chip.hbm_bandwidth,
                   "ici_bytes_per_s": chip.ici_bandwidth, "source": chip.source},
          "mesh": {"data": data, "fsdp": fsdp}, "remat": config.model.remat,
          "batch_size": config.batch_size, "per_chip_batch": config.batch_size / len(devices),
          "fast": compiler.fast}


def _config_path() -> str:
  return next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
              sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else "config")


def cli() -> None:
  """The `cfdg-aot` command (pyproject.toml)."""
  runtime.run(main)


if __name__ == "__main__":
  cli()
