"""Fashion-MNIST (28x28x1, 10 classes): configs/mnist.py with another data set.

  python -m cfdg_jax.train --config configs/fashion_mnist.py --workdir /tmp/cfdg_fmnist

Offline, TFDS prepares the data set from local copies of the four original *-ubyte.gz files:

  python -m cfdg_jax.train --config configs/fashion_mnist.py --workdir /tmp/cfdg_fmnist \
      --config.data.manual_dir=../shared/data/fashion_mnist
"""
import pathlib
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  mnist = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist.py")))
  config = mnist["get_config"]()
  config.data.name = "fashion_mnist"
  # Flips are usual for clothing, and the garments here are near-symmetric, but nearly every
  # sandal, sneaker and ankle boot faces the same way (the right half is the heavier in 92-100%
  # of those classes' training images): flips would teach mirrored shoes the data lacks.
  config.data.random_flip = False
  return config
