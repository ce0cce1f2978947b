"""FID between two sets of images or statistics, like pytorch-fid's command line.

  python -m cfdg_jax.eval.fid A.npz B.npz --weights inception.msgpack \
      [--batch_size 50] [--resize tf] [--save_stats A_stats.npz]

A and B are each an .npz of either
* images: `images` (uint8 N×H×W×C with C = 1 or 3, or N×H×W; any H×W), as cfdg_jax.sample --npz
  writes, or ADM-style `arr_0`;
* statistics: `mu` [2048] and `sigma` [2048, 2048] (pytorch-fid's .npz, ADM's reference batches).
When a file holds both, its statistics are used. --weights is the file written by
cfdg_jax.eval.convert_inception. --save_stats writes A's statistics (pytorch-fid format).
"""
import functools
from typing import Callable

import numpy as np
from absl import app
from absl import flags
from etils import epath

from cfdg_jax.eval import inception
from cfdg_jax.eval import metrics

flags.DEFINE_string("weights", None, "FID Inception weights from cfdg_jax.eval.convert_inception.")
flags.DEFINE_integer("batch_size", 50, "Images per Inception forward pass.")
flags.DEFINE_enum("resize", "tf", list(inception.RESIZE_METHODS),
                  "Resize to 299x299: 'tf' = the 2015 TF graph's (TTUR/ADM/NVlabs), 'torch' = pytorch-fid's.")
flags.DEFINE_string("save_stats", None, "Optional .npz to write the first input's mu and sigma to.")


def load_images_or_stats(path: str) -> tuple[str, object]:
  """Returns ("stats", (mu, sigma)) or ("images", uint8 [N, H, W, C]) from an .npz."""
  with epath.Path(path).open("rb") as f:
    with np.load(f) as data:
      keys = set(data.files)
      if {"mu", "sigma"} <= keys:
        return "stats", (data["mu"], data["sigma"])
      for key in ("images", "arr_0"):
        if key in keys:
          return "images", data[key]
  raise ValueError(f"{path} holds neither images (`images` or `arr_0`: uint8 N×H×W×C) nor statistics "
                   f"(`mu`, `sigma`); found {sorted(keys)}.")


def compute_stats(path: str, get_feature_fn: Callable[[], Callable]) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the .npz at `path`: read as is, or from the images' pool3 features."""
  kind, value = load_images_or_stats(path)
  if kind == "stats":
    return value
  if value.ndim == 3:  # N×H×W grayscale.
    value = value[..., None]
  return metrics.stats_from_features(get_feature_fn()(value)["pool"])


def compute_fid(path_a: str, path_b: str, weights: str | None, batch_size: int = 50, resize: str = "tf",
                save_stats: str | None = None) -> float:
  """FID between the images or statistics in two .npz files; optionally saves A's statistics."""

  @functools.cache
  def get_feature_fn():  # Loads the network only if some input holds images.
    if weights is None:
      raise ValueError("--weights is required when an input holds images: convert the Inception with "
                       "python -m cfdg_jax.eval.convert_inception SRC OUT.")
    return inception.make_feature_fn(inception.load_params(weights), batch_size, resize)

  mu_a, sigma_a = compute_stats(path_a, get_feature_fn)
  if save_stats:
    metrics.save_stats(save_stats, mu_a, sigma_a)
  mu_b, sigma_b = compute_stats(path_b, get_feature_fn)
  return metrics.fid_from_stats(mu_a, sigma_a, mu_b, sigma_b)


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("Usage: python -m cfdg_jax.eval.fid A.npz B.npz --weights W [--save_stats OUT]")
  fid = compute_fid(argv[1], argv[2], flags.FLAGS.weights, flags.FLAGS.batch_size, flags.FLAGS.resize,
                    flags.FLAGS.save_stats)
  print(f"FID: {fid:.6f}")


if __name__ == "__main__":
  app.run(main)
