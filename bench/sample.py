"""Guided-sampling throughput of a config's real sampler: one network call per step, or two.

  python bench/sample.py --config configs/digits.py [--config.model.base_channels=16 ...] \
      [--sampler "dpmpp_2m(num_steps=20)"] [--batch 64] [--w 1.0] [--dtypes float32,bfloat16] \
      [--repeats 5] [--workdir DIR] [--out sample.json]

Builds the network and jitted sampler that sampling uses (job.create_job, pipeline.make_sample_fn)
with random weights, or with --workdir (instead of --config) its newest checkpoint's EMA weights
and config. For each compute dtype (config.model.dtype; parameters stay float32) it measures two
modes of the same sampler on --batch B images of the labels 0, 1, ... at guidance strength --w:
  one_call   the library as is: guidance.guided_x pairs each example's conditional and
             unconditional pass into ONE network call on 2B examples;
  two_calls  the network called twice per guided step, on the B conditional and then the B
             unconditional examples (TwoCallNetwork below; the library is unchanged).
Each mode is compiled once (compile_s), called once, then timed --repeats times, the two modes'
calls alternating so that the drift of a shared machine slows both alike. Prints ONE JSON line:
per (dtype, mode) images_per_s, call_ms (median, min, max), compile_s, nfe_per_image,
network_examples_per_image (the sampler's count), network_calls_per_step, flops_per_image (XLA's
cost analysis of one network call on the step's examples, times nfe, per image; the sampler's own
arithmetic is not counted), peak_memory_bytes (the device's, else the process's RSS:
`peak_memory_source`; a peak SO FAR, so it includes the rows measured before); `ratios`, per
dtype one_call_vs_two_calls = one_call's images/s over two_calls'; and `max_pixel_diff`, per
dtype the largest |one_call − two_calls| of their uint8 images from the same rng: the modes
compute the same function, so 0 or 1 (rounding).
Default dtypes: float32, plus bfloat16 off the CPU.
"""
import dataclasses
import functools
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # bench/*.py, and the package from any cwd.
import common  # noqa: E402  (bench/common.py)

from cfdg_jax import checkpointing  # noqa: E402
from cfdg_jax import costs  # noqa: E402
from cfdg_jax import guidance  # noqa: E402
from cfdg_jax import job as job_lib  # noqa: E402
from cfdg_jax import pipeline  # noqa: E402
from cfdg_jax import runtime  # noqa: E402
from cfdg_jax import samplers  # noqa: E402
from cfdg_jax import sharding  # noqa: E402
from cfdg_jax import unet  # noqa: E402
from cfdg_jax import validation  # noqa: E402
from cfdg_jax.errors import UserError  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
# two_calls first: its activations are half of one_call's, so one_call's peak so far is its own.
MODES = ("two_calls", "one_call")

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py); random weights.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "A training workdir: its newest checkpoint's EMA weights and "
                    "config, instead of --config.")
flags.DEFINE_string("sampler", None, "Sampler: a name or 'name(field=value,...)', e.g. "
                    "'dpmpp_2m(num_steps=20)'. Default: the config's sample.sampler.")
flags.DEFINE_integer("batch", 64, "Images per call B (a multiple of the device count).")
flags.DEFINE_float("w", 1.0, "Guidance strength (paper convention; 0: unguided).")
flags.DEFINE_list("dtypes", None, "Compute dtypes (default: float32, plus bfloat16 off the CPU).")
flags.DEFINE_integer("repeats", 5, "Timed calls per mode and dtype.")
flags.DEFINE_string("out", None, "Also write the JSON line here.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class TwoCallNetwork(pipeline.Network):
  """The same network, but a guided step's 2B examples (c_0, ∅, c_1, ∅, …: guidance.guided_x)
  go through it as two calls of B: the conditional ones, then the unconditional ones."""
  batch: int

  def eps_fn(self, params):
    eps_fn = super().eps_fn(params)

    def two_calls(z, logsnr, labels):
      if z.shape[0] != 2 * self.batch:  # An unguided step: B examples, one call.
        return eps_fn(z, logsnr, labels)
      halves = [eps_fn(z[i::2], logsnr[i::2], labels[i::2]) for i in (0, 1)]
      return jnp.stack(halves, axis=1).reshape(z.shape)
    return two_calls


def check_flags(has_config: bool, workdir: str | None, batch: int, w: float, dtypes: list[str],
                repeats: int) -> None:
  """UserError naming the flag, its value and the fix; before anything is built or compiled."""
  if has_config == bool(workdir):
    raise UserError("Pass --config configs/<name>.py (random weights) or --workdir DIR (a "
                    "checkpoint's weights and config), not both or neither.")
  devices = jax.device_count()
  if batch < 1:
    raise UserError(f"--batch={batch}: use a positive number of images, e.g. 64.")
  if batch % devices:
    raise UserError(f"--batch={batch} is not a multiple of the {devices} devices; use e.g. "
                    f"--batch={-(-batch // devices) * devices}.")
  if not math.isfinite(w):
    raise UserError(f"--w={w}: use a finite guidance strength, e.g. 1.0.")
  if bad := [d for d in dtypes if d not in DTYPES]:
    raise UserError(f"--dtypes={','.join(dtypes)}: {bad[0]!r} is not a compute dtype; use "
                    f"some of {','.join(DTYPES)}.")
  if repeats < 1:
    raise UserError(f"--repeats={repeats}: use at least 1 timed call.")


def random_params(job: job_lib.Job, seed: int):
  """The initial parameters plus N(0, 0.02²) noise, sharded as the EMA params: the UNet's output
  layers start at zero, and with ε̂ ≡ 0 any two modes would agree. (Not job.init_state, whose
  optimizer state would count in the peak memory.)"""
  params = jax.jit(lambda rng: unet.init_params(rng, job.model, job.config),
                   out_shardings=job.state_sharding.ema_params)(jax.random.key(seed))
  noise = np.random.default_rng(seed)
  return jax.device_put(jax.tree.map(
      lambda p: np.asarray(p) + 0.02 * noise.standard_normal(p.shape, np.float32), params),
      job.state_sharding.ema_params)


def run(config, workdir: str | None, spec: str | None, batch: int, w: float, dtypes: list[str],
        repeats: int) -> dict:
  """The measurement (see the module docstring)."""
  if workdir:
    mesh = sharding.create_mesh()
    job, step, params = checkpointing.load_ema_params(workdir, mesh)
    weights = f"{workdir}@{step}"
  else:
    validation.check_config(config)
    mesh = sharding.create_mesh(config.mesh)
    job = job_lib.create_job(config, mesh)
    weights = "random"
  config = job.config
  try:
    settings = samplers.parse(spec or config.sample.sampler.name, config.sample.sampler)
  except ValueError as e:
    raise UserError(f"--sampler={spec}: {e}") from e
  if not workdir:
    params = random_params(job, config.seed)

  labels = (np.arange(batch) % config.data.num_classes).astype(np.int32)
  inputs = jax.tree.map(lambda a: sharding.global_array(a, mesh), (
      labels, guidance.make_options(batch, w), np.arange(batch, dtype=np.int32)))
  rng = jax.device_put(jax.random.key(0), sharding.replicated(mesh))
  nfe = samplers.get(settings.name).evaluations(settings.num_steps)
  images_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  rows, ratios, diffs = [], {}, {}
  for dtype in dtypes:
    dtype_config = config.copy_and_resolve_references()
    dtype_config.model.dtype = dtype
    model, shardings = unet.create_model(dtype_config), job.state_sharding.ema_params
    networks = {"two_calls": TwoCallNetwork(model, dtype_config, shardings, batch),
                "one_call": pipeline.Network(model, dtype_config, shardings)}
    examples = 2 * batch if w else batch  # Of one network call at each step.
    dense = pipeline.Network(unet.create_model(common.dense_attention(dtype_config)),
                             dtype_config, shardings)
    call = jax.jit(dense.eps_fn(params)).lower(
        jnp.zeros((examples, *images_shape), jnp.float32), jnp.zeros((examples,)),
        jnp.zeros((examples,), jnp.int32))
    flops_per_image = costs.lowered_flops(call) * nfe / batch
    calls, results = {}, {}
    for mode in MODES:
      tic = time.perf_counter()
      compiled = pipeline.make_sample_fn(networks[mode], mesh, settings).lower(
          params, None, rng, *inputs).compile()
      compile_s = time.perf_counter() - tic
      calls[mode] = functools.partial(compiled, params, None, rng, *inputs)
      images, stats = jax.block_until_ready(calls[mode]())  # The untimed first call.
      memory, memory_source = common.peak_memory()
      results[mode] = {
          "dtype": dtype, "mode": mode, "compile_s": compile_s, "nfe_per_image": nfe,
          "network_examples_per_image": int(stats["examples"]) / batch,
          "network_calls_per_step": 2 if mode == "two_calls" and w != 0 else 1,
          "flops_per_image": flops_per_image,
          "peak_memory_bytes": memory, "peak_memory_source": memory_source,
          "images": np.asarray(images, np.int16)}
    times = {mode: [] for mode in MODES}
    for _ in range(repeats):  # Alternating, so that drift slows both modes alike.
      for mode in MODES:
        times[mode] += common.time_calls(calls[mode], 1, warmup=0)
    for mode in MODES:
      results[mode].update(images_per_s=batch / statistics.median(times[mode]),
                           call_ms=common.summary_ms(times[mode]))
    diffs[dtype] = int(np.abs(results["one_call"].pop("images") -
                              results["two_calls"].pop("images")).max())
    ratios[dtype] = results["one_call"]["images_per_s"] / results["two_calls"]["images_per_s"]
    rows += [results["one_call"], results["two_calls"]]
  device = jax.devices()[0]
  return {"device": device.device_kind, "devices": jax.device_count(),
          "platform": device.platform, "batch": batch, "w": w, "sampler": settings.canonical,
          "weights": weights, "results": rows, "ratios": ratios, "max_pixel_diff": diffs}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  dtypes = FLAGS.dtypes or ["float32"] + (
      ["bfloat16"] if jax.devices()[0].platform != "cpu" else [])
  check_flags(FLAGS.config is not None, FLAGS.workdir, FLAGS.batch, FLAGS.w, dtypes,
              FLAGS.repeats)
  report = run(FLAGS.config, FLAGS.workdir, FLAGS.sampler, FLAGS.batch, FLAGS.w, dtypes,
               FLAGS.repeats)
  path = None if FLAGS.workdir else config_flags.get_config_filename(FLAGS["config"])
  common.emit({**report, "config": path}, FLAGS.out)


if __name__ == "__main__":
  runtime.run(main)
