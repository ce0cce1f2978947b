"""Every experiment config passes the training and evaluation checks and builds its UNet."""
import functools
import pathlib
import runpy

import jax
import pytest

from cfdg_jax import unet
from cfdg_jax import validation
from cfdg_jax.eval import plan

# Every experiment config; common.py holds the sections they share.
CONFIGS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem != "common")
# Parameters (millions); the ImageNet ones match ADM's 296M and 422M (Dhariwal & Nichol, 2021).
EXPECTED_PARAMS_M = {"digits": 1.082, "mnist": 6.950, "fashion_mnist": 6.950, "mnist_cpu": 0.288,
                     "cifar10": 38.313, "imagenet64": 295.900, "imagenet128": 421.524,
                     "attention32": 10.341}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid(path):
  config = runpy.run_path(str(path))["get_config"]()
  validation.check_config(config)
  with config.unlocked():
    config.eval.classifier_dir = "dir"  # Left to the user: a network to measure with.
  plan.check_eval_config(config.eval, jax.device_count(), config.sample)
  model = unet.create_model(config)
  shapes = jax.eval_shape(functools.partial(unet.init_params, model=model, config=config),
                          jax.random.key(0))
  millions = sum(x.size for x in jax.tree.leaves(shapes)) / 1e6
  assert millions == pytest.approx(EXPECTED_PARAMS_M[path.stem], abs=0.001), millions


def test_every_config_is_covered():
  assert {p.stem for p in CONFIGS} == set(EXPECTED_PARAMS_M)
