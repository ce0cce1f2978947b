"""CIFAR-10 (32x32x3, 10 classes) with DDPM's CIFAR-10 network and training recipe.

  python -m cfdg_jax.train --config configs/cifar10.py --workdir /tmp/cfdg_cifar10

The network and optimizer follow DDPM (Ho et al., 2020, Appendix B, and its released code,
github.com/hojonathanho/diffusion scripts/run_cifar.py), with ADM's scale-shift conditioning
(Dhariwal & Nichol, 2021) as in every config here. The guidance and sampler settings are the
CFG paper's (Ho & Salimans, 2022, Section 4), which has no CIFAR-10 experiment. DDPM trained
800k steps in 10.6 hours on a TPU v3-8.
"""
import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"
  config.data.split = "train"
  # TFDS data dir; None uses TFDS's default (~/tensorflow_datasets). Typed None
  # (placeholders): absl cannot override a plain None from the command line.
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  # Local copies of the original files (offline preparation).
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = 10
  config.data.random_flip = True  # DDPM, App. B: flips improved CIFAR-10 samples slightly.
  config.data.prefetch = 2  # Batches that a background thread prepares ahead of the step.
  config.data.num_workers = 4  # Threads that decode (and resize) a batch's images.

  # DDPM's CIFAR-10 UNet (App. B; run_cifar.py, model "unet2d16b2"): 35.7M parameters there,
  # 38.3M here with scale-shift conditioning and the class embedding.
  config.model = ml_collections.ConfigDict()
  config.model.base_channels = 128
  config.model.channel_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.head_channels = 256  # One head over the 256 channels at 16x16, as DDPM's code.
  config.model.dropout = 0.1  # DDPM, App. B (swept 0.1-0.4).
  config.model.resblock_updown = False  # DDPM resamples with convolutions.
  # Chosen: DDPM trained in float32. ADM trained with 16-bit activations and 32-bit weights
  # (App. I); bfloat16 with float32 parameters does that without loss scaling.
  config.model.dtype = "bfloat16"
  config.model.remat = "none"  # "blocks": recompute block activations in the backward pass.
  # "auto": cuDNN's fused kernel on a GPU (bfloat16), blockwise on a CPU (cfdg_jax/attention.py).
  config.model.attention = "auto"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.logsnr_min = -20.0  # CFG paper, Section 4.1.
  config.diffusion.logsnr_max = 20.0  # CFG paper, Section 4.1.
  # CFG paper, Section 4.2: 0.1 and 0.2 do equally well, 0.5 worse (swept {0.1, 0.2, 0.5}).
  config.diffusion.p_uncond = 0.1
  config.diffusion.prediction = "eps"  # CFG paper, Section 2 (and DDPM).

  # DDPM, App. B: Adam at its default hyperparameters, lr 2e-4. Warm-up and clipping are from
  # run_cifar.py (warmup=5000, grad_clip=1.0); the paper states neither.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5000
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip = 1.0

  config.batch_size = 128  # DDPM, App. B.
  config.microbatches = 1  # Gradient accumulation over sequential microbatches (same update).
  config.num_train_steps = 800_000  # DDPM, App. B.
  config.ema_decay = 0.9999  # DDPM, App. B.
  config.log_every = 500
  config.checkpoint_every = 10_000
  config.keep_checkpoints = 3
  config.max_nonfinite_steps = 0  # Non-finite losses skipped (update dropped) before a stop.
  config.sample_every = 50_000

  # T: the CFG paper's choice of 128/256/1024 (Section 4.3); v: its 64x64 value (Section 4.1),
  # as it gives none for 32x32.
  config.sample = common["sample_config"](num_steps=256, v=0.3)

  # Parameters, EMA and two Adam moments: 0.6 GB, cheap to replicate on every device.
  config.mesh = common["mesh_config"]()

  # Evaluation (python -m cfdg_jax.evaluate --workdir DIR --config configs/cifar10.py
  # --config.eval.inception_weights=inception.msgpack): FID and IS of 50,000 samples against the
  # training set, the usual CIFAR-10 protocol.
  # FID-50k against all 50,000 training images, the usual protocol.
  config.eval = common["eval_config"](sampler_specs=("ancestral(num_steps=256)",),
                                      num_samples=50_000, batch_size=1024)
  return config
