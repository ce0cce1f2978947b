"""Project TFDS builders; importing this package registers them with TFDS."""

from cfdg_jax.datasets.digits import Digits
