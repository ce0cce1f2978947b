"""Config sections every experiment shares. The files beside this one load it with
runpy.run_path(... "common.py"), so a config file works from any working directory.

Sampler and guidance fields come from the package (cfdg_jax.samplers, cfdg_jax.guidance): a new
sampler or guidance option appears in every config, and on every command line, by itself.
"""
import ml_collections

from cfdg_jax import guidance
from cfdg_jax import samplers


def sample_config(num_steps: int, v: float, w: tuple[float, ...] = (0.0, 1.0, 3.0),
                  num_per_class: int = 8) -> ml_collections.ConfigDict:
  """config.sample: the sampler, the guidance options, and the training runs' sample grids.

  The default sampler is the paper's Algorithm 2 with T = num_steps and variance exponent v; any
  other is --config.sample.sampler.name=dpmpp_2m --config.sample.sampler.num_steps=20 (each
  sampler's own fields are in its subsection, e.g. --config.sample.sampler.ddim.eta=0.5).
  """
  config = ml_collections.ConfigDict()
  config.sampler = samplers.config_section("ancestral", num_steps=num_steps, ancestral={"v": v})
  # Guidance options beyond w (cfdg_jax/guidance.py); all off by default. clip_x (clip x̂ to the
  # data range at every step) is not stated in the papers.
  config.guidance = guidance.config_section()
  config.w = w  # Guidance strengths of the sample grids, one panel each.
  config.num_per_class = num_per_class
  # Images per sampler call when a grid is drawn (a multiple of the device count); None: the
  # whole grid, classes × num_per_class × len(w), in one call.
  config.batch_size = ml_collections.config_dict.placeholder(int)
  return config


def mesh_config(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
  """config.mesh: the device mesh data × fsdp (cfdg_jax/sharding.py); −1 takes all the devices
  the other axis leaves. The batch is split over both axes; parameters, EMA and optimizer
  moments over "fsdp" (ZeRO-3 style)."""
  config = ml_collections.ConfigDict()
  config.data = data
  config.fsdp = fsdp
  config.fsdp_min_size = 2**18  # Smaller arrays (biases, norms) stay replicated.
  return config


def eval_config(*, sampler_specs: tuple[str, ...], num_samples: int, batch_size: int,
                step_sweep: tuple[int, ...] = (32, 64, 128, 256),
                step_sweep_w: tuple[float, ...] = (0.3, 1.0),
                reference_split: str = "train") -> ml_collections.ConfigDict:
  """config.eval: what `python -m cfdg_jax.evaluate` measures for each checkpoint.

  Each sampler setting of `sampler_specs` is sampled at every w, with every guidance setting of
  `guidance`; the first sampler also at each T of step_sweep, at the w of step_sweep_w. A setting
  is "name(field=value,...)": fields not given take the checkpoint's config.sample values.
  """
  config = ml_collections.ConfigDict()
  config.w = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 4.0)  # w from 0 to 4, as the CFG paper.
  config.samplers = sampler_specs
  config.guidance = ("cfg",)  # E.g. "cfg(interval_lo=-3.4,interval_hi=2.6)", "cfg(rescale=0.7)".
  config.step_sweep = step_sweep  # Points already sampled above are not sampled twice.
  config.step_sweep_w = step_sweep_w
  # "balanced": num_samples / K of each class; "random": uniform labels (ADM's protocol, under which
  # IS compares with published values; a class-balanced IS is higher on the same model).
  config.labels = "balanced"
  config.num_samples = num_samples  # Per point.
  config.batch_size = batch_size  # Images per sampler call; a multiple of the device count.
  config.seed = 0  # Every checkpoint is scored on the same labels and noise draws.
  # Weights from python -m cfdg_jax.eval.convert_inception (pytorch-fid's .pth also gives IS);
  # None: no Inception metrics.
  config.inception_weights = ml_collections.config_dict.placeholder(str)
  # A trained classifier's directory (python -m cfdg_jax.eval.train_classifier); None: none.
  config.classifier_dir = ml_collections.config_dict.placeholder(str)
  config.reference_split = reference_split  # FID's reference images: its first 50,000.
  # Directory of the cached reference statistics (a gs:// path on a pod); None: <workdir>/eval.
  config.reference_cache = ml_collections.config_dict.placeholder(str)
  config.precision_recall_k = 3  # Kynkäänniemi et al. (2019), as ADM's evaluator.
  return config
