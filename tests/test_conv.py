"""Tests for har_jax.models.cpu_kernels.conv: the CPU kernels' convolution and its selection.

Small shapes only: every test compiles in a second or two on a CPU.
"""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from har_jax import models
from har_jax.models import encoders
from har_jax.models.cpu_kernels import conv


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize('backend, expected', [
    ('cpu', 'cpu'), ('gpu', 'xla'), ('cuda', 'xla'), ('rocm', 'xla'), ('tpu', 'xla')])
def test_auto_selects_the_cpu_kernels_on_cpu_only(backend, expected):
  assert conv.resolve_conv_impl('auto', backend) == expected
  want = conv.CpuConv if expected == 'cpu' else nn.Conv
  assert conv.conv_module('auto', backend) is want


@pytest.mark.parametrize('impl', ['xla', 'cpu'])
@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu'])
def test_explicit_impl_ignores_the_backend(impl, backend):
  assert conv.resolve_conv_impl(impl, backend) == impl


@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu'])
def test_patches_is_the_old_name_of_cpu(backend):
  """Checkpoints written before the rename store conv_impl='patches' in their config."""
  assert conv.resolve_conv_impl('patches', backend) == 'cpu'
  assert conv.conv_module('patches', backend) is conv.CpuConv
  config = ml_collections.ConfigDict(dict(
      encoder='small_cnn', lstm_size=8, dropout_rate=0.0, temporal_pooling='last',
      conv_impl='patches'))
  assert models.create_model(config, 3).conv_impl == 'patches'


def test_auto_uses_the_default_backend():
  assert jax.default_backend() == 'cpu'
  assert conv.resolve_conv_impl('auto') == 'cpu'


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="'fast'.*cpu"):
    conv.resolve_conv_impl('fast')
  config = ml_collections.ConfigDict(dict(
      encoder='small_cnn', lstm_size=8, dropout_rate=0.0, temporal_pooling='last',
      conv_impl='fast'))
  with pytest.raises(ValueError, match="'fast'"):
    models.create_model(config, 3)


def _conv_grads(module_cls, x, *, features, kernel, strides, padding):
  module = module_cls(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                      use_bias=False)
  variables = module.init(jax.random.key(0), x)

  def loss(variables, x):
    return jnp.sum(jnp.sin(module.apply(variables, x)))  # A non-uniform output gradient.
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)
  return value, grads


# The encoders' convolutions: ResNet stem 7x7/2 pad 3, 3x3/1 and 3x3/2 pad 1, 1x1/2 projection;
# plus XLA's 'SAME' padding (asymmetric for stride 2) and odd sizes.
@pytest.mark.parametrize('kernel, strides, padding, size', [
    (7, 2, ((3, 3), (3, 3)), 17),
    (3, 1, ((1, 1), (1, 1)), 9),
    (3, 2, ((1, 1), (1, 1)), 9),
    (1, 2, 'VALID', 9),
    (1, 1, 'VALID', 8),
    (3, 2, 'SAME', 8),
])
@pytest.mark.slow
@pytest.mark.parametrize('chunk_bytes', [4 << 20, 2000])  # 2000: a scan over batch chunks.
def test_cpu_conv_gradients_equal_nn_conv(monkeypatch, kernel, strides, padding, size,
                                          chunk_bytes):
  monkeypatch.setattr(conv, '_CHUNK_BYTES', chunk_bytes)
  monkeypatch.setattr(conv, '_WINOGRAD_CHUNK_BYTES', chunk_bytes)  # 3x3/1: Winograd.
  x = _normal(0, (6, size, size, 5))
  kwargs = dict(features=7, kernel=kernel, strides=strides, padding=padding)
  want_value, (want_vars, want_dx) = _conv_grads(nn.Conv, x, **kwargs)
  value, (got_vars, dx) = _conv_grads(conv.CpuConv, x, **kwargs)
  assert jax.tree.structure(got_vars) == jax.tree.structure(want_vars)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(got_vars['params']['kernel'], want_vars['params']['kernel'],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape, out_channels', [
    ((3, 8, 8, 5), 7),     # Even size: whole tiles.
    ((2, 7, 9, 4), 6),     # Odd, non-square: the last tile row/column is cropped.
    ((2, 4, 4, 16), 16),   # The smallest map it is used for.
    ((1, 28, 28, 64), 64),  # ResNet stage 1.
])
@pytest.mark.parametrize('chunk_bytes', [8 << 20, 1])  # 1: one image per lax.map step.
def test_winograd_conv_equals_xla(monkeypatch, shape, out_channels, chunk_bytes):
  monkeypatch.setattr(conv, '_WINOGRAD_CHUNK_BYTES', chunk_bytes)
  x = _normal(4, shape)
  w = _normal(5, (3, 3, shape[-1], out_channels)) / np.sqrt(9 * shape[-1])
  want = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)
  got = jax.jit(conv.winograd_conv)(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * float(np.abs(want).max()))


def test_winograd_transposed_conv_equals_xla_with_the_flipped_swapped_kernel():
  x = _normal(12, (2, 7, 8, 6))
  w = _normal(13, (3, 3, 5, 6)) / np.sqrt(27)  # [3, 3, C=5, O=6]; the transposed maps 6 -> 5.
  want = lax.conv_general_dilated(x, jnp.flip(w, (0, 1)).swapaxes(2, 3), (1, 1),
                                  ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)
  got = jax.jit(functools.partial(conv.winograd_conv, transpose=True))(x, w)
  assert got.shape == want.shape == (2, 7, 8, 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize('shape, out_channels', [
    ((3, 8, 8, 5), 7),     # Even size: whole tiles.
    ((2, 7, 9, 4), 6),     # Odd, non-square: dy is zero-padded to whole tiles.
    ((2, 4, 4, 16), 16),   # The smallest map it is used for.
    ((2, 28, 28, 64), 64),  # ResNet stage 1.
])
@pytest.mark.parametrize('chunk_bytes', [8 << 20, 1])  # 1: one image per scan step.
def test_winograd_weight_grad_equals_xla(monkeypatch, shape, out_channels, chunk_bytes):
  monkeypatch.setattr(conv, '_WINOGRAD_CHUNK_BYTES', chunk_bytes)
  x = _normal(8, shape)
  dy = _normal(9, shape[:3] + (out_channels,))
  w = jnp.zeros((3, 3, shape[-1], out_channels))
  _, kernel_vjp = jax.vjp(
      lambda w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                         precision=lax.Precision.HIGHEST), w)
  want, = kernel_vjp(dy)
  got = jax.jit(conv.winograd_weight_grad)(x, dy)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * float(np.abs(want).max()))


@pytest.mark.slow
def test_cpu_conv_takes_the_winograd_weight_grad_where_it_applies(monkeypatch):
  calls = []
  real = conv.winograd_weight_grad
  monkeypatch.setattr(conv, 'winograd_weight_grad',
                      lambda *args: calls.append(args[0].shape) or real(*args))
  x, w = _normal(10, (2, 8, 8, 4)), _normal(11, (3, 3, 4, 5))
  for strides, padding in [((1, 1), ((1, 1), (1, 1))), ((2, 2), ((1, 1), (1, 1))),
                           ((1, 1), ((0, 0), (0, 0)))]:
    jax.grad(lambda w: jnp.sum(conv.cpu_conv_general_dilated(  # pylint: disable=g-long-lambda
        x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2))(w)  # noqa: B023
  assert calls == [(2, 8, 8, 4)]  # Only the 3x3 / stride 1 / padding 1 one.


def _primitives(fn, *args):
  """The program's text, nested jaxprs (custom_vjp, scan bodies) included."""
  return str(jax.make_jaxpr(fn)(*args))


def test_winograd_only_for_float32_3x3_stride1_same_on_maps_of_4_or_more():
  x, w = _normal(6, (2, 8, 8, 4)), _normal(7, (3, 3, 4, 4))
  fwd = lambda x, w, s=(1, 1), p=((1, 1), (1, 1)): conv.cpu_conv_general_dilated(  # pylint: disable=g-long-lambda
      x, w, s, p, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  grad = jax.grad(lambda x, w: jnp.sum(fwd(x, w) ** 2), argnums=(0, 1))
  # Forward and input gradient: no XLA convolution left (the weight gradient is a matmul anyway).
  assert 'conv_general_dilated' not in _primitives(fwd, x, w)
  assert 'conv_general_dilated' not in _primitives(grad, x, w)
  for args in [(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),  # bf16: XLA's convolution.
               (x[:, :3, :3], w)]:                                  # 3x3 maps: too small.
    assert 'conv_general_dilated' in _primitives(fwd, *args)
  assert 'conv_general_dilated' in _primitives(lambda x, w: fwd(x, w, (2, 2)), x, w)
  assert 'conv_general_dilated' in _primitives(lambda x, w: fwd(x, w, p=((0, 0), (0, 0))), x, w)


def test_weight_grad_chunking():
  stem_patches = 56 * 56 * 7 * 7 * 3 * 4  # ResNet stem at 112x112, float32: 1.8 MiB per image.
  assert conv.batch_chunk(128, stem_patches) == 2
  assert conv.batch_chunk(128, 16) == 128
  assert conv.batch_chunk(7, 10_000, budget=25_000) == 1  # 7 is prime: 1 or 7.
  assert conv.batch_chunk(12, 10, budget=45) == 4
  assert conv.batch_chunk(3, 10 << 20) == 1  # An image over the budget: one at a time.


def test_unsupported_convolutions_fall_back_to_lax():
  x, w = _normal(1, (2, 9, 9, 3)), _normal(2, (3, 3, 3, 4))
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  call = functools.partial(lax.conv_general_dilated, x, w, (1, 1), 'SAME', rhs_dilation=(2, 2),
                           dimension_numbers=dn)
  got = conv.cpu_conv_general_dilated(x, w, (1, 1), 'SAME', rhs_dilation=(2, 2),
                                          dimension_numbers=dn)
  np.testing.assert_allclose(got, call(), rtol=1e-6)


def _encoder_loss(model):
  def loss(params, batch_stats, x):
    out, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                         mutable=['batch_stats'])
    return jnp.sum(jnp.sin(out))
  return jax.jit(jax.value_and_grad(loss))


@pytest.mark.slow
def test_resnet_with_cpu_conv_has_the_same_params_and_gradients():
  plain = encoders.ResNet(stage_sizes=(1, 1), block_cls=encoders.BasicBlock, num_filters=4)
  fast = plain.clone(conv=conv.CpuConv)
  x = _normal(3, (4, 32, 32, 3))
  variables = jax.jit(functools.partial(plain.init, train=False))(jax.random.key(0), x)
  fast_shapes = jax.eval_shape(functools.partial(fast.init, train=False), jax.random.key(0), x)
  assert jax.tree.structure(fast_shapes) == jax.tree.structure(variables)
  assert 'proj_conv' in variables['params']['stage2_block0']
  args = (variables['params'], variables['batch_stats'], x)
  want_loss, want = _encoder_loss(plain)(*args)
  got_loss, got = _encoder_loss(fast)(*args)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = functools.reduce(lambda t, k: t[k.key], path, want)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('impl, module', [('xla', nn.Conv), ('cpu', conv.CpuConv),
                                          ('patches', conv.CpuConv)])
def test_lrcn_passes_the_conv_module_to_the_encoder(impl, module):
  model = models.LRCN(encoder='small_cnn', num_classes=3, lstm_size=4, conv_impl=impl)
  video = jax.ShapeDtypeStruct((1, 2, 16, 16, 3), jnp.uint8)
  variables = jax.eval_shape(
      functools.partial(model.init, train=False, capture_intermediates=True),
      jax.random.key(0), video)
  assert 'conv0' in variables['intermediates']['encoder']
  bound = model.bind({}).clone()
  assert conv.conv_module(bound.conv_impl) is module
