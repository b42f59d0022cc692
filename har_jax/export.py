r"""Export a trained checkpoint for serving: a TensorFlow SavedModel, a portable JAX artifact and,
on request, ONNX models.

  export.export('workdirs/synthetic', 'exports/synthetic', checkpoint='best')
  export.export(..., formats='saved_model,jax,onnx')  # onnx needs the `onnx` extra

The output folder holds:
  saved_model/  a SavedModel (jax2tf, native serialization: the StableHLO of `har_jax.serving`
                inside XlaCallModule ops, the variables as tf.Variables). Signatures:
                serving_default   frames uint8 [batch, num_frames, height, width, 3]
                                  -> probabilities, logits float32 [batch, num_classes]
                encode_frames     frames uint8 [n, height, width, 3] -> features float32 [n, D]
                classify_features features float32 [batch, time, D] -> probabilities, logits
                class_names       () -> class_names string [num_classes]
                and assets/class_names.txt, one name per line, in logit order.
  model.jax     `jax.export.Exported.serialize()` of serving_default with the variables inside:
                `jax.export.deserialize(data).call(frames)` -> {'logits', 'probabilities'}.
  model.onnx    (formats 'onnx' only) serving_default as an ONNX model, and the streaming pair
  encode_frames.onnx, classify_features.onnx: `har_jax.onnx_export`, converted by jax2onnx, with
                the class names in each file's metadata_props.
  model.json    class names, each signature's inputs and outputs (dimension names for the sizes
                that may vary), the preprocessing and the provenance (`artifacts.provenance`):
                har_jax's version and commit, the library versions, model.jax's serialization
                version and platforms, the ONNX converter, its version and the opset, the
                config's digest and the source checkpoint.
  manifest.json the same provenance and the SHA-256 of every file above, written last
                (`artifacts.verify` checks an export against it; `artifacts.load_jax` loads it).

Batch, frame height and width (and the time of classify_features) are symbolic: one artifact
serves every size. The SavedModel and model.jax are lowered for CPU, CUDA GPUs and TPUs
(`PLATFORMS`) with the XLA convolutions; the ONNX files are float32 graphs of the default ONNX
domain at opset `onnx_export.OPSET`, for any ONNX runtime. A `jax.export` artifact runs on a JAX
(jaxlib) built up to 6 months after the one that exported it, or up to 3 weeks before it
(jax.export's compatibility guarantees).
"""

import errno
import json
import os
import shutil
import tempfile
import uuid
from typing import Sequence

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from har_jax import artifacts
from har_jax import checkpoint_files
from har_jax import errors
from har_jax import inference
from har_jax import onnx_export
from har_jax import paths
from har_jax import serving

FORMATS = ('saved_model', 'jax', 'onnx')
# What --formats defaults to: onnx needs the `onnx` extra (onnx_export.INSTALL_COMMAND).
DEFAULT_FORMATS = ('saved_model', 'jax')
PLATFORMS = ('cpu', 'cuda', 'tpu')
SAVED_MODEL_DIR = artifacts.SAVED_MODEL_DIR
JAX_FILE = artifacts.JAX_FILE
METADATA_FILE = artifacts.METADATA_FILE
MANIFEST_FILE = artifacts.MANIFEST_FILE
ONNX_FILE = artifacts.ONNX_FILE
FORMAT_FILES = {'saved_model': SAVED_MODEL_DIR, 'jax': JAX_FILE, 'onnx': ONNX_FILE}
CLASS_NAMES_SIGNATURE = 'class_names'


def parse_formats(formats) -> tuple[str, ...]:
  """'saved_model,jax' (or a sequence) -> the formats in FORMATS order; UserError if unknown."""
  names = formats.split(',') if isinstance(formats, str) else list(formats)
  names = [n.strip().lower() for n in names if n.strip()]
  unknown = sorted(set(names) - set(FORMATS))
  if unknown or not names:
    raise errors.UserError(f'--formats={",".join(names)!r}: give one or more of '
                           f'{",".join(FORMATS)} (comma-separated); unknown: {unknown}.')
  return tuple(f for f in FORMATS if f in names)


def check_out(out: str, overwrite: bool) -> str:
  """The absolute output folder, if it may be written; a UserError says why not.

  An existing path is refused unless `overwrite`; even then only an earlier export (a folder with
  model.json) or an empty folder is replaced, never anything else.
  """
  if not out:
    raise errors.UserError('--out is empty; give the folder to write the export to.')
  out = str(paths.path(out))
  if not checkpoint_files.lexists(out):
    return out
  if not overwrite:
    raise errors.UserError(f'--out {out} already exists; pass --overwrite to replace it, or '
                           'choose another folder.')
  if not paths.path(out).is_dir() or os.path.islink(out):
    raise errors.UserError(f'--out {out} exists and is not a folder; not replacing it.')
  if paths.list_names(out) and not (paths.path(out) / METADATA_FILE).is_file():
    raise errors.UserError(f'--out {out} is not an earlier export (it has no {METADATA_FILE}); '
                           'not replacing it with --overwrite. Remove it yourself or choose '
                           'another folder.')
  return out


def export(workdir: str, out: str, *, checkpoint='best', formats=DEFAULT_FORMATS,
           overwrite: bool = False, platforms: Sequence[str] = PLATFORMS) -> dict:
  """Exports checkpoint `checkpoint` of `workdir` to the folder `out`; returns model.json's dict.

  Everything is written to a new folder beside `out` and moved into place at the end, so a failed
  export leaves `out` as it was (and a refused one touches nothing).

  Args:
    workdir: the training run's workdir (holding checkpoints/).
    out: the folder to create (see the module docstring for its contents).
    checkpoint: 'best' (falls back to the latest without metrics), 'latest' or a step number.
    formats: any of 'saved_model', 'jax' and 'onnx' (a sequence or a comma-separated string).
    overwrite: replace `out` if it is an earlier export.
    platforms: what the StableHLO is lowered for (a subset of 'cpu', 'cuda', 'rocm', 'tpu').

  Raises:
    errors.UserError: a wrong workdir or checkpoint, unknown formats, onnx without jax2onnx (or
      a model it cannot convert), or an `out` that may not be written.
  """
  formats = parse_formats(formats)
  if 'onnx' in formats:
    onnx_export.check_converter()
  out = check_out(out, overwrite)
  # A bucket has no rename: the export is staged on the local disk and uploaded at the end.
  parent = tempfile.gettempdir() if paths.is_url(out) else os.path.dirname(out)
  _check_parent(parent, out)
  loaded = inference.load(workdir, checkpoint)
  signatures = serving.signatures(loaded)
  staging = _new_folder(parent, f'.{paths.path(out).name}.partial')
  try:
    if 'saved_model' in formats:
      write_saved_model(os.path.join(staging, SAVED_MODEL_DIR), loaded, signatures, platforms)
    exported = None
    if 'jax' in formats:
      exported = write_jax(os.path.join(staging, JAX_FILE), loaded,
                           signatures['serving_default'], platforms)
    onnx_made = onnx_export.write_onnx(staging, loaded, signatures) if 'onnx' in formats else None
    made = artifacts.provenance(loaded, exported, onnx_made)
    metadata = describe(loaded, signatures, formats, platforms, made)
    with open(os.path.join(staging, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2)
    artifacts.write_manifest(staging, made)
    _move_into_place(staging, check_out(out, overwrite))
  except (OSError, tf.errors.OpError) as e:
    full = getattr(e, 'errno', None) == errno.ENOSPC or 'No space left' in str(e)
    reason = 'the disk is full' if full else ' '.join(str(e).split())[:300]
    raise errors.UserError(f'Could not write the export to {out} ({reason}); nothing was left '
                           'behind. Free space or choose another --out.') from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info('Exported checkpoint %d of %s to %s (%s).', loaded.step, workdir, out,
               ', '.join(formats))
  return metadata


def _check_parent(parent: str, out: str):
  """Raises errors.UserError unless the folder the export is staged in can be written."""
  if os.path.lexists(parent) and not os.path.isdir(parent):
    raise errors.UserError(f'--out {out}: {parent} is a file, not a folder; choose another --out.')
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'--out {out}: cannot create {parent} ({e.strerror or e}); choose '
                           'another --out.') from None
  problem = checkpoint_files.write_problem(parent)
  if problem:
    raise errors.UserError(f'--out {out}: {parent} cannot be written ({problem}); choose another '
                           '--out, or give this user write access.')


def _move_into_place(staging: str, out: str):
  """Renames `staging` to `out`, replacing an earlier export there only once staging is done.

  On an object store: the earlier export is deleted, then the staged files are uploaded.
  """
  if paths.is_url(out):
    if paths.path(out).exists():
      paths.path(out).rmtree()
    paths.move_tree(staging, out)
    return
  aside = os.path.join(os.path.dirname(out),
                       f'.{os.path.basename(out)}.old-{uuid.uuid4().hex[:12]}')
  paths.replace_folder(staging, out, aside)


def _new_folder(parent: str, prefix: str) -> str:
  """A new empty folder `<parent>/<prefix>-<random>`, with the umask's permissions."""
  while True:
    path = os.path.join(parent, f'{prefix}-{uuid.uuid4().hex[:12]}')
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue


def describe(loaded: inference.LoadedModel, signatures: dict, formats: Sequence[str],
             platforms: Sequence[str], made: dict) -> dict:
  """model.json: what a client needs to call the artifacts, and `made`, where they came from
  (artifacts.provenance)."""
  return {
      **made,
      'signatures': {name: s.to_json() for name, s in signatures.items()},
      'preprocessing': loaded.preprocessing.serving_json(),
      'files': {f: FORMAT_FILES[f] for f in formats},
      'jax_function': 'serving_default' if 'jax' in formats else None,
      'platforms': list(platforms),
  }


def write_jax(path: str, loaded: inference.LoadedModel, signature: serving.Signature,
              platforms: Sequence[str]) -> jax.export.Exported:
  """Writes `signature` with the checkpoint's variables as constants, serialized by jax.export,
  with its named dimensions symbolic; returns the Exported."""
  variables = jax.tree.map(np.asarray, loaded.variables)
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(signature.symbolic_shape()),
                              np.dtype(signature.input_dtype))
  exported = jax.export.export(jax.jit(lambda x: signature.fn(variables, x)),
                               platforms=list(platforms))(spec)
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  return exported


def write_saved_model(path: str, loaded: inference.LoadedModel, signatures: dict,
                      platforms: Sequence[str]):
  """Writes the SavedModel described in the module docstring."""
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  module = tf.Module()
  tf_variables = jax.tree_util.tree_map_with_path(
      lambda keys, v: tf.Variable(np.asarray(v), trainable=False, name=_variable_name(keys)),
      loaded.variables)
  module.model_variables = tf.nest.flatten(tf_variables)
  tf_signatures = {}
  for name, signature in signatures.items():
    converted = jax2tf.convert(
        signature.fn, polymorphic_shapes=[None, f'({signature.symbolic_shape()})'],
        with_gradient=False, native_serialization_platforms=tuple(platforms))
    spec = tf.TensorSpec([d if isinstance(d, int) else None for d in signature.input_shape],
                         tf.as_dtype(signature.input_dtype), name=signature.input_name)
    function = _tf_function(converted, tf_variables, spec)
    setattr(module, name, function)
    tf_signatures[name] = function.get_concrete_function()

  with tempfile.TemporaryDirectory() as folder:
    names_file = os.path.join(folder, 'class_names.txt')
    with open(names_file, 'w') as f:
      f.write(''.join(f'{name}\n' for name in _one_line_names(loaded.class_names)))
    module.class_names_file = tf.saved_model.Asset(names_file)
    names = tf.constant(list(loaded.class_names))
    module.class_names = tf.function(lambda: {'class_names': names}, input_signature=[])
    tf_signatures[CLASS_NAMES_SIGNATURE] = module.class_names.get_concrete_function()
    tf.saved_model.save(module, path, signatures=tf_signatures)


def _tf_function(converted, tf_variables, spec: tf.TensorSpec):
  """A tf.function of one input, `spec`, calling a jax2tf function with the variables."""
  def call(inputs):
    return converted(tf_variables, inputs)
  return tf.function(call, input_signature=[spec], autograph=False)


def _variable_name(keys) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in keys)


def _one_line_names(class_names) -> list[str]:
  bad = [n for n in class_names if '\n' in n or '\r' in n]
  if bad:
    raise errors.UserError(f'Class names {bad[:3]} contain line breaks; the SavedModel lists one '
                           'name per line in assets/class_names.txt.')
  return list(class_names)
