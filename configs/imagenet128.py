"""Class-conditional ImageNet 128x128: the CFG paper's setting (Ho & Salimans, 2022, Table 2).

  python -m cfdg_jax.train --config configs/imagenet128.py --workdir gs://BUCKET/cfdg_in128 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --distributed

configs/imagenet64.py with what differs at 128x128: the paper uses "the same model architectures
and hyperparameters as the guided diffusion models of Dhariwal & Nichol (2021)" apart from
continuous-time training (Section 4), so the changes are ADM's ImageNet 128 values (Dhariwal &
Nichol, 2021, Appendix I and Table 11) and the paper's own 128x128 sampler settings. Comments say
which paper gives each value, and where neither does; see configs/imagenet64.py for the rest.

Data: as configs/imagenet64.py, centre-cropped and resized to 128x128 with an antialiased filter
(the paper's area downsampling). TFDS's "downsampled_imagenet" variants have no labels and stop
at 64x64.
"""
import pathlib
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  imagenet64 = runpy.run_path(str(pathlib.Path(__file__).with_name("imagenet64.py")))
  config = imagenet64["get_config"]()
  config.data.image_size = 128

  # ADM's ImageNet 128 diffusion model (Dhariwal & Nichol, 2021, Table 11).
  config.model.base_channels = 256
  config.model.channel_mult = (1, 1, 2, 3, 4)
  config.model.num_res_blocks = 2  # "Depth".
  # ADM fixes 4 heads here (128, 192 and 256 channels each at 32, 16 and 8 pixels); this UNet
  # fixes channels per head instead. Chosen: 64, ADM's default for its other models, after its
  # ablation (Table 2) found more heads or fewer channels per head better.
  config.model.head_channels = 64
  config.model.dropout = 0.0
  # Not stated for 128x128: p_uncond stays at 64x64's 0.1, where the paper swept {0.1, 0.2, 0.5}
  # (Section 4.2, Table 1): 0.1 and 0.2 did about equally well, 0.5 worse; 0.1 had the best FID.

  config.optimizer.learning_rate = 1e-4  # ADM, Table 11.
  config.batch_size = 256  # ADM, Table 11.
  config.num_train_steps = 2_700_000  # CFG paper, Section 4.1 (ADM trained 4360K).

  # CFG paper, Section 4.3 and Table 2: of T in {128, 256, 1024}, 256 balances quality and speed;
  # v: Section 4.1. The w of the paper's 128x128 sample figure (best FID at w = 0.3, best IS at
  # w = 4; Table 2). The grid is one batch of 3000 images: trim w if it does not fit in memory.
  config.sample.sampler.num_steps = 256
  config.sample.sampler.ancestral.v = 0.2
  config.sample.w = (0.0, 1.0, 4.0)

  # Parameters, EMA and two Adam moments take 16 bytes a parameter: ~6.7 GB replicated, over 40%
  # of a 16 GB TPU core (v3, v5e) before activations; FSDP stays on (see configs/imagenet64.py).

  # Evaluation: the paper's protocol as at 64x64; its step study (Section 4.3, Table 2) was made
  # at this resolution, at T = 256 for the w sweep.
  config.eval.samplers = ("ancestral(num_steps=256)",)
  config.eval.batch_size = 512  # Images per sampler call; a multiple of the device count.
  return config
