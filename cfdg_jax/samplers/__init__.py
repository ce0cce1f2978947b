"""Samplers: one module each, all run by the one loop of `core.sample`.

  ancestral  the paper's Algorithm 2 (T levels, T evaluations; v)
  ddim       DDIM, deterministic (η = 0) or stochastic (η)
  dpmpp_2m   DPM-Solver++(2M), data-prediction multistep (lower_order_final)
  heun       EDM's 2nd-order Heun solver of the probability-flow ODE (2N − 1 evaluations)

A setting is the config section config.sample.sampler = {name, num_steps, grid, logsnr_min,
logsnr_max (the λ grid and its ends; None: the sampler's own), and one subsection of fields per
sampler}, or the string "name(field=value,...)", whose canonical form
(`Settings.canonical`) keys results rows, TensorBoard tags and plots. A new sampler is one module
with a `SAMPLER`, listed below; its fields appear in configs and CLIs by themselves.
"""
from typing import Any, Mapping

from cfdg_jax import specs
from cfdg_jax.samplers import ancestral
from cfdg_jax.samplers import core
from cfdg_jax.samplers import ddim
from cfdg_jax.samplers import dpmpp_2m
from cfdg_jax.samplers import heun
from cfdg_jax.samplers.core import GRIDS, Settings, logsnr_grid, sample  # noqa: F401

SAMPLERS = {s.name: s for s in (ancestral.SAMPLER, ddim.SAMPLER, dpmpp_2m.SAMPLER, heun.SAMPLER)}
COMMON_FIELDS = ("name", "num_steps", "grid", "logsnr_min", "logsnr_max")


def get(name: str) -> core.Sampler:
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; the samplers are {sorted(SAMPLERS)}.")
  return SAMPLERS[name]


def config_section(name: str = "ancestral", num_steps: int = 128, **fields: Mapping[str, Any]):
  """config.sample.sampler: the common fields and every sampler's own subsection.

  grid, logsnr_min and logsnr_max are None: each sampler's own (see its module).
  fields: per-sampler overrides, e.g. ancestral={"v": 0.2}.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  placeholder = ml_collections.config_dict.placeholder
  section = ml_collections.ConfigDict({"name": name, "num_steps": num_steps,
                                       "grid": placeholder(str), "logsnr_min": placeholder(float),
                                       "logsnr_max": placeholder(float)})
  for sampler in SAMPLERS.values():
    section[sampler.name] = ml_collections.ConfigDict(dict(sampler.fields))
  for sampler_name, values in fields.items():
    get(sampler_name)
    section[sampler_name].update(values)
  return section


def settings_from_config(section: Mapping[str, Any]) -> Settings:
  """Settings from a config.sample.sampler section; ValueError names the bad field."""
  if missing := [f for f in COMMON_FIELDS if f not in section]:
    raise ValueError(f"config.sample.sampler lacks {missing}.")
  if unknown := sorted(set(section) - set(COMMON_FIELDS) - set(SAMPLERS)):
    raise ValueError(f"Unknown config.sample.sampler field(s) {unknown}; the fields are "
                     f"{list(COMMON_FIELDS)} and one section per sampler {sorted(SAMPLERS)}.")
  sampler = get(section["name"])
  num_steps = section["num_steps"]
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < sampler.min_steps:
    raise ValueError(f"num_steps={num_steps!r}: {sampler.name} needs an integer >= "
                     f"{sampler.min_steps}.")
  grid = section["grid"] or sampler.grid
  if grid not in GRIDS:
    raise ValueError(f"grid={grid!r}: use one of {GRIDS} (None: the sampler's own).")
  ends = [default if section[k] is None else float(section[k]) for k, default in zip(
      ("logsnr_min", "logsnr_max"), sampler.logsnr_range or (None, None))]
  if None not in ends and not ends[0] < ends[1]:
    raise ValueError(f"logsnr_min={ends[0]} must be below logsnr_max={ends[1]} (None: the "
                     "model's config.diffusion range).")
  own = dict(section.get(sampler.name) or {})
  if unknown := sorted(set(own) - set(sampler.fields)):
    raise ValueError(f"Unknown {sampler.name} field(s) {unknown}; its fields are "
                     f"{sorted(sampler.fields)}.")
  fields = {}
  for key, default in sampler.fields.items():
    value = own.get(key, default)
    try:
      fields[key] = type(default)(value)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{sampler.name} field {key}={value!r} is not a "
                       f"{type(default).__name__}.") from e
    if isinstance(default, bool) and not isinstance(value, bool):
      raise ValueError(f"{sampler.name} field {key}={value!r} must be True or False.")
  sampler.check(fields)
  return Settings(sampler.name, num_steps, grid, *ends, tuple(sorted(fields.items())))


def parse(spec: str, base: Mapping[str, Any], **overrides: Any) -> Settings:
  """Settings from "name" or "name(field=value,...)" on top of a config.sample.sampler section.

  Fields not given take `base`'s values, e.g. parse("ddim(eta=0.5)", config.sample.sampler) keeps
  its num_steps and grid; `overrides` (e.g. num_steps=20) come last.
  """
  name, fields = specs.parse_spec(spec)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  sampler = get(name)
  section = {k: base[k] for k in COMMON_FIELDS}
  section["name"] = name
  own = dict(base.get(name) or sampler.fields)
  for key, value in fields.items():
    if key in COMMON_FIELDS[1:]:
      section[key] = value
    elif key in sampler.fields:
      own[key] = value
    else:
      raise ValueError(f"Sampler spec {spec!r}: {name} has no field {key!r}; its fields are "
                       f"{sorted((*COMMON_FIELDS[1:], *sampler.fields))}.")
  section[name] = own
  return settings_from_config(section)
