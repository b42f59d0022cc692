"""Tests for har_jax.models.cpu_kernels.pool: the max pool with a CPU-fast gradient and its
selection."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import models
from har_jax.models import encoders
from har_jax.models.cpu_kernels import conv
from har_jax.models.cpu_kernels import pool


def _inputs(kind: str, shape) -> jnp.ndarray:
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  if kind == 'relu':  # Half the inputs are 0: most windows tie.
    x = np.maximum(x, 0)
  elif kind == 'constant':  # Every window ties everywhere.
    x = np.ones(shape, np.float32)
  elif kind == 'rounded':  # Ties between positive values too.
    x = np.round(x * 2) / 2
  return jnp.asarray(x)


def _value_and_grad(pool_fn, x, window, strides, padding):
  dy = jnp.asarray(np.random.default_rng(1).normal(
      size=jax.eval_shape(lambda x: pool_fn(x, window, strides, padding), x).shape), jnp.float32)

  def loss(x):
    y = pool_fn(x, window, strides, padding)
    return jnp.sum(y * dy), y
  (_, y), dx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
  return y, dx


@pytest.mark.parametrize('window, strides, padding, size', [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (12, 12)),  # The ResNet stem's pool.
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (9, 7)),  # Odd sizes.
    ((2, 2), (2, 2), ((0, 0), (0, 0)), (8, 8)),
    ((3, 3), (1, 1), ((1, 1), (1, 1)), (6, 6)),
    ((3, 2), (2, 3), ((0, 1), (1, 0)), (9, 10)),  # Asymmetric everything.
])
@pytest.mark.parametrize('kind', ['normal', 'relu', 'constant', 'rounded'])
def test_values_and_gradients_equal_nn_max_pool(window, strides, padding, size, kind):
  x = _inputs(kind, (3,) + size + (5,))
  want_y, want_dx = _value_and_grad(nn.max_pool, x, window, strides, padding)
  y, dx = _value_and_grad(pool.max_pool, x, window, strides, padding)
  np.testing.assert_array_equal(y, want_y)
  # Equal up to the order of summation where windows overlap.
  np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
  # The gradient is routed, not spread over ties: the totals agree.
  np.testing.assert_allclose(jnp.sum(dx), jnp.sum(want_dx), rtol=1e-5, atol=1e-5)


def test_gradient_is_the_same_in_chunks(monkeypatch):
  x = _inputs('relu', (6, 12, 12, 4))
  args = ((3, 3), (2, 2), ((1, 1), (1, 1)))
  want = _value_and_grad(pool.max_pool, x, *args)
  monkeypatch.setattr(conv, '_CHUNK_BYTES', 1000)  # One image per chunk.
  got = _value_and_grad(pool.max_pool, x, *args)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize('x_shape, window, strides, padding, match', [
    ((2, 8, 8), (3, 3), (2, 2), ((1, 1), (1, 1)), 'N, H, W, C'),
    ((2, 8, 8, 3), (3, 3), (2, 2), 'SAME', 'explicit'),
    ((2, 8, 8, 3), (3, 3), (2, 2), ((-1, 1), (1, 1)), 'non-negative'),
])
def test_bad_arguments_are_rejected(x_shape, window, strides, padding, match):
  with pytest.raises(ValueError, match=match):
    pool.max_pool(jnp.zeros(x_shape), window, strides, padding)


def test_max_pool_fn_selects_by_implementation():
  assert pool.max_pool_fn('xla') is nn.max_pool
  assert pool.max_pool_fn('cpu') is pool.max_pool


@pytest.mark.slow
@pytest.mark.parametrize('impl, xla_scatter', [('xla', True), ('cpu', False),
                                                 ('patches', False)])
def test_lrcn_uses_the_pool_of_its_conv_impl(impl, xla_scatter):
  model = models.LRCN(encoder='resnet18', num_classes=3, lstm_size=4, dropout_rate=0.0,
                      conv_impl=impl)
  video = jnp.zeros((1, 2, 32, 32, 3), jnp.uint8)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), video)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)

  def loss(params):
    out, _ = model.apply({**variables, 'params': params}, video, train=True,
                         mutable=['batch_stats'])
    return jnp.sum(out)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables['params']))
  assert ('select_and_scatter_add' in jaxpr) == xla_scatter


@pytest.mark.slow
def test_resnet_with_fast_pool_has_the_same_gradients():
  plain = encoders.ResNet(stage_sizes=(1,), block_cls=encoders.BasicBlock, num_filters=4)
  fast = plain.clone(max_pool=pool.max_pool)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = jax.jit(functools.partial(plain.init, train=False))(jax.random.key(0), x)

  def grads(model):
    def loss(params):
      out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                           train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(out))
    return jax.jit(jax.grad(loss))(variables['params'])
  want, got = grads(plain), grads(fast)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = functools.reduce(lambda t, k: t[k.key], path, want)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
