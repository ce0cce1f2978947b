"""Classifier-free guidance (Ho & Salimans 2022) and its later refinements, for one denoising call.

The paper's guidance: ε̃(z, c) = (1 + w) ε(z, c) − w ε(z, ∅), with the conditional and unconditional
passes in ONE network call on 2B examples: z_0, z_0, z_1, z_1, … with labels c_0, ∅, c_1, ∅, ….
w = 0 is the plain conditional model; libraries that write ε_u + s (ε_c − ε_u) use s = 1 + w.

Refinements, each a per-example number that leaves plain guidance unchanged at its default:
  interval_lo, interval_hi   guidance only for λ in [lo, hi] (Kynkäänniemi et al. 2024); where
                             no example of the batch is guided at a step, only the conditional
                             pass runs (one call on B examples instead of 2B);
  rescale                    φ: ε ← φ ε̃ std(ε_c)/std(ε̃) + (1 − φ) ε̃ per example (Lin et al. 2023);
  apg_eta, apg_norm_threshold, apg_momentum
                             adaptive projected guidance on x̂ (Sadat et al. 2024): Δ = x̂_c − x̂_u,
                             Δ ← Δ + β Δ_prev, Δ ← Δ min(1, r/‖Δ‖), x̂ = x̂_c + w (Δ_⊥ + η Δ_∥);
                             η = 1, r = 0 (off) and β = 0 is plain guidance;
  dynamic_threshold          p: x̂ ← clip(x̂, −s, s)/s with s = max(1, quantile_p |x̂|) (Saharia et
                             al. 2022); 0 is off, and then `clip_x` clips x̂ to [−1, 1].
Autoguidance (Karras et al. 2024) replaces ε(z, ∅) by a weaker guide network's ε_guide(z, c); the
two networks run in the same jitted step.

Shapes: z [B, H, W, C]; λ a scalar or [B]; labels [B]; every option [B] (or a scalar on the host).
"""
import dataclasses
import math
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cfdg_jax import diffusion
from cfdg_jax import specs

EpsFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]

# The per-example options and their defaults (the values that leave plain guidance unchanged).
# None bounds mean an unbounded interval.
OPTIONS = {"interval_lo": None, "interval_hi": None, "rescale": 0.0, "apg_eta": 1.0,
           "apg_norm_threshold": 0.0, "apg_momentum": 0.0, "dynamic_threshold": 0.0}
# Settings that change what is compiled: x̂ clipping, and the guide network of autoguidance.
STATIC = {"clip_x": True, "guide_workdir": None, "guide_step": None}
FIELDS = {**OPTIONS, **STATIC}


@flax.struct.dataclass
class Options:
  """Per-example guidance parameters, each float32 [B]; see the module docstring."""
  w: jax.Array
  interval_lo: jax.Array
  interval_hi: jax.Array
  rescale: jax.Array
  apg_eta: jax.Array
  apg_norm_threshold: jax.Array
  apg_momentum: jax.Array
  dynamic_threshold: jax.Array


def make_options(batch: int, w: Any = 0.0, **options: Any) -> Options:
  """Host Options of length `batch` from scalars or [batch] arrays; checked (ValueError).

  Unnamed options take their defaults; an interval bound of None is unbounded.
  """
  if unknown := sorted(set(options) - set(OPTIONS)):
    raise ValueError(f"Unknown guidance option(s) {unknown}; the options are {sorted(OPTIONS)}.")
  values = {}
  for name, value in {"w": w, **OPTIONS, **options}.items():
    if value is None:
      value = -np.inf if name == "interval_lo" else np.inf
    value = np.asarray(value, np.float32)
    try:
      values[name] = np.broadcast_to(value, (batch,)).copy()
    except ValueError as e:
      raise ValueError(f"Guidance option {name} has shape {value.shape}; give a scalar or one "
                       f"value per example ({batch},).") from e
  check_options(values)
  return Options(**values)


def check_options(values: Mapping[str, np.ndarray]) -> None:
  """Raises ValueError naming the option, the bad values and the valid range."""
  def bad(name, ok, valid):
    if not np.all(ok):
      raise ValueError(f"Guidance option {name} = {np.unique(values[name][~ok])[:5].tolist()}: "
                       f"{valid}.")

  v = values
  for name in ("w", "rescale", "apg_eta", "apg_norm_threshold", "apg_momentum",
               "dynamic_threshold"):
    bad(name, np.isfinite(v[name]), "must be finite")
  bad("interval_lo", ~np.isnan(v["interval_lo"]), "must be a number (None: unbounded)")
  bad("interval_hi", v["interval_hi"] >= v["interval_lo"],
      "must be >= interval_lo (guidance applies for interval_lo <= λ <= interval_hi)")
  bad("rescale", (v["rescale"] >= 0) & (v["rescale"] <= 1), "φ lies in [0, 1] (0: off)")
  bad("apg_norm_threshold", v["apg_norm_threshold"] >= 0, "r must be >= 0 (0: no threshold)")
  bad("apg_momentum", v["apg_momentum"] <= 0, "β must be <= 0 (Sadat et al. use −0.5; 0: off)")
  bad("dynamic_threshold", (v["dynamic_threshold"] >= 0) & (v["dynamic_threshold"] < 1),
      "the percentile p lies in [0, 1), e.g. 0.995 (0: off)")
  apg = (v["apg_eta"] != 1) | (v["apg_norm_threshold"] > 0) | (v["apg_momentum"] != 0)
  bad("rescale", ~((v["rescale"] > 0) & apg),
      "rescale applies to plain guidance, not with APG (apg_eta != 1, apg_norm_threshold or "
      "apg_momentum): use one or the other")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Guidance settings of one evaluation row or sampling call: options plus static fields."""
  options: tuple[tuple[str, Any], ...] = ()  # Non-default OPTIONS, sorted.
  clip_x: bool = True
  guide_workdir: str | None = None  # Autoguidance: the guide network's workdir and step.
  guide_step: int | None = None

  @property
  def canonical(self) -> str:
    """E.g. "cfg", "cfg(rescale=0.7)", "autoguidance(guide_step=2000,guide_workdir='/runs/s')"."""
    fields = dict(self.options)
    if not self.clip_x:
      fields["clip_x"] = False
    if self.guide_workdir:
      fields.update(guide_workdir=self.guide_workdir, guide_step=self.guide_step)
    return specs.format_spec("autoguidance" if self.guide_workdir else "cfg", fields)

  def option_values(self) -> dict[str, Any]:
    return {**OPTIONS, **dict(self.options)}


def settings_from_config(section: Mapping[str, Any]) -> Settings:
  """Settings from a config.sample.guidance section (a mapping of FIELDS); checked."""
  if unknown := sorted(set(section) - set(FIELDS)):
    raise ValueError(f"Unknown guidance field(s) {unknown}; the fields are {sorted(FIELDS)}.")
  options = {}
  for name, default in OPTIONS.items():
    value = section.get(name, default)
    value = None if value is None else float(value)
    if value != default:
      options[name] = value
  make_options(1, **options)  # Checks the values.
  workdir, step = section.get("guide_workdir"), section.get("guide_step")
  if step is not None and not workdir:
    raise ValueError(f"guide_step={step} needs guide_workdir, the guide network's workdir.")
  return Settings(tuple(sorted(options.items())), bool(section.get("clip_x", True)),
                  workdir or None, None if step is None else int(step))


def parse(spec: str, base: Mapping[str, Any]) -> Settings:
  """Settings from "cfg", "cfg(rescale=0.7,...)" or "k=v,..." on top of `base` (a config section).

  "autoguidance(guide_workdir=...,guide_step=...)", as results rows write it, reads back too.
  """
  name, fields = specs.parse_spec(spec, default_name="cfg")
  if name not in ("cfg", "autoguidance"):
    raise ValueError(f"Guidance spec {spec!r}: the name is 'cfg' (or 'autoguidance', as "
                     "written in results), e.g. cfg(rescale=0.7).")
  if unknown := sorted(set(fields) - set(FIELDS)):
    raise ValueError(f"Guidance spec {spec!r} has unknown field(s) {unknown}; the fields are "
                     f"{sorted(FIELDS)}.")
  return settings_from_config({**base, **fields})


def config_section(**overrides: Any):
  """The config.sample.guidance section: every field at its default, then `overrides`."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  placeholder = ml_collections.config_dict.placeholder
  section = ml_collections.ConfigDict({
      "interval_lo": placeholder(float), "interval_hi": placeholder(float),
      "guide_workdir": placeholder(str), "guide_step": placeholder(int),
      **{k: v for k, v in FIELDS.items() if v is not None}})
  section.update(overrides)
  return section


def _bcast(a: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _sum(x: jnp.ndarray) -> jnp.ndarray:
  """Sum over the pixel axes, kept for broadcasting: [B, ...] -> [B, 1, ...]."""
  return jnp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def _std(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.std(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def guided_x(eps_fn: EpsFn, z: jnp.ndarray, logsnr: jnp.ndarray, labels: jnp.ndarray,
             options: Options, apg_average: jnp.ndarray, *, null_label: int, clip_x: bool,
             guide_fn: EpsFn | None = None
             ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The guided x̂ at (z, λ), from one 2B-example network call (or B when nobody is guided).

  Args:
    eps_fn: (z [N,H,W,C], λ [N], labels [N]) -> ε̂ [N,H,W,C], the main network.
    z: [B, H, W, C] latents at λ.
    logsnr: scalar or [B] λ.
    labels: [B] int class ids in 0..K−1.
    options: per-example guidance parameters.
    apg_average: [B, H, W, C] APG's momentum buffer (zeros at the start); returned updated where
      the example was guided at this λ.
    null_label: K, the id of ∅.
    clip_x: clip x̂ to [−1, 1] where dynamic_threshold is 0.
    guide_fn: autoguidance's guide network, called with the same labels; None: ε(z, ∅).
  Returns:
    (x̂ [B,H,W,C], apg_average, network calls, examples evaluated): the last two int32 scalars.
  """
  batch = z.shape[0]
  logsnr = jnp.broadcast_to(logsnr, (batch,))
  inside = (options.interval_lo <= logsnr) & (logsnr <= options.interval_hi)
  w = jnp.where(inside, options.w, 0.0)
  guided = jnp.any(w != 0)

  def both(_):
    if guide_fn is not None:
      return eps_fn(z, logsnr, labels), guide_fn(z, logsnr, labels)
    # Interleaved [z_0, z_0, z_1, z_1, ...], not [z, z]: with the batch sharded over devices,
    # each device then evaluates both passes of its own examples, and nothing moves between them.
    pair = lambda c, u: jnp.stack([c, u], axis=1).reshape(2 * batch, *c.shape[1:])
    eps = eps_fn(pair(z, z), pair(logsnr, logsnr), pair(labels, jnp.full_like(labels, null_label)))
    eps = eps.reshape(batch, 2, *z.shape[1:])
    return eps[:, 0], eps[:, 1]

  def conditional_only(_):
    eps = eps_fn(z, logsnr, labels)
    return eps, eps

  eps_c, eps_u = jax.lax.cond(guided, both, conditional_only, None)
  calls = jnp.where(guided, 1 if guide_fn is None else 2, 1).astype(jnp.int32)
  examples = jnp.where(guided, 2 * batch, batch).astype(jnp.int32)

  # Plain guidance in ε, optionally rescaled toward the conditional prediction's std.
  wb = _bcast(w, z)
  eps = (1.0 + wb) * eps_c - wb * eps_u
  phi = _bcast(options.rescale, z)
  std_eps = _std(eps)
  rescaled = eps * _std(eps_c) / jnp.where(std_eps > 0, std_eps, 1.0)
  eps = jnp.where(phi > 0, phi * rescaled + (1.0 - phi) * eps, eps)
  x = diffusion.x_from_eps(z, eps, logsnr)

  # Adaptive projected guidance on x̂.
  x_c = diffusion.x_from_eps(z, eps_c, logsnr)
  delta = x_c - diffusion.x_from_eps(z, eps_u, logsnr)
  delta = delta + _bcast(options.apg_momentum, z) * apg_average
  apg_average = jnp.where(_bcast(w != 0, z), delta, apg_average)
  r = _bcast(options.apg_norm_threshold, z)
  norm = jnp.sqrt(_sum(jnp.square(delta)))
  delta = jnp.where(r > 0, delta * jnp.minimum(1.0, r / jnp.where(norm > 0, norm, 1.0)), delta)
  norm_c = _sum(jnp.square(x_c))
  parallel = _sum(delta * x_c) / jnp.where(norm_c > 0, norm_c, 1.0) * x_c
  eta = _bcast(options.apg_eta, z)
  x_apg = x_c + wb * (delta - parallel + eta * parallel)
  use_apg = (options.apg_eta != 1) | (options.apg_norm_threshold > 0) | (options.apg_momentum != 0)
  x = jnp.where(_bcast(use_apg, z), x_apg, x)
  return _threshold(x, options.dynamic_threshold, clip_x), apg_average, calls, examples


def _threshold(x: jnp.ndarray, percentile: jnp.ndarray, clip_x: bool) -> jnp.ndarray:
  """Dynamic thresholding where percentile > 0, else clipping to [−1, 1] (if clip_x)."""
  flat = jnp.abs(x).reshape(x.shape[0], -1)
  s = jnp.maximum(1.0, jax.vmap(jnp.quantile)(flat, percentile))
  s = _bcast(s, x)
  dynamic = jnp.clip(x, -s, s) / s
  return jnp.where(_bcast(percentile > 0, x), dynamic, jnp.clip(x, -1.0, 1.0) if clip_x else x)


def interval_from_sigma(sigma_lo: float, sigma_hi: float) -> tuple[float, float]:
  """An EDM-style σ interval (σ_lo, σ_hi], σ = σ/α = e^(−λ/2), as (interval_lo, interval_hi) in λ."""
  return -2.0 * math.log(sigma_hi), -2.0 * math.log(sigma_lo)
