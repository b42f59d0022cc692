"""Per-frame 2D CNN encoders: `[N, H, W, 3] float -> [N, F] features`.

Every encoder is a flax.linen module with the same attributes:
  dtype: computation dtype; parameters are always float32.
  bn_axis_name: passed to `nn.BatchNorm(axis_name=...)`. Under `pmap` with
    this axis name the batch statistics are averaged over replicas
    (synchronous BatchNorm). None outside `pmap`.
  conv: the module class used for every convolution (default `nn.Conv`), so
    that a custom-VJP convolution can be injected. It is called with the
    `nn.Conv` signature: `conv(features, kernel_size, strides=..., padding=...,
    use_bias=False, dtype=..., param_dtype=..., kernel_init=..., name=...)`.
  max_pool: the max-pool function (default `nn.max_pool`), called as
    `max_pool(x, window_shape, strides=..., padding=...)`. An encoder without
    a max pool ignores it.
  remat_blocks: rematerialise each block in the backward pass (default False).
    An encoder without blocks ignores it.
Its class attribute `has_blocks` says whether it has blocks that remat_blocks
rematerialises (LRCN rematerialises an encoder without blocks as a whole).
It is called as `encoder(x, train=...)`. None has a classifier head.

`ENCODERS` maps config names to classes. It is a plain dict: nothing is
registered by importing a module.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# torchvision's ResNet init: He normal over fan_out.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding of torchvision/Keras (not XLA 'SAME', which is
  asymmetric for stride 2), so that converted weights give the same output."""
  p = kernel_size // 2
  return ((p, p), (p, p))


def _layers(module: nn.Module, train: bool) -> tuple[Callable, Callable]:
  """Returns the `conv` and `norm` constructors shared by all encoders."""
  conv = functools.partial(
      module.conv, use_bias=False, dtype=module.dtype,
      param_dtype=jnp.float32, kernel_init=_conv_init)
  norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON, dtype=module.dtype, param_dtype=jnp.float32,
      axis_name=module.bn_axis_name)
  return conv, norm


class SmallCNN(nn.Module):
  """A CPU-sized encoder: per stage a 3x3/2 conv, BatchNorm and ReLU.

  `[N, H, W, 3] -> [N, feature_dim]`. On 32x32 inputs with the default widths the last feature map
  is 2x2. With `spatial_features` > 0 the last map is flattened and projected (Dense, BN, ReLU) so the
  features keep *where* things are (global average pooling loses position, and with it "left" vs
  "right"); with 0 it is globally average-pooled. It has no max pool and no blocks: `max_pool` and
  `remat_blocks` are accepted, for the common encoder interface, and ignored.
  """
  widths: Sequence[int] = (32, 64, 128, 128)
  spatial_features: int = 256
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  conv: ModuleDef = nn.Conv
  max_pool: Callable = nn.max_pool  # Unused.
  remat_blocks: bool = False  # Unused.

  has_blocks = False

  @property
  def feature_dim(self) -> int:
    return self.spatial_features or self.widths[-1]

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    conv, norm = _layers(self, train)
    x = jnp.asarray(x, self.dtype)
    for i, width in enumerate(self.widths):
      x = conv(width, (3, 3), strides=(2, 2), padding=_pad(3),
               name=f'conv{i}')(x)
      x = norm(name=f'bn{i}')(x)
      x = nn.relu(x)
    if not self.spatial_features:
      return jnp.mean(x, axis=(1, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.spatial_features, dtype=self.dtype, param_dtype=jnp.float32,
                 use_bias=False, name='project')(x)
    return nn.relu(norm(name='project_bn')(x))


class BasicBlock(nn.Module):
  """ResNet-18/34 block: 3x3 conv, 3x3 conv, identity or 1x1 projection."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  stride_on_1x1: bool = False  # No 1x1 conv here; kept for a uniform API.
  zero_init_residual: bool = False

  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (3, 3), strides=s, padding=_pad(3),
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), padding=_pad(3), name='conv2')(y)
    y = _last_norm(self)(name='bn2')(y)
    return nn.relu(_shortcut(self, x, y) + y)


class Bottleneck(nn.Module):
  """ResNet-50 block: 1x1, 3x3, 1x1 (x4 channels), identity or projection.

  stride_on_1x1=False puts the stride on the 3x3 conv (ResNet v1.5, as
  torchvision); True puts it on the first 1x1 conv (v1, as Keras
  applications' ResNet50). Both have the same parameters.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  stride_on_1x1: bool = False
  zero_init_residual: bool = False

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = (self.strides, self.strides)
    s_1x1, s_3x3 = (s, (1, 1)) if self.stride_on_1x1 else ((1, 1), s)
    y = self.conv(self.filters, (1, 1), strides=s_1x1, padding='VALID',
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), strides=s_3x3, padding=_pad(3),
                  name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.filters * self.expansion, (1, 1), padding='VALID',
                  name='conv3')(y)
    y = _last_norm(self)(name='bn3')(y)
    return nn.relu(_shortcut(self, x, y) + y)


def _last_norm(block: nn.Module) -> Callable:
  """The block's last BN; scale initialised to 0 if zero_init_residual, so
  that each residual block starts as the identity (Goyal et al. 2017)."""
  if block.zero_init_residual:
    return functools.partial(block.norm, scale_init=nn.initializers.zeros)
  return block.norm


def _shortcut(block: nn.Module, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Identity, or a strided 1x1 conv + BN where the shape changes."""
  if x.shape == y.shape:
    return x
  s = (block.strides, block.strides)
  x = block.conv(y.shape[-1], (1, 1), strides=s, padding='VALID',
                 name='proj_conv')(x)
  return block.norm(name='proj_bn')(x)


class ResNet(nn.Module):
  """ImageNet ResNet backbone (He et al. 2016) without the classifier.

  7x7/2 conv 64, BN, ReLU, 3x3/2 max-pool, then `len(stage_sizes)` stages of
  `num_filters * 2**i` filters (the first block of each stage after the first
  has stride 2), then global average pooling.
  `[N, H, W, 3] -> [N, num_filters * 2**(stages-1) * expansion]`.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_filters: int = 64
  stride_on_1x1: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  conv: ModuleDef = nn.Conv
  max_pool: Callable = nn.max_pool  # The stem's pool.
  # Rematerialise each residual block in the backward pass: only block inputs are kept from the
  # forward pass, so peak activation memory is about one block's instead of the whole network's.
  remat_blocks: bool = False

  has_blocks = True

  @property
  def feature_dim(self) -> int:
    return (self.num_filters * 2**(len(self.stage_sizes) - 1) *
            self.block_cls.expansion)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    conv, norm = _layers(self, train)
    x = jnp.asarray(x, self.dtype)
    x = conv(self.num_filters, (7, 7), strides=(2, 2), padding=_pad(7),
             name='stem_conv')(x)
    x = nn.relu(norm(name='stem_bn')(x))
    # Pads with -inf; after the ReLU this equals Keras' zero padding.
    x = self.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    block_cls = nn.remat(self.block_cls) if self.remat_blocks else self.block_cls
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = block_cls(
            filters=self.num_filters * 2**i,
            conv=conv,
            norm=norm,
            strides=2 if i > 0 and j == 0 else 1,
            stride_on_1x1=self.stride_on_1x1,
            zero_init_residual=self.zero_init_residual,
            name=f'stage{i + 1}_block{j}')(x)
    return jnp.mean(x, axis=(1, 2))


class ResNet18(ResNet):
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: ModuleDef = BasicBlock


class ResNet34(ResNet):
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block_cls: ModuleDef = BasicBlock


class ResNet50(ResNet):
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block_cls: ModuleDef = Bottleneck


ENCODERS: dict[str, type] = {
    'small_cnn': SmallCNN,
    'resnet18': ResNet18,
    'resnet34': ResNet34,
    'resnet50': ResNet50,
}


def get_encoder_cls(name: str) -> type:
  """Looks `name` up in ENCODERS; ValueError naming the valid ones."""
  if name not in ENCODERS:
    raise ValueError(
        f'Unknown encoder {name!r}; valid encoders: {sorted(ENCODERS)}')
  return ENCODERS[name]


def encoder_feature_dim(name: str) -> int:
  """The width F of the `[N, F]` features of encoder `name`."""
  return get_encoder_cls(name)().feature_dim
