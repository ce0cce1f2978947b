"""Does a config fit an accelerator slice: its jobs' programs compiled for the slice's chips
(cfdg_jax/programs.py, cfdg_jax/topology.py), with their memory per chip, costs and a roofline
estimate, and the search for the cheapest setting that fits. `python -m cfdg_jax.aot` is its
command line.

  compiler = fit.Compiler("v5e:4x4")
  report = compiler.check(config, ["train", "eval"])    # {"jobs": {...}, "fits": bool}
  overrides, fitting = fit.suggest(compiler, config, report, ["train", "eval"])
"""
import concurrent.futures
import hashlib
import math
import os
import pathlib
import re
import time
from typing import Any, Sequence

import jax
import ml_collections
from absl import logging

from cfdg_jax import costs
from cfdg_jax import programs
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import topology
from cfdg_jax import unet


class Compiler:
  """Compiles programs for one slice, `threads` at a time; identical programs (by HLO) once."""

  # The least effort's peaks were up to a quarter below the default's (docs/scaling.md): a fast
  # verdict keeps that much of the memory free.
  FAST_HEADROOM = 0.25

  def __init__(self, name: str, fast: bool = False, threads: int = 1):
    self.name, self.fast, self.threads = topology.canonical(name), fast, threads
    self.devices, self.chip = topology.devices(name), topology.chip(name)
    self.usable = topology.usable_hbm(name)
    self.limit = self.usable * (1 - self.FAST_HEADROOM if fast else 1)  # What "fits" means.
    self._cache = {}

  def _compile(self, program: programs.Program, lowered: jax.stages.Lowered,
               twin: programs.Program) -> dict[str, Any]:
    """A program's figures per chip, or its out-of-memory verdict (the compiler's numbers).

    twin: the same program on as many CPU devices, whose lowering counts the FLOPs: the model's
    (for imagenet64 within 4% of its convolutions' and matmuls'). The compiler's own count
    ("compiler_flops") counts a loop's body once, and the TPU compiler turns fsdp's gathered
    convolutions into loops (half imagenet64's FLOPs were missing); compile-only GPUs give none.
    """
    logging.info("Compiling %s/%s for %s.", program.job, program.name, self.name)
    tic = time.perf_counter()
    # The feature network does not depend on the config; the least effort gives its memory
    # within 1% of the default's in a twentieth of the time (docs/scaling.md).
    options = {"exec_time_optimization_effort": -1.0 if (
        self.fast or program.name == "inception") else 0.0}
    if self.chip.platform == "cuda":
      # CUB's radix sort (XLA's choice for large sorts: dynamic thresholding's percentile) asks
      # the CUDA runtime for its scratch size while compiling, which needs a GPU; XLA's own sort
      # stands in (the memory differs by that scratch).
      options["xla_gpu_enable_cub_radix_sort"] = False
    try:
      report = costs.measure(lowered.compile(compiler_options=options), self.chip)
    except Exception as e:  # pylint: disable=broad-except  (XLA's JaxRuntimeError)
      if (oom := topology.out_of_memory(str(e))) is None:
        raise
      report = {"total_bytes": oom[0], "out_of_memory": True}
    if "estimate" in report:  # Compiled (not out of memory).
      report["compiler_flops"] = report["flops"]
      report["flops"] = costs.lowered_flops(twin.lower()) / twin.num_devices
      report["estimate"] = costs.roofline(report, self.chip)
    report["compile_s"] = time.perf_counter() - tic
    return report

  def _figures(self, program: programs.Program, key: str) -> dict[str, Any]:
    """The compiled figures of `program`, with what its job holds beside it and the verdict."""
    report = dict(self._cache[key], argument_bytes_planned=programs.per_device_bytes(
        program.args), held_bytes=program.resident_bytes)
    report["peak_bytes"] = report["total_bytes"] + program.resident_bytes
    report["fits"] = not report.get("out_of_memory") and report["peak_bytes"] <= self.limit
    if "flops" in report:
      report["estimate"] = _estimate(program.work, report["estimate"])
    return report

  def check(self, config: ml_collections.ConfigDict, jobs: Sequence[str],
            sample_batch: int | None = None) -> dict[str, Any]:
    """Compiles `jobs` of `config`: {"jobs": {job: {"programs", "fits", "peak_bytes", ...}},
    "fits"}."""
    built = programs.build(config, self.devices, jobs, sample_batch=sample_batch)
    twins = programs.build(config, jax.devices("cpu")[:len(self.devices)], jobs,
                           sample_batch=sample_batch)
    lowered = [program.lower() for program in built]
    keys = [hashlib.sha1(low.as_text().encode()).hexdigest() for low in lowered]
    todo = {}  # The first program of each HLO not compiled yet.
    for key, program, low, twin in zip(keys, built, lowered, twins):
      if key not in self._cache:
        todo.setdefault(key, (program, low, twin))
    # XLA's compiler releases the GIL: programs compile side by side.
    with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
      done = pool.map(lambda args: self._compile(*args), todo.values())
      self._cache.update(zip(todo, done))
    out = {"jobs": {}}
    for program, key in zip(built, keys):
      job = out["jobs"].setdefault(program.job, {"programs": {}})
      job["programs"][program.name] = self._figures(program, key)
    for job_name, job in out["jobs"].items():
      peak = max(p["peak_bytes"] for p in job["programs"].values())
      job.update(fits=all(p["fits"] for p in job["programs"].values()), peak_bytes=peak,
                 margin_bytes=self.usable - peak)
      step = job["programs"].get("train_step", {}).get("estimate")
      if job_name == "train" and step:
        job["estimate"] = {"step_s": step["call_s"],
                           "images_per_s": config.batch_size / step["call_s"],
                           "days": config.num_train_steps * step["call_s"] / 86400}
    out["fits"] = all(job["fits"] for job in out["jobs"].values())
    return out


def _estimate(work: dict[str, Any], roofline: dict[str, float]) -> dict[str, float]:
  """Roofline seconds per call and images/s: a lower bound on time, not a measurement.

  XLA counts a loop's body once: a sampler's figures hold one network evaluation per call site in
  its HLO (`counted_evaluations`), and a call runs NFE of them; a train step with k microbatches
  runs its body k times.
  """
  calls = work.get("loop_trips", 1)  # The microbatches' loop (its body dominates the step).
  if "evaluations" in work:
    calls = work["evaluations"] / counted_evaluations(samplers.get(work["sampler"]),
                                                      work["num_steps"])
  call_s = roofline["step_s"] * calls
  return {**roofline, "call_s": call_s, "collective_s": roofline["collective_s"] * calls,
          "images_per_s": work["images"] / max(call_s, 1e-12)}


def counted_evaluations(sampler: samplers.core.Sampler, num_steps: int) -> int:
  """Network evaluations in a sampler's HLO: its loop body's (Heun's last trip skips one)."""
  return math.ceil(sampler.evaluations(num_steps) / sampler.loop_trips(num_steps))


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides.items():
    *parents, field = path.split(".")
    section = config
    for parent in parents:
      section = section[parent]
    section[field] = value
  return config


def suggest(compiler: Compiler, config: ml_collections.ConfigDict, report: dict[str, Any],
            jobs: Sequence[str], sample_batch: int | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]] | None:
  """The cheapest change that makes the failing jobs fit: (overrides, their report), or None.

  Tried in order of cost: a larger config.mesh.fsdp (each chip holds less of the state; the
  parameters are all-gathered each step), then rematerialisation (the backward pass recomputes
  block activations, about 1/3 more FLOPs) with the smallest fsdp that then fits, then a smaller
  batch per call (train: microbatches of the same global batch; sample and eval: fewer images
  per call). A setting whose planned arguments alone cannot close the gap is not compiled.
  """
  failing = [job for job in jobs if not report["jobs"][job]["fits"]]
  chips = len(compiler.devices)
  fsdp_now = sharding.mesh_shape(config.mesh, chips)[1]
  fsdps = [2**i for i in range(int(math.log2(chips)) + 1) if 2**i >= fsdp_now and not chips % 2**i]
  remats = ["none", "blocks"] if config.model.remat == "none" or "train" not in failing else [
      config.model.remat]
  candidates = [{"mesh.data": -1, "mesh.fsdp": f, "model.remat": r} for r in remats for f in fsdps]
  reference = dict(report, remat=config.model.remat)
  for overrides in candidates[1:]:
    candidate = with_overrides(config, overrides)
    if overrides["model.remat"] == reference["remat"] and _too_big(
        compiler, candidate, reference, failing, sample_batch):
      logging.info("Skipping %s: its arguments alone leave it over the HBM.", flags_of(overrides))
      continue
    result = compiler.check(candidate, failing, sample_batch)
    logging.info("%s: %s (%s).", flags_of(overrides), "fits" if result["fits"] else "does not fit",
                 peaks(result))
    if result["fits"]:
      return _changed(config, overrides, chips), result
    reference = dict(result, remat=overrides["model.remat"])
  # Fewer images per call shrink what grows with them: start from the smallest fsdp whose
  # arguments and held bytes leave at least half of the memory to it.
  last = [c for c in candidates if c["model.remat"] == remats[-1]]
  start = next((c for c in last if _fixed_bytes(compiler, with_overrides(config, c), failing,
                                                sample_batch) <= compiler.limit / 2), last[-1])
  found = _smaller_batches(compiler, with_overrides(config, start), start, failing, sample_batch)
  return found and (_changed(config, found[0], chips), found[1])


def _fixed_bytes(compiler, config, jobs, sample_batch) -> int:
  """The largest planned arguments + held bytes of the jobs' programs (no compilation)."""
  return max(programs.per_device_bytes(p.args) + p.resident_bytes
             for p in programs.build(config, compiler.devices, jobs, sample_batch=sample_batch))


def _changed(config, overrides, chips) -> dict[str, Any]:
  """The overrides that change the config (the mesh fields when they change its shape)."""
  changed = {k: v for k, v in overrides.items() if k.startswith("--") or (
      not k.startswith("mesh.") and with_overrides(config, {})[k] != v)}
  mesh = sharding.mesh_shape(with_overrides(config, overrides).mesh, chips)
  if mesh != sharding.mesh_shape(config.mesh, chips):
    changed.update({"mesh.data": -1, "mesh.fsdp": mesh[1]})
  return changed


def _too_big(compiler, candidate, reference, failing, sample_batch) -> bool:
  """Whether a program that did not fit still would not if only its arguments and what its job
  holds beside it changed as the candidate changes them."""
  for program in programs.build(candidate, compiler.devices, failing, sample_batch=sample_batch):
    old = reference["jobs"][program.job]["programs"][program.name]
    planned = (old["peak_bytes"] - old["argument_bytes_planned"] - old["held_bytes"]
               + programs.per_device_bytes(program.args) + program.resident_bytes)
    if not old["fits"] and planned > compiler.limit:
      return True
  return False


def _smaller_batches(compiler, config, overrides, failing, sample_batch):
  """Fewer images per call for each program that does not fit, fewer by the factor its measured
  bytes call for (what is not its arguments or held grows with them), until every job fits: the
  train step's config.microbatches, the grid's config.sample.batch_size, the sample job's
  --sample_batch, the eval job's config.eval.batch_size."""
  overrides = dict(overrides)
  while not (result := compiler.check(config, failing, sample_batch))["fits"]:
    changes = {}
    for job in failing:
      for name, p in result["jobs"][job]["programs"].items():
        fixed = p["argument_bytes_planned"] + p["held_bytes"]
        factor = (p["peak_bytes"] - fixed) / max(0.9 * compiler.limit - fixed, 1.0)
        if not p["fits"] and (change := _fewer_images(name, config, sample_batch, factor,
                                                      len(compiler.devices))):
          changes.update(change)
    if not changes:
      return None
    logging.info("%s (%s): trying %s.", flags_of(overrides) or "The config", peaks(result),
                 flags_of(changes))
    sample_batch = changes.pop("--sample_batch", sample_batch)
    overrides.update(changes, **({"--sample_batch": sample_batch} if sample_batch else {}))
    config = with_overrides(config, changes)
  return overrides, result


def _fewer_images(program: str, config, sample_batch, factor: float, chips: int):
  """{override: value} cutting a program's images per call by at least `factor` (at least 2),
  or None when it cannot be cut further."""
  factor = max(2.0, factor)
  if program == "train_step":
    per_device, k = config.batch_size // chips, config.microbatches
    fits = [d for d in range(k + 1, per_device + 1) if not per_device % d and d >= k * factor]
    return {"microbatches": fits[0]} if fits else None
  grid = config.sample.batch_size or _grid_size(config)
  key, now = {"grid": ("sample.batch_size", grid),
              # The sample CLI's --batch_size where given, else config.sample.batch_size.
              "sampler": ("--sample_batch", sample_batch) if sample_batch else (
                  "sample.batch_size", grid)}.get(program,
                                                  ("eval.batch_size", config.eval.batch_size))
  fewer = int(now / factor) // chips * chips
  return {key: fewer} if chips <= fewer < now else None


def _grid_size(config) -> int:
  return config.data.num_classes * config.sample.num_per_class * len(config.sample.w)


def peaks(result: dict[str, Any]) -> str:
  """Each compiled program's peak GiB per chip, e.g. "train/train_step 38.20 GiB"."""
  return ", ".join(f"{job}/{name} {p['peak_bytes'] / 2**30:.2f} GiB"
                   for job, j in result["jobs"].items() for name, p in j["programs"].items())


def flags_of(overrides: dict[str, Any]) -> str:
  return " ".join(f"{k}={v}" if k.startswith("--") else f"--config.{k}={v}"
                  for k, v in overrides.items())


def default_threads(config: ml_collections.ConfigDict) -> int:
  """Programs to compile at once: as many as the cores and the free memory hold, at the peak
  memory of one compile measured on this project's CPU (8 GB for cifar10's 38M parameters, 17 GB
  for imagenet64's 296M: about 7 GB + 35 GB per billion parameters)."""
  shapes = jax.eval_shape(lambda: unet.init_params(jax.random.key(0), unet.create_model(config),
                                                   config))
  params = sum(x.size for x in jax.tree.leaves(shapes))
  need = 7e9 + 35 * params
  return max(1, min(len(os.sched_getaffinity(0)), int(_available_memory() // need)))


def _available_memory() -> float:
  """Bytes of memory free for new work (Linux's MemAvailable)."""
  try:
    meminfo = pathlib.Path("/proc/meminfo").read_text()
    return float(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
  except (OSError, AttributeError):
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
