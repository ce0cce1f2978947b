"""Class-conditional ImageNet 64x64: the CFG paper's setting (Ho & Salimans, 2022, Table 1).

  python -m cfdg_jax.train --config configs/imagenet64.py --workdir gs://BUCKET/cfdg_in64 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --distributed

The paper uses "the same model architectures and hyperparameters as the guided diffusion models
of Dhariwal & Nichol (2021)" apart from continuous-time training (Section 4); those are ADM's
ImageNet 64 values (Dhariwal & Nichol, 2021, Appendix I and Table 11). Comments say which paper
gives each value, and where neither does.

Data: TFDS "imagenet2012" cannot be downloaded; TFDS prepares it from ILSVRC2012_img_train.tar
and ILSVRC2012_img_val.tar in --config.data.manual_dir (prepare once, copy the result to GCS).
Each image is resized as ADM's released loader does (box-filter halvings while the short side is
at least 128, a bicubic resize of the short side to 64, the central 64x64 crop). TFDS's
"downsampled_imagenet/64x64" has no labels (it only suits an unconditional model);
"imagenet_resized/64x64" has labels but squashes whole images to a square.
"""
import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "imagenet2012"
  config.data.split = "train"
  # TFDS data dir (None: TFDS's default); on a pod, a gs:// path every host can read.
  # Typed None (placeholders): absl cannot override a plain None from the command line.
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  # Holds the ILSVRC2012 tars when TFDS first prepares the data.
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_classes = 1000
  # Neither paper states it; ADM's released loader (guided-diffusion) flips by default.
  config.data.random_flip = True
  config.data.prefetch = 2  # Batches that a background thread prepares ahead of the step.
  # Threads that decode and resize a batch's full-size JPEGs (PIL releases the GIL); raise it on
  # hosts whose share of the batch takes longer to prepare than a training step.
  config.data.num_workers = 4

  # ADM's ImageNet 64 diffusion model (Dhariwal & Nichol, 2021, Table 11).
  config.model = ml_collections.ConfigDict()
  config.model.base_channels = 192
  config.model.channel_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 3  # "Depth".
  config.model.attn_resolutions = (32, 16, 8)
  config.model.head_channels = 64  # "Heads Channels".
  config.model.dropout = 0.1
  config.model.resblock_updown = True  # "BigGAN up/downsample".
  config.model.dtype = "bfloat16"  # ADM trained with 16-bit activations, 32-bit weights (App. I).
  config.model.remat = "none"  # "blocks": recompute block activations in the backward pass.
  # "auto": cuDNN's fused kernel on a GPU (bfloat16), blockwise on a CPU (cfdg_jax/attention.py).
  config.model.attention = "auto"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.logsnr_min = -20.0  # CFG paper, Section 4.1.
  config.diffusion.logsnr_max = 20.0  # CFG paper, Section 4.1.
  # CFG paper, Section 4.2 and Table 1: swept {0.1, 0.2, 0.5}; 0.1 and 0.2 do about equally
  # well and 0.5 worse. 0.1 has the best FID (1.55 at w = 0.1).
  config.diffusion.p_uncond = 0.1
  config.diffusion.prediction = "eps"  # CFG paper, Section 2.

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-4  # ADM, Table 11.
  # Neither paper gives a warm-up (guided-diffusion has none); chosen: 0.25% of the run, to
  # spare the first Adam steps at full rate.
  config.optimizer.warmup_steps = 1000
  config.optimizer.b1 = 0.9  # ADM, App. I.
  config.optimizer.b2 = 0.999  # ADM, App. I.
  config.optimizer.eps = 1e-8  # Not given; Adam's default.
  config.optimizer.weight_decay = 0.0  # ADM gives none for its diffusion models ("Adam or AdamW").
  config.optimizer.grad_clip = 1.0  # Not given; DDPM's released code clips at 1.0.

  config.batch_size = 2048  # ADM, Table 11.
  # Gradient accumulation: the batch's gradient as the mean over sequential microbatches (same
  # update, 1/k of the activations held): what lets the batch fit a small slice (docs/scaling.md).
  config.microbatches = 1
  config.num_train_steps = 400_000  # CFG paper, Section 4.1 (ADM trained 540K).
  config.ema_decay = 0.9999  # ADM, App. I.
  config.log_every = 500
  config.checkpoint_every = 10_000
  config.keep_checkpoints = 3
  config.max_nonfinite_steps = 0  # Non-finite losses skipped (update dropped) before a stop.
  config.sample_every = 50_000

  # The paper states T only for its 128x128 model (Section 4.3: 256 balances quality and speed);
  # chosen the same here; v: CFG paper, Section 4.1. The w are those of the paper's 64x64 sample
  # figure (best FID at w = 0.1, best IS at w >= 4; Table 1). The grid is one batch of 1000
  # classes x num_per_class x len(w) = 3000 images; trim w if it does not fit in memory.
  config.sample = common["sample_config"](num_steps=256, v=0.3, num_per_class=1)

  # Parameters, EMA and two Adam moments take 16 bytes a parameter: ~4.7 GB replicated, a third
  # of a 16 GB TPU core (v3, v5e) before activations. FSDP splits the large tensors over all
  # devices at the cost of all-gathers each step; on a pod, keep them within a host or slice
  # (e.g. --config.mesh.data=-1 --config.mesh.fsdp=8); on 80 GB GPUs --config.mesh.data=-1
  # --config.mesh.fsdp=1 (no all-gathers) is faster.
  config.mesh = common["mesh_config"](data=1, fsdp=-1)

  # Evaluation (python -m cfdg_jax.evaluate --workdir DIR --config configs/imagenet64.py
  # --config.eval.inception_weights=inception.msgpack): the CFG paper's protocol, FID and IS of
  # 50,000 samples per point (Section 4), as ADM. A full sweep samples 550,000 images per
  # checkpoint: cut eval.w, eval.step_sweep or eval.num_samples for quicker looks. The step
  # sweep: the T of the paper's step study (Section 4.3, at 128x128), at the w of the best FID
  # and the best IS there (Table 2).
  config.eval = common["eval_config"](sampler_specs=("ancestral(num_steps=256)",),
                                      num_samples=50_000, batch_size=1024,
                                      step_sweep=(128, 256, 1024), step_sweep_w=(0.3, 4.0))
  return config
