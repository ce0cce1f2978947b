"""Every sampler against the closed forms of class-conditional Gaussian data (gaussian_mixture.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussian_mixture as gm
from cfdg_jax import diffusion
from cfdg_jax import guidance
from cfdg_jax import samplers

K = gm.NUM_CLASSES


@functools.cache
def _compiled(spec, clip_x, with_ids):
  settings = samplers.parse(spec, samplers.config_section())
  sampler = samplers.get(settings.name)

  def run(rng, labels, options, ids):
    return samplers.sample(sampler, settings, gm.eps_fn, rng, labels, options,
                           image_shape=gm.SHAPE, null_label=K, logsnr_min=-20.0,
                           logsnr_max=20.0, clip_x=clip_x, ids=ids if with_ids else None)
  return jax.jit(run)


def run(spec, labels, w=0.0, *, seed=0, clip_x=False, ids=None, **options):
  """(x [B, 4, 4, 1] as numpy, stats) of `spec` with the exact Gaussian-mixture denoiser."""
  labels = jnp.asarray(labels)
  opts = guidance.make_options(labels.shape[0], w, **options)
  x, stats = _compiled(spec, clip_x, ids is not None)(jax.random.key(seed), labels, opts, ids)
  return np.asarray(x), {k: int(v) for k, v in stats.items()}


def per_class(spec, n, seed=0):
  """Samples of each class at w = 0: [K, n, 16]."""
  x, _ = run(spec, np.repeat(np.arange(K), n), seed=seed)
  return x.reshape(K, n, -1)


def levels(spec):
  settings = samplers.parse(spec, samplers.config_section())
  sampler = samplers.get(settings.name)
  lo = -20.0 if settings.logsnr_min is None else settings.logsnr_min
  hi = 20.0 if settings.logsnr_max is None else settings.logsnr_max
  return gm.grid(settings.grid, sampler.num_levels(settings.num_steps), lo, hi), dict(
      settings.fields)


def assert_law(x, mean, var, n_sd=5.0):
  """Per class: every pixel's mean, and the variance pooled over pixels, within n_sd standard
  errors of (mean, var)."""
  n = x.shape[0]
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), n_sd * np.sqrt(var / n))
  pooled = x.var(0).mean()
  assert abs(pooled / var - 1) < n_sd * np.sqrt(2 / (n * x.shape[1])), (pooled, var)


# 1. Each sampler's output law equals its exact discretised law (any bug in a coefficient shows).
@pytest.mark.parametrize("spec", [
    "ancestral(num_steps=32,v=0.3)", "ancestral(num_steps=32,v=1.0)",
    # A low λ_max: the sample is x̂ at the last level, visibly not z there.
    "ancestral(num_steps=16,grid='cosine',logsnr_min=-10.0,logsnr_max=3.0)", "ddim(num_steps=16)",
    "ddim(num_steps=16,eta=0.5)", "ddim(num_steps=16,eta=1.0)", "dpmpp_2m(num_steps=12)",
    "dpmpp_2m(num_steps=8,grid='uniform')", "dpmpp_2m(num_steps=12,lower_order_final=False)",
    "heun(num_steps=8)", "heun(num_steps=8,grid='cosine',logsnr_min=-10.0,logsnr_max=12.0)"])
def test_sampler_law_equals_its_exact_discretised_law(spec):
  x = per_class(spec, 2000)
  lams, fields = levels(spec)
  for c in range(K):
    mean, var = gm.exact_law(samplers.parse(spec, samplers.config_section()).name, lams,
                             gm.MEANS[c].ravel(), gm.STDS[c], **fields)
    assert_law(x[c], mean, var)


def test_exact_laws_notice_a_wrong_coefficient():
  """The comparison above can fail: DPM-Solver++'s law moves when its second-order term does."""
  lams, _ = levels("dpmpp_2m(num_steps=12)")
  right = gm.exact_law("dpmpp_2m", lams, gm.MEANS[0].ravel(), gm.STDS[0])
  first_order = gm.exact_law("ddim", lams, gm.MEANS[0].ravel(), gm.STDS[0])
  assert abs(right[1] / first_order[1] - 1) > 0.1


# 2. At the step counts users run, each sampler reproduces the data, within sampling error and
# its discretisation error at that T, which the exact law bounds.
@pytest.mark.parametrize("spec,allowance", [
    ("ancestral(num_steps=512)", 0.02), ("ddim(num_steps=200)", 0.03),
    ("dpmpp_2m(num_steps=25)", 0.07), ("heun(num_steps=25)", 0.08)])
def test_sampler_reproduces_each_class_mean_and_variance(spec, allowance):
  x = per_class(spec, 1500)
  lams, fields = levels(spec)
  name = samplers.parse(spec, samplers.config_section()).name
  for c in range(K):
    mean, var = gm.exact_law(name, lams, gm.MEANS[c].ravel(), gm.STDS[c], **fields)
    np.testing.assert_allclose(mean, gm.MEANS[c].ravel(), atol=0.01)
    assert abs(var / gm.STDS[c] ** 2 - 1) < allowance, (c, var / gm.STDS[c] ** 2)
    assert_law(x[c], mean, var)


# 3. The ODE solvers solve the same ODE: from the same noise, few steps land near many, and the
# distance shrinks at each solver's order.
@pytest.mark.parametrize("spec,max_error,mean_error", [("dpmpp_2m(num_steps=25)", 0.1, 0.015),
                                                       ("heun(num_steps=25)", 0.08, 0.012),
                                                       ("ddim(num_steps=100)", 0.04, 0.008)])
def test_ode_solvers_agree_with_ddim_at_1000_steps_from_the_same_noise(spec, max_error,
                                                                       mean_error):
  labels = np.repeat(np.arange(K), 200)
  reference, _ = run("ddim(num_steps=1000)", labels)
  error = np.abs(run(spec, labels)[0] - reference)
  assert error.max() < max_error and error.mean() < mean_error, (error.max(), error.mean())


def test_ode_error_shrinks_at_the_solvers_order():
  """Doubling the steps divides the distance to a 1000-step solution by ~2 (DDIM, first order)
  and by ~4 (DPM-Solver++(2M), Heun: second order), on one uniform λ grid over [−20, 20]."""
  labels = np.repeat(np.arange(K), 100)
  grid = "grid='uniform',logsnr_min=-20.0,logsnr_max=20.0"
  reference, _ = run(f"dpmpp_2m(num_steps=1000,{grid})", labels)
  np.testing.assert_allclose(run(f"heun(num_steps=1000,{grid})", labels)[0], reference,
                             atol=2e-4)  # Two second-order solvers agree: a good reference.
  for name, order in (("ddim", 1), ("dpmpp_2m", 2), ("heun", 2)):
    errors = [np.sqrt(np.mean((run(f"{name}(num_steps={n},{grid})", labels)[0] - reference)**2))
              for n in (40, 80, 160)]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    np.testing.assert_allclose(ratios, 2.0**order, rtol=0.2, err_msg=name)


# The paper's sampler, as it was before the other samplers came: same outputs for the same key.
def _algorithm_2(eps_fn, rng, labels, w, *, num_steps, v, null_label, ids):
  """The earlier cfdg_jax/sampler.py's loop, kept as the reference."""
  logsnrs = diffusion.logsnr_schedule_cosine(jnp.linspace(1.0, 0.0, num_steps), -20.0, 20.0)
  rng_init, rng_steps = jax.random.split(rng)

  def noise(key):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), gm.SHAPE))(ids)

  def predict_x(z, logsnr):
    eps = jnp.concatenate([z, z])
    eps = eps_fn(eps, jnp.full((2 * z.shape[0],), logsnr),
                 jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    wb = w[:, None, None, None]
    eps = (1.0 + wb) * eps[:z.shape[0]] - wb * eps[z.shape[0]:]
    return jnp.clip(diffusion.x_from_eps(z, eps, logsnr), -1.0, 1.0)

  def step(t, z):
    logsnr, logsnr_next = logsnrs[t], logsnrs[t + 1]
    mean, _ = diffusion.posterior_mean_var(z, predict_x(z, logsnr), logsnr, logsnr_next)
    std = jnp.exp(0.5 * diffusion.sampler_log_var(logsnr, logsnr_next, v))
    return mean + std * noise(jax.random.fold_in(rng_steps, t))

  z = jax.lax.fori_loop(0, num_steps - 1, step, noise(rng_init))
  return predict_x(z, logsnrs[-1])


def test_ancestral_gives_the_same_samples_as_before_for_the_same_key():
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  w = jnp.array([0.5, 1.0, 2.0, 3.0, 0.3, 1.5])
  ids = jnp.arange(6)
  before = jax.jit(lambda rng: _algorithm_2(gm.eps_fn, rng, labels, w, num_steps=24, v=0.3,
                                            null_label=K, ids=ids))(jax.random.key(3))
  now, _ = run("ancestral(num_steps=24,v=0.3)", labels, w, seed=3, clip_x=True, ids=ids)
  np.testing.assert_allclose(now, before, atol=1e-6)
  assert np.abs(np.asarray(before)).max() > 0.1


def test_noise_follows_ids_not_batch_position_in_every_sampler():
  labels = np.array([0, 1, 2, 1])
  for spec in ("ancestral(num_steps=8)", "ddim(num_steps=8,eta=0.7)", "heun(num_steps=4)"):
    batch, _ = run(spec, labels, 1.0, seed=3, ids=np.arange(4))
    alone, _ = run(spec, labels[2:3], 1.0, seed=3, ids=np.array([2]))
    np.testing.assert_allclose(alone[0], batch[2], atol=1e-6)
    shared, _ = run(spec, labels, 1.0, seed=3, ids=np.array([5, 5, 6, 5]))
    np.testing.assert_array_equal(shared[1], shared[3])
    assert not np.allclose(shared[0], shared[2])


def test_same_key_same_samples_other_key_other_samples():
  labels = np.arange(6) % K
  for spec in ("ancestral(num_steps=8)", "ddim(num_steps=8,eta=1.0)", "dpmpp_2m(num_steps=8)"):
    a, _ = run(spec, labels, 1.0, seed=7)
    np.testing.assert_array_equal(a, run(spec, labels, 1.0, seed=7)[0])
    assert not np.allclose(a, run(spec, labels, 1.0, seed=8)[0])


@pytest.mark.parametrize("spec,nfe", [("ancestral(num_steps=10)", 10), ("ddim(num_steps=10)", 10),
                                      ("dpmpp_2m(num_steps=10)", 10), ("heun(num_steps=10)", 19)])
def test_network_evaluations_are_counted(spec, nfe):
  b = 6
  settings = samplers.parse(spec, samplers.config_section())
  assert samplers.get(settings.name).evaluations(settings.num_steps) == nfe
  _, guided = run(spec, np.arange(b) % K, 1.0)
  assert guided == {"network_calls": nfe, "examples": 2 * b * nfe}  # One call on 2B a step.
  _, unguided = run(spec, np.arange(b) % K, 0.0)
  assert unguided == {"network_calls": nfe, "examples": b * nfe}  # w = 0: the conditional pass.


def test_clip_x_clips_every_intermediate_prediction():
  """DDIM returns z/α with no final clip, so its output shows the clipping of every step's x̂: data
  at 3 (outside [−1, 1]) comes out at 3 unclipped and at 1 clipped."""
  means, stds = np.full((1, *gm.SHAPE), 3.0), np.array([0.05])
  eps_fn = functools.partial(gm.eps_fn, means=means, stds=stds)
  settings = samplers.parse("ddim(num_steps=50)", samplers.config_section())
  options = guidance.make_options(8, 0.0)
  outputs = {}
  for clip_x in (False, True):
    outputs[clip_x], _ = samplers.sample(
        samplers.get("ddim"), settings, eps_fn, jax.random.key(0), jnp.zeros(8, jnp.int32),
        options, image_shape=gm.SHAPE, null_label=1, logsnr_min=-20.0, logsnr_max=20.0,
        clip_x=clip_x)
  np.testing.assert_allclose(outputs[False], 3.0, atol=0.25)  # 5 s.d. of the data.
  np.testing.assert_allclose(outputs[True], 1.0, atol=0.01)


def test_grids_run_from_noisy_to_clean_and_have_their_shape():
  for kind in samplers.GRIDS:
    lams = np.asarray(samplers.logsnr_grid(kind, 9, -10.0, 12.0))
    np.testing.assert_allclose([lams[0], lams[-1]], [-10.0, 12.0], atol=1e-4)
    np.testing.assert_allclose(lams, gm.grid(kind, 9, -10.0, 12.0), rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(lams) > 0)
  np.testing.assert_allclose(np.diff(samplers.logsnr_grid("uniform", 5, -4.0, 4.0)), 2.0)
  with pytest.raises(ValueError, match="at least 2 levels"):
    samplers.logsnr_grid("cosine", 1, -20.0, 20.0)
  with pytest.raises(ValueError, match="Unknown λ grid 'linear'"):
    samplers.logsnr_grid("linear", 4, -20.0, 20.0)
