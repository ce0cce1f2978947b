"""MNIST (28x28x1, 10 classes): good class-conditional samples in about an hour on one GPU.

  python -m cfdg_jax.train --config configs/mnist.py --workdir /tmp/cfdg_mnist

Offline, TFDS prepares the data set from local copies of the four original *-ubyte.gz files:

  python -m cfdg_jax.train --config configs/mnist.py --workdir /tmp/cfdg_mnist \
      --config.data.manual_dir=../shared/data/mnist

Sized for a GPU: one step takes ~30 s on a 2-core CPU. There, use configs/digits.py, or cut
--config.num_train_steps and --config.batch_size.

The CFG paper (Ho & Salimans, 2022) has no MNIST experiment: the diffusion and sampler settings
are its ImageNet ones (Section 4); the network is a small DDPM/ADM-style UNet chosen here for
the budget.
"""
import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "mnist"
  config.data.split = "train"
  # TFDS data dir; None uses TFDS's default (~/tensorflow_datasets). Typed None
  # (placeholders): absl cannot override a plain None from the command line.
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  # Local copies of the original files (offline preparation).
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)
  config.data.image_size = 28
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.random_flip = False  # Digits are not mirror-symmetric.
  config.data.prefetch = 2  # Batches that a background thread prepares ahead of the step.
  config.data.num_workers = 4  # Threads that decode (and resize) a batch's images.

  # Chosen, not from a paper: three levels (28 -> 14 -> 7, the most 28 allows), DDPM's
  # CIFAR-10 depth and dropout at half its width; 6.9M parameters.
  config.model = ml_collections.ConfigDict()
  config.model.base_channels = 64
  config.model.channel_mult = (1, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (14,)  # As DDPM's 16x16 at 32x32; the 7x7 middle attends too.
  config.model.head_channels = 64  # ADM's channels per head (Dhariwal & Nichol, 2021, Table 11).
  config.model.dropout = 0.1  # DDPM's CIFAR-10 value (Ho et al., 2020, App. B): small data set.
  config.model.resblock_updown = False
  config.model.dtype = "float32"  # Runs anywhere; "bfloat16" is faster on a GPU.
  config.model.remat = "none"  # "blocks": recompute block activations in the backward pass.
  # "auto": cuDNN's fused kernel on a GPU (bfloat16), blockwise on a CPU (cfdg_jax/attention.py).
  config.model.attention = "auto"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.logsnr_min = -20.0  # CFG paper, Section 4.1.
  config.diffusion.logsnr_max = 20.0  # CFG paper, Section 4.1.
  # CFG paper, Section 4.2: 0.1 and 0.2 do equally well, 0.5 worse (swept {0.1, 0.2, 0.5}).
  config.diffusion.p_uncond = 0.1
  config.diffusion.prediction = "eps"  # CFG paper, Section 2.

  # DDPM's Adam settings (Ho et al., 2020, App. B: lr 2e-4, other values Adam's defaults);
  # grad_clip 1.0 is from DDPM's released code (scripts/run_cifar.py); warm-up chosen.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 1000
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip = 1.0

  config.batch_size = 128  # DDPM's CIFAR-10 batch (Ho et al., 2020, App. B).
  config.microbatches = 1  # Gradient accumulation over sequential microbatches (same update).
  # Chosen for the budget: ~107 epochs, 0.87 TFLOP a step (XLA's count), so 43 PFLOP in all,
  # under an hour at a sustained 15 TFLOP/s (an estimate; not timed on a GPU).
  config.num_train_steps = 50_000
  # Chosen: DDPM's and ADM's 0.9999 averages over ~10k steps, long for a 50k-step run.
  config.ema_decay = 0.9995
  config.log_every = 100
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  config.max_nonfinite_steps = 0  # Non-finite losses skipped (update dropped) before a stop.
  config.sample_every = 10_000

  # T: the cheapest of the CFG paper's 128/256/1024 (Section 4.3); v: its 64x64 value (4.1).
  config.sample = common["sample_config"](num_steps=128, v=0.3)

  config.mesh = common["mesh_config"]()  # 6.9M parameters: replicating them is cheap.

  # Evaluation (python -m cfdg_jax.evaluate): classifier metrics (Inception features say little
  # about 28x28 grey digits), optionally Inception ones. Train the classifier once (minutes on a
  # CPU; with --config configs/fashion_mnist.py for Fashion-MNIST), then
  #   python -m cfdg_jax.eval.train_classifier --config configs/mnist.py --out_dir /tmp/cls_mnist
  #   python -m cfdg_jax.evaluate --workdir /tmp/cfdg_mnist --config configs/mnist.py \
  #       --config.eval.classifier_dir=/tmp/cls_mnist
  # Per point: 100 per class, a quick check on one GPU. FID is biased upwards at small N:
  # compare numbers at equal num_samples only.
  config.eval = common["eval_config"](sampler_specs=("ancestral(num_steps=128)",),
                                      num_samples=1000, batch_size=512)
  return config
