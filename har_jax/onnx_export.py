r"""The ONNX format of an export: the serving signatures as ONNX models, converted by jax2onnx.

  onnx_export.check_converter()  # UserError naming the `onnx` extra when jax2onnx is missing
  made = onnx_export.write_onnx(folder, loaded, serving.signatures(loaded))

Writes into `folder` (see `artifacts.ONNX_FILES`):
  model.onnx              serving_default   frames uint8 [batch, num_frames, height, width, 3]
                                            -> logits, probabilities float32 [batch, num_classes]
  encode_frames.onnx      encode_frames     frames uint8 [frames, height, width, 3]
                                            -> features float32 [frames, D]
  classify_features.onnx  classify_features features float32 [batch, time, D]
                                            -> logits, probabilities
Batch, height, width, frames and time are dynamic dimensions named as in model.json; the
preprocessing (frame geometry, resize, centre crop) runs inside the graph for any frame size.
Each file holds the variables as initializers, uses only the default ONNX domain at opset OPSET,
and carries in its metadata_props: class_names (a JSON list in logit order), signature,
description and preprocessing (JSON).

How: JAX traces each signature with its dimensions symbolic, the equations whose results are
unused are dropped (flax's nn.RNN splits a PRNG key for its all-zero initial carry, and jax2onnx
has no rule for random_split), a max pool becomes the maximum of strided slices (`window_max`:
jax2onnx's MaxPool of an NHWC array pools all four axes, which onnxruntime refuses), and jax2onnx
converts the primitives. Tracing before jax2onnx also keeps its patches of jax.numpy and
flax.linen out of the model's Python: its jnp.shape returns a traced array, which the LSTM's flax
scan cannot take as a shape.

jax2onnx, not jax2tf then tf2onnx: the jax2tf of JAX 0.10 writes only XlaCallModule ops (the
model as StableHLO), which tf2onnx 1.17 cannot convert.
"""

import contextlib
import importlib.metadata
import itertools
import json
import logging
import os
from typing import Callable

import jax
from jax import lax
from jax.extend import core as jax_core
import numpy as np

from har_jax import artifacts
from har_jax import errors
from har_jax import inference
from har_jax import serving

OPSET = 17
CONVERTER = 'jax2onnx'
# jax2onnx 0.17.1 declares orbax-checkpoint<0.11.37, which har_jax's orbax pin excludes, though it
# never imports orbax (nor orbax-export, huggingface-hub, netron or einops, also declared). It is
# installed without its dependencies, and the `onnx` extra brings the ones it imports. The same
# pin is in pyproject.toml ([tool.har_jax] install-no-deps), which scripts/setup.sh installs.
CONVERTER_REQUIREMENT = 'jax2onnx==0.17.1'
INSTALL_COMMAND = (f"pip install '.[onnx]' && pip install --no-deps {CONVERTER_REQUIREMENT} "
                   '(bash scripts/setup.sh does both)')


def check_converter() -> str:
  """The installed jax2onnx's version; a UserError with the install command if it (or onnx)
  cannot be imported."""
  try:
    import jax2onnx  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import onnx  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise errors.UserError(f'--formats=onnx needs {CONVERTER} and onnx, which cannot be imported '
                           f'({e}); install them: {INSTALL_COMMAND}.') from None
  return importlib.metadata.version(CONVERTER)


def converter_info() -> dict:
  """What makes the ONNX files: model.json's and manifest.json's 'onnx' entry, without 'files'."""
  import onnx  # pylint: disable=g-import-not-at-top
  return {'converter': CONVERTER, 'converter_version': check_converter(), 'opset': OPSET,
          'onnx_version': onnx.__version__}


def write_onnx(folder: str, loaded: inference.LoadedModel, signatures: dict) -> dict:
  """Writes the ONNX files of the module docstring into the local `folder`; returns
  converter_info() with 'files': {signature name: file name}.

  Raises:
    errors.UserError: jax2onnx is missing, or cannot convert a signature.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  made = converter_info()
  variables = jax.tree.map(np.asarray, loaded.variables)
  for name, file in artifacts.ONNX_FILES.items():
    model = convert(signatures[name], variables)
    _describe(model, signatures[name], loaded)
    onnx.checker.check_model(model)
    onnx.save_model(model, os.path.join(folder, file))
  return {**made, 'files': dict(artifacts.ONNX_FILES)}


def convert(signature: serving.Signature, variables: dict):
  """`signature` with `variables` as constants -> an onnx.ModelProto (inputs and outputs named as
  the signature names them, its named dimensions dynamic), without unused initializers (jax2onnx
  leaves some in the LSTM's loop body, which onnxruntime warns about)."""
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  import onnx_ir  # pylint: disable=g-import-not-at-top
  from onnx_ir.passes import common  # pylint: disable=g-import-not-at-top
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(signature.symbolic_shape()),
                              np.dtype(signature.input_dtype))
  fn, output_names = traced(lambda x: signature.fn(variables, x), spec)
  try:
    with _quiet_value_info_warnings():
      model = to_onnx(fn, [spec], model_name=signature.name, opset=OPSET, return_mode='ir',
                      input_names=[signature.input_name], output_names=output_names)
      common.LiftSubgraphInitializersToMainGraphPass()(model)
      common.RemoveUnusedNodesPass()(model)
      return onnx_ir.to_proto(model)
  except (NotImplementedError, ValueError, TypeError) as e:
    reason = ' '.join(str(e).split())[:300]
    raise errors.UserError(f'{CONVERTER} {check_converter()} could not convert {signature.name} '
                           f'({type(e).__name__}: {reason}); export the other formats with '
                           '--formats=saved_model,jax.') from None


def traced(fn: Callable, spec: jax.ShapeDtypeStruct) -> tuple[Callable, list[str]]:
  """`fn` (one array in, a dict of arrays out) as the primitives JAX traces for `spec`, without
  the equations whose results are unused, and with `window_max` for the max pools; returns (that
  function, its output names in order)."""
  closed = jax.make_jaxpr(fn)(spec)
  live = {v for v in closed.jaxpr.outvars if not isinstance(v, jax_core.Literal)}
  kept = []
  for eqn in reversed(closed.jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if not isinstance(v, jax_core.Literal))
  jaxpr = closed.jaxpr.replace(eqns=kept[::-1])
  outputs, tree = jax.tree_util.tree_flatten_with_path(jax.eval_shape(fn, spec))
  output_names = ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in outputs]
  return lambda x: jax.tree.unflatten(tree, _evaluate(jaxpr, closed.consts, x)), output_names


def _evaluate(jaxpr, consts: list, *args) -> list:
  """Binds the equations of `jaxpr` in order (as jax.core.eval_jaxpr does), a max pool's as
  `window_max`."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    params = eqn.params
    if (eqn.primitive.name == 'reduce_window_max' and set(params['base_dilation']) == {1}
        and set(params['window_dilation']) == {1}):
      outs = [window_max(*inputs, params['window_dimensions'], params['window_strides'],
                         params['padding'])]
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def window_max(x: jax.Array, window: tuple, strides: tuple, padding: tuple) -> jax.Array:
  """`lax.reduce_window_max` as the maximum of window[0] x window[1] x ... strided slices of `x`
  padded with copies of its edges: ONNX Slice, Concat and Max. (jax2onnx makes a max pool over
  [batch, height, width, channels] one MaxPool over all four axes, which onnxruntime refuses.)

  Padding with the edge gives the maximum that padding with -inf gives wherever each window
  overlaps `x`, as a max pool's windows do (padding < window); a ValueError otherwise.
  """
  if any(low >= w or high >= w for (low, high), w in zip(padding, window)):
    raise ValueError(f'window_max: padding {padding} is not smaller than the window {window}')
  for axis, (low, high) in enumerate(padding):
    if low or high:
      first = lax.slice_in_dim(x, 0, 1, axis=axis)
      last = lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
      x = lax.concatenate([first] * low + [x] + [last] * high, axis)
  sizes = [(n - w) // s + 1 for n, w, s in zip(x.shape, window, strides)]
  out = None
  for start in itertools.product(*(range(w) for w in window)):
    limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, sizes, strides)]
    piece = lax.slice(x, start, limit, strides)
    out = piece if out is None else lax.max(out, piece)
  return out


def _describe(model, signature: serving.Signature, loaded: inference.LoadedModel):
  """Sets the model's doc_string and metadata_props (see the module docstring)."""
  model.doc_string = signature.description
  props = {'class_names': json.dumps(list(loaded.class_names)),
           'signature': signature.name,
           'description': signature.description,
           'preprocessing': json.dumps(loaded.preprocessing.serving_json())}
  del model.metadata_props[:]
  for key, value in props.items():
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


class _NoValueInfoWarnings(logging.Filter):
  """Drops onnx_ir's 'The value type for shape ... is not known' warnings: intermediate values
  jax2onnx leaves untyped, which ONNX runtimes infer."""

  def filter(self, record):
    return 'is not known' not in record.getMessage()


@contextlib.contextmanager
def _quiet_value_info_warnings():
  logger = logging.getLogger('onnx_ir.serde')
  quiet = _NoValueInfoWarnings()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)
