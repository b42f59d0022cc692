"""Pretrained encoders: Keras -> har_jax parity, encoder checkpoints, the frozen-encoder phase.

The Keras tests build keras.applications.ResNet50(weights=None) and randomise every weight,
including conv biases and BatchNorm moving statistics, so that a wrong conversion cannot pass.
"""

import functools
import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from har_jax import checkpoints
from har_jax import errors
from har_jax import models
from har_jax import optim
from har_jax import parallel
from har_jax import pretrained
from har_jax import steps
from har_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAFFE_MEAN_BGR = np.asarray((103.939, 116.779, 123.68), np.float32)


def _load_script():
  spec = importlib.util.spec_from_file_location(
      'convert_keras_encoder', os.path.join(REPO, 'scripts', 'convert_keras_encoder.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _randomise_keras(model, seed=0):
  """Random conv biases and BN gamma/beta/moving stats (Keras initialises them to constants)."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    if len(weights) == 2:  # Conv2D: kernel (already random), bias.
      layer.set_weights([weights[0], rng.normal(0, 0.1, weights[1].shape).astype(np.float32)])
    else:  # BatchNormalization: gamma, beta, moving_mean, moving_variance.
      n = weights[0].shape
      layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n),
                         rng.normal(0, 0.2, n), rng.uniform(0.5, 2.0, n)])


@pytest.fixture(scope='module')
def keras_resnet50():
  model = pretrained.build_keras_model('resnet50', weights=None)
  _randomise_keras(model)
  return model


def _caffe_images(n=3, size=64, seed=1):
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32) - CAFFE_MEAN_BGR


@pytest.mark.slow
def test_keras_resnet50_parity(keras_resnet50):
  variables = pretrained.convert_keras_resnet(keras_resnet50)
  meta = dict(encoder='resnet50', encoder_kwargs={'stride_on_1x1': True})
  images = _caffe_images()
  reference = np.asarray(keras_resnet50(images, training=False))
  ours = pretrained.encoder_features(variables, meta, images)
  assert ours.shape == reference.shape == (3, 2048)
  scale = np.abs(reference).max()
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)
  assert pretrained.relative_error(ours, reference) < 1e-4

  # Power: the folded conv biases matter, and so does where the stride sits (v1 vs v1.5).
  unfolded = jax.tree.map(np.copy, variables)
  keras_bn = keras_resnet50.get_layer('conv5_block3_3_bn')
  unfolded['batch_stats']['stage4_block2']['bn3']['mean'] = keras_bn.get_weights()[2]
  assert pretrained.relative_error(
      pretrained.encoder_features(unfolded, meta, images), reference) > 1e-3
  v15 = dict(meta, encoder_kwargs={'stride_on_1x1': False})
  assert pretrained.relative_error(
      pretrained.encoder_features(variables, v15, images), reference) > 1e-2


@pytest.mark.slow
def test_convert_script_from_h5_file(keras_resnet50, tmp_path):
  weights_file = str(tmp_path / 'resnet50_random.weights.h5')
  keras_resnet50.save_weights(weights_file)
  out = str(tmp_path / 'encoder')
  script = _load_script()
  meta = script.convert('resnet50', out, weights_file, parity_image_size=64)
  assert meta['parity_relative_error'] < 1e-4
  with pytest.raises(FileExistsError):
    script.convert('resnet50', out, weights_file, check_parity=False)

  saved = pretrained.read_encoder_meta(out)
  assert saved['encoder'] == 'resnet50' and saved['preprocessing'] == 'caffe'
  assert saved['encoder_kwargs'] == {'stride_on_1x1': True}
  expected = pretrained.convert_keras_resnet(keras_resnet50)
  restored, _ = pretrained.load_encoder(out, expected)
  jax.tree.map(np.testing.assert_array_equal, restored, expected)


@pytest.mark.slow
def test_legacy_h5_file_with_the_classifier_top(tmp_path):
  """The format of Keras' published files (resnet50_weights_tf_dim_ordering_tf_kernels.h5)."""
  h5py = pytest.importorskip('h5py')
  keras = pytest.importorskip('keras')
  legacy_h5 = pytest.importorskip('keras.src.legacy.saving.legacy_h5_format')
  full = keras.applications.ResNet50(weights=None, include_top=True)
  _randomise_keras(full, seed=2)
  path = str(tmp_path / 'resnet50_with_top.h5')
  with h5py.File(path, 'w') as f:
    legacy_h5.save_weights_to_hdf5_group(f, full)
  variables, meta, _ = pretrained.convert_keras('resnet50', path)
  assert meta['encoder'] == 'resnet50'
  bn = full.get_layer('conv4_block6_3_bn').get_weights()
  bias = full.get_layer('conv4_block6_3_conv').get_weights()[1]
  np.testing.assert_array_equal(variables['params']['stage3_block5']['bn3']['scale'], bn[0])
  np.testing.assert_allclose(variables['batch_stats']['stage3_block5']['bn3']['mean'],
                             bn[2] - bias, rtol=1e-6)


def test_caffe_preprocessing_matches_keras():
  keras_resnet = pytest.importorskip('keras').applications.resnet50
  video = np.random.default_rng(0).integers(0, 256, (1, 2, 8, 8, 3), dtype=np.uint8)
  model = models.create_model(_recipe().model, num_classes=3)
  ours = model.apply({}, jnp.asarray(video), method=models.LRCN.normalise)
  expected = keras_resnet.preprocess_input(video.astype(np.float32))
  np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-4)


def _recipe():
  spec = importlib.util.spec_from_file_location(
      'ucf101_resnet50_imagenet', os.path.join(REPO, 'configs', 'ucf101_resnet50_imagenet.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_recipe_config_matches_converted_checkpoint():
  config = _recipe()
  spec = pretrained.KERAS_ARCHS['resnet50']
  meta = dict(encoder=spec['encoder'], encoder_kwargs=spec['encoder_kwargs'],
              preprocessing=spec['preprocessing'])
  assert not pretrained.config_mismatches(meta, config.model)
  assert config.model.encoder_init and config.model.freeze_encoder_steps > 0
  model = models.create_model(config.model, num_classes=101)
  video = jax.ShapeDtypeStruct((1, config.num_frames, config.image_size, config.image_size, 3),
                               jnp.uint8)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), video)
  template = pretrained.encoder_template(spec['encoder'], spec['encoder_kwargs'])
  pretrained.check_tree(template['params'], variables['params']['encoder'], 'the recipe')


def _random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), tree)


@pytest.mark.slow
def test_load_encoder_into_state_replaces_exactly_the_encoder(tiny_config, tmp_path):
  config = tiny_config()
  state = train.create_train_state(jax.random.PRNGKey(0), config, 10,
                                   optim.create_learning_rate_fn(config))
  encoder = _random_like(pretrained.encoder_template(config.model.encoder,
                                                     image_size=config.image_size), seed=1)
  path = str(tmp_path / 'small_cnn')
  pretrained.save_encoder(path, encoder, {'encoder': 'small_cnn', 'encoder_kwargs': {},
                                          'preprocessing': 'imagenet'})
  loaded = pretrained.load_encoder_into_state(state, path, model_config=config.model)

  assert sorted(loaded.params) == sorted(state.params)
  jax.tree.map(np.testing.assert_array_equal, loaded.params['encoder'], encoder['params'])
  jax.tree.map(np.testing.assert_array_equal, loaded.batch_stats['encoder'],
               encoder['batch_stats'])
  for key in state.params:
    if key != 'encoder':
      jax.tree.map(np.testing.assert_array_equal, loaded.params[key], state.params[key])
  jax.tree.map(np.testing.assert_array_equal, loaded.opt_state, state.opt_state)
  assert int(loaded.step) == 0 and np.array_equal(jax.random.key_data(loaded.rng),
                                                  jax.random.key_data(state.rng))

  wrong = config.model.copy_and_resolve_references()
  wrong.preprocessing = 'caffe'
  with pytest.raises(ValueError, match='model.preprocessing'):
    pretrained.load_encoder_into_state(state, path, model_config=wrong)


def _zero_lrcn_state(encoder, **encoder_kwargs):
  """A concrete LRCN TrainState with zero params, made without compiling an init."""
  model = models.LRCN(encoder=encoder, num_classes=5, lstm_size=8,
                      encoder_kwargs=tuple(encoder_kwargs.items()))
  video = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.uint8)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), video)
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return train.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                 batch_stats=variables['batch_stats'], tx=optax.sgd(0.1),
                                 rng=jax.random.key(0))


def test_mismatched_architecture_names_the_first_parameter(tmp_path):
  path = str(tmp_path / 'resnet18')
  encoder = jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                         pretrained.encoder_template('resnet18'))
  pretrained.save_encoder(path, encoder, {'encoder': 'resnet18', 'preprocessing': 'imagenet'})
  state = _zero_lrcn_state('resnet50')
  with pytest.raises(errors.UserError,
                     match=r"'params/stage1_block0/bn3/bias' \(256,\) .* missing .* "
                           r"'params/stage1_block0' holds \['bn1', 'bn2', 'conv1', 'conv2'\]"):
    pretrained.load_encoder_into_state(state, path)


def test_stride_convention_mismatch_is_refused(tmp_path):
  path = str(tmp_path / 'resnet50')
  encoder = jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                         pretrained.encoder_template('resnet50', {'stride_on_1x1': True}))
  pretrained.save_encoder(path, encoder, {'encoder': 'resnet50', 'preprocessing': 'caffe',
                                          'encoder_kwargs': {'stride_on_1x1': True}})
  model_config = ml_collections.ConfigDict(dict(encoder='resnet50', preprocessing='caffe',
                                                encoder_kwargs={}))
  with pytest.raises(ValueError, match=r'encoder_kwargs.stride_on_1x1: checkpoint True'):
    pretrained.load_encoder_into_state(_zero_lrcn_state('resnet50'), path,
                                       model_config=model_config)


def _optim_config(optimizer, freeze, clip=1.0):
  return ml_collections.ConfigDict(dict(
      optimizer=optimizer, learning_rate=0.1, momentum=0.9, weight_decay=1e-2, warmup_steps=1,
      num_train_steps=10, grad_clip_norm=clip, model=dict(freeze_encoder_steps=freeze)))


def _toy_params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {'encoder': {'conv0': {'kernel': f(3, 3, 2, 4)}, 'bn0': {'scale': f(4), 'bias': f(4)}},
          'lstm_0': {'kernel': f(4, 8)}, 'head': {'kernel': f(8, 3), 'bias': f(3)}}


def _run(tx, params, num_steps, seed=0):
  """Applies `num_steps` updates from random gradients (norm ~ 10, so clipping is active)."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  for _ in range(num_steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, p.dtype), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _encoder_core_state(opt_state):
  """The encoder's optimizer state inside the last multi_transform (under its mask wrappers)."""
  found = []

  def visit(node):
    if isinstance(node, optax.MultiTransformState):
      found.append(node)
    elif isinstance(node, tuple):
      for child in node:
        visit(child)
  visit(opt_state)
  return found[-1].inner_states['encoder'].inner_state.inner_state


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_frozen_encoder_optimizer_phase(optimizer):
  config = _optim_config(optimizer, freeze=3)
  tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config))
  params = _toy_params()
  frozen, state = _run(tx, params, 3)
  jax.tree.map(np.testing.assert_array_equal, frozen['encoder'], params['encoder'])
  for key in ('lstm_0', 'head'):
    for before, after in zip(jax.tree.leaves(params[key]), jax.tree.leaves(frozen[key])):
      assert not np.allclose(before, after), key
  # The encoder's inner optimizer state (momentum, Adam moments and count) was never touched.
  encoder_state = _encoder_core_state(state)
  fresh = _encoder_core_state(tx.init(params))
  assert jax.tree.leaves(fresh)
  jax.tree.map(np.testing.assert_array_equal, encoder_state, fresh)

  moved, _ = _run(tx, params, 4)
  for before, after in zip(jax.tree.leaves(params['encoder']), jax.tree.leaves(moved['encoder'])):
    assert not np.allclose(before, after)


@pytest.mark.slow
def test_frozen_encoder_gradients_do_not_shrink_the_rest():
  config = _optim_config('sgd', freeze=2)
  lr_fn = optim.create_learning_rate_fn(config)
  params = _toy_params()
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 5.0), params)
  frozen_tx = optim.create_optimizer(config, lr_fn)
  updates, _ = frozen_tx.update(grads, frozen_tx.init(params), params)
  plain_tx = optim.create_optimizer(_optim_config('sgd', freeze=0), lr_fn)
  no_encoder_grads = dict(grads, encoder=jax.tree.map(jnp.zeros_like, grads['encoder']))
  expected, _ = plain_tx.update(no_encoder_grads, plain_tx.init(params), params)
  for key in ('lstm_0', 'head'):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
                 updates[key], expected[key])


def test_no_freeze_keeps_the_plain_optimizer():
  config = _optim_config('sgd', freeze=0)
  tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config))
  assert 'MultiTransformState' not in repr(tx.init(_toy_params()))


def test_hold_frozen_encoder_batch_stats():
  config = _optim_config('sgd', freeze=2)
  old = {'encoder': {'bn0': {'mean': jnp.zeros(3)}}, 'other': {'mean': jnp.zeros(2)}}
  new = jax.tree.map(lambda x: x + 1.0, old)
  held = optim.hold_frozen_encoder_batch_stats(jnp.asarray(1), old, new, config)
  np.testing.assert_array_equal(held['encoder']['bn0']['mean'], 0.0)
  np.testing.assert_array_equal(held['other']['mean'], 1.0)
  moved = optim.hold_frozen_encoder_batch_stats(jnp.asarray(2), old, new, config)
  np.testing.assert_array_equal(moved['encoder']['bn0']['mean'], 1.0)


@pytest.mark.slow
def test_train_step_freezes_the_encoder_for_n_steps(tiny_config):
  num_frozen = 2
  config = tiny_config(**{'model.freeze_encoder_steps': num_frozen, 'warmup_steps': 0,
                          'learning_rate': 1e-2})
  lr_fn = optim.create_learning_rate_fn(config)
  state = train.create_train_state(jax.random.PRNGKey(0), config, 10, lr_fn)
  model = models.create_model(config.model, 10, dtype=config.dtype, bn_axis_name='batch')
  devices = jax.devices()[:1]
  p_step = jax.pmap(functools.partial(steps.train_step, model=model, learning_rate_fn=lr_fn,
                                      config=config), axis_name='batch', devices=devices)
  rng = np.random.default_rng(0)
  replicated = parallel.replicate(state, devices)
  history = []
  for _ in range(num_frozen + 1):
    batch = {'video': rng.integers(0, 256, (1, 8, config.num_frames, config.image_size,
                                            config.image_size, 3), dtype=np.uint8),
             'label': rng.integers(0, 10, (1, 8)).astype(np.int32)}
    replicated, _ = p_step(replicated, batch)
    history.append(parallel.unreplicate(replicated).params)

  frozen, thawed = history[num_frozen - 1], history[num_frozen]
  jax.tree.map(np.testing.assert_array_equal, frozen['encoder'], state.params['encoder'])
  for key in ('lstm_0', 'head'):
    assert not np.allclose(jax.tree.leaves(frozen[key])[0], jax.tree.leaves(state.params[key])[0])
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(thawed['encoder']),
                                                      jax.tree.leaves(state.params['encoder']))]
  assert all(changed)


def _one_device_step(config, model, lr_fn, frozen_encoder: bool):
  return jax.pmap(functools.partial(steps.train_step, model=model, learning_rate_fn=lr_fn,
                                    config=config, frozen_encoder=frozen_encoder),
                  axis_name='batch', devices=jax.devices()[:1])


@pytest.mark.slow
def test_frozen_encoder_step_trains_the_head_on_the_features_it_is_evaluated_on(tiny_config):
  """While frozen, the encoder's BatchNorm normalises with its running statistics (inference
  mode): the loss the head trains on is the loss of the model as evaluated."""
  config = tiny_config(**{'model.freeze_encoder_steps': 5, 'warmup_steps': 0})
  lr_fn = optim.create_learning_rate_fn(config)
  state = train.create_train_state(jax.random.PRNGKey(0), config, 10, lr_fn)
  # Running statistics unlike any batch's, so inference mode and batch statistics differ.
  state = state.replace(batch_stats=jax.tree.map(lambda x: x + 0.5, state.batch_stats))
  model = models.create_model(config.model, 10, dtype=config.dtype, bn_axis_name='batch')
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (8, config.num_frames, config.image_size, config.image_size, 3),
                       dtype=np.uint8)
  labels = rng.integers(0, 10, (8,)).astype(np.int32)
  eval_model = models.create_model(config.model, 10, dtype=config.dtype)
  logits = eval_model.apply({'params': state.params, 'batch_stats': state.batch_stats}, video,
                            train=False)
  evaluated = float(steps.cross_entropy(logits, labels, 10).mean())
  losses = {}
  for frozen in (True, False):
    new, out = _one_device_step(config, model, lr_fn, frozen)(
        parallel.replicate(state, jax.devices()[:1]), {'video': video[None], 'label': labels[None]})
    losses[frozen] = float(parallel.unreplicate(out['metrics']).compute()['loss'])
    if frozen:
      new = parallel.unreplicate(new)
      jax.tree.map(np.testing.assert_array_equal, new.params['encoder'], state.params['encoder'])
      jax.tree.map(np.testing.assert_array_equal, new.batch_stats, state.batch_stats)
  np.testing.assert_allclose(losses[True], evaluated, rtol=1e-5)
  assert abs(losses[False] - evaluated) > 1e-3, losses  # Batch statistics: what was fixed.


@pytest.mark.slow
def test_resume_across_the_end_of_the_frozen_phase_is_exact(tiny_config, tmp_path):
  """A run resumed at step 2 of a 3-step frozen phase ends bitwise equal to one never stopped."""
  config = tiny_config(**{'model.freeze_encoder_steps': 3, 'num_train_steps': 6,
                          'deterministic_data': True, 'checkpoint_every_steps': 2,
                          'keep_checkpoints': 10, 'eval_every_steps': 6})
  straight = tmp_path / 'straight'
  train.train_and_evaluate(config, str(straight))
  resumed = tmp_path / 'resumed'
  shutil.copytree(straight / 'checkpoints' / '2', resumed / 'checkpoints' / '2')
  train.train_and_evaluate(config, str(resumed))
  manager = checkpoints.CheckpointManager(str(straight), read_only=True)
  want = manager.read_meta(6)['variables_crc32']
  manager.close()
  manager = checkpoints.CheckpointManager(str(resumed), read_only=True)
  assert manager.all_steps() == [2, 4, 6]
  assert manager.read_meta(6)['variables_crc32'] == want
  manager.close()
