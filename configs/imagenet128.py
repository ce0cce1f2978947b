"""Class-conditional ImageNet 128x128: the CFG paper's setting (Ho & Salimans, 2022, Table 2).

  python -m cfdg_jax.train --config configs/imagenet128.py --workdir gs://BUCKET/cfdg_in128 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --distributed

The paper uses "the same model architectures and hyperparameters as the guided diffusion models
of Dhariwal & Nichol (2021)" apart from continuous-time training (Section 4); those are ADM's
ImageNet 128 values (Dhariwal & Nichol, 2021, Appendix I and Table 11). Comments say which paper
gives each value, and where neither does.

Data: TFDS "imagenet2012" cannot be downloaded; TFDS prepares it from ILSVRC2012_img_train.tar
and ILSVRC2012_img_val.tar in --config.data.manual_dir (prepare once, copy the result to GCS).
Each image is centre-cropped and resized to 128x128 with an antialiased filter, which stands in
for the paper's area downsampling. (TFDS's "downsampled_imagenet" variants have no labels and
stop at 64x64.)
"""
import ml_collections


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
  config.data.image_size = 128
  config.data.channels = 3
  config.data.num_classes = 1000
  # Neither paper states it; ADM's released loader (guided-diffusion) flips by default.
  config.data.random_flip = True
  # Decoded full-size images (~0.5 MB each) wait here before the resize: ~5 GB per host.
  config.data.shuffle_buffer = 10_000
  config.data.cache = False  # 1.28M full-size images do not fit in memory.

  # ADM's ImageNet 128 diffusion model (Dhariwal & Nichol, 2021, Table 11).
  config.model = ml_collections.ConfigDict()
  config.model.base_channels = 256
  config.model.channel_mult = (1, 1, 2, 3, 4)
  config.model.num_res_blocks = 2  # "Depth".
  config.model.attn_resolutions = (32, 16, 8)
  # ADM fixes 4 heads here (128, 192 and 256 channels each at 32, 16 and 8 pixels); this UNet
  # fixes channels per head instead. Chosen: 64, ADM's default for its other models, after its
  # ablation (Table 2) found more heads or fewer channels per head better.
  config.model.head_channels = 64
  config.model.dropout = 0.0
  config.model.resblock_updown = True  # "BigGAN up/downsample".
  config.model.dtype = "bfloat16"  # ADM trained with 16-bit activations, 32-bit weights (App. I).

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.logsnr_min = -20.0  # CFG paper, Section 4.1.
  config.diffusion.logsnr_max = 20.0  # CFG paper, Section 4.1.
  # Not stated for 128x128. Chosen as at 64x64, where the paper swept {0.1, 0.2, 0.5} (Section
  # 4.2, Table 1): 0.1 and 0.2 did about equally well, 0.5 worse; 0.1 had the best FID.
  config.diffusion.p_uncond = 0.1
  config.diffusion.prediction = "eps"  # CFG paper, Section 2.

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4  # ADM, Table 11.
  # Neither paper gives a warm-up (guided-diffusion has none); chosen: 1000 steps, to spare the
  # first Adam steps at full rate.
  config.optimizer.warmup_steps = 1000
  config.optimizer.b1 = 0.9  # ADM, App. I.
  config.optimizer.b2 = 0.999  # ADM, App. I.
  config.optimizer.eps = 1e-8  # Not given; Adam's default.
  config.optimizer.weight_decay = 0.0  # ADM gives none for its diffusion models ("Adam or AdamW").
  config.optimizer.grad_clip = 1.0  # Not given; DDPM's released code clips at 1.0.

  config.batch_size = 256  # ADM, Table 11.
  config.num_train_steps = 2_700_000  # CFG paper, Section 4.1 (ADM trained 4360K).
  config.ema_decay = 0.9999  # ADM, App. I.
  config.log_every = 500
  config.checkpoint_every = 10_000
  config.keep_checkpoints = 3
  config.sample_every = 50_000

  config.sample = ml_collections.ConfigDict()
  # CFG paper, Section 4.3 and Table 2: of T in {128, 256, 1024}, 256 balances quality and speed.
  config.sample.num_steps = 256
  config.sample.v = 0.2  # CFG paper, Section 4.1.
  config.sample.clip_x = True  # Not stated in the papers; keeps x-predictions in the data range.
  # The w of the paper's 128x128 sample figure (best FID at w = 0.3, best IS at w = 4; Table 2).
  # The grid is one batch of 1000 classes x num_per_class x len(guidance) = 3000 images; trim
  # guidance if it does not fit in memory.
  config.sample.guidance = (0.0, 1.0, 4.0)
  config.sample.num_per_class = 1

  # Parameters, EMA and two Adam moments take 16 bytes a parameter: ~6.7 GB replicated, over
  # 40% of a 16 GB TPU core (v3, v5e) before activations. FSDP splits the large tensors over all
  # devices at the cost of all-gathers each step; on 80 GB GPUs --config.sharding.fsdp=False
  # is faster.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.fsdp = True
  config.sharding.fsdp_min_size = 2**18  # Smaller tensors (biases, norms) stay replicated.

  # Evaluation (python -m cfdg_jax.evaluate --workdir DIR --config configs/imagenet128.py
  # --config.eval.inception_weights=inception.msgpack): the CFG paper's protocol, FID and IS of
  # 50,000 samples per w (Section 4). A full sweep samples 550,000 images per checkpoint: cut
  # eval.guidance, eval.step_sweep or eval.num_samples for quicker looks.
  config.eval = ml_collections.ConfigDict()
  config.eval.guidance = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 4.0)  # w from 0 to 4, as Tables 1 and 2.
  config.eval.num_steps = 256  # T of the w sweep: sample.num_steps.
  # The T of the paper's step study (Section 4.3), at the w of the best FID and the best IS
  # (Table 2).
  config.eval.step_sweep = (128, 256, 1024)
  config.eval.step_sweep_guidance = (0.3, 4.0)
  config.eval.v = ml_collections.config_dict.placeholder(float)  # None: sample.v.
  config.eval.num_samples = 50_000  # Per (w, T) point, as the paper (and ADM).
  config.eval.batch_size = 512  # Images per sampler call; a multiple of the device count.
  config.eval.seed = 0  # Every checkpoint is scored on the same noise draws.
  # Weights from python -m cfdg_jax.eval.convert_inception; pytorch-fid's .pth also gives IS.
  # None: no Inception metrics.
  config.eval.inception_weights = ml_collections.config_dict.placeholder(str)
  # A trained classifier's directory; None: no classifier metrics.
  config.eval.classifier_dir = ml_collections.config_dict.placeholder(str)
  # The FID convention (ADM's reference batches are training images); its first 50,000 images.
  config.eval.reference_split = "train"
  # Directory of the cached reference statistics (a gs:// path on a pod); None: <workdir>/eval.
  config.eval.reference_cache = ml_collections.config_dict.placeholder(str)
  config.eval.precision_recall_k = 3  # Kynkäänniemi et al. (2019), as ADM's evaluator.
  return config
