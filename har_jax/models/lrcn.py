"""LRCN (Donahue et al. 2015): a 2D CNN per frame, an LSTM over time."""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from har_jax.models import encoders
from har_jax.models.cpu_kernels import conv as conv_lib
from har_jax.models.cpu_kernels import pool as pool_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, in [0, 1] units.
IMAGENET_STD = (0.229, 0.224, 0.225)

TEMPORAL_POOLINGS = ('last', 'mean')
CHANNEL_ORDERS = ('rgb', 'bgr')


class LRCN(nn.Module):
  """Video classifier: `[batch, time, height, width, 3] uint8 RGB -> logits`.

  Input normalisation, on device, in float32, then cast to `dtype`:
    x = (reorder(video * input_scale, channel_order) - input_mean) / input_std
  where `reorder` keeps RGB for 'rgb' and reverses the channels for 'bgr', so
  input_mean and input_std are given in channel_order order and in the units
  of `video * input_scale`. ImageNet (torchvision): scale 1/255, 'rgb', mean
  and std in [0, 1] units (the defaults). Keras 'caffe': scale 1, 'bgr',
  mean (103.939, 116.779, 123.68), std (1, 1, 1).

  Attributes:
    encoder: a key of `encoders.ENCODERS`.
    num_classes: width of the logits.
    lstm_size: LSTM hidden units.
    num_lstm_layers: stacked LSTM layers.
    dropout_rate: dropout on the LSTM outputs (rng collection 'dropout').
    temporal_pooling: 'last' classifies the last step's output; 'mean'
      averages the per-step logits over time, as the LRCN paper averages its
      per-step predictions.
    dtype: computation dtype of the encoder. The LSTM and the head always
      compute in float32; all parameters are float32.
    bn_axis_name: pmap axis over which BatchNorm averages batch statistics.
    remat: rematerialise the encoder's activations in the backward pass:
      per residual block for ResNets (peak activation memory of about one
      block), the whole encoder at once otherwise.
    conv_impl: the encoder's convolutions and max pool, one of
      `conv.CONV_IMPLS`: 'xla' (nn.Conv, nn.max_pool), 'cpu' (the CPU
      kernels, whose gradients are fast on XLA:CPU: cpu_kernels.conv.CpuConv,
      cpu_kernels.pool.max_pool) or 'auto' ('cpu' on the CPU backend, 'xla'
      elsewhere); 'patches' is the old name of 'cpu'. Same parameters and
      values for all.
    encoder_kwargs: extra encoder attributes as (name, value) pairs, e.g.
      (('stride_on_1x1', True),) for Keras-style ResNet-50 blocks.
  """
  encoder: str
  num_classes: int
  lstm_size: int = 512
  num_lstm_layers: int = 1
  dropout_rate: float = 0.5
  temporal_pooling: str = 'mean'
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False
  conv_impl: str = 'auto'
  input_mean: Sequence[float] = IMAGENET_MEAN
  input_std: Sequence[float] = IMAGENET_STD
  channel_order: str = 'rgb'
  input_scale: float = 1 / 255
  encoder_kwargs: tuple = ()

  def normalise(self, video: jnp.ndarray) -> jnp.ndarray:
    """`[..., 3]` uint8 RGB -> `[..., 3]` float in `dtype`, as documented."""
    if self.channel_order not in CHANNEL_ORDERS:
      raise ValueError(f'channel_order {self.channel_order!r} not in '
                       f'{CHANNEL_ORDERS}')
    x = video.astype(jnp.float32) * self.input_scale
    if self.channel_order == 'bgr':
      x = x[..., ::-1]
    mean = jnp.asarray(self.input_mean, jnp.float32)
    std = jnp.asarray(self.input_std, jnp.float32)
    return ((x - mean) / std).astype(self.dtype)

  def setup(self):
    if self.temporal_pooling not in TEMPORAL_POOLINGS:
      raise ValueError(f'temporal_pooling {self.temporal_pooling!r} not in '
                       f'{TEMPORAL_POOLINGS}')
    encoder_cls = encoders.get_encoder_cls(self.encoder)
    impl = conv_lib.resolve_conv_impl(self.conv_impl)
    self.encoder_module = encoder_cls(
        dtype=self.dtype, bn_axis_name=self.bn_axis_name, conv=conv_lib.conv_module(impl),
        max_pool=pool_lib.max_pool_fn(impl), remat_blocks=self.remat, name='encoder',
        **dict(self.encoder_kwargs))
    self._remat_whole_encoder = self.remat and not encoder_cls.has_blocks
    # Parameter paths: encoder/..., lstm_<i>/cell/..., head/... (nn.RNN adopts a cell made with
    # parent=None as its child 'cell').
    self.lstms = [
        nn.RNN(nn.OptimizedLSTMCell(self.lstm_size, dtype=jnp.float32,
                                    param_dtype=jnp.float32, parent=None), name=f'lstm_{i}')
        for i in range(self.num_lstm_layers)]
    self.dropout = nn.Dropout(self.dropout_rate)
    self.head = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                         name='head')

  def encode_frames(self, frames: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """`[n, height, width, 3]` uint8 RGB frames -> `[n, feature_dim]` float32 features.

    Each frame is encoded on its own (in inference mode, BatchNorm uses its running
    statistics), so a frame's features do not depend on the frames batched with it.
    """
    x = self.normalise(frames)
    if self._remat_whole_encoder:
      features = nn.remat(lambda mdl, x: mdl(x, train=train))(self.encoder_module, x)
    else:
      features = self.encoder_module(x, train=train)
    return features.astype(jnp.float32)

  def classify(self, features: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """`[batch, time, feature_dim]` frame features -> `[batch, num_classes]` float32 logits.

    The recurrent part: the LSTM layers from a zero state over `time` steps, dropout, the head,
    then the last step's logits or their mean over time (temporal_pooling).
    """
    y = features.astype(jnp.float32)
    for lstm in self.lstms:
      y = lstm(y)  # [batch, time, lstm_size]
    y = self.dropout(y, deterministic=not train)
    if self.temporal_pooling == 'last':
      return self.head(y[:, -1])
    return jnp.mean(self.head(y), axis=1)

  def __call__(self, video: jnp.ndarray, *, train: bool,
               frozen_encoder: bool = False) -> jnp.ndarray:
    """`[batch, time, height, width, 3]` uint8 -> `[batch, num_classes]` float32 logits.

    frozen_encoder: run the encoder in inference mode (BatchNorm normalises with its running
      statistics and does not update them) and pass no gradient into it, while the rest of the
      model trains as `train` says: the frozen-encoder phase of fine-tuning, in which the head
      trains on the features it will be evaluated on.
    """
    batch, time = video.shape[:2]
    frames = video.reshape((batch * time,) + video.shape[2:])
    features = self.encode_frames(frames, train=train and not frozen_encoder)
    if frozen_encoder:
      features = jax.lax.stop_gradient(features)
    return self.classify(features.reshape(batch, time, -1), train=train)
