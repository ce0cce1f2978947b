"""The loop every sampler shares: one `lax.fori_loop` over a λ grid, inside one jitted function.

A sampler is a `Sampler`: a `step` that moves the loop `State` from grid level i to level i + 1
(calling `ctx.denoise` for each guided x̂ it needs), an `init` for its own carry (a multistep
solver keeps its previous x̂ there), and how many levels and denoiser evaluations num_steps
means. Guidance (guidance.py) sits behind `ctx.denoise`, so every sampler takes every guidance
method. Shapes: z, x [B, H, W, C]; λ scalars (one level for the whole batch).
"""
import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp

from cfdg_jax import diffusion
from cfdg_jax import guidance
from cfdg_jax import specs

GRIDS = ("cosine", "uniform", "karras")
KARRAS_RHO = 7.0  # EDM's ρ (Karras et al. 2022, eq. 5).


def logsnr_grid(grid: str, num_levels: int, logsnr_min: float, logsnr_max: float) -> jnp.ndarray:
  """λ levels from λ_min (noisiest, first) to λ_max; [num_levels].

  "cosine": the training schedule at uniformly spaced u (the paper's sampler); "uniform":
  uniformly spaced λ (DPM-Solver's); "karras": EDM's σ_i^(1/ρ) uniformly spaced, ρ = 7, in
  σ = e^(−λ/2).
  """
  if num_levels < 2:
    raise ValueError(f"A λ grid needs at least 2 levels (got {num_levels}).")
  if grid == "cosine":
    return diffusion.logsnr_schedule_cosine(jnp.linspace(1.0, 0.0, num_levels), logsnr_min,
                                            logsnr_max)
  t = jnp.linspace(0.0, 1.0, num_levels)
  if grid == "uniform":
    return logsnr_min + t * (logsnr_max - logsnr_min)
  if grid == "karras":
    root_max, root_min = (jnp.exp(-0.5 * l / KARRAS_RHO) for l in (logsnr_min, logsnr_max))
    return -2.0 * KARRAS_RHO * jnp.log(root_max + t * (root_min - root_max))
  raise ValueError(f"Unknown λ grid {grid!r}; use one of {GRIDS}.")


@flax.struct.dataclass
class State:
  """The loop carry."""
  z: jax.Array  # [B, H, W, C] latent at the current level.
  aux: Any  # The sampler's own carry.
  apg_average: jax.Array  # [B, H, W, C] APG's momentum buffer (guidance.guided_x).
  calls: jax.Array  # int32: network calls so far (a guided 2B-example call counts once).
  examples: jax.Array  # int32: examples evaluated by the networks so far.


@dataclasses.dataclass(frozen=True)
class Context:
  """What a sampler's step sees besides the state."""
  logsnrs: jax.Array  # [L] the grid.
  num_steps: int
  fields: Mapping[str, Any]  # The sampler's own settings (static).
  noise: Callable[[Any], jax.Array]  # i -> [B, H, W, C] N(0, I), fixed by (rng, i, example id).
  guided_x: Callable[..., tuple]  # (z, λ, apg_average) -> (x̂, apg_average, calls, examples).

  def denoise(self, state: State, z: jax.Array, logsnr: jax.Array) -> tuple[jax.Array, State]:
    """The guided x̂ at (z, λ), and the state with APG's buffer and the counters updated."""
    x, apg_average, calls, examples = self.guided_x(z, logsnr, state.apg_average)
    return x, state.replace(apg_average=apg_average, calls=state.calls + calls,
                            examples=state.examples + examples)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """One sampler. num_steps N means N steps over N + 1 levels (ancestral: N levels, see below)."""
  name: str
  fields: Mapping[str, Any]  # Its own settings, with their defaults.
  step: Callable[[Context, jax.Array, State], State]  # Level i -> i + 1.
  evaluations: Callable[[int], int] = lambda num_steps: num_steps  # Denoiser calls for N steps.
  init: Callable[[jax.Array], Any] = lambda z: ()
  # True: the last level is evaluated and its x̂ returned (the paper's Algorithm 2: T levels,
  # T − 1 transitions, T evaluations); `step` then runs at the last level too (i = L − 1) and
  # puts that x̂ in z, so the program holds one network call site, not two (half the compile
  # time). False: z/α at the last level is returned.
  final_denoise: bool = False
  min_steps: int = 1
  check: Callable[[Mapping[str, Any]], None] = lambda fields: None  # Raises ValueError.
  grid: str = "cosine"  # Its λ grid, and the grid's ends (None: the model's λ range), unless
  logsnr_range: tuple[float, float] | None = None  # the setting names others.

  def num_levels(self, num_steps: int) -> int:
    return num_steps if self.final_denoise else num_steps + 1

  def loop_trips(self, num_steps: int) -> int:
    """Iterations of the sampling loop: one per transition, and the last level's x̂."""
    return self.num_levels(num_steps) - 1 + int(self.final_denoise)


def check_range(field: str, lo: float, hi: float, meaning: str) -> Callable[[Mapping], None]:
  """A Sampler.check that `field` lies in [lo, hi]."""
  def check(fields):
    if not lo <= fields[field] <= hi:
      raise ValueError(f"{field}={fields[field]}: {meaning} lies in [{lo:g}, {hi:g}].")
  return check


@dataclasses.dataclass(frozen=True)
class Settings:
  """A sampler setting: hashable, so it keys compilations and results rows."""
  name: str
  num_steps: int
  grid: str = "cosine"
  logsnr_min: float | None = None  # The grid's ends; None: the model's (config.diffusion).
  logsnr_max: float | None = None
  fields: tuple[tuple[str, Any], ...] = ()  # The sampler's own fields, sorted by name.

  def __getitem__(self, key: str) -> Any:
    return dict(self.fields)[key]

  @property
  def canonical(self) -> str:
    """E.g. "ddim(eta=0.0,grid='cosine',num_steps=50)": what results rows and plots are keyed by.

    Grid ends are written only when set (None: the model's λ range).
    """
    return specs.format_spec(self.name, {"num_steps": self.num_steps, **self._other_fields()})

  @property
  def family(self) -> str:
    """The canonical form without num_steps: settings that differ only in their step count."""
    return specs.format_spec(self.name, self._other_fields())

  def _other_fields(self) -> dict[str, Any]:
    ends = {k: v for k, v in (("logsnr_min", self.logsnr_min), ("logsnr_max", self.logsnr_max))
            if v is not None}
    return {"grid": self.grid, **ends, **dict(self.fields)}


def sample(sampler: Sampler, settings: Settings, eps_fn: guidance.EpsFn, rng: jax.Array,
           labels: jnp.ndarray, options: guidance.Options, *, image_shape: tuple[int, int, int],
           null_label: int, logsnr_min: float, logsnr_max: float, clip_x: bool = True,
           ids: jnp.ndarray | None = None, guide_fn: guidance.EpsFn | None = None
           ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Runs `sampler` from z ~ N(0, I) at λ_min; call it inside jax.jit.

  Args:
    sampler, settings: the sampler and its setting (settings.name == sampler.name).
    eps_fn: (z [N,H,W,C], λ [N], labels [N]) -> ε̂; guided calls stack [c, ∅] into N = 2B.
    rng: key; the same key gives the same samples.
    labels: [B] int class ids.
    options: per-example guidance parameters (guidance.make_options).
    image_shape: (H, W, C).
    null_label: K.
    logsnr_min, logsnr_max: the model's λ range: the grid's ends unless settings set others.
    clip_x: clip x̂ to [−1, 1] (where dynamic thresholding is off).
    ids: [B] ints (default 0..B−1). Example i's noise depends only on (rng, ids[i]), so a sample
      does not change with the batch it is in, and equal ids share their noise (a w sweep of the
      same draws).
    guide_fn: autoguidance's guide network (replaces ε(z, ∅)).
  Returns:
    (float32 x [B, H, W, C], {"network_calls", "examples"}: int32 counts for the batch).
  """
  ids = jnp.arange(labels.shape[0]) if ids is None else ids
  rng_init, rng_steps = jax.random.split(rng)

  def noise(key):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape))(ids)

  def guided_x(z, logsnr, apg_average):
    return guidance.guided_x(eps_fn, z, logsnr, labels, options, apg_average,
                             null_label=null_label, clip_x=clip_x, guide_fn=guide_fn)

  logsnrs = logsnr_grid(settings.grid, sampler.num_levels(settings.num_steps),
                        logsnr_min if settings.logsnr_min is None else settings.logsnr_min,
                        logsnr_max if settings.logsnr_max is None else settings.logsnr_max)
  ctx = Context(logsnrs, settings.num_steps, dict(settings.fields),
                lambda i: noise(jax.random.fold_in(rng_steps, i)), guided_x)
  z = noise(rng_init)
  zero = jnp.zeros((), jnp.int32)
  state = State(z=z, aux=sampler.init(z), apg_average=jnp.zeros_like(z), calls=zero,
                examples=zero)
  state = jax.lax.fori_loop(0, sampler.loop_trips(settings.num_steps),
                            lambda i, s: sampler.step(ctx, i, s), state)
  if sampler.final_denoise:
    x = state.z
  else:
    alpha, _ = diffusion.alpha_sigma(logsnrs[-1])
    x = state.z / alpha
  return x, {"network_calls": state.calls, "examples": state.examples}
