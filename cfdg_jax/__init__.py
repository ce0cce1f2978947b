"""Classifier-free diffusion guidance (Ho & Salimans, 2022) in JAX/Flax.

  import cfdg_jax
  pipe = cfdg_jax.load(workdir)                 # a checkpoint's EMA weights (pipeline.py)
  images = pipe.sample(labels, w=1.0, sampler="dpmpp_2m", num_steps=20)
"""


def __getattr__(name):  # `load` and `Pipeline` import JAX and Orbax only when first used.
  if name in ("load", "Pipeline"):
    from cfdg_jax import pipeline  # pylint: disable=import-outside-toplevel
    return getattr(pipeline, name)
  raise AttributeError(f"module 'cfdg_jax' has no attribute {name!r}")
