"""Default config: scikit-learn's 8x8 handwritten digits, trainable on a 2-core CPU in ~10 minutes.

  python -m cfdg_jax.train --config configs/digits.py --workdir /tmp/cfdg_digits
"""
import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"  # Any TFDS image classification data set.
  config.data.split = "train"
  # Optional strings are typed placeholders so that --config.data.data_dir=... can set them.
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: ~/tensorflow_datasets.
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)  # Local original files.
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.random_flip = False  # Digits are not mirror-symmetric.
  config.data.prefetch = 2  # Batches that a background thread prepares ahead of the step.
  config.data.num_workers = 4  # Threads that decode (and resize) a batch's images.

  config.model = ml_collections.ConfigDict()
  config.model.base_channels = 32
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (4,)  # Feature-map sizes (pixels) that get self-attention.
  config.model.head_channels = 32
  config.model.dropout = 0.0  # 10 minutes of training do not overfit 1,500 images.
  config.model.resblock_updown = False
  config.model.dtype = "float32"  # Compute dtype; "bfloat16" on TPU/GPU. Parameters stay float32.
  config.model.remat = "none"  # "blocks": recompute block activations in the backward pass.
  # "auto": cuDNN's fused kernel on a GPU (bfloat16), blockwise on a CPU (cfdg_jax/attention.py).
  config.model.attention = "auto"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.logsnr_min = -20.0
  config.diffusion.logsnr_max = 20.0
  config.diffusion.p_uncond = 0.2  # Probability of training on the null label.
  config.diffusion.prediction = "eps"  # What the network predicts: "eps" (paper) or "v".

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-3  # A small model and a short run.
  config.optimizer.warmup_steps = 200
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.99
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip = 1.0

  config.batch_size = 64  # Global, split over all devices.
  # The gradient of a batch as the mean of this many sequential microbatches (same update, 1/k
  # of the activations held at a time): for batches that do not fit the devices.
  config.microbatches = 1
  config.num_train_steps = 3000  # 128 epochs.
  config.ema_decay = 0.999
  config.log_every = 100
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.max_nonfinite_steps = 0  # Non-finite losses skipped (update dropped) before a stop.
  config.sample_every = 1500

  config.sample = common["sample_config"](num_steps=128, v=0.3)  # The paper's T and v.

  config.mesh = common["mesh_config"]()  # Data parallel over every device.

  # Evaluation (python -m cfdg_jax.evaluate): classifier metrics, as Inception features say little
  # about 8x8 digits. Train the digits classifier once (under a minute on a 2-core CPU), then
  #   python -m cfdg_jax.eval.train_classifier --config configs/digits.py --out_dir /tmp/cls_digits
  #   python -m cfdg_jax.evaluate --workdir /tmp/cfdg_digits --config configs/digits.py \
  #       --config.eval.classifier_dir=/tmp/cls_digits
  # Per point: 100 per class. One point at T=128 samples in ~100 s on a 2-core CPU with two XLA
  # devices (README); the whole sweep (13 points) in ~21 min per checkpoint there.
  # The reference split is train: 1,500 images (the test split has only 297).
  config.eval = common["eval_config"](sampler_specs=("ancestral(num_steps=128)",),
                                      num_samples=1000, batch_size=512)
  return config
