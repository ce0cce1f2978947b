"""Guidance and its refinements in one denoising call, against their formulas (DESIGN.md §1, §5)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussian_mixture as gm
from cfdg_jax import diffusion
from cfdg_jax import guidance
from cfdg_jax import samplers

NULL = 5
B = 4


def _eps_fn(z, logsnr, labels):
  """A nonlinear ε-function of z, λ and the label (∅ = NULL differs from every class)."""
  scale = (1.0 + labels.astype(jnp.float32))[:, None, None, None]
  return (jnp.tanh(z * scale) + 0.1 * logsnr[:, None, None, None]
          - 0.3 * (labels == NULL)[:, None, None, None])


def _counting(eps_fn, calls):
  """eps_fn that records the batch size of every call that runs (not of every trace)."""
  def counted(z, logsnr, labels):
    jax.debug.callback(lambda n: calls.append(int(n)), z.shape[0])
    return eps_fn(z, logsnr, labels)
  return counted


def _inputs(batch=B):
  z = jax.random.normal(jax.random.key(0), (batch, 3, 3, 2))
  return z, jnp.float32(0.5), jnp.arange(batch) % NULL


def _guided(w=0.0, *, eps_fn=_eps_fn, clip_x=False, guide_fn=None, apg_average=None, batch=B,
            z=None, logsnr=None, **options):
  """guided_x at the test inputs; returns (x̂, apg_average, calls, examples)."""
  z0, logsnr0, labels = _inputs(batch)
  z = z0 if z is None else z
  logsnr = logsnr0 if logsnr is None else logsnr
  apg_average = jnp.zeros_like(z) if apg_average is None else apg_average
  opts = guidance.make_options(batch, w, **options)
  return guidance.guided_x(eps_fn, z, logsnr, labels, opts, apg_average, null_label=NULL,
                           clip_x=clip_x, guide_fn=guide_fn)


def _plain(w, eps_u_labels=None):
  """The paper's formula from two separate calls: x̂ of (1 + w) ε(z, c) − w ε(z, ∅)."""
  z, logsnr, labels = _inputs()
  lam = jnp.full((B,), logsnr)
  eps_c = _eps_fn(z, lam, labels)
  eps_u = _eps_fn(z, lam, jnp.full_like(labels, NULL) if eps_u_labels is None else eps_u_labels)
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (B,))[:, None, None, None]
  return diffusion.x_from_eps(z, (1 + w) * eps_c - w * eps_u, lam), eps_c, eps_u


def test_a_guided_step_is_one_network_call_on_2b_examples():
  calls = []
  _, _, n_calls, examples = _guided(2.0, eps_fn=_counting(_eps_fn, calls))
  assert calls == [2 * B] and (int(n_calls), int(examples)) == (1, 2 * B)


def test_a_guided_call_on_a_sharded_batch_moves_no_examples_between_devices():
  """Each device evaluates both passes of its own examples: no all-gather or permute of z."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  batch = 2 * jax.device_count()
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  z, logsnr, labels = _inputs(batch)
  opts = guidance.make_options(batch, 2.0)
  fn = jax.jit(lambda z, labels, opts: guidance.guided_x(
      _eps_fn, z, logsnr, labels, opts, jnp.zeros_like(z), null_label=NULL, clip_x=False)[0])
  args = jax.device_put((z, labels, opts), split)
  hlo = fn.lower(*args).compile().as_text()
  assert jax.device_count() >= 2 and re.search(r"\ball-reduce\(", hlo)  # jnp.any over examples.
  assert not re.findall(r"\b(all-gather|all-to-all|collective-permute)\(", hlo)
  np.testing.assert_allclose(fn(*args), _guided(2.0, batch=batch)[0], atol=1e-6)


@pytest.mark.parametrize("options", [{"w": 0.0}, {"w": 2.0, "interval_lo": 1.0},
                                     {"w": 2.0, "interval_hi": 0.0}])
def test_an_unguided_step_is_one_call_on_b_examples(options):
  calls = []
  x, _, n_calls, examples = _guided(eps_fn=_counting(_eps_fn, calls), **options)
  assert calls == [B] and (int(n_calls), int(examples)) == (1, B)
  np.testing.assert_allclose(x, _plain(0.0)[0], atol=1e-6)


def test_batched_guidance_equals_the_formula_from_two_calls():
  for w in (0.3, 1.0, 4.0):
    np.testing.assert_allclose(_guided(w)[0], _plain(w)[0], rtol=1e-5, atol=1e-5)
  _, eps_c, eps_u = _plain(1.0)
  assert not np.allclose(eps_c, eps_u)  # So a guidance that ignored ε(z, ∅) would show.


def test_per_example_options_equal_separate_calls():
  per_example = {"w": np.array([0.0, 0.5, 2.0, 4.0]),
                 "interval_lo": np.array([-1.0, 1.0, -np.inf, 0.0]),
                 "rescale": np.array([0.0, 0.0, 0.7, 0.0]),
                 "apg_eta": np.array([1.0, 1.0, 1.0, 0.0]),
                 "apg_norm_threshold": np.array([0.0, 0.0, 0.0, 0.5])}
  together = _guided(**per_example)[0]
  for i in range(B):
    alone = _guided(**{k: float(v[i]) for k, v in per_example.items()})[0]
    np.testing.assert_allclose(together[i], alone[i], rtol=1e-5, atol=1e-6)


def test_interval_guides_only_inside_it():
  z, _, _ = _inputs()
  inside = _guided(2.0, interval_lo=0.0, interval_hi=1.0)[0]  # λ = 0.5
  np.testing.assert_allclose(inside, _plain(2.0)[0], atol=1e-6)
  for lo, hi in ((0.6, 3.0), (-3.0, 0.4)):
    np.testing.assert_allclose(_guided(2.0, interval_lo=lo, interval_hi=hi)[0], _plain(0.0)[0],
                               atol=1e-6)
  # Per example: the examples whose interval holds λ are guided, the others not.
  x = _guided(2.0, interval_lo=np.array([0.0, 1.0, 0.0, 1.0]))[0]
  np.testing.assert_allclose(x[0::2], _plain(2.0)[0][0::2], atol=1e-6)
  np.testing.assert_allclose(x[1::2], _plain(0.0)[0][1::2], atol=1e-6)
  assert z.shape == x.shape


def test_rescale_matches_its_formula():
  z, logsnr, _ = _inputs()
  lam = jnp.full((B,), logsnr)
  plain, eps_c, _ = _plain(3.0)
  np.testing.assert_array_equal(_guided(3.0, rescale=0.0)[0], _guided(3.0)[0])
  eps_cfg = (z - diffusion.alpha_sigma(logsnr)[0] * plain) / diffusion.alpha_sigma(logsnr)[1]
  std = lambda e: np.asarray(e).reshape(B, -1).std(axis=1)[:, None, None, None]
  for phi in (0.5, 1.0):
    want = phi * eps_cfg * std(eps_c) / std(eps_cfg) + (1 - phi) * eps_cfg
    np.testing.assert_allclose(_guided(3.0, rescale=phi)[0], diffusion.x_from_eps(z, want, lam),
                               rtol=1e-4, atol=1e-4)


def test_apg_matches_its_formula():
  z, logsnr, _ = _inputs()
  lam = jnp.full((B,), logsnr)
  plain, eps_c, eps_u = _plain(2.0)
  x_c, x_u = (np.asarray(diffusion.x_from_eps(z, e, lam)) for e in (eps_c, eps_u))
  # With η = 1 and a threshold that never binds, the projection adds up to plain guidance.
  np.testing.assert_allclose(_guided(2.0, apg_norm_threshold=1e9)[0], plain, rtol=1e-4, atol=1e-4)
  flat = lambda a: a.reshape(B, -1)
  delta = x_c - x_u
  parallel = (np.sum(flat(delta * x_c), 1) / np.sum(flat(x_c**2), 1))[:, None, None, None] * x_c
  for eta in (0.0, 0.4):
    want = x_c + 2.0 * (delta - parallel + eta * parallel)
    np.testing.assert_allclose(_guided(2.0, apg_eta=eta)[0], want, rtol=1e-4, atol=1e-4)
  # η = 0: the update is orthogonal to x̂_c; a threshold r bounds its norm by w r.
  update = flat(np.asarray(_guided(2.0, apg_eta=0.0)[0]) - x_c)
  np.testing.assert_allclose(np.sum(update * flat(x_c), 1), 0.0, atol=1e-3)
  r = 0.5 * np.linalg.norm(flat(delta), axis=1).min()
  clipped = flat(np.asarray(_guided(2.0, apg_norm_threshold=r)[0]) - x_c)
  np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), 2.0 * r, rtol=1e-4)


def test_apg_momentum_carries_the_running_difference():
  z, logsnr, _ = _inputs()
  lam = jnp.full((B,), logsnr)
  _, eps_c, eps_u = _plain(2.0)
  x_c, x_u = (np.asarray(diffusion.x_from_eps(z, e, lam)) for e in (eps_c, eps_u))
  previous = np.full(z.shape, 0.3, np.float32)
  x, average, _, _ = _guided(2.0, apg_momentum=-0.5, apg_eta=1.0, apg_average=previous)
  want_average = (x_c - x_u) - 0.5 * previous
  np.testing.assert_allclose(average, want_average, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(x, x_c + 2.0 * want_average, rtol=1e-4, atol=1e-4)
  # Unguided examples keep their buffer.
  _, kept, _, _ = _guided(0.0, apg_momentum=-0.5, apg_average=previous)
  np.testing.assert_array_equal(kept, previous)


def test_dynamic_thresholding_and_clipping():
  z, logsnr, _ = _inputs()
  alpha, sigma = diffusion.alpha_sigma(logsnr)
  target = 3.0 * np.asarray(z)  # An ε-function whose x̂ is `target` exactly.
  eps_fn = lambda zz, lam, labels: (zz - alpha * 3.0 * zz) / sigma
  for p in (0.5, 0.9):
    s = np.maximum(1.0, np.quantile(np.abs(target).reshape(B, -1), p, axis=1))[:, None, None, None]
    got = _guided(1.0, eps_fn=eps_fn, dynamic_threshold=p)[0]
    np.testing.assert_allclose(got, np.clip(target, -s, s) / s, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(got)).max() <= 1.0 + 1e-6
  np.testing.assert_allclose(_guided(1.0, eps_fn=eps_fn, clip_x=True)[0],
                             np.clip(target, -1, 1), atol=1e-5)
  np.testing.assert_allclose(_guided(1.0, eps_fn=eps_fn)[0], target, rtol=1e-4, atol=1e-4)


def test_autoguidance_guides_with_the_guide_networks_conditional_prediction():
  calls = []
  guide = lambda z, lam, labels: 0.5 * _eps_fn(z, lam, labels) + 0.1
  x, _, n_calls, examples = _guided(1.5, eps_fn=_counting(_eps_fn, calls),
                                    guide_fn=_counting(guide, calls))
  assert calls == [B, B] and (int(n_calls), int(examples)) == (2, 2 * B)
  z, logsnr, labels = _inputs()
  lam = jnp.full((B,), logsnr)
  want = diffusion.x_from_eps(z, 2.5 * _eps_fn(z, lam, labels) - 1.5 * guide(z, lam, labels), lam)
  np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_guided(1.5, guide_fn=_eps_fn)[0], _plain(0.0)[0], atol=1e-6)


def test_bad_options_name_the_option_and_the_valid_values():
  for options, message in (({"rescale": 1.5}, r"rescale = \[1.5\].*\[0, 1\]"),
                           ({"apg_momentum": 0.5}, r"apg_momentum = \[0.5\].*<= 0"),
                           ({"dynamic_threshold": 1.0}, r"dynamic_threshold = \[1.0\].*\[0, 1\)"),
                           ({"interval_lo": 2.0, "interval_hi": 1.0}, r"interval_hi = \[1.0\]"),
                           ({"w": np.nan}, r"w = \[nan\]: must be finite"),
                           ({"rescale": 0.5, "apg_eta": 0.0}, "one or the other"),
                           ({"cfg_scale": 2.0}, r"Unknown guidance option\(s\) \['cfg_scale'\]")):
    with pytest.raises(ValueError, match=message):
      guidance.make_options(3, **options)
  with pytest.raises(ValueError, match=r"rescale has shape \(2,\)"):
    guidance.make_options(3, rescale=np.zeros(2))


def test_settings_canonical_forms_read_back_and_differ():
  base = guidance.config_section()
  specs = ["cfg", "cfg(rescale=0.7)", "cfg(interval_hi=2.6,interval_lo=-3.4)",
           "cfg(apg_eta=0.0,apg_momentum=-0.5,apg_norm_threshold=15.0)", "cfg(clip_x=False)",
           "cfg(dynamic_threshold=0.995)",
           "autoguidance(guide_step=2000,guide_workdir='/runs/small')"]
  canonical = [guidance.parse(s, base).canonical for s in specs]
  assert canonical == specs
  assert guidance.parse("rescale=0.7", base) == guidance.parse("cfg(rescale=0.7)", base)
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['rescal'\]"):
    guidance.parse("cfg(rescal=0.7)", base)
  with pytest.raises(ValueError, match="guide_step=3 needs guide_workdir"):
    guidance.parse("cfg(guide_step=3)", base)


# In the sampling loop, with the exact Gaussian-mixture denoiser.

@functools.cache
def _sampler(spec, counted, guide_same):
  settings = samplers.parse(spec, samplers.config_section())
  calls = []
  eps_fn = _counting(gm.eps_fn, calls) if counted else gm.eps_fn

  @jax.jit
  def run(labels, options):
    return samplers.sample(samplers.get(settings.name), settings, eps_fn, jax.random.key(0),
                           labels, options, image_shape=gm.SHAPE, null_label=gm.NUM_CLASSES,
                           logsnr_min=-20.0, logsnr_max=20.0, clip_x=False,
                           guide_fn=gm.eps_fn if guide_same else None)
  return run, calls


def _sample(spec, labels, w, *, guide_same=False, counted=False, **options):
  run, calls = _sampler(spec, counted, guide_same)
  calls.clear()
  x, stats = run(jnp.asarray(labels), guidance.make_options(len(labels), w, **options))
  return np.asarray(x), {k: int(v) for k, v in stats.items()}, list(calls)


@pytest.mark.parametrize("spec", ["ancestral(num_steps=16)", "dpmpp_2m(num_steps=12)",
                                  "heun(num_steps=6)"])
def test_intervals_in_the_loop(spec):
  labels = np.arange(6) % gm.NUM_CLASSES
  plain, plain_stats, _ = _sample(spec, labels, 2.0)
  everything, _, _ = _sample(spec, labels, 2.0, interval_lo=-30.0, interval_hi=30.0)
  np.testing.assert_array_equal(everything, plain)
  unguided, _, _ = _sample(spec, labels, 0.0)
  empty, stats, calls = _sample(spec, labels, 2.0, interval_lo=25.0, interval_hi=30.0,
                                counted=True)
  np.testing.assert_allclose(empty, unguided, atol=1e-6)
  nfe = plain_stats["network_calls"]
  assert calls == [6] * nfe and stats == {"network_calls": nfe, "examples": 6 * nfe}
  # An interval guides some steps only: fewer examples, other samples.
  part, part_stats, _ = _sample(spec, labels, 2.0, interval_lo=-3.0, interval_hi=3.0)
  assert 6 * nfe < part_stats["examples"] < 12 * nfe
  assert not np.allclose(part, plain) and not np.allclose(part, unguided)


def test_per_example_parameters_in_the_loop_equal_separate_runs():
  spec = "dpmpp_2m(num_steps=12)"
  labels = np.array([0, 1, 2, 0, 1])
  per_example = {"w": np.array([0.0, 1.0, 3.0, 2.0, 2.0]),
                 "interval_lo": np.array([-30.0, -3.0, -30.0, -30.0, -30.0]),
                 "rescale": np.array([0.0, 0.0, 0.7, 0.0, 0.0]),
                 "apg_eta": np.array([1.0, 1.0, 1.0, 0.0, 1.0]),
                 "apg_momentum": np.array([0.0, 0.0, 0.0, -0.5, 0.0]),
                 "dynamic_threshold": np.array([0.0, 0.0, 0.0, 0.0, 0.9])}
  together, _, _ = _sample(spec, labels, **per_example)
  for i in range(len(labels)):
    alone, _, _ = _sample(spec, labels, **{k: np.full(5, v[i]) for k, v in per_example.items()})
    np.testing.assert_allclose(together[i], alone[i], atol=2e-5)
  assert len({np.round(together[i].sum(), 4) for i in range(5)}) == 5


def test_autoguidance_with_the_model_itself_is_w_zero():
  labels = np.arange(6) % gm.NUM_CLASSES
  unguided, _, _ = _sample("dpmpp_2m(num_steps=12)", labels, 0.0)
  same, stats, _ = _sample("dpmpp_2m(num_steps=12)", labels, 3.0, guide_same=True)
  np.testing.assert_allclose(same, unguided, atol=1e-5)
  assert stats == {"network_calls": 24, "examples": 144}  # Two B-example calls a step.
