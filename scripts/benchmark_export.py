r"""Latency of one clip through the exported SavedModel, the jax.export artifact, the ONNX model
and har_jax.

  python scripts/benchmark_export.py --config=configs/default.py [--num_classes=101] \
      [--height=240 --width=320] [--rounds=20]
  python scripts/benchmark_export.py --workdir=workdirs/synthetic [--checkpoint=best]

With --config, a freshly initialised checkpoint of that config is saved in a temporary workdir
(latency does not depend on the weights; the frame geometry is the one its dataset's records
have); with --workdir, a trained run's checkpoint is used. The checkpoint is exported
(har_jax.export, all three formats, into a temporary folder; onnx needs the `onnx` extra) and one
clip of --height x --width frames (uint8, num_frames of them) is timed, batch 1, on this
machine's CPU:

  saved_model      serving_default of the SavedModel in TensorFlow, raw frames in (preprocessing
                   inside the graph), probabilities out
  jax_export       the deserialized jax.export artifact, raw frames in
  onnx             model.onnx in onnxruntime (CPUExecutionProvider, default session options), raw
                   frames in
  har_jax_apply    LoadedModel.apply on the clip already preprocessed to image_size (the model alone,
                   with the checkpoint's conv_impl, as har_jax evaluates)
  har_jax_predict  what predict.py does after decoding, from the raw frames: the decoder's scaling
                   (Preprocessing.decode_size; TF's resize standing in for FFmpeg's), eval_views
                   (resize and crop), LoadedModel.apply

Each is compiled and run twice before timing; then every round times each path once, in turn (load
spikes on a shared machine hit single rounds), and the figures are medians over rounds, in ms. The
last line is one JSON object with all figures, the load average before and after, the export
time, the sizes of the artifacts, and each artifact's largest absolute and relative differences
from the Flax model on the clip (`parity`: logits and probabilities; the reference is
`serving.preprocess_frames` then `LoadedModel.apply` with the checkpoint's conv_impl).
"""

import dataclasses
import importlib.metadata
import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from har_jax import artifacts
from har_jax import checkpoints
from har_jax import cli
from har_jax import distributed
from har_jax import export
from har_jax import inference
from har_jax import onnx_export
from har_jax import optim
from har_jax import predict
from har_jax import serving
from har_jax import train
from har_jax.data import datasets

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config module (fresh weights).',
                                          lock_config=False)
FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A trained run (instead of --config).')
flags.DEFINE_string('checkpoint', 'best', "With --workdir: 'best', 'latest' or a step.")
flags.DEFINE_integer('num_classes', 101, 'With --config: classes of the fresh head.')
flags.DEFINE_integer('height', 240, 'Frame height of the timed clip, pixels.')
flags.DEFINE_integer('width', 320, 'Frame width of the timed clip, pixels.')
flags.DEFINE_integer('rounds', 20, 'Timed rounds; figures are medians over rounds.')


def fresh_workdir(config, num_classes: int, workdir: str) -> str:
  """Saves step 0 of a freshly initialised `config` model into `workdir`."""
  state = train.create_train_state(jax.random.PRNGKey(0), config, num_classes,
                                   optim.create_learning_rate_fn(config))
  name = str(config.dataset.name)
  info = datasets.DatasetInfo(name=name, class_names=tuple(f'class_{i}' for i in range(num_classes)),
                              split_sizes={}, frame_geometry=inference.guess_frame_geometry(name))
  manager = checkpoints.CheckpointManager(workdir, config, info)
  manager.save_now(0, state)
  manager.close()
  return workdir


def decoder_scaled(frames: np.ndarray, p: inference.Preprocessing) -> np.ndarray:
  """`[T, H, W, 3]` frames at the size predict.py has its video decoder scale them to
  (`Preprocessing.decode_size`), by TF's antialiased bilinear resize instead of FFmpeg's."""
  size = p.decode_size(*frames.shape[1:3])
  if size is None or tuple(size) == frames.shape[1:3]:
    return frames
  resized = tf.image.resize(frames, size, method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


def _megabytes(path: str) -> float:
  """Size of a file, or of all files under a folder, in MB (10^6 bytes)."""
  if os.path.isfile(path):
    return round(os.path.getsize(path) / 1e6, 1)
  return round(sum(os.path.getsize(os.path.join(root, name))
                   for root, _, names in os.walk(path) for name in names) / 1e6, 1)


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return (time.perf_counter() - start) * 1e3


def _differences(got: dict, reference: dict) -> dict:
  """{'<output>_max_abs', '<output>_max_rel'} of `got` against `reference` (relative to
  |reference|, floored at 1e-6), for logits and probabilities."""
  out = {}
  for key in ('logits', 'probabilities'):
    ref = np.asarray(reference[key], np.float64)
    gap = np.abs(np.asarray(got[key], np.float64) - ref)
    out[f'{key}_max_abs'] = float(f'{gap.max():.3g}')
    out[f'{key}_max_rel'] = float(f'{(gap / np.maximum(np.abs(ref), 1e-6)).max():.3g}')
  return out


def parity(loaded: inference.LoadedModel, outputs: dict, clip: np.ndarray) -> dict:
  """{path: _differences} of each artifact's outputs on `clip` against the Flax model's."""
  frames = clip.reshape((-1,) + clip.shape[2:])
  views = jax.jit(lambda x: serving.preprocess_frames(x, loaded.preprocessing))(frames)
  logits = loaded.apply(np.asarray(views).reshape(clip.shape[:2] + views.shape[1:]))
  reference = {'logits': logits, 'probabilities': jax.nn.softmax(logits)}
  return {name: _differences(got, reference) for name, got in outputs.items()}


def measure(loaded: inference.LoadedModel, out: str, clip: np.ndarray,
            rounds: int) -> tuple[dict, dict]:
  """(median ms per call of each path (see the module docstring) on `clip` [1, T, H, W, 3],
  parity of each artifact's outputs)."""
  artifact = jax.jit(artifacts.load_jax(out).call)  # Verifies every file of the export first.
  onnx_session = artifacts.load_onnx(out)
  saved_model = tf.saved_model.load(os.path.join(out, export.SAVED_MODEL_DIR))
  serving_default = saved_model.signatures['serving_default']
  one_view = dataclasses.replace(loaded.preprocessing, num_clips=1, num_crops=1)

  def predict_views():
    return predict.eval_views(decoder_scaled(clip[0], one_view), one_view)

  views = predict_views()
  tf_clip = tf.constant(clip)
  onnx_names = [o.name for o in onnx_session.get_outputs()]
  outputs = {
      'saved_model': {k: v.numpy() for k, v in serving_default(frames=tf_clip).items()},
      'jax_export': artifact(clip),
      'onnx': dict(zip(onnx_names, onnx_session.run(onnx_names, {'frames': clip}))),
  }
  paths = {
      'saved_model': lambda: serving_default(frames=tf_clip)['probabilities'].numpy(),
      'jax_export': lambda: np.asarray(artifact(clip)['probabilities']),
      'onnx': lambda: onnx_session.run(['probabilities'], {'frames': clip})[0],
      'har_jax_apply': lambda: loaded.apply(views),
      'har_jax_predict': lambda: loaded.apply(predict_views()),
  }
  for fn in list(paths.values()) * 2:  # Compile, warm up.
    fn()
  times = {name: [] for name in paths}
  for _ in range(rounds):
    for name, fn in paths.items():
      times[name].append(_timed(fn))
  figures = {f'{name}_ms': round(float(np.median(t)), 1) for name, t in times.items()}
  return figures, parity(loaded, outputs, clip)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if (_CONFIG.value is None) == (FLAGS.workdir is None):
    raise app.UsageError('give exactly one of --config (fresh weights) or --workdir (a trained '
                         'run).')
  tf.config.set_visible_devices([], 'GPU')
  distributed.quiet_library_logs()
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as folder:
    if FLAGS.workdir:
      workdir, checkpoint = FLAGS.workdir, FLAGS.checkpoint
    else:
      workdir = fresh_workdir(_CONFIG.value, FLAGS.num_classes, os.path.join(folder, 'run'))
      checkpoint = 'latest'
    start = time.perf_counter()
    export.export(workdir, os.path.join(folder, 'export'), checkpoint=checkpoint,
                  formats=export.FORMATS)
    export_s = time.perf_counter() - start
    loaded = inference.load(workdir, checkpoint)
    p = loaded.preprocessing
    clip = np.random.default_rng(0).integers(
        0, 256, (1, p.num_frames, FLAGS.height, FLAGS.width, 3), np.uint8)
    figures, differences = measure(loaded, os.path.join(folder, 'export'), clip, FLAGS.rounds)
    sizes = {name: _megabytes(os.path.join(folder, 'export', path))
             for name, path in (('saved_model_mb', export.SAVED_MODEL_DIR),
                                ('jax_mb', export.JAX_FILE), ('onnx_mb', export.ONNX_FILE))}
  model = serving.xla_model(loaded)
  summary = {
      'clip': list(clip.shape), 'encoder': model.encoder, 'num_classes': loaded.num_classes,
      'image_size': p.image_size, 'frame_geometry': p.frame_geometry,
      'conv_impl_har_jax': str(loaded.config.model.get('conv_impl', 'auto')),
      'export_s': round(export_s, 1), **sizes, **figures, 'rounds': FLAGS.rounds,
      'parity': differences,
      'loadavg_before': [round(x, 2) for x in load_before],
      'loadavg_after': [round(x, 2) for x in os.getloadavg()],
      'cpus': os.cpu_count(), 'jax': jax.__version__, 'tensorflow': tf.__version__,
      'onnxruntime': importlib.metadata.version('onnxruntime'),
      'onnx_converter': f'{onnx_export.CONVERTER} {onnx_export.check_converter()}',
      'onnx_opset': onnx_export.OPSET,
  }
  for name in ('saved_model', 'jax_export', 'onnx', 'har_jax_apply', 'har_jax_predict'):
    print(f'{name:16s} {figures[name + "_ms"]:8.1f} ms per clip')
  print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  cli.run(main)
