"""What the evaluation job measures for a checkpoint: the points of config.eval, checked and grouped.

A point is (sampler setting, guidance setting, w). The points are every sampler of
`eval.samplers` × every guidance setting of `eval.guidance` × every w of `eval.w`, then the first
sampler at each num_steps of `eval.step_sweep` with the first guidance setting at each w of
`eval.step_sweep_w`; equal points once. Settings are specs ("ddim(num_steps=50,eta=0.5)",
"cfg(rescale=0.7)") whose unnamed fields take the checkpoint's config.sample values.
"""
import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from cfdg_jax import checkpointing
from cfdg_jax import guidance
from cfdg_jax import samplers
from cfdg_jax.errors import UserError

EVAL_FIELDS = ("w", "samplers", "guidance", "step_sweep", "step_sweep_w", "labels",
               "num_samples", "batch_size", "seed", "inception_weights", "classifier_dir",
               "reference_split", "reference_cache", "precision_recall_k")
LABELS = ("balanced", "random")
IS_SPLITS = 10  # networks.IS_SPLITS, repeated here to keep this module free of TensorFlow.


@dataclasses.dataclass(frozen=True)
class Point:
  sampler: samplers.Settings
  guidance: guidance.Settings
  w: float


def get_eval_config(config: ml_collections.ConfigDict | None,
                    override: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """A copy of `override` (the --config file's eval section) or else of the checkpoint config's."""
  if override is not None:
    return ml_collections.ConfigDict(override.to_dict())
  if "eval" not in config:
    raise UserError("This checkpoint's config has no `eval` section (it predates the evaluator): "
                    "pass the experiment's config file, e.g. --config configs/digits.py, whose "
                    "eval section is then used.")
  return ml_collections.ConfigDict(config.eval.to_dict())


def check_eval_config(eval_config: ml_collections.ConfigDict, device_count: int,
                      sample_config: ml_collections.ConfigDict | None = None, *,
                      need_networks: bool = True) -> None:
  """Cheap checks of `config.eval`, before any data loading or compilation; raises ValueError.

  sample_config: the checkpoint's config.sample (default: the defaults), for the specs' fields.
  need_networks: False accepts a section that names no metric network yet (AOT compilation).
  """
  fields = set(eval_config.keys())
  if unknown := sorted(fields - set(EVAL_FIELDS)):
    raise UserError(f"Unknown config.eval field(s) {unknown}; the fields are {list(EVAL_FIELDS)}.")
  if missing := sorted(set(EVAL_FIELDS) - fields):
    raise UserError(f"config.eval lacks {missing}: pass the experiment's config file (e.g. "
                    "--config configs/digits.py), which defines every eval field.")
  e = eval_config
  if need_networks and not e.inception_weights and not e.classifier_dir:
    raise UserError("config.eval.inception_weights and config.eval.classifier_dir are both unset, "
                    "so there is nothing to measure: set at least one, e.g. --config "
                    "configs/digits.py --config.eval.classifier_dir=DIR (configs/digits.py says "
                    "how to train that classifier).")
  for name, example in (("w", "(0.0, 1.0)"), ("samplers", "('ancestral',)"),
                        ("guidance", "('cfg',)")):
    if not e[name]:
      raise UserError(f"config.eval.{name} is empty; give at least one, e.g. {example}.")
  for name in ("w", "step_sweep_w"):
    if not all(isinstance(w, (int, float)) and np.isfinite(w) for w in e[name]):
      raise UserError(f"config.eval.{name}={e[name]} must hold finite numbers.")
  if not all(isinstance(t, int) and t >= 1 for t in e.step_sweep):
    raise UserError(f"config.eval.step_sweep={e.step_sweep} must hold integers >= 1 (sampler "
                    "num_steps).")
  if e.labels not in LABELS:
    raise UserError(f"config.eval.labels={e.labels!r}; use one of {LABELS}.")
  if e.precision_recall_k < 1:
    raise UserError(f"config.eval.precision_recall_k={e.precision_recall_k} must be >= 1 (3 as "
                    "Kynkäänniemi et al.).")
  least = max(IS_SPLITS, e.precision_recall_k + 1)
  if e.num_samples < least:
    raise UserError(f"config.eval.num_samples={e.num_samples}: the Inception Score's "
                    f"{IS_SPLITS} splits and k-NN precision/recall need at least {least}.")
  if e.batch_size < 1 or e.batch_size % device_count:
    raise UserError(f"config.eval.batch_size={e.batch_size} must be a positive multiple of the "
                    f"{device_count} devices it is split over.")
  plan_points(e, sample_config)


def _sample_defaults(sample_config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  if sample_config is None:
    sample_config = ml_collections.ConfigDict(
        {"sampler": samplers.config_section(), "guidance": guidance.config_section()})
  return sample_config


def plan_points(eval_config: ml_collections.ConfigDict,
                sample_config: ml_collections.ConfigDict | None = None) -> list[Point]:
  """The points of `eval_config` in sampling order (see the module docstring); ValueError names
  a bad spec."""
  sample_config = _sample_defaults(sample_config)

  def parse(name, index, spec, parser, base):
    try:
      return parser(spec, base)
    except ValueError as e:
      raise UserError(f"config.eval.{name}[{index}]={spec!r}: {e}") from e

  settings = [parse("samplers", i, s, samplers.parse, sample_config.sampler)
              for i, s in enumerate(eval_config.samplers)]
  guides = [parse("guidance", i, s, guidance.parse, sample_config.guidance)
            for i, s in enumerate(eval_config.guidance)]
  points = [Point(s, g, float(w)) for s, g, w in itertools.product(settings, guides,
                                                                    eval_config.w)]
  for t in eval_config.step_sweep:
    sweep = parse("step_sweep", 0, settings[0].canonical,
                  lambda spec, base, t=t: samplers.parse(spec, base, num_steps=t),
                  sample_config.sampler)
    points += [Point(sweep, guides[0], float(w)) for w in eval_config.step_sweep_w]
  return list(dict.fromkeys(points))


def resolve_guides(points: Sequence[Point], newest_step) -> list[Point]:
  """Points whose autoguidance guide step is unset get the guide workdir's newest step."""
  def resolve(point):
    g = point.guidance
    if g.guide_workdir and g.guide_step is None:
      g = dataclasses.replace(g, guide_step=newest_step(g.guide_workdir))
    return dataclasses.replace(point, guidance=g)
  return [resolve(p) for p in points]


def newest_step(workdir: str) -> int:
  """The newest checkpoint step of a workdir (FileNotFoundError if there is none)."""
  steps = checkpointing.create_manager(workdir, read_only=True).all_steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoints in {checkpointing.checkpoint_dir(workdir)} (an "
                            "autoguidance guide_workdir).")
  return max(steps)


def sampling_groups(points: Sequence[Point]) -> list[list[Point]]:
  """Points sampled in the same batched calls, in order of first appearance.

  One group shares the sampler setting and what is compiled (x̂ clipping, the guide network). It
  also shares the guidance interval and whether w = 0: a step where no example of a batch is
  guided runs the conditional pass alone, so unguided points and intervals keep their saving.
  """
  groups = {}
  for p in points:
    values = p.guidance.option_values()
    key = (p.sampler, p.guidance.clip_x, p.guidance.guide_workdir, p.guidance.guide_step,
           values["interval_lo"], values["interval_hi"], p.w == 0)
    groups.setdefault(key, []).append(p)
  return list(groups.values())


def eval_labels(protocol: str, num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """int32 [num_samples]: "balanced" cycles 0..K−1; "random" draws uniformly (ADM's protocol)."""
  if protocol == "balanced":
    return (np.arange(num_samples) % num_classes).astype(np.int32)
  return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)


def group_options(group: Sequence[Point], num_samples: int) -> guidance.Options:
  """Host guidance options for a group laid out point by point, num_samples each."""
  options = [guidance.make_options(num_samples, p.w, **p.guidance.option_values()) for p in group]
  return jax.tree.map(lambda *a: np.concatenate(a), *options)


def row_identity(point: Point, eval_config: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of a results row that say which point and protocol it measured."""
  s = point.sampler
  return {"w": point.w, "sampler": s.canonical, "sampler_family": s.family,
          "num_steps": s.num_steps, "nfe": samplers.get(s.name).evaluations(s.num_steps),
          "guidance": point.guidance.canonical, "labels": eval_config["labels"],
          "num_samples": eval_config["num_samples"], "seed": eval_config["seed"]}
