"""Tests for har_jax.models: encoders, LRCN and create_model.

Full-size ResNets are only traced (jax.eval_shape); the compiled tests use
small modules so that the file runs in well under a minute on a CPU.
tests/conftest.py gives jax 4 fake CPU devices for the pmap test.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from har_jax import models
from har_jax.models import encoders
from har_jax.models.cpu_kernels import pool


def _key(seed=0):
  # XLA:CPU compiles inits that draw from 'rbg' keys several times faster
  # than from the default threefry keys.
  return jax.random.key(seed, impl='rbg')


def _num_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _init(model, x, *, train=False, **kwargs):
  """Abstract init: shapes and dtypes only, nothing is compiled."""
  return jax.eval_shape(
      functools.partial(model.init, train=train, **kwargs),
      _key(), x)


@functools.partial(jax.jit, static_argnums=0)
def _init_with_output(model, x):
  return model.init_with_output(_key(), x, train=False)


def _fake_variables(model, *args, seed=0):
  """Variables shaped as `model.init` makes them, filled from numpy.

  Compiling a real init costs seconds on a CPU; compiling an apply does not.
  Kernels ~ N(0, 1/fan_in), BatchNorm scales and variances 1, the rest 0.
  """
  shapes = _init(model, *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if leaf.ndim < 2:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1])
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in),
                       leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _video(seed, shape=(2, 4, 32, 32, 3)):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _lrcn(**kwargs):
  kwargs = dict(encoder='small_cnn', num_classes=5, lstm_size=16,
                num_lstm_layers=2, temporal_pooling='last') | kwargs
  return models.LRCN(**kwargs)


@pytest.mark.parametrize('name', sorted(encoders.ENCODERS))
def test_encoder_output_shape(name):
  model = encoders.ENCODERS[name]()
  x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  out, variables = jax.eval_shape(
      functools.partial(model.init_with_output, train=False),
      jax.random.key(0), x)
  assert out.shape == (3, models.encoder_feature_dim(name))
  assert set(variables) == {'params', 'batch_stats'}


def _poison_pool(*args, **kwargs):
  raise AssertionError('an encoder without a max pool called max_pool')


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(encoders.ENCODERS))
def test_every_encoder_takes_conv_max_pool_and_remat_blocks(name):
  """The common interface LRCN passes: same attributes for all, the same variables with any."""
  cls = encoders.ENCODERS[name]
  assert isinstance(cls.has_blocks, bool)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  want = _init(cls(), x)
  no_pool = name == 'small_cnn'
  got = _init(cls(conv=models.CpuConv, remat_blocks=True,
                  max_pool=_poison_pool if no_pool else pool.max_pool), x)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), got) == jax.tree.map(
      lambda s: (s.shape, s.dtype), want)


@pytest.mark.parametrize('block_cls', [encoders.BasicBlock,
                                       encoders.Bottleneck])
@pytest.mark.slow
def test_small_resnet_runs_with_zero_init_residual(block_cls):
  model = encoders.ResNet(stage_sizes=(1, 1), block_cls=block_cls,
                          num_filters=4, zero_init_residual=True)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)),
                  jnp.float32)
  out, variables = _init_with_output(model, x)
  assert out.shape == (2, model.feature_dim)
  assert np.all(np.isfinite(out))
  last_bn = 'bn2' if block_cls is encoders.BasicBlock else 'bn3'
  block = variables['params']['stage2_block0']
  np.testing.assert_array_equal(block[last_bn]['scale'], 0.0)
  assert np.all(block['bn1']['scale'] == 1.0)
  assert 'proj_conv' in block  # stride 2 changes the shape: projection.


@pytest.mark.parametrize('name, expected', [
    ('resnet18', 11_176_512),  # torchvision resnet18 minus fc (513,000).
    ('resnet34', 21_284_672),
    ('resnet50', 23_508_032),  # torchvision resnet50 minus fc (2,049,000).
])
def test_resnet_param_counts_match_torchvision(name, expected):
  model = encoders.ENCODERS[name]()
  variables = _init(model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert _num_params(variables['params']) == expected


@pytest.mark.parametrize('stride_on_1x1, conv1_size, conv2_size', [
    (False, 16, 8),  # v1.5 (torchvision): the 3x3 conv downsamples.
    (True, 8, 8),    # v1 (Keras): the first 1x1 conv downsamples.
])
def test_resnet50_stride_placement(stride_on_1x1, conv1_size, conv2_size):
  model = encoders.ResNet50(stride_on_1x1=stride_on_1x1)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = _init(model, x, capture_intermediates=True)
  # stage2 input is 64 / 4 = 16 pixels wide; its first block strides.
  block = variables['intermediates']['stage2_block0']
  assert block['conv1']['__call__'][0].shape[1] == conv1_size
  assert block['conv2']['__call__'][0].shape[1] == conv2_size
  assert _num_params(variables['params']) == 23_508_032


@pytest.fixture(scope='module')
def lrcn_last():
  model = _lrcn()
  video = _video(2)
  logits, variables = _init_with_output(model, video)
  return model, variables, video, logits


@pytest.mark.slow
def test_lrcn_logits_and_param_tree(lrcn_last):
  model, variables, video, logits = lrcn_last
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert set(variables['params']) == {'encoder', 'lstm_0', 'lstm_1', 'head'}
  assert set(variables['batch_stats']) == {'encoder'}
  assert variables['params']['head']['kernel'].shape == (16, 5)


@pytest.mark.slow
def test_lrcn_last_pooling_depends_on_frame_order(lrcn_last):
  model, variables, video, logits = lrcn_last
  apply = jax.jit(functools.partial(model.apply, train=False))
  np.testing.assert_allclose(apply(variables, video), logits, rtol=1e-5,
                             atol=1e-6)
  reordered = apply(variables, video[:, ::-1])
  assert not np.allclose(reordered, logits, atol=1e-4)
  # The last frame alone does not decide the output: the LSTM remembers.
  swapped_first = apply(variables, video[:, [1, 0, 2, 3]])
  assert not np.allclose(swapped_first, logits, atol=1e-4)


@pytest.mark.slow
def test_lrcn_mean_pooling_averages_per_step_logits():
  model = _lrcn(temporal_pooling='mean', num_lstm_layers=1)
  video = _video(3, (2, 3, 16, 16, 3))
  init = jax.jit(functools.partial(model.init_with_output, train=False,
                                   capture_intermediates=True))
  logits, variables = init(_key(), video)
  assert logits.shape == (2, 5)
  steps = variables['intermediates']['head']['__call__'][0]
  assert steps.shape == (2, 3, 5)
  np.testing.assert_allclose(logits, steps.mean(axis=1), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(logits, steps[:, -1], atol=1e-4)


def test_no_lstm_and_mean_pooling_is_the_frame_average_baseline():
  """num_lstm_layers=0, 'mean': the linear head of the mean frame feature, blind to frame order
  (the baseline of scripts/run_splits.py)."""
  model = _lrcn(temporal_pooling='mean', num_lstm_layers=0, dropout_rate=0.0)
  video = _video(4, (2, 3, 16, 16, 3))
  logits, variables = jax.jit(functools.partial(model.init_with_output, train=False))(
      _key(), video)
  assert set(variables['params']) == {'encoder', 'head'}
  features = model.apply(variables, video.reshape((6, 16, 16, 3)), train=False,
                         method=models.LRCN.encode_frames).reshape(2, 3, -1)
  head = variables['params']['head']
  expected = features.mean(axis=1) @ head['kernel'] + head['bias']
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.apply(variables, video[:, ::-1], train=False), logits,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lrcn_dropout_is_active_only_in_training(lrcn_last):
  model, variables, video, logits = lrcn_last
  model = model.clone(dropout_rate=0.9)
  apply = jax.jit(functools.partial(model.apply, train=True,
                                    mutable=['batch_stats']))
  rngs = lambda seed: {'dropout': jax.random.key(seed)}
  out_a, _ = apply(variables, video, rngs=rngs(0))
  out_b, _ = apply(variables, video, rngs=rngs(1))
  assert not np.allclose(out_a, out_b, atol=1e-4)


def _batch_stats_fn(model):
  def fn(variables, x):
    _, updates = model.apply(variables, x, train=True,
                             mutable=['batch_stats'])
    return updates['batch_stats']
  return fn


def test_sync_batch_norm_under_pmap_equals_whole_batch_stats():
  num_devices = 4
  assert jax.local_device_count() >= num_devices, 'see tests/conftest.py'
  model = encoders.SmallCNN(widths=(8,), bn_axis_name='batch')
  local = model.clone(bn_axis_name=None)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 8, 8, 3)),
                  jnp.float32)
  # Different inputs per replica, so per-replica stats really differ.
  x = x + jnp.arange(8.0)[:, None, None, None]
  variables = jax.jit(functools.partial(local.init, train=False))(_key(), x)

  whole = jax.jit(_batch_stats_fn(local))(variables, x)
  replicated = jax.tree.map(lambda a: jnp.stack([a] * num_devices), variables)
  shards = x.reshape(num_devices, 2, *x.shape[1:])
  synced = jax.pmap(_batch_stats_fn(model), axis_name='batch')(
      replicated, shards)
  unsynced = jax.pmap(_batch_stats_fn(local), axis_name='batch')(
      replicated, shards)

  for got, want, alone in zip(jax.tree.leaves(synced), jax.tree.leaves(whole),
                              jax.tree.leaves(unsynced)):
    for replica in range(1, num_devices):
      np.testing.assert_array_equal(got[replica], got[0])
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(alone[0], want, rtol=1e-3)


@pytest.mark.slow
def test_bfloat16_computes_in_bf16_with_float32_params_and_logits():
  model = _lrcn(dtype=jnp.bfloat16, num_lstm_layers=1)
  video = _video(5, (2, 3, 16, 16, 3))
  params = _init(model, video)['params']
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32
  apply = jax.jit(functools.partial(model.apply, train=True,
                                    capture_intermediates=True,
                                    mutable=['batch_stats', 'intermediates']))
  variables = _fake_variables(model, video)
  logits, state = apply(variables, video, rngs={'dropout': _key(1)})
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  for leaf in jax.tree.leaves(state['batch_stats']):
    assert leaf.dtype == jnp.float32
  encoder_out = state['intermediates']['encoder']['__call__'][0]
  assert encoder_out.dtype == jnp.bfloat16


@pytest.mark.parametrize('preprocessing, expected', [
    ('imagenet', [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224,
                  (30 / 255 - 0.406) / 0.225]),
    ('caffe', [30 - 103.939, 20 - 116.779, 10 - 123.68]),  # BGR, 0..255.
])
def test_create_model_preprocessing(preprocessing, expected):
  config = ml_collections.ConfigDict(dict(
      encoder='resnet50', lstm_size=8, dropout_rate=0.5,
      temporal_pooling='mean', preprocessing=preprocessing))
  model = models.create_model(config, 7, dtype='bfloat16')
  assert model.num_classes == 7 and model.num_lstm_layers == 1
  assert model.dtype == jnp.bfloat16 and not model.remat
  video = jnp.array([10, 20, 30], jnp.uint8).reshape(1, 1, 1, 1, 3)
  x = model.apply({}, video, method=model.normalise)
  np.testing.assert_allclose(x.astype(jnp.float32).ravel(), expected,
                             rtol=1e-2)


def test_create_model_rejects_unknown_encoder():
  config = ml_collections.ConfigDict(dict(
      encoder='resnet51', lstm_size=8, dropout_rate=0.5,
      temporal_pooling='mean'))
  with pytest.raises(ValueError, match="'resnet51'.*resnet50"):
    models.create_model(config, 7)


def _has_remat(fn, *args) -> bool:
  eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
  return any('remat' in e.primitive.name or 'checkpoint' in e.primitive.name
             for e in eqns)


@pytest.mark.slow
def test_remat_keeps_the_param_tree_and_logits(lrcn_last):
  model, variables, video, logits = lrcn_last
  remat = model.clone(remat=True)
  loss = lambda p: remat.apply({**variables, 'params': p}, video,
                               train=False).sum()
  plain = lambda p: model.apply({**variables, 'params': p}, video,
                                train=False).sum()
  assert _has_remat(loss, variables['params'])
  assert not _has_remat(plain, variables['params'])
  grads = jax.eval_shape(jax.grad(loss), variables['params'])
  assert jax.tree.structure(grads) == jax.tree.structure(variables['params'])
  np.testing.assert_allclose(
      jax.jit(functools.partial(remat.apply, train=False))(variables, video),
      logits, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resnet_remat_is_per_block_same_gradients_less_memory():
  """remat on a ResNet: one checkpoint per residual block and the same gradients. The recomputation
  is fenced by optimization barriers in the lowered program; GPU/TPU keep them, XLA:CPU removes
  them before fusion, so on CPU the step's temp memory does not shrink (not asserted here)."""
  plain = models.LRCN(encoder='resnet18', num_classes=5, lstm_size=8, dropout_rate=0.0,
                      conv_impl='xla')
  remat = plain.clone(remat=True)
  video = _video(7, (2, 4, 64, 64, 3))
  variables = _fake_variables(plain, video)

  def grad_fn(model):
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, video, train=True,
                              mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits))
    return jax.jit(jax.grad(loss))

  jaxpr = str(jax.make_jaxpr(grad_fn(remat))(variables['params']))
  assert jaxpr.count('checkpoint[') + jaxpr.count('remat') >= 8  # 8 BasicBlocks.
  want, got = grad_fn(plain)(variables['params']), grad_fn(remat)(variables['params'])
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = functools.reduce(lambda t, k: t[k.key], path, want)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  lowered = grad_fn(remat).lower(variables['params']).as_text()
  assert lowered.count('optimization_barrier') >= 8
  assert 'optimization_barrier' not in grad_fn(plain).lower(variables['params']).as_text()


@pytest.mark.slow
@pytest.mark.parametrize('conv_impl', ['xla', 'cpu'])
def test_bfloat16_loss_and_gradients_agree_with_float32(conv_impl):
  """Mixed precision: bf16 encoder, f32 params, LSTM and loss, close to the f32 model."""
  f32 = _lrcn(num_lstm_layers=1, dropout_rate=0.0, conv_impl=conv_impl)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  video = _video(6, (2, 3, 16, 16, 3))
  labels = jnp.array([1, 3])
  variables = _fake_variables(f32, video)

  def loss_fn(model):
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, video, train=True,
                              mutable=['batch_stats'])
      labels_1hot = jax.nn.one_hot(labels, logits.shape[-1])
      return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels_1hot, -1))
    return jax.jit(jax.value_and_grad(loss))

  want_loss, want = loss_fn(f32)(variables['params'])
  loss, grads = loss_fn(bf16)(variables['params'])
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-2)
  # bf16 has an 8-bit mantissa. The f32 LSTM and head get gradients within 5% (relative l2); the
  # bf16 encoder's gradients (through 4 conv+BN layers) within 35% (~20% measured), each tensor
  # pointing the same way.
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    w = functools.reduce(lambda t, k: t[k.key], path, want)
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g))
    rel = np.linalg.norm(g - w) / np.linalg.norm(w)
    cosine = np.dot(g.ravel(), w.ravel()) / (np.linalg.norm(g) * np.linalg.norm(w))
    in_encoder = path[0].key == 'encoder'
    assert rel <= (0.35 if in_encoder else 0.05), jax.tree_util.keystr(path)
    assert cosine >= 0.95, jax.tree_util.keystr(path)
