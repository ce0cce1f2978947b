"""What one evaluation point costs, part by part: sampling, each feature network, the metrics.

  python bench/eval.py --config configs/digits.py [--config.eval.num_samples=1000 ...] \
      [--workdir DIR] [--inception_weights PATH] [--classifier_dir DIR] [--w 1.0] [--out eval.json]

Runs the evaluation job's own pieces (cfdg_jax/eval/evaluator.py) at one point: the first sampler
and guidance setting of config.eval at --w, num_samples images in eval.batch_size batches, from
--workdir's newest EMA weights or else from random weights of --config's model (the images are
noise then, but cost the same). --workdir's checkpoint supplies the model and data; --config
only the eval section. The flags --inception_weights and --classifier_dir replace
config.eval's; without either, only sampling is timed and the features are skipped.

Each part runs once untimed first (one sampler batch: the whole point when num_samples <=
eval.batch_size; one image per network), so the timed run excludes compilation; `compile_s` is
the warm-up's tracing, lowering and compiling.
Prints ONE JSON line: `seconds` of the point's parts (sample, features_<network>, metrics) and
their `total`, each part's `fractions` of it, the `slowest` part, `images_per_s` of sampling and
of each network, `compile_s`, `reference_seconds` (the reference statistics, computed afresh,
and what the metrics derive from them: the job does this once per data set and process, and
keeps them for every point), the metric `values`, and the point:
sampler, nfe, guidance, w, num_samples, batch_size, device, devices.
"""
import dataclasses
import functools
import math
import pathlib
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from etils import epath
from jax import monitoring
from ml_collections import config_flags

BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # bench/*.py, and the package from any cwd.
import common  # noqa: E402  (bench/common.py)

from cfdg_jax import checkpointing  # noqa: E402
from cfdg_jax import job as job_lib  # noqa: E402
from cfdg_jax import pipeline  # noqa: E402
from cfdg_jax import runtime  # noqa: E402
from cfdg_jax import sharding  # noqa: E402
from cfdg_jax import validation  # noqa: E402
from cfdg_jax.errors import UserError  # noqa: E402
from cfdg_jax.eval import classifier  # noqa: E402
from cfdg_jax.eval import evaluator  # noqa: E402
from cfdg_jax.eval import networks as networks_lib  # noqa: E402
from cfdg_jax.eval import plan  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py): its eval "
                                "section, and the model when there is no --workdir.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir: sample its newest checkpoint's EMA "
                    "weights (default: random weights of --config's model).")
flags.DEFINE_string("inception_weights", None, "FID Inception weights (cfdg_jax.eval."
                    "convert_inception); default config.eval.inception_weights.")
flags.DEFINE_string("classifier_dir", None, "A trained classifier (cfdg_jax.eval."
                    "train_classifier); default config.eval.classifier_dir.")
flags.DEFINE_float("w", 1.0, "Guidance strength of the point.")
flags.DEFINE_string("out", None, "Also write the JSON line here.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

_COMPILE_EVENTS = "/jax/core/compile/"  # Tracing, lowering to MLIR, XLA's compilation.


def _timed(fn):
  """(fn(), wall seconds, seconds of them in JAX compile events; nested traces count once)."""
  spans = []

  def listener(event, start, end, **unused):
    if event.startswith(_COMPILE_EVENTS):
      spans.append((start, end))

  monitoring.register_event_time_span_listener(listener)
  try:
    tic = time.perf_counter()
    result = jax.block_until_ready(fn())
    wall = time.perf_counter() - tic
  finally:
    monitoring.unregister_event_time_span_listener(listener)
  compile_s, reach = 0.0, -math.inf
  for start, end in sorted(spans):  # The length of the spans' union.
    compile_s += max(0.0, end - max(start, reach))
    reach = max(reach, end)
  return result, wall, compile_s


def _eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.eval at the one point measured, with the flags' networks; UserError names a bad flag."""
  if not math.isfinite(FLAGS.w):
    raise UserError(f"--w={FLAGS.w} must be a finite guidance strength, e.g. --w=1.0.")
  if FLAGS.out and not pathlib.Path(FLAGS.out).absolute().parent.is_dir():
    raise UserError(f"--out={FLAGS.out}: its directory does not exist; pass a path in an "
                    "existing directory.")
  eval_config = plan.get_eval_config(None, config.eval)
  # One point: no step sweep. No reference cache: the references are computed, and timed.
  eval_config.update(w=(FLAGS.w,), step_sweep=(), reference_cache=None)
  eval_config.inception_weights = FLAGS.inception_weights or eval_config.inception_weights
  eval_config.classifier_dir = FLAGS.classifier_dir or eval_config.classifier_dir
  where = lambda name: f"--{name}" if FLAGS[name].value else f"--config.eval.{name}"
  if (path := eval_config.inception_weights) and not epath.Path(path).is_file():
    raise UserError(f"{where('inception_weights')}={path}: no such file; convert the FID "
                    "Inception with python -m cfdg_jax.eval.convert_inception SRC OUT.")
  if (path := eval_config.classifier_dir) and not (
      epath.Path(path) / classifier.METADATA_FILE).is_file():
    raise UserError(f"{where('classifier_dir')}={path} holds no trained classifier (no "
                    f"{classifier.METADATA_FILE}); train one with python -m cfdg_jax.eval."
                    f"train_classifier --config CONFIG --out_dir {path}.")
  return eval_config


def _check_eval(eval_config: ml_collections.ConfigDict,
                sample_config: ml_collections.ConfigDict) -> None:
  """plan.check_eval_config, less its demand for a feature network: sampling alone needs none."""
  checked = ml_collections.ConfigDict(eval_config.to_dict())
  checked.classifier_dir = checked.classifier_dir or "(none: features skipped)"
  plan.check_eval_config(checked, jax.device_count(), sample_config)


def _model(config: ml_collections.ConfigDict, step: int | None,
           mesh: jax.sharding.Mesh) -> pipeline.Pipeline:
  """--workdir's EMA weights at `step`, or random weights of `config`'s model."""
  if FLAGS.workdir:
    return pipeline.load(FLAGS.workdir, step, mesh=mesh)
  job = job_lib.create_job(config, mesh)
  network = pipeline.Network(job.model, config, job.state_sharding.ema_params)
  return pipeline.Pipeline(network, job.init_state(jax.random.key(config.seed)).ema_params, mesh)


def run(config: ml_collections.ConfigDict, scratch: str) -> dict:
  """The measurement of one point (see the module docstring); `scratch` gets the references."""
  # pylint: disable=protected-access  (the evaluator's own networks and references)
  eval_config, step = _eval_config(config), None
  if FLAGS.workdir:
    step = validation.check_checkpoint(FLAGS.workdir)
    config = checkpointing.restore_config(
        checkpointing.create_manager(FLAGS.workdir, read_only=True), step)
  else:
    validation.check_config(config)
  _check_eval(eval_config, config.sample)
  point = plan.resolve_guides(plan.plan_points(eval_config, config.sample)[:1],
                              plan.newest_step)[0]
  job_evaluator = None
  if eval_config.inception_weights or eval_config.classifier_dir:
    validation.check_data(config.data)
    # The evaluator builds the networks and references itself; its workdir, and so its
    # reference cache, is `scratch`: the references are computed, not loaded.
    job_evaluator = evaluator.Evaluator(scratch, eval_config)
  # Everything above is cheap and fails on bad input; from here on things load and compile.
  mesh = sharding.create_mesh(FLAGS.config.mesh)
  pipe, g = _model(config, step, mesh), point.guidance
  guide = pipeline.load(g.guide_workdir, g.guide_step, mesh=mesh) if g.guide_workdir else None
  data, n = config.data, eval_config.num_samples
  networks = job_evaluator._networks(eval_config, data) if job_evaluator else []
  labels = plan.eval_labels(eval_config.labels, n, data.num_classes, eval_config.seed)
  sample = lambda subset, what: next(evaluator.sample_points(
      pipe, [point], subset, seed=eval_config.seed, batch_size=eval_config.batch_size,
      guide=guide, description=f"{what}, {point.sampler.canonical}, w={point.w}"))

  # Warm-ups in the timed runs' shapes: one sampler batch, one image per network (padded).
  compile_s = {"sample": _timed(lambda: sample(labels[:eval_config.batch_size], "Warm-up"))[2]}
  blank = np.zeros((1, data.image_size, data.image_size, data.channels), np.uint8)
  for network in networks:
    compile_s[f"features_{network.name}"] = _timed(functools.partial(network.fn, blank))[2]
  references, reference_seconds = [], None
  if networks:
    builder = job_evaluator._reference_builder(data, eval_config.reference_split)
    references, reference_seconds, _ = _timed(lambda: job_evaluator._references(
        builder, data, eval_config, networks))

  seconds, outputs, values = {}, {}, {}
  (_, images, cost), seconds["sample"], _ = _timed(lambda: sample(labels, "Point"))
  for network in networks:
    outputs[network.name], seconds[f"features_{network.name}"], _ = _timed(
        functools.partial(network.fn, images))
  if networks:
    # The job's metrics of the features just computed: each network now returns its outputs.
    known = [dataclasses.replace(net, fn=lambda _, out=outputs[net.name]: out)
             for net in networks]
    compute = lambda: networks_lib.compute_metrics(images, labels, known, references,
                                                   eval_config.precision_recall_k)
    # The first call also derives what the metrics need of the references alone (kept for every
    # later point, as in the job): that counts with the references, the second call is a point's.
    _, first_s, _ = _timed(compute)
    values, seconds["metrics"], _ = _timed(compute)
    reference_seconds += max(0.0, first_s - seconds["metrics"])
  total = sum(seconds.values())
  return {
      "seconds": {**seconds, "total": total},
      "fractions": {part: s / total for part, s in seconds.items()},
      "slowest": max(seconds, key=seconds.get),
      "images_per_s": {part: n / s for part, s in seconds.items() if part != "metrics"},
      "compile_s": compile_s, "reference_seconds": reference_seconds,
      "reference_images": len(references[0]["features"]) if references else None,
      "values": values, "feature_networks": [net.name for net in networks],
      "features_skipped": None if networks else (
          "no --inception_weights or --classifier_dir (nor config.eval's): sampling alone"),
      **plan.row_identity(point, eval_config), "batch_size": eval_config.batch_size,
      "examples_per_sample": cost["examples_per_sample"],
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "config": config_flags.get_config_filename(FLAGS["config"]),
      "workdir": FLAGS.workdir, "step": pipe.step}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  with tempfile.TemporaryDirectory() as scratch:
    report = run(FLAGS.config, scratch)
  common.emit(report, FLAGS.out)


if __name__ == "__main__":
  runtime.run(main)
