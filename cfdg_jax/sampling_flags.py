"""Sampler and guidance flags of the sample and evaluate entry points.

Generated from the sampler registry and guidance.FIELDS, so a new sampler field or guidance
option is a flag without new code:
  --sampler NAME or 'NAME(field=value,...)'  --steps N  --grid G  --logsnr_min/--logsnr_max
  --<sampler>.<field>   each sampler's own fields, e.g. --ddim.eta=0.5, --ancestral.v=0.2
  --<option>            guidance options, e.g. --rescale=0.7, --interval_lo=-3.4, --apg_eta=0
  --clip_x, --guide_workdir DIR, --guide_step N   x̂ clipping; autoguidance's guide network
Unset flags keep the config's values. The mesh is the checkpoint's config.mesh; --fsdp N
splits the parameters over N devices instead.
"""
from typing import Any

from absl import app
from absl import flags

from cfdg_jax import guidance
from cfdg_jax import samplers
from cfdg_jax import specs

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}

flags.DEFINE_string("sampler", None, "Sampler: a name (" + ", ".join(samplers.SAMPLERS) + ") or "
                    "'name(field=value,...)', e.g. 'ddim(eta=0.5)'. Default: the config's "
                    "sample.sampler.")
flags.DEFINE_integer("steps", None, "The sampler's num_steps (ancestral: T levels).")
flags.DEFINE_enum("grid", None, samplers.GRIDS, "The λ grid of the sampler's steps.")
flags.DEFINE_float("logsnr_min", None, "The grid's noisiest λ (default: the model's).")
flags.DEFINE_float("logsnr_max", None, "The grid's cleanest λ (default: the model's).")
for _sampler in samplers.SAMPLERS.values():
  for _field, _default in _sampler.fields.items():
    _DEFINE[type(_default)](f"{_sampler.name}.{_field}", None,
                            f"{_sampler.name}'s {_field} (default {_default!r}).")
for _option in guidance.OPTIONS:
  flags.DEFINE_float(_option, None, f"Guidance option {_option} (cfdg_jax/guidance.py); "
                     "default: the config's.")
flags.DEFINE_bool("clip_x", None, "Clip x̂ to [-1, 1] at every step (default: the config's).")
flags.DEFINE_string("guide_workdir", None, "Autoguidance: guide with this training workdir's "
                    "checkpoint (a weaker model of the same data) instead of the null label.")
flags.DEFINE_integer("guide_step", None, "Autoguidance: the guide's checkpoint step (default: "
                     "its newest).")
flags.DEFINE_integer("fsdp", None, "Devices each large parameter is split over (the mesh's fsdp "
                     "axis; the batch is split over all devices). Default: the checkpoint's "
                     "config.mesh.")
FLAGS = flags.FLAGS


def sampler_spec(default_name: str | None) -> str | None:
  """The sampler flags as one spec, or None when none is set; UsageError on a mismatch.

  default_name: the sampler when only other sampler flags are given (None: --sampler is needed).
  """
  common = {field: FLAGS[flag].value for flag, field in (
      ("steps", "num_steps"), ("grid", "grid"), ("logsnr_min", "logsnr_min"),
      ("logsnr_max", "logsnr_max")) if FLAGS[flag].value is not None}
  own = {(s.name, f): FLAGS[f"{s.name}.{f}"].value for s in samplers.SAMPLERS.values()
         for f in s.fields if FLAGS[f"{s.name}.{f}"].value is not None}
  if FLAGS.sampler is None and not (common or own):
    return None
  if FLAGS.sampler is None and default_name is None:
    raise app.UsageError("The sampler flags (--steps, --grid, --<sampler>.<field>) need "
                         "--sampler NAME here.")
  try:
    name, fields = specs.parse_spec(FLAGS.sampler or default_name)
    samplers.get(name)
  except ValueError as e:
    raise app.UsageError(f"--sampler={FLAGS.sampler!r}: {e}") from e
  for (owner, field), value in own.items():
    if owner != name:
      raise app.UsageError(f"--{owner}.{field} is a field of {owner}, but the sampler is "
                           f"{name}: pass --sampler {owner}, or drop it.")
    fields[field] = value
  return specs.format_spec(name, {**fields, **common})


def guidance_overrides() -> dict[str, Any]:
  """The guidance flags that are set, as config.sample.guidance fields."""
  overrides = {name: FLAGS[name].value for name in (*guidance.OPTIONS, "clip_x", "guide_workdir",
                                             "guide_step")}
  if overrides["guide_step"] is not None and not overrides["guide_workdir"]:
    raise app.UsageError("--guide_step needs --guide_workdir (the guide network's workdir).")
  return {k: v for k, v in overrides.items() if v is not None}
