"""Pretrained frame encoders: encoder checkpoints, loading them, and the Keras Applications path.

Encoder checkpoints are made by scripts/convert_keras_encoder.py (Keras ResNet50, below) and by
scripts/convert_weights.py (PyTorch-layout ResNet-18/34/50: har_jax.torch_weights).

An encoder checkpoint is an orbax directory with two items:
  'variables': {'params': ..., 'batch_stats': ...} of one encoder (the subtree that LRCN keeps
               under 'encoder'), float32.
  'meta':      JSON: encoder name, encoder_kwargs, the input preprocessing the weights expect
               (a key of har_jax.models.PREPROCESSING), and where the weights came from.

Conversion from Keras (exact in inference mode):
  - Conv kernels are HWIO in both frameworks and are copied as they are.
  - Keras convolutions have biases and ours do not; every conv is followed by a BatchNorm, so the
    bias b is folded into the BN's moving mean: BN(conv(x) + b) with mean m equals BN(conv(x))
    with mean m - b.
  - Keras BN epsilon (1.001e-5) differs from ours (encoders.BN_EPSILON); the difference is added to
    the moving variance, so 1 / sqrt(var + eps) is unchanged.
  - Keras ResNet50 is ResNet v1 (stride on the first 1x1 conv): the encoder is built with
    stride_on_1x1=True, and the weights expect Keras' 'caffe' preprocessing (BGR, mean-subtracted
    0..255 pixels).
"""

import functools
import os
import re
from typing import Any, Optional

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from har_jax import config_fields
from har_jax import errors
from har_jax import paths
from har_jax.models import encoders

FORMAT = 'har_jax_encoder'
VERSION = 1

# Keras Applications architectures we can convert, and the har_jax encoder each becomes.
KERAS_ARCHS: dict[str, dict[str, Any]] = {
    'resnet50': dict(keras_name='ResNet50', encoder='resnet50',
                     encoder_kwargs={'stride_on_1x1': True}, preprocessing='caffe',
                     keras_url='https://storage.googleapis.com/tensorflow/keras-applications/'
                               'resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'),
}

_KERAS_STEM = re.compile(r'^conv1_(conv|bn)$')
_KERAS_BLOCK = re.compile(r'^conv(\d)_block(\d+)_(\d)_(conv|bn)$')
_KERAS_TOP = ('predictions',)  # The ImageNet classifier of include_top models: not converted.



def _arch(arch: str) -> dict[str, Any]:
  if arch not in KERAS_ARCHS:
    raise ValueError(f'Unknown arch {arch!r}; convertible: {sorted(KERAS_ARCHS)}')
  return KERAS_ARCHS[arch]


def build_keras_model(arch: str, weights: Optional[str] = 'imagenet'):
  """The Keras Applications backbone of `arch` without its classifier, average-pooled.

  Args:
    arch: a key of KERAS_ARCHS.
    weights: 'imagenet' (downloaded by Keras, needs the internet once), None (random), or the path
      of a Keras weights file (.h5 or .weights.h5), with or without the classifier ("top").

  Returns:
    A keras.Model, `[N, H, W, 3]` preprocessed float -> `[N, F]` pooled features.
  """
  import keras  # pylint: disable=g-import-not-at-top  (imports TensorFlow: only when converting)
  build = getattr(keras.applications, _arch(arch)['keras_name'])
  if weights is None:
    return build(weights=None, include_top=False, pooling='avg')
  if weights == 'imagenet':
    try:
      return build(weights='imagenet', include_top=False, pooling='avg')
    except Exception as e:  # pylint: disable=broad-except  (Keras raises bare Exceptions)
      raise RuntimeError(
          f'Keras could not fetch the ImageNet weights of {arch} ({type(e).__name__}: {e}). '
          f'Download {_arch(arch)["keras_url"]} where there is internet and pass the file '
          'as --keras_weights.') from e
  if not os.path.exists(weights):
    raise FileNotFoundError(f'Keras weights file {weights!r} does not exist.')
  model = build(weights=None, include_top=False, pooling='avg')
  try:
    model.load_weights(weights)
    return model
  except ValueError as e:  # A file with the classifier does not fit the notop model.
    logging.info('%s does not fit the model without a top (%s); trying with the top.', weights, e)
  full = build(weights=None, include_top=True)
  full.load_weights(weights)
  for layer in model.layers:
    if layer.weights:
      layer.set_weights(full.get_layer(layer.name).get_weights())
  return model


def encoder_template(encoder: str, encoder_kwargs: Optional[dict] = None,
                     image_size: int = 64) -> dict:
  """Shapes and dtypes of an encoder's {'params', 'batch_stats'}; nothing is computed.

  ResNets' shapes do not depend on image_size; small_cnn's spatial projection does.
  """
  model = encoders.get_encoder_cls(encoder)(**(encoder_kwargs or {}))
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def _flax_name(keras_layer: str) -> Optional[tuple[str, str]]:
  """Keras ResNet layer name -> (flax module path, 'conv' | 'bn'), or None if not ours."""
  m = _KERAS_STEM.match(keras_layer)
  if m:
    return f'stem_{m.group(1)}', m.group(1)
  m = _KERAS_BLOCK.match(keras_layer)
  if not m:
    return None
  stage, block, index, kind = int(m.group(1)) - 1, int(m.group(2)) - 1, m.group(3), m.group(4)
  layer = f'proj_{kind}' if index == '0' else f'{kind}{index}'
  return f'stage{stage}_block{block}/{layer}', kind


def convert_keras_resnet(keras_model) -> dict:
  """Keras ResNet (v1) weights -> har_jax ResNet {'params', 'batch_stats'} as float32 numpy.

  Conv biases are folded into the following BN and the BN epsilon difference into the variance
  (see the module docstring), so the result is exact in inference mode.
  """
  conv_bias, bns, params = {}, {}, {}
  for layer in keras_model.layers:
    weights = [np.asarray(w, np.float32) for w in layer.get_weights()]
    if not weights:
      continue
    name = _flax_name(layer.name)
    if name is None:
      if layer.name in _KERAS_TOP:
        continue
      raise ValueError(f'Keras layer {layer.name!r} ({type(layer).__name__}) has weights but no '
                       'har_jax counterpart; is this a Keras ResNet v1?')
    path, kind = name
    if kind == 'conv':
      params[f'{path}/kernel'] = weights[0]
      conv_bias[path] = weights[1] if len(weights) > 1 else 0.0
    else:
      gamma, beta, mean, var = weights
      bns[path] = (gamma, beta, mean, var, float(layer.epsilon))
  batch_stats = {}
  for path, (gamma, beta, mean, var, eps) in bns.items():
    conv_path = path.replace('bn', 'conv')
    if conv_path not in conv_bias:
      raise ValueError(f'BatchNorm {path!r} has no preceding convolution {conv_path!r}.')
    params[f'{path}/scale'], params[f'{path}/bias'] = gamma, beta
    batch_stats[f'{path}/mean'] = mean - conv_bias.pop(conv_path)
    batch_stats[f'{path}/var'] = (var + (eps - encoders.BN_EPSILON)).astype(np.float32)
  if conv_bias:
    raise ValueError(f'Convolutions without a BatchNorm to fold the bias into: {sorted(conv_bias)}')
  return {'params': unflatten(params), 'batch_stats': unflatten(batch_stats)}


def unflatten(flat: dict) -> dict:
  """{'a/b/leaf': x} -> {'a': {'b': {'leaf': x}}}."""
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def convert_keras(arch: str, weights: Optional[str] = 'imagenet') -> tuple[dict, dict, Any]:
  """Builds the Keras model of `arch` with `weights` and converts it.

  Returns:
    (variables, meta, keras_model): the encoder checkpoint contents (checked against the har_jax
    encoder's parameter tree) and the Keras model they came from.
  """
  import keras  # pylint: disable=g-import-not-at-top
  spec = _arch(arch)
  keras_model = build_keras_model(arch, weights)
  variables = convert_keras_resnet(keras_model)
  check_tree(encoder_template(spec['encoder'], spec['encoder_kwargs']), variables,
             f'the har_jax {spec["encoder"]!r} encoder')
  meta = {
      'format': FORMAT, 'version': VERSION, 'encoder': spec['encoder'],
      'encoder_kwargs': spec['encoder_kwargs'], 'preprocessing': spec['preprocessing'],
      'source': f'keras.applications.{spec["keras_name"]}(weights={weights!r})',
      'keras_version': keras.__version__,
  }
  return variables, meta, keras_model


@functools.lru_cache(maxsize=8)
def _jitted_inference(encoder: str, encoder_kwargs: tuple) -> Any:
  model = encoders.get_encoder_cls(encoder)(**dict(encoder_kwargs))
  return jax.jit(functools.partial(model.apply, train=False))


def encoder_features(variables: dict, meta: dict, images: np.ndarray) -> np.ndarray:
  """Runs a converted encoder in inference mode: `[N, H, W, 3]` preprocessed float -> `[N, F]`.

  Convolutions run at full float32 precision (no TF32 / bf16 passes on GPUs and TPUs), as a
  parity check needs.
  """
  apply = _jitted_inference(meta['encoder'],
                            tuple(sorted(meta.get('encoder_kwargs', {}).items())))
  with jax.default_matmul_precision('float32'):
    return np.asarray(apply(variables, jnp.asarray(images, jnp.float32)))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """max |ours - reference| / max |reference| (0 when both are all zero)."""
  scale = float(np.max(np.abs(reference)))
  diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))))
  return diff / scale if scale > 0 else diff


def check_tree(expected, actual, what: str):
  """Raises errors.UserError naming the first leaf of `expected` (a tree of arrays or
  ShapeDtypeStructs; in its flattening order) that `actual` lacks or holds with another shape,
  then the first leaf of `actual` that `expected` lacks."""
  want = traverse_util.flatten_dict(flax.core.unfreeze(expected), sep='/')
  have = traverse_util.flatten_dict(flax.core.unfreeze(actual), sep='/')
  for path, leaf in want.items():
    if path not in have:
      module = path.rsplit('/', 2)[0]
      held = sorted({p[len(module) + 1:].split('/')[0] for p in have if p.startswith(module + '/')})
      raise errors.UserError(
          f'Encoder parameter {path!r} {tuple(leaf.shape)} of {what} is missing from the '
          f'checkpoint (its {module!r} holds {held}).')
    if tuple(np.shape(have[path])) != tuple(leaf.shape):
      raise errors.UserError(
          f'Encoder parameter {path!r}: checkpoint shape {tuple(np.shape(have[path]))}, '
          f'{what} expects {tuple(leaf.shape)}.')
  extra = [p for p in have if p not in want]
  if extra:
    raise errors.UserError(
        f'Encoder parameter {extra[0]!r} of the checkpoint does not exist in {what} '
        f'({len(extra)} extra parameters).')


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      variables=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))


def save_encoder(path: str, variables: dict, meta: dict):
  """Writes an encoder checkpoint (synchronously) to the new directory `path`."""
  for field in ('encoder', 'preprocessing'):
    if field not in meta:
      raise ValueError(f'Encoder checkpoint meta needs {field!r}; got {sorted(meta)}')
  meta = dict(meta, format=FORMAT, version=VERSION)
  variables = jax.tree.map(lambda x: np.asarray(x, np.float32), flax.core.unfreeze(variables))
  _checkpointer().save(paths.path(path), args=ocp.args.Composite(
      variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)))
  logging.info('Wrote encoder checkpoint %s (%s, %d parameters).', path, meta['encoder'],
               sum(int(np.size(x)) for x in jax.tree.leaves(variables['params'])))


def read_encoder_meta(path: str) -> dict:
  """The 'meta' JSON of the encoder checkpoint at `path`."""
  path = paths.path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'No encoder checkpoint at {path}. Make one with '
                            'scripts/convert_weights.py or scripts/convert_keras_encoder.py.')
  meta = _checkpointer().restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  meta = meta['meta']
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path} is not a har_jax encoder checkpoint (meta: {meta}).')
  return meta


def load_encoder(path: str, target: dict) -> tuple[dict, dict]:
  """Restores an encoder checkpoint into the structure, shapes and shardings of `target`.

  Args:
    path: an encoder checkpoint directory.
    target: {'params': ..., 'batch_stats': ...} of the encoder to fill (arrays or
      ShapeDtypeStructs); the checkpoint must hold exactly these paths and shapes.

  Returns:
    (variables, meta).
  Raises:
    errors.UserError naming the first parameter that does not fit.
  """
  path = paths.path(path)
  meta = read_encoder_meta(path)
  tree_meta = _checkpointer().metadata(path).item_metadata['variables']
  saved = jax.tree.map(lambda m: np.empty(m.shape, np.uint8), dict(tree_meta.tree))
  check_tree(target, saved, f'the model (encoder {meta["encoder"]!r} in the checkpoint)')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flax.core.unfreeze(target))
  restored = _checkpointer().restore(path, args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(abstract)))
  return restored['variables'], meta


def config_mismatches(meta: dict, model_config) -> list[str]:
  """Model config fields that disagree with what the encoder checkpoint was made for."""
  problems = []
  if model_config.encoder != meta['encoder']:
    problems.append(f'model.encoder: checkpoint {meta["encoder"]!r}, config '
                    f'{model_config.encoder!r}')
  configured = dict(model_config.get('encoder_kwargs', None) or {})
  defaults = encoders.get_encoder_cls(model_config.encoder)()
  for key, value in meta.get('encoder_kwargs', {}).items():
    current = configured.get(key, getattr(defaults, key, None))
    if current != value:
      problems.append(f'model.encoder_kwargs.{key}: checkpoint {value!r}, config {current!r}')
  preprocessing = config_fields.model_field(model_config, 'preprocessing')
  if preprocessing != meta['preprocessing']:
    problems.append(f'model.preprocessing: checkpoint {meta["preprocessing"]!r}, config '
                    f'{preprocessing!r}')
  return problems


def load_encoder_into_state(state, path: str, *, model_config=None):
  """Replaces exactly `state.params['encoder']` and `state.batch_stats['encoder']`.

  Meant for the start of a fresh run (step 0): the optimizer state is left as initialised.

  Args:
    state: an unreplicated TrainState of an LRCN (params {'encoder', 'lstm_*', 'head'}).
    path: an encoder checkpoint directory (scripts/convert_weights.py, convert_keras_encoder.py).
    model_config: if given (config.model), its encoder, encoder_kwargs and preprocessing must be
      those the checkpoint was made for; a ValueError lists every disagreement.

  Returns:
    The state with the pretrained encoder.
  Raises:
    errors.UserError naming the first encoder parameter that does not fit.
  """
  if 'encoder' not in state.params:
    raise ValueError(f'The state has no encoder params (top-level keys {sorted(state.params)}).')
  if model_config is not None:
    problems = config_mismatches(read_encoder_meta(path), model_config)
    if problems:
      raise ValueError(f'Encoder checkpoint {path} does not fit the model config:\n  ' +
                       '\n  '.join(problems))
  if int(np.asarray(jax.device_get(state.step)).reshape(-1)[0]) != 0:
    logging.warning('Loading an encoder into a state at step %s; its optimizer state is kept.',
                    state.step)
  target = {'params': state.params['encoder'],
            'batch_stats': state.batch_stats.get('encoder', {})}
  variables, meta = load_encoder(path, target)
  logging.info('Loaded the %s encoder from %s (%s).', meta['encoder'], path, meta.get('source'))
  batch_stats = dict(state.batch_stats)
  if variables['batch_stats'] or 'encoder' in batch_stats:
    batch_stats['encoder'] = variables['batch_stats']
  return state.replace(params=dict(state.params, encoder=variables['params']),
                       batch_stats=batch_stats)


# Model config fields that describe how an encoder checkpoint's weights are laid out and fed; a run
# with model.encoder_init takes them from the checkpoint (resolve_encoder_init).
CHECKPOINT_FIELDS = ('encoder_kwargs', 'preprocessing')


def resolve_encoder_init(config):
  """`config` with model.encoder_kwargs and model.preprocessing taken from the encoder checkpoint
  that model.encoder_init names (a copy; `config` itself is unchanged). Without encoder_init,
  `config` as it is.

  So one config trains from Keras weights (ResNet v1, 'caffe' input) or PyTorch weights (v1.5,
  'imagenet' input): the weights say which. Each field changed is logged. Training and evaluation
  both resolve, so a run's checkpoints and its --mode=eval agree.

  Raises:
    errors.UserError if the checkpoint holds another encoder than model.encoder, or is not one.
  """
  path = config_fields.get(config, 'model.encoder_init')
  if not path:
    return config
  try:
    meta = read_encoder_meta(path)
  except (FileNotFoundError, ValueError) as e:
    raise errors.UserError(f'model.encoder_init: {e}') from None
  if meta['encoder'] != config.model.encoder:
    raise errors.UserError(
        f'model.encoder_init={path!r} holds a {meta["encoder"]!r} encoder, model.encoder is '
        f'{config.model.encoder!r}; pass --config.model.encoder={meta["encoder"]}.')
  wanted = {'encoder_kwargs': dict(meta.get('encoder_kwargs', {})),
            'preprocessing': meta['preprocessing']}
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    for field in CHECKPOINT_FIELDS:
      current = config_fields.model_field(resolved.model, field)
      if field == 'encoder_kwargs':
        current = dict(current or {})
      if current != wanted[field]:
        logging.info('model.%s: %r, as the encoder checkpoint %s records (the config had %r).',
                     field, wanted[field], path, current)
        resolved.model[field] = wanted[field]
  return resolved
