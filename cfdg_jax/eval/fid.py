"""FID between two sets of images or statistics, like pytorch-fid's command line.

  python -m cfdg_jax.eval.fid A.npz B.npz --weights inception.msgpack \
      [--batch_size 50] [--resize tf] [--save_stats A_stats.npz]

A and B are each an .npz of either
* images: `images` (uint8 N×H×W×C with C = 1 or 3, or N×H×W; any H×W), as cfdg_jax.sample --npz
  writes, or ADM-style `arr_0`;
* statistics: `mu` [2048] and `sigma` [2048, 2048] (pytorch-fid's .npz, ADM's reference batches).
When a file holds both, its statistics are used. --weights is the file written by
cfdg_jax.eval.convert_inception. --save_stats writes A's statistics (pytorch-fid format). Every
input and the output are checked before any Inception pass; a mistake is one `error:` line.
"""
import zipfile

import numpy as np
from absl import app
from absl import flags
from etils import epath

from cfdg_jax import runtime
from cfdg_jax import validation
from cfdg_jax.errors import UserError
from cfdg_jax.eval import inception
from cfdg_jax.eval import metrics

flags.DEFINE_string("weights", None, "FID Inception weights from cfdg_jax.eval.convert_inception.")
flags.DEFINE_integer("batch_size", 50, "Images per Inception forward pass.")
flags.DEFINE_enum("resize", "tf", list(inception.RESIZE_METHODS),
                  "Resize to 299x299: 'tf' = the 2015 TF graph's (TTUR/ADM/NVlabs), 'torch' = pytorch-fid's.")
flags.DEFINE_string("save_stats", None, "Optional .npz to write the first input's mu and sigma to.")


def load_images_or_stats(path: str) -> tuple[str, object]:
  """Returns ("stats", (mu, sigma)) or ("images", uint8 [N, H, W, C]) from an .npz.

  Raises UserError naming `path` when it cannot be read or holds neither, in the shapes above.
  """
  try:
    with epath.Path(path).open("rb") as f, np.load(f) as data:
      keys = set(data.files)
      if {"mu", "sigma"} <= keys:
        kind, value = "stats", (data["mu"], data["sigma"])
      elif key := next((k for k in ("images", "arr_0") if k in keys), None):
        kind, value = "images", data[key]
      else:
        raise UserError(f"{path} holds neither images (`images` or `arr_0`: uint8 N×H×W×C) nor "
                        f"statistics (`mu`, `sigma`); found {sorted(keys)}.")
  except OSError as e:  # Missing, a directory, no permission.
    raise UserError(f"{path}: {e.strerror or e}; give an .npz of images or statistics.") from e
  except (ValueError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, UserError):
      raise
    # np.load takes a file that is no zip archive for a pickle ("pickled data").
    reason = "not a zip archive" if "pickle" in str(e) else (
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'}")
    raise UserError(f"{path} is not a readable .npz file ({reason}); write it with numpy.savez "
                    "or cfdg_jax.sample --npz.") from e
  if kind == "stats":
    mu, sigma = value
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
      raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not statistics of "
                      "features (mu [D], sigma [D, D]).")
  elif value.dtype != np.uint8 or value.ndim not in (3, 4) or (
      value.ndim == 4 and value.shape[-1] not in (1, 3)) or not len(value):
    raise UserError(f"{path}: images {value.dtype} {value.shape}; expected uint8 N×H×W×C with "
                    "C = 1 or 3 (or N×H×W), N >= 1.")
  elif value.ndim == 3:  # N×H×W grayscale.
    value = value[..., None]
  return kind, value


def compute_fid(path_a: str, path_b: str, weights: str | None, batch_size: int = 50, resize: str = "tf",
                save_stats: str | None = None) -> float:
  """FID between the images or statistics in two .npz files; optionally saves A's statistics.

  Both inputs, the weights (when an input holds images) and `save_stats` are checked first.
  """
  inputs = [load_images_or_stats(path) for path in (path_a, path_b)]
  if save_stats:
    validation.check_output_file(save_stats, "--save_stats", ".npz")
  feature_fn = None
  if any(kind == "images" for kind, _ in inputs):
    if weights is None:
      raise UserError("--weights is required when an input holds images: convert the Inception with "
                      "python -m cfdg_jax.eval.convert_inception SRC OUT.")
    feature_fn = inception.make_feature_fn(inception.load_params(weights), batch_size, resize)
  (mu_a, sigma_a), (mu_b, sigma_b) = [
      value if kind == "stats" else metrics.stats_from_features(feature_fn(value)["pool"])
      for kind, value in inputs]
  if mu_a.shape != mu_b.shape:
    raise UserError(f"{path_a} and {path_b} hold statistics of {mu_a.shape[0]}- and "
                    f"{mu_b.shape[0]}-d features: compare statistics of the same network.")
  if save_stats:
    metrics.save_stats(save_stats, mu_a, sigma_a)
  return metrics.fid_from_stats(mu_a, sigma_a, mu_b, sigma_b)


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("Usage: python -m cfdg_jax.eval.fid A.npz B.npz --weights W [--save_stats OUT]")
  if flags.FLAGS.batch_size < 1:
    raise app.UsageError(f"--batch_size={flags.FLAGS.batch_size}: give images per pass >= 1.")
  runtime.initialize()
  fid = compute_fid(argv[1], argv[2], flags.FLAGS.weights, flags.FLAGS.batch_size, flags.FLAGS.resize,
                    flags.FLAGS.save_stats)
  print(f"FID: {fid:.6f}")


def cli() -> None:
  """The `cfdg-fid` command (pyproject.toml)."""
  runtime.run(main)


if __name__ == "__main__":
  cli()
