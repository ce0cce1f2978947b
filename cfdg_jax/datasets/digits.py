"""TFDS builder for scikit-learn's bundled 8x8 handwritten digits."""

import numpy as np
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

_NUM_TEST = 297

_CITATION = """\
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {{Optical Recognition of Handwritten Digits}},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49},
}"""


class Digits(tfds.core.GeneratorBasedBuilder):
  """Handwritten digits, 8x8 grey scale, from `sklearn.datasets.load_digits`.

  scikit-learn ships a copy of the test set (1,797 images written by 13
  people) of the UCI Optical Recognition of Handwritten Digits data
  (Alpaydin & Kaynak, 1998; https://doi.org/10.24432/C50P49). Each pixel
  counts the "on" pixels in a 4x4 block of a 32x32 bitmap, so it lies in
  0..16; it is stored as uint8 round(v * 255 / 16) in 0..255.

  Splits (fixed, in scikit-learn's order, so preparing is deterministic):
    train: the first 1,500 examples (indices 0..1499).
    test: the last 297 examples (indices 1500..1796).
  Every class has 146..153 training and 27..33 test examples. Nothing is
  downloaded: the data come with scikit-learn.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: 1,500 train / 297 test examples.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "8x8 handwritten digits (scikit-learn's copy of the UCI Optical"
            " Recognition of Handwritten Digits test set), rescaled from"
            " 0..16 to 0..255."
        ),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data come with scikit-learn.
    digits = sk_datasets.load_digits()
    # [1797, 8, 8] float64 in 0..16 -> [1797, 8, 8, 1] uint8 in 0..255.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    num_train = len(labels) - _NUM_TEST
    return {
        "train": self._generate_examples(images, labels, range(num_train)),
        "test": self._generate_examples(
            images, labels, range(num_train, len(labels))
        ),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      # The index in load_digits() is a stable, unique key.
      yield i, {"image": images[i], "label": labels[i]}
