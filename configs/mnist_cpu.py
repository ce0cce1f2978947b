"""MNIST on a 2-core CPU: configs/mnist.py with a 0.3M-parameter UNet and a short run.

  python -m cfdg_jax.train --config configs/mnist_cpu.py --workdir /tmp/cfdg_mnist_cpu \
      --config.data.manual_dir=../shared/data/mnist

The model of docs/results.md's MNIST measurements, where no accelerator was available. Sized so
that 1,000 samples at T = 128 take minutes there (89 MFLOP a network call, XLA's count, against
configs/mnist.py's 2.25 GFLOP); it trades sample quality for that. Everything else (data,
diffusion, sampler, evaluation) is configs/mnist.py's.
"""
import pathlib
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  mnist = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist.py")))
  config = mnist["get_config"]()
  config.model.base_channels = 16
  config.model.channel_mult = (1, 2, 2)  # 28 -> 14 -> 7, as configs/mnist.py.
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()  # Only the 7x7 middle block attends.
  config.model.head_channels = 32
  config.model.dropout = 0.0  # A few epochs do not overfit 60,000 images.

  config.optimizer.learning_rate = 1e-3  # A small model and a short run (configs/digits.py: 2e-3).
  config.optimizer.warmup_steps = 200
  config.batch_size = 64
  config.num_train_steps = 4000  # 4.3 epochs.
  config.ema_decay = 0.999  # Averages over ~1,000 steps of a 4,000-step run.
  config.checkpoint_every = 1000
  config.sample_every = 2000
  return config
