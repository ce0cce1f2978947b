"""ADM-style UNet conditioned on log-SNR and class label.

The architecture follows the ablated diffusion model (ADM) of Dhariwal & Nichol
(2021), which the classifier-free guidance paper (Ho & Salimans, 2022) uses:
residual blocks with scale-shift ("adaptive group norm") conditioning,
multi-head self-attention at chosen resolutions, and skip connections from
every down-path output to the up path.

Conditioning: the network sees the log signal-to-noise ratio lambda of the
noisy input, not a discrete step. lambda is mapped to the bounded time
t(lambda) = arctan(exp(-lambda / 2)) * 2 / pi in [0, 1] (the inverse of the
cosine schedule, lambda = -2 log tan(pi t / 2)), embedded with the usual
sinusoidal timestep features of 1000 * t, and passed through a two-layer MLP.
A learned class embedding with num_classes + 1 rows is added to it; row
num_classes is the null label used for the unconditional model.
"""
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
import ml_collections

from cfdg_jax import attention as attention_lib

zeros = nn.initializers.zeros


def logsnr_to_time(logsnr: jnp.ndarray) -> jnp.ndarray:
  """[B] log-SNR lambda -> [B] t in [0, 1]; t = 0 is clean data, t = 1 pure noise."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) * (2.0 / math.pi)


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
  """[B] float -> [B, dim] float32 sinusoidal features (cos then sin), as in ADM."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def num_groups(channels: int) -> int:
  """Largest divisor of `channels` that is <= 32 (ADM uses 32 groups)."""
  return max(g for g in range(1, 33) if channels % g == 0)


def _group_norm(channels: int, dtype: Any, name: str) -> nn.GroupNorm:
  # eps 1e-5 matches ADM's torch.nn.GroupNorm; flax reduces in float32 under bf16.
  return nn.GroupNorm(num_groups(channels), epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _resample(x: jnp.ndarray, mode: str) -> jnp.ndarray:
  """[B,H,W,C] -> [B,H/2,W/2,C] (2x2 average pool) or [B,2H,2W,C] (nearest)."""
  if mode == "down":
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


REMAT = ("none", "blocks")


class ResBlock(nn.Module):
  """ADM residual block with scale-shift norm: [B,H,W,Cin], emb [B,E] -> [B,H',W',out_channels].

  With resample="down" / "up", both branches are average-pooled / nearest-
  upsampled 2x (BigGAN-style resampling, ADM's resblock_updown).
  """
  out_channels: int
  dropout: float = 0.0
  resample: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, emb: jnp.ndarray, train: bool) -> jnp.ndarray:
    conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)
    h = nn.silu(_group_norm(x.shape[-1], self.dtype, "norm0")(x))
    if self.resample:
      h, x = _resample(h, self.resample), _resample(x, self.resample)
    h = conv(self.out_channels, (3, 3), name="conv0")(h)
    scale_shift = nn.Dense(2 * self.out_channels, dtype=self.dtype, param_dtype=jnp.float32,
                           name="emb_proj")(nn.silu(emb))
    scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
    h = _group_norm(self.out_channels, self.dtype, "norm1")(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    # Zero init makes every block the identity at initialisation.
    h = conv(self.out_channels, (3, 3), kernel_init=zeros, bias_init=zeros, name="conv1")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, (1, 1), name="skip")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all H*W positions: [B,H,W,C] -> [B,H,W,C]."""
  head_channels: int
  dtype: Any = jnp.float32
  implementation: str = "auto"  # attention.IMPLEMENTATIONS: the same function, computed anyhow.
  platform: str | None = None  # Where it runs ("auto" depends on it); None: the default backend.

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, height, width, c = x.shape
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    h = _group_norm(c, self.dtype, "norm")(x).reshape(b, height * width, c)
    qkv = dense(3 * c, name="qkv")(h)
    q, k, v = (a.reshape(b, height * width, c // self.head_channels, self.head_channels)
               for a in jnp.split(qkv, 3, axis=-1))
    h = attention_lib.attention(q, k, v, self.implementation, platform=self.platform)
    h = h.reshape(b, height * width, c)
    h = dense(c, kernel_init=zeros, bias_init=zeros, name="proj_out")(h)
    return x + h.reshape(x.shape)


class UNet(nn.Module):
  """ADM UNet predicting eps (or v) from (x_lambda, lambda, label).

  Attributes:
    num_classes: K; labels are in 0..K and K is the null (unconditional) label.
    out_channels: channels of the prediction (the image channels).
    base_channels: channels at the first level; the embedding has 4x as many.
    channel_mult: per-level channel multipliers; level l runs at size H / 2**l.
    num_res_blocks: residual blocks per level on the down path (+1 on the up path).
    attn_resolutions: feature-map sizes (pixels, e.g. 16 for 16x16) with self-attention.
    head_channels: channels per attention head.
    dropout: dropout rate inside residual blocks (active only with train=True).
    resblock_updown: resample with residual blocks instead of conv layers.
    dtype: compute dtype; parameters are always float32.
    remat: "none", or "blocks": the backward pass recomputes each residual and attention
      block's activations instead of keeping them (less memory, ~1/3 more compute).
    attention: how attention is computed (attention.IMPLEMENTATIONS; the same function).
  """
  num_classes: int
  out_channels: int
  base_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  head_channels: int = 64
  dropout: float = 0.0
  resblock_updown: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"
  platform: str | None = None  # The devices' platform, for attention="auto"; None: the default.

  def _check(self, x, logsnr, labels) -> None:
    """Raises ValueError for a bad config or input shapes, before any parameter is built."""
    if min(self.num_classes, self.out_channels, self.base_channels, self.head_channels) < 1:
      raise ValueError("num_classes, out_channels, base_channels and head_channels must be >= 1.")
    if not self.channel_mult or min(self.channel_mult) < 1 or self.num_res_blocks < 0:
      raise ValueError(f"channel_mult must be a non-empty sequence of positive ints and "
                       f"num_res_blocks >= 0; got {self.channel_mult}, {self.num_res_blocks}.")
    if self.remat not in REMAT:
      raise ValueError(f"remat={self.remat!r}; use one of {REMAT}.")
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"attention={self.attention!r}; use one of "
                       f"{attention_lib.IMPLEMENTATIONS}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got {self.dropout}.")
    if x.ndim != 4:
      raise ValueError(f"x must be NHWC [B, H, W, C]; got shape {x.shape}.")
    b, height, width, _ = x.shape
    if logsnr.shape != (b,) or labels.shape != (b,):
      raise ValueError(f"logsnr and labels must have shape [B] = ({b},); got "
                       f"{logsnr.shape} and {labels.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"labels must be integers in 0..{self.num_classes}; got dtype "
                       f"{labels.dtype}.")
    if height != width:
      raise ValueError(f"UNet expects square images; got {height}x{width}.")
    factor = 2 ** (len(self.channel_mult) - 1)
    if height % factor:
      raise ValueError(
          f"Image size {height} is not divisible by 2**(len(channel_mult)-1) = {factor}; use "
          f"fewer levels than channel_mult={tuple(self.channel_mult)} or resize/pad the images.")
    sizes = [height // 2**l for l in range(len(self.channel_mult))]
    for r in self.attn_resolutions:
      if r not in sizes:
        raise ValueError(f"attn_resolutions has {r} but the feature maps are {sizes} pixels; "
                         f"pick attention resolutions from those sizes.")
    # The middle block always attends, at the lowest resolution.
    attn_levels = {len(sizes) - 1} | {sizes.index(r) for r in self.attn_resolutions}
    for level in sorted(attn_levels):
      channels = self.base_channels * self.channel_mult[level]
      if channels % self.head_channels:
        raise ValueError(
            f"Attention at level {level} has {channels} channels, not divisible by "
            f"head_channels={self.head_channels}; choose head_channels dividing {channels}.")
    # Values are only known outside of jit; inside, bad labels give NaN outputs (below).
    if not isinstance(labels, jax.core.Tracer):
      values = np.asarray(labels)  # numpy: also right for a constant closed over by a jit.
      bad = sorted(set(values[(values < 0) | (values > self.num_classes)].tolist()))
      if bad:
        raise ValueError(f"labels must be in 0..{self.num_classes} ({self.num_classes} is the "
                         f"null label); got {bad}.")

  @nn.compact
  def __call__(self, x: jnp.ndarray, logsnr: jnp.ndarray, labels: jnp.ndarray, *,
               train: bool) -> jnp.ndarray:
    """x: [B,H,W,C], logsnr: [B] float, labels: [B] int in 0..K -> [B,H,W,out_channels] float32."""
    x, logsnr, labels = jnp.asarray(x), jnp.asarray(logsnr), jnp.asarray(labels)
    self._check(x, logsnr, labels)
    conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)
    res_block, attn_block = ResBlock, AttentionBlock
    if self.remat == "blocks":  # `train` (argument 3, after self) is a Python bool.
      res_block = nn.remat(ResBlock, static_argnums=(3,))
      attn_block = nn.remat(AttentionBlock)
    res = functools.partial(res_block, dropout=self.dropout, dtype=self.dtype)
    attn = functools.partial(attn_block, head_channels=self.head_channels, dtype=self.dtype,
                             implementation=self.attention, platform=self.platform)
    size = x.shape[1]
    last = len(self.channel_mult) - 1

    # The conditioning path is tiny ([B, 4*base]), so it stays float32 for accuracy.
    emb_dim = 4 * self.base_channels
    temb = timestep_embedding(1000.0 * logsnr_to_time(logsnr), self.base_channels)
    temb = nn.Dense(emb_dim, name="time_dense0")(temb)
    temb = nn.Dense(emb_dim, name="time_dense1")(nn.silu(temb))
    emb = temb + nn.Embed(self.num_classes + 1, emb_dim, name="label_embed")(labels)
    # jnp.take would wrap -1 to the null label; poison invalid labels instead.
    valid = (labels >= 0) & (labels <= self.num_classes)
    emb = jnp.where(valid[:, None], emb, jnp.nan)

    h = conv(self.base_channels * self.channel_mult[0], (3, 3), name="conv_in")(x)
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res(self.base_channels * mult, name=f"down{level}_res{i}")(h, emb, train)
        if size // 2**level in self.attn_resolutions:
          h = attn(name=f"down{level}_attn{i}")(h)
        skips.append(h)
      if level < last:
        if self.resblock_updown:
          h = res(h.shape[-1], resample="down", name=f"down{level}_downsample")(h, emb, train)
        else:
          h = conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                   name=f"down{level}_downsample")(h)
        skips.append(h)

    h = res(h.shape[-1], name="mid_res0")(h, emb, train)
    h = attn(name="mid_attn")(h)
    h = res(h.shape[-1], name="mid_res1")(h, emb, train)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.base_channels * mult, name=f"up{level}_res{i}")(h, emb, train)
        if size // 2**level in self.attn_resolutions:
          h = attn(name=f"up{level}_attn{i}")(h)
      if level > 0:
        if self.resblock_updown:
          h = res(h.shape[-1], resample="up", name=f"up{level}_upsample")(h, emb, train)
        else:
          h = conv(h.shape[-1], (3, 3), name=f"up{level}_upsample")(_resample(h, "up"))

    h = nn.silu(_group_norm(h.shape[-1], self.dtype, "out_norm")(h))
    # Zero init: the initial prediction is exactly 0 for every input.
    h = conv(self.out_channels, (3, 3), kernel_init=zeros, bias_init=zeros, name="conv_out")(h)
    return h.astype(jnp.float32)


def create_model(config: ml_collections.ConfigDict, platform: str | None = None) -> UNet:
  """The UNet of a run's config: config.model, with classes and channels from config.data, for
  devices of `platform` (None: the default backend's)."""
  m = config.model
  return UNet(
      num_classes=config.data.num_classes, out_channels=config.data.channels,
      base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
      num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
      head_channels=m.head_channels, dropout=m.dropout, resblock_updown=m.resblock_updown,
      dtype=jnp.dtype(m.dtype), remat=m.remat, attention=m.attention, platform=platform)


def init_params(rng: jax.Array, model: UNet, config: ml_collections.ConfigDict) -> Any:
  """float32 parameters for images of config.data's shape."""
  s, c = config.data.image_size, config.data.channels
  return model.init({"params": rng}, jnp.zeros((1, s, s, c)), jnp.zeros((1,)),
                    jnp.zeros((1,), jnp.int32), train=False)["params"]
