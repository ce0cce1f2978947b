"""A benchmark shape: a DDPM-style UNet with self-attention after every residual block at every
resolution, on MNIST resized to 32×32.

  python bench/train.py --config configs/attention32.py

Base 64, channel_mult 1-2-2-2, 2 residual blocks per level, attention at 32, 16, 8 and 4 pixels,
batch 64; 10.3M parameters. At 32×32 the attention logits are [B, heads, 1024, 1024], so
attention dominates memory and a large share of the step (docs/performance.md). Everything else
is configs/mnist.py's; it trains too (--config.data.manual_dir=../shared/data/mnist offline).
"""
import pathlib
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  mnist = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist.py")))
  config = mnist["get_config"]()
  config.data.image_size = 32
  config.model.base_channels = 64
  config.model.channel_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (32, 16, 8, 4)
  config.model.head_channels = 64
  config.batch_size = 64
  return config
