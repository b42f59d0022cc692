"""Export for serving: the SavedModel, the jax.export artifact and the ONNX models give the Flax
model's answers, in processes without har_jax (and, for the SavedModel, without JAX; for ONNX,
without JAX or TensorFlow); preprocessing as evaluation does it; bad input refused clearly,
nothing lost."""

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import artifacts
from har_jax import checkpoints
from har_jax import errors
from har_jax import export
from har_jax import geometry
from har_jax import inference
from har_jax import onnx_export
from har_jax import optim
from har_jax import predict
from har_jax import serving
from har_jax import train
from har_jax.data import datasets
from har_jax.data import stages
import conftest
from conftest import write_video  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNATURES = ('serving_default', 'encode_frames', 'classify_features', 'class_names')
# (batch, height, width) of the parity checks: two batch sizes and two frame sizes.
CASES = [(1, 48, 64), (3, 48, 64), (1, 90, 70), (3, 90, 70)]

# Makes the named top-level packages unimportable, so a client script proves it needs none of
# them. (TensorFlow 2.21 imports jax when it can, for tf.lite; it copes when it cannot.)
BLOCK_IMPORTS = """
import importlib.abc
import sys


class _Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ModuleNotFoundError(f'{name} is blocked in this client', name=name)
    return None


sys.meta_path.insert(0, _Blocked())
"""

TF_CLIENT = """
BLOCKED = ('jax', 'jaxlib', 'flax', 'har_jax')
""" + BLOCK_IMPORTS + """
import json
import os

import numpy as np
import tensorflow as tf

saved_model, cases_file, results_file = sys.argv[1:]
model = tf.saved_model.load(saved_model)
cases = np.load(cases_file)
results = {}
for key in cases.files:
  clips = tf.constant(cases[key])
  out = model.signatures['serving_default'](frames=clips)
  results[key + '/probabilities'] = out['probabilities'].numpy()
  results[key + '/logits'] = out['logits'].numpy()
  frames = tf.reshape(clips, [-1] + clips.shape[2:].as_list())
  features = model.signatures['encode_frames'](frames=frames)['features']
  results[key + '/features'] = features.numpy()
  window = tf.reshape(features, [clips.shape[0], clips.shape[1], -1])
  results[key + '/window'] = model.signatures['classify_features'](features=window)[
      'probabilities'].numpy()
np.savez(results_file, **results)
names = model.signatures['class_names']()['class_names'].numpy()
with open(os.path.join(saved_model, 'assets', 'class_names.txt')) as f:
  asset = f.read().splitlines()
print(json.dumps({'class_names': [n.decode() for n in names], 'asset': asset,
                  'imported': [m for m in BLOCKED if m in sys.modules]}))
"""

JAX_CLIENT = """
BLOCKED = ('flax', 'har_jax', 'tensorflow')
""" + BLOCK_IMPORTS + """
import json

import jax
import numpy as np

artifact, cases_file, results_file = sys.argv[1:]
with open(artifact, 'rb') as f:
  exported = jax.export.deserialize(f.read())
cases = np.load(cases_file)
results = {}
for key in cases.files:
  out = exported.call(cases[key])
  results[key + '/probabilities'] = np.asarray(out['probabilities'])
  results[key + '/logits'] = np.asarray(out['logits'])
np.savez(results_file, **results)
print(json.dumps({'in_avals': str(exported.in_avals), 'platforms': list(exported.platforms),
                  'imported': [m for m in BLOCKED if m in sys.modules]}))
"""

ONNX_CLIENT = """
BLOCKED = ('jax', 'jaxlib', 'flax', 'har_jax', 'tensorflow')
""" + BLOCK_IMPORTS + """
import json
import os

import numpy as np
import onnx
import onnxruntime as ort

folder, cases_file, results_file = sys.argv[1:]


def session(name):
  options = ort.SessionOptions()
  options.log_severity_level = 3  # Not the warnings about unused initializers in the LSTM's loop.
  return ort.InferenceSession(os.path.join(folder, name), options,
                              providers=['CPUExecutionProvider'])


def run(model, **inputs):
  names = [o.name for o in model.get_outputs()]
  return dict(zip(names, model.run(names, inputs)))


serving, encode, classify = (session(n) for n in (
    'model.onnx', 'encode_frames.onnx', 'classify_features.onnx'))
cases = np.load(cases_file)
results = {}
for key in cases.files:
  clips = cases[key]
  out = run(serving, frames=clips)
  results[key + '/probabilities'] = out['probabilities']
  results[key + '/logits'] = out['logits']
  features = run(encode, frames=clips.reshape((-1,) + clips.shape[2:]))['features']
  results[key + '/features'] = features
  window = features.reshape(clips.shape[:2] + features.shape[1:])
  results[key + '/window'] = run(classify, features=window)['probabilities']
np.savez(results_file, **results)
model = onnx.load(os.path.join(folder, 'model.onnx'))
frames = serving.get_inputs()[0]
assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules, sorted(sys.modules)
print(json.dumps({'class_names': json.loads({p.key: p.value for p in model.metadata_props}[
                      'class_names']),
                  'input': [frames.name, frames.type, frames.shape],
                  'outputs': [[o.name, o.shape] for o in serving.get_outputs()],
                  'imported': [m for m in BLOCKED if m in sys.modules]}))
"""


def _run_client(code: str, args, tmp_path, name: str) -> dict:
  """Runs `code` in a fresh Python in tmp_path; returns the JSON its last line prints."""
  script = tmp_path / name
  script.write_text(code)
  out = subprocess.run([sys.executable, str(script)] + [str(a) for a in args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _clips(config, batch: int, height: int, width: int) -> np.ndarray:
  """`[batch, num_frames, height, width, 3]` uint8: training videos of the tiny set, resized."""
  ds = datasets.get_builder(config.dataset).as_dataset(split=f'train[:{batch}]')
  return np.stack([stages.resize_bilinear(tf.constant(example['video'][:config.num_frames]),
                                          tf.constant([height, width])).numpy()
                   for example in tfds.as_numpy(ds)])


def _flax_reference(loaded: inference.LoadedModel, clips: np.ndarray) -> dict:
  """What har_jax computes for `clips`: the exported preprocessing (jitted here), then the
  checkpoint's own Flax model as `LoadedModel.apply` runs it."""
  batch, time = clips.shape[:2]
  preprocess = jax.jit(lambda x: serving.preprocess_frames(x, loaded.preprocessing))
  views = np.asarray(preprocess(clips.reshape((batch * time,) + clips.shape[2:])))
  logits = loaded.apply(views.reshape((batch, time) + views.shape[1:]))
  features = loaded.model.apply(loaded.variables, views, train=False,
                                method=type(loaded.model).encode_frames)
  return {'probabilities': np.asarray(jax.nn.softmax(logits)), 'logits': logits,
          'features': np.asarray(features)}


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
  """(config, loaded model, export folder) of the trained tiny run, exported in all formats."""
  config, workdir = trained
  out = tmp_path_factory.mktemp('export') / 'tiny'
  export.export(workdir, str(out), checkpoint='latest', formats=export.FORMATS)
  return config, inference.load(workdir, 'latest'), out


@pytest.fixture(scope='module')
def parity_cases(exported, tmp_path_factory):
  """(cases.npz path, {case: clips}, {case: flax reference}) for CASES."""
  config, loaded, _ = exported
  clips = {f'b{b}_{h}x{w}': _clips(config, b, h, w) for b, h, w in CASES}
  path = tmp_path_factory.mktemp('cases') / 'cases.npz'
  np.savez(path, **clips)
  return path, clips, {k: _flax_reference(loaded, v) for k, v in clips.items()}


@pytest.mark.slow
def test_saved_model_in_tensorflow_alone_gives_the_flax_probabilities(exported, parity_cases,
                                                                      tmp_path):
  _, loaded, out = exported
  cases_file, clips, reference = parity_cases
  answer = _run_client(TF_CLIENT, [out / export.SAVED_MODEL_DIR, cases_file,
                                   tmp_path / 'tf.npz'], tmp_path, 'tf_client.py')
  assert answer['imported'] == []
  assert answer['class_names'] == list(loaded.class_names) == answer['asset']
  results = np.load(tmp_path / 'tf.npz')
  for key in clips:
    ref = reference[key]
    assert results[f'{key}/probabilities'].shape == (clips[key].shape[0], loaded.num_classes)
    np.testing.assert_allclose(results[f'{key}/probabilities'], ref['probabilities'], atol=1e-4,
                               rtol=0, err_msg=key)
    np.testing.assert_allclose(results[f'{key}/logits'], ref['logits'], atol=1e-3, rtol=1e-4,
                               err_msg=key)
    # The streaming pair composes to serving_default.
    np.testing.assert_allclose(results[f'{key}/features'], ref['features'], atol=1e-3, rtol=1e-4,
                               err_msg=key)
    np.testing.assert_allclose(results[f'{key}/window'], ref['probabilities'], atol=1e-4, rtol=0,
                               err_msg=key)
  # The clips are real videos the model learned: the check compares confident answers.
  confident = np.concatenate([reference[k]['probabilities'].max(-1) for k in clips])
  assert np.median(confident) > 0.5, confident


@pytest.mark.slow
def test_jax_artifact_without_har_jax_gives_the_flax_probabilities(exported, parity_cases,
                                                                   tmp_path):
  _, loaded, out = exported
  cases_file, clips, reference = parity_cases
  answer = _run_client(JAX_CLIENT, [out / export.JAX_FILE, cases_file, tmp_path / 'jax.npz'],
                       tmp_path, 'jax_client.py')
  assert answer['imported'] == []
  assert answer['in_avals'] == f'(ShapedArray(uint8[batch,{loaded.preprocessing.num_frames},' \
                               'height,width,3]),)'
  assert answer['platforms'] == list(export.PLATFORMS)
  results = np.load(tmp_path / 'jax.npz')
  for key in clips:
    np.testing.assert_allclose(results[f'{key}/probabilities'],
                               reference[key]['probabilities'], atol=1e-4, rtol=0, err_msg=key)


@pytest.mark.slow
def test_onnx_models_in_onnxruntime_alone_give_the_flax_probabilities(exported, parity_cases,
                                                                      tmp_path):
  """model.onnx, and encode_frames.onnx then classify_features.onnx, in a process with neither
  JAX nor TensorFlow: the Flax model's probabilities to 1e-4, two batch sizes, two frame sizes."""
  _, loaded, out = exported
  cases_file, clips, reference = parity_cases
  answer = _run_client(ONNX_CLIENT, [out, cases_file, tmp_path / 'onnx.npz'], tmp_path,
                       'onnx_client.py')
  assert answer['imported'] == []
  assert answer['class_names'] == list(loaded.class_names)
  frames = loaded.preprocessing.num_frames
  assert answer['input'] == ['frames', 'tensor(uint8)', ['batch', frames, 'height', 'width', 3]]
  assert answer['outputs'] == [['logits', ['batch', loaded.num_classes]],
                               ['probabilities', ['batch', loaded.num_classes]]]
  results = np.load(tmp_path / 'onnx.npz')
  assert {k.split('_')[0] for k in clips} == {'b1', 'b3'}
  assert len({k.split('_')[1] for k in clips}) == 2
  for key in clips:
    ref = reference[key]
    # As for the SavedModel: a pixel of the resized views may round to the other grey level.
    np.testing.assert_allclose(results[f'{key}/probabilities'], ref['probabilities'], atol=1e-4,
                               rtol=0, err_msg=key)
    for name in ('logits', 'features'):
      np.testing.assert_allclose(results[f'{key}/{name}'], ref[name], atol=1e-3, rtol=1e-4,
                                 err_msg=f'{key} {name}')
    np.testing.assert_allclose(results[f'{key}/window'], ref['probabilities'], atol=1e-4, rtol=0,
                               err_msg=key)


@pytest.mark.slow
def test_saved_model_cli_lists_the_signatures(exported):
  _, loaded, out = exported
  cli = os.path.join(os.path.dirname(sys.executable), 'saved_model_cli')
  shown = subprocess.run([cli, 'show', '--dir', str(out / export.SAVED_MODEL_DIR), '--all'],
                         capture_output=True, text=True, timeout=300, check=False)
  assert shown.returncode == 0, shown.stderr[-3000:]
  text = shown.stdout
  for name in SIGNATURES:
    assert f"signature_def['{name}']" in text, text
  serving_default = text.split("signature_def['serving_default']")[1].split('signature_def')[0]
  frames = loaded.preprocessing.num_frames
  assert "inputs['frames']" in serving_default and 'DT_UINT8' in serving_default
  assert f'shape: (-1, {frames}, -1, -1, 3)' in serving_default, serving_default
  for output in ('probabilities', 'logits'):
    assert f"outputs['{output}']" in serving_default
  assert f'shape: (-1, {loaded.num_classes})' in serving_default
  metadata = json.loads((out / export.METADATA_FILE).read_text())
  assert metadata['class_names'] == list(loaded.class_names)
  assert metadata['signatures']['serving_default']['inputs']['frames']['shape'] == [
      'batch', frames, 'height', 'width', 3]
  assert metadata['source']['step'] == loaded.step == 300


@pytest.mark.slow
def test_export_predicts_what_predict_py_predicts_from_the_video_files(exported, tmp_path):
  """The looser check: the raw frames of video files through the export against predict.py on
  the files (FFmpeg's area filter and the export's antialiased bilinear resize differ a little)."""
  config, loaded, out = exported
  clips = _clips(config, 10, 72, 96)
  results = predict.predict_files(
      [write_video(tmp_path / f'{i}.avi', clip) for i, clip in enumerate(clips)],
      model=loaded, top_k=loaded.num_classes)
  from_files = np.zeros((len(clips), loaded.num_classes))
  for i, result in enumerate(results):
    assert result['ok'], result
    for entry in result['top_k']:
      from_files[i, entry['index']] = entry['probability']
  with open(out / export.JAX_FILE, 'rb') as f:
    exported_fn = jax.export.deserialize(f.read())
  from_export = np.asarray(exported_fn.call(clips)['probabilities'])
  agree = np.mean(from_export.argmax(-1) == from_files.argmax(-1))
  gaps = np.abs(from_export - from_files).max(-1)
  assert agree >= 0.9, (from_export.argmax(-1), from_files.argmax(-1))
  assert gaps.mean() < 0.02 and gaps.max() < 0.1, gaps


# Preprocessing: the exported frames are evaluation's (fast; no trained model needed).


def _pattern(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  """`[num, height, width, 3]` uint8 stripes and noise: detail at every scale."""
  y, x = np.mgrid[:height, :width]
  frames = np.stack([np.stack([(3 * x + y + 9 * t) % 256, (2 * y + 5 * t) % 256,
                               (x + 3 * y) % 256], -1) for t in range(num)])
  noise = np.random.default_rng(seed).integers(0, 24, frames.shape)
  return np.clip(frames + noise, 0, 255).astype(np.uint8)


GEOMETRIES = {
    'as_decoded_resized': ({'resize': 'none'}, 32),
    'as_decoded': ({'resize': 'none'}, 0),
    'short_side_stored': ({'resize': 'short_side', 'size': 40}, 0),
    'short_side_resized': ({'resize': 'short_side', 'size': 64}, 36),
    'squash': ({'resize': 'squash', 'size': [64, 64]}, 32),
}


def _evaluation_views(frames: np.ndarray, p: inference.Preprocessing) -> np.ndarray:
  """evaluation's views of frames given at their decoded size (predict.eval_views), after a
  squash to the size the training frames were decoded at (TF's antialiased bilinear resize)."""
  if p.frame_geometry['resize'] == 'squash':
    size = geometry.jpeg_scaled_size(tuple(p.frame_geometry['size']), p.resize_size)
    frames = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
        frames, size, method='bilinear', antialias=True)), 0, 255), tf.uint8).numpy()
  elif p.frame_geometry['resize'] == 'short_side' and not p.resize_size:
    p = dataclasses.replace(p, resize_size=int(p.frame_geometry['size']))
  return predict.eval_views(frames, p)[0]


@pytest.mark.parametrize('geometry', sorted(GEOMETRIES))
def test_preprocessing_gives_evaluation_views_for_any_frame_size(geometry):
  """Within one grey level of evaluation's views: the same bilinear resizes, JAX's
  scale_and_translate against tf.image.resize, round differently where a value falls near a
  half (exactly half, in float arithmetic, for scales like 3/4)."""
  frame_geometry, resize_size = GEOMETRIES[geometry]
  p = inference.Preprocessing(frame_geometry, resize_size, num_frames=2, frame_stride=1,
                              image_size=28, num_clips=1, num_crops=1, short_video='loop')
  preprocess = jax.jit(lambda x: serving.preprocess_frames(x, p))
  for height, width in [(48, 64), (90, 70), (240, 320), (32, 32), (28, 28), (17, 50)]:
    frames = _pattern(2, height, width)
    ours = np.asarray(preprocess(frames)).astype(int)
    theirs = _evaluation_views(frames, p)
    assert ours.shape == theirs.shape == (2, 28, 28, 3)
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05, (height, width, diff.max(),
                                                          (diff > 0).mean())


@pytest.mark.parametrize('geometry', ['as_decoded_resized', 'squash'])
def test_preprocessing_exports_with_symbolic_frame_sizes(geometry):
  """One artifact for every frame size gives what the function traced for each size gives."""
  frame_geometry, resize_size = GEOMETRIES[geometry]
  p = inference.Preprocessing(frame_geometry, resize_size, num_frames=2, frame_stride=1,
                              image_size=28, num_clips=1, num_crops=1, short_video='loop')
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape('n, height, width, 3'), np.uint8)
  symbolic = jax.export.export(jax.jit(lambda x: serving.preprocess_frames(x, p)))(spec)
  assert str(symbolic.out_avals) == '(ShapedArray(uint8[n,28,28,3]),)'
  for n, height, width in [(1, 33, 100), (3, 240, 320), (2, 20, 20)]:
    frames = _pattern(n, height, width, seed=n)
    np.testing.assert_array_equal(np.asarray(symbolic.call(frames)),
                                  np.asarray(jax.jit(lambda x: serving.preprocess_frames(x, p))(
                                      frames)))


# Bad input and the output folder (fast: a freshly initialised checkpoint).


@pytest.fixture(scope='module')
def fresh_workdir(tmp_path_factory):
  """A workdir with checkpoints 3 and 5 of a fresh tiny model (10 classes, geometry 'none')."""
  workdir = tmp_path_factory.mktemp('fresh')
  config = conftest.make_tiny_config(workdir / 'tfds')
  state = train.create_train_state(jax.random.PRNGKey(0), config, 10,
                                   optim.create_learning_rate_fn(config))
  info = datasets.DatasetInfo(name='fresh', class_names=tuple('abcdefghij'), split_sizes={})
  manager = checkpoints.CheckpointManager(str(workdir), config, info)
  for step in (3, 5):
    manager.save_now(step, state)
  manager.close()
  return str(workdir)


def _leftovers(folder) -> list[str]:
  return [n for n in os.listdir(folder) if '.partial-' in n or '.old-' in n]


def test_workdir_without_checkpoints_or_unknown_checkpoint_is_a_clear_error(fresh_workdir,
                                                                            tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(errors.UserError, match='No checkpoints directory at'):
    export.export(str(tmp_path), str(out))
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(errors.UserError, match='No checkpoints in'):
    export.export(str(tmp_path / 'empty'), str(out))
  with pytest.raises(errors.UserError, match='is not a directory'):
    export.export(str(tmp_path / 'nope'), str(out))
  with pytest.raises(errors.UserError, match=r'No checkpoint at step 4 .*\[3, 5\]'):
    export.export(fresh_workdir, str(out), checkpoint='4')
  with pytest.raises(errors.UserError, match="'bogus' is not one of"):
    export.export(fresh_workdir, str(out), checkpoint='bogus')
  with pytest.raises(errors.UserError, match="unknown: \\['tflite'\\]"):
    export.export(fresh_workdir, str(out), formats='saved_model,tflite')
  assert not out.exists() and _leftovers(tmp_path) == []


def test_existing_out_is_refused_and_kept(fresh_workdir, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(errors.UserError, match='already exists; pass --overwrite'):
    export.export(fresh_workdir, str(out))
  with pytest.raises(errors.UserError, match='is not an earlier export'):
    export.export(fresh_workdir, str(out), overwrite=True)
  a_file = tmp_path / 'file'
  a_file.write_text('mine too')
  with pytest.raises(errors.UserError, match='is not a folder'):
    export.export(fresh_workdir, str(a_file), overwrite=True)
  assert os.listdir(out) == ['notes.txt'] and (out / 'notes.txt').read_text() == 'mine'
  assert a_file.read_text() == 'mine too' and _leftovers(tmp_path) == []


@pytest.mark.slow
def test_overwrite_replaces_an_earlier_export_only_once_the_new_one_is_written(
    fresh_workdir, tmp_path, monkeypatch):
  """Also the dynamic-size preprocessing path (geometry 'none') through jax.export."""
  out = tmp_path / 'out'
  first = export.export(fresh_workdir, str(out), checkpoint='3', formats='jax')
  assert sorted(os.listdir(out)) == [export.MANIFEST_FILE, export.JAX_FILE, export.METADATA_FILE]
  assert first['source']['step'] == 3 and first['files'] == {'jax': export.JAX_FILE}

  def broken(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(export, 'write_jax', broken)
  with pytest.raises(RuntimeError, match='disk full'):
    export.export(fresh_workdir, str(out), checkpoint='5', formats='jax', overwrite=True)
  assert json.loads((out / export.METADATA_FILE).read_text())['source']['step'] == 3
  assert _leftovers(tmp_path) == []
  monkeypatch.undo()

  second = export.export(fresh_workdir, str(out), checkpoint='5', formats='jax', overwrite=True)
  assert second['source']['step'] == 5 and _leftovers(tmp_path) == []
  loaded = inference.load(fresh_workdir, '5')
  assert loaded.preprocessing.frame_geometry == {'resize': 'none'}
  exported_fn = artifacts.load_jax(out)
  for batch, height, width in [(1, 40, 56), (2, 75, 33)]:
    clips = _pattern(batch * 4, height, width).reshape(batch, 4, height, width, 3)
    got = exported_fn.call(clips)
    ref = _flax_reference(loaded, clips)
    np.testing.assert_allclose(np.asarray(got['logits']), ref['logits'], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got['probabilities']), ref['probabilities'],
                               atol=1e-5, rtol=0)


def _run_script(args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'export.py')] + args,
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)


@pytest.mark.slow
def test_export_script_writes_both_formats_and_refuses_with_one_line(fresh_workdir, tmp_path):
  out = tmp_path / 'out'
  done = _run_script([f'--workdir={fresh_workdir}', f'--out={out}', '--checkpoint=latest'])
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary['step'] == 5 and summary['num_classes'] == 10
  assert sorted(os.listdir(out)) == sorted([export.JAX_FILE, export.METADATA_FILE,
                                            export.MANIFEST_FILE, export.SAVED_MODEL_DIR])
  refused = _run_script([f'--workdir={fresh_workdir}', f'--out={out}'])
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines()[-1] == (
      f'error: --out {out} already exists; pass --overwrite to replace it, or choose another '
      'folder.')
  no_checkpoints = _run_script([f'--workdir={tmp_path}', f'--out={tmp_path / "other"}'])
  assert no_checkpoints.returncode == 1
  assert no_checkpoints.stderr.strip().splitlines()[-1].startswith(
      'error: No checkpoints directory at')
  assert not (tmp_path / 'other').exists()


@pytest.mark.slow
def test_benchmark_script_times_every_path(fresh_workdir):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  script = os.path.join(REPO, 'scripts', 'benchmark_export.py')
  done = subprocess.run([sys.executable, script, f'--workdir={fresh_workdir}',
                         '--checkpoint=latest', '--rounds=2', '--height=40', '--width=56'],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary['clip'] == [1, 4, 40, 56, 3] and summary['rounds'] == 2
  for name in ('saved_model', 'jax_export', 'onnx', 'har_jax_apply', 'har_jax_predict'):
    assert summary[f'{name}_ms'] > 0
  assert summary['saved_model_mb'] > 0 and summary['jax_mb'] > 0 and summary['onnx_mb'] > 0
  assert sorted(summary['parity']) == ['jax_export', 'onnx', 'saved_model']
  for gaps in summary['parity'].values():
    assert gaps['probabilities_max_abs'] < 1e-4 and gaps['logits_max_abs'] < 1e-3, gaps
  assert summary['onnx_converter'] == f'jax2onnx {importlib.metadata.version("jax2onnx")}'
  assert summary['onnx_opset'] == onnx_export.OPSET
  both = subprocess.run([sys.executable, script, f'--workdir={fresh_workdir}',
                         '--config=configs/synthetic.py'], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)
  assert both.returncode == 2
  assert both.stderr.strip().splitlines()[-1] == (
      'error: give exactly one of --config (fresh weights) or --workdir (a trained run).')


def test_unwritable_output_is_one_error_and_leaves_nothing(fresh_workdir, tmp_path):
  """A read-only parent, a parent that is a file and a full disk were tracebacks
  (PermissionError, FileExistsError, OSError ENOSPC) (27.10)."""
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(errors.UserError, match='a_file is a file, not a folder'):
    export.export(fresh_workdir, str(tmp_path / 'a_file' / 'out'), formats='jax')
  with conftest.tmpfs(tmp_path / 'ro', read_only=True):
    with pytest.raises(errors.UserError, match='cannot be written'):
      export.export(fresh_workdir, str(tmp_path / 'ro' / 'out'), formats='jax')
  with conftest.tmpfs(tmp_path / 'full', size='2m') as disk:
    conftest.fill_disk(disk, leave_bytes=20_000)
    with pytest.raises(errors.UserError, match=r'the disk is full\); nothing was left behind'):
      export.export(fresh_workdir, str(disk / 'out'), formats='saved_model,jax')
    assert sorted(os.listdir(disk)) == ['filler']


# The manifest: provenance and the digest of every file; damage refused in one line (fast: a fresh
# checkpoint, exported once in a few seconds).


@pytest.fixture(scope='module')
def fresh_export(fresh_workdir, tmp_path_factory):
  """An export of checkpoint 5 of `fresh_workdir` in all formats. Tests that damage it copy it."""
  out = tmp_path_factory.mktemp('fresh_export') / 'export'
  export.export(fresh_workdir, str(out), checkpoint='latest', formats=export.FORMATS)
  return out


def _files_on_disk(folder) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, n), folder).replace(os.sep, '/')
                for root, _, names in os.walk(folder) for n in names)


def _manifest(folder) -> dict:
  return json.loads((folder / export.MANIFEST_FILE).read_text())


def _flip_middle_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(errors.UserError) as raised:
    fn(*args, **kwargs)
  message = str(raised.value)
  assert '\n' not in message, message
  return message


def test_manifest_lists_every_file_written_with_its_digest_and_the_provenance(fresh_export,
                                                                              fresh_workdir):
  manifest = _manifest(fresh_export)
  metadata = json.loads((fresh_export / export.METADATA_FILE).read_text())
  assert _files_on_disk(fresh_export) == sorted(list(manifest['files']) + [export.MANIFEST_FILE])
  assert {export.JAX_FILE, export.METADATA_FILE, 'saved_model/saved_model.pb',
          'saved_model/assets/class_names.txt', 'model.onnx', 'encode_frames.onnx',
          'classify_features.onnx'} <= set(manifest['files'])
  for name, digest in manifest['files'].items():
    assert hashlib.sha256((fresh_export / name).read_bytes()).hexdigest() == digest, name
  assert artifacts.verify(fresh_export) == {k: v for k, v in manifest.items() if k != 'sha256'}

  for key in ('har_jax', 'versions', 'jax_export', 'onnx', 'config_sha256', 'class_names',
              'source', 'exported_at'):
    assert manifest[key] == metadata[key], key
  assert manifest['har_jax']['version'] == importlib.metadata.version('har_jax')
  commit = manifest['har_jax']['commit']
  if os.path.exists(os.path.join(REPO, '.git')):
    assert commit == subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True,
                                    text=True, check=True).stdout.strip()
  else:
    assert commit is None
  assert manifest['versions']['jax'] == jax.__version__
  serve = jax.export.deserialize((fresh_export / export.JAX_FILE).read_bytes())
  assert manifest['jax_export'] == {'serialization_version': serve.calling_convention_version,
                                    'platforms': list(export.PLATFORMS)}
  import onnx  # pylint: disable=g-import-not-at-top
  assert manifest['onnx'] == {
      'converter': 'jax2onnx', 'converter_version': importlib.metadata.version('jax2onnx'),
      'opset': onnx_export.OPSET, 'onnx_version': onnx.__version__,
      'files': {'serving_default': 'model.onnx', 'encode_frames': 'encode_frames.onnx',
                'classify_features': 'classify_features.onnx'}}
  assert metadata['files'] == {'saved_model': 'saved_model', 'jax': 'model.jax',
                               'onnx': 'model.onnx'}
  config = inference.load(fresh_workdir, 'latest').config
  canonical = json.dumps(config.to_dict(), sort_keys=True, separators=(',', ':'))
  assert manifest['config_sha256'] == hashlib.sha256(canonical.encode()).hexdigest()
  assert manifest['class_names'] == list('abcdefghij')
  assert manifest['source'] == {'workdir': fresh_workdir, 'step': 5}


def test_one_flipped_byte_in_any_exported_file_is_refused_in_one_line_naming_it(fresh_export,
                                                                               tmp_path):
  out = tmp_path / 'export'
  shutil.copytree(fresh_export, out)
  names = list(_manifest(out)['files']) + [export.MANIFEST_FILE]
  assert len(names) >= 10 and 'model.onnx' in names, names
  for name in names:
    original = (out / name).read_bytes()
    _flip_middle_byte(out / name)
    for load in (artifacts.verify, artifacts.load_jax, artifacts.load_onnx):
      message = _one_line_error(load, out)
      assert message.startswith(f'{out / name} is damaged'), (name, message)
    (out / name).write_bytes(original)
  artifacts.verify(out)
  assert artifacts.load_jax(out).platforms == export.PLATFORMS
  assert [o.name for o in artifacts.load_onnx(out).get_outputs()] == ['logits', 'probabilities']


def test_missing_file_or_manifest_is_refused_in_one_line(fresh_export, fresh_workdir, tmp_path):
  out = tmp_path / 'export'
  shutil.copytree(fresh_export, out)
  os.remove(out / 'saved_model' / 'variables' / 'variables.index')
  assert _one_line_error(artifacts.verify, out).startswith(
      f'{out}/saved_model/variables/variables.index is missing from the export. Re-export it '
      f'from its checkpoint: python scripts/export.py --workdir={fresh_workdir} --out={out} '
      '--overwrite')
  os.remove(out / export.MANIFEST_FILE)
  assert _one_line_error(artifacts.load_jax, out).startswith(
      f'{out / export.MANIFEST_FILE} is missing: {out} is not a har_jax export')


def test_model_jax_of_an_incompatible_jax_names_both_versions_and_the_reexport_command(
    fresh_export, fresh_workdir, monkeypatch):
  made_by = _manifest(fresh_export)['versions']
  command = (f'Re-export it from its checkpoint with this JAX: python scripts/export.py '
             f'--workdir={fresh_workdir} --out={fresh_export} --overwrite')
  monkeypatch.setattr(jax, '__version__', '0.99.0')

  def refuse(data):
    raise ValueError('Unsupported serialization version 3;\n supported versions are 4 to 5')

  with monkeypatch.context() as patched:
    patched.setattr(jax.export, 'deserialize', refuse)
    message = _one_line_error(artifacts.load_jax, fresh_export)
  assert message.startswith(
      f'{fresh_export / export.JAX_FILE} was exported by JAX {made_by["jax"]} (jaxlib '
      f'{made_by["jaxlib"]}) and this JAX 0.99.0 (jaxlib ')
  assert 'cannot load it (Unsupported serialization version 3; supported versions are 4 to 5)' in (
      message) and message.endswith(command)
  # A JAX that deserializes the file but no longer runs its calling convention.
  version = _manifest(fresh_export)['jax_export']['serialization_version']
  monkeypatch.setattr(jax.export, 'maximum_supported_calling_convention_version', version - 1)
  message = _one_line_error(artifacts.load_jax, fresh_export)
  assert f'was exported by JAX {made_by["jax"]}' in message and 'this JAX 0.99.0' in message
  assert f'(serialization version {version}, outside the ' in message
  assert message.endswith(command)


def _readme_verifier() -> str:
  """The standalone verifier shown in docs/export.md's "Exporting a model"."""
  with open(os.path.join(REPO, 'docs', 'export.md')) as f:
    section = f.read().split('## Exporting a model')[1].split('\n## ')[0]
  blocks = [b for b in re.findall(r'```python\n(.*?)```', section, re.S) if 'def verify(' in b]
  assert len(blocks) == 1, blocks
  return blocks[0]


def test_readme_verifier_needs_only_the_standard_library_and_names_a_damaged_file(fresh_export,
                                                                                 tmp_path):
  code = _readme_verifier()
  assert len(code.strip().splitlines()) <= 30
  script = tmp_path / 'verify_export.py'
  script.write_text(code)

  def run(folder):  # -S: no site-packages (no numpy, JAX, TensorFlow or har_jax); -I: no PYTHONPATH.
    return subprocess.run([sys.executable, '-I', '-S', str(script), str(folder)],
                          capture_output=True, text=True, timeout=60, check=False)

  good = run(fresh_export)
  assert good.returncode == 0 and good.stdout.strip() == f'ok: {fresh_export}', good.stderr
  out = tmp_path / 'export'
  shutil.copytree(fresh_export, out)
  for name in list(_manifest(out)['files']) + [export.MANIFEST_FILE]:
    original = (out / name).read_bytes()
    _flip_middle_byte(out / name)
    damaged = run(out)
    assert damaged.returncode == 1, (name, damaged.stdout)
    assert damaged.stderr.strip().splitlines() == [
        damaged.stderr.strip()], damaged.stderr  # One line.
    # A flipped byte of manifest.json that breaks its JSON (where the middle byte falls depends
    # on the length of the paths it records) is "missing or damaged" to this verifier.
    prefixes = (f'error: {out / name} is damaged', f'error: {out / name} is missing or damaged')
    assert damaged.stderr.startswith(prefixes), (name, damaged.stderr)
    (out / name).write_bytes(original)
  os.remove(out / export.JAX_FILE)
  assert run(out).stderr.strip() == f'error: {out / export.JAX_FILE} is missing'


# ONNX (fast: the fresh export, and the preprocessing converted alone).


def _onnx_interface(path) -> dict:
  """{'inputs'|'outputs': [(name, elem_type, dims)]} and the metadata_props of an ONNX file."""
  import onnx  # pylint: disable=g-import-not-at-top
  model = onnx.load(str(path))

  def values(vs):
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vs]

  return {'inputs': values(model.graph.input), 'outputs': values(model.graph.output),
          'props': {p.key: p.value for p in model.metadata_props},
          'opsets': {o.domain: o.version for o in model.opset_import},
          'producer': (model.producer_name, model.producer_version)}


def test_onnx_files_name_their_dimensions_classes_and_converter(fresh_export, fresh_workdir):
  import onnx  # pylint: disable=g-import-not-at-top
  uint8, float32 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT
  loaded = inference.load(fresh_workdir, 'latest')
  dim = serving.feature_dim(serving.xla_model(loaded), loaded.variables, 28)
  scores = [('logits', float32, ['batch', 10]), ('probabilities', float32, ['batch', 10])]
  expected = {
      'model.onnx': ([('frames', uint8, ['batch', 4, 'height', 'width', 3])], scores),
      'encode_frames.onnx': ([('frames', uint8, ['frames', 'height', 'width', 3])],
                             [('features', float32, ['frames', dim])]),
      'classify_features.onnx': ([('features', float32, ['batch', 'time', dim])], scores),
  }
  metadata = json.loads((fresh_export / export.METADATA_FILE).read_text())
  for (name, file), (inputs, outputs) in zip(artifacts.ONNX_FILES.items(), expected.values()):
    found = _onnx_interface(fresh_export / file)
    assert (found['inputs'], found['outputs']) == (inputs, outputs), file
    assert found['opsets'] == {'': onnx_export.OPSET}, file
    assert found['producer'] == ('jax2onnx', importlib.metadata.version('jax2onnx'))
    assert json.loads(found['props']['class_names']) == list('abcdefghij')
    assert found['props']['signature'] == name
    assert json.loads(found['props']['preprocessing']) == metadata['preprocessing']
    assert found['props']['description'] == metadata['signatures'][name]['description']


@pytest.mark.parametrize('geometry', ['as_decoded_resized', 'short_side_stored', 'squash'])
def test_onnx_preprocessing_gives_the_jax_views_for_any_frame_size(geometry):
  """The resize and crop, converted alone with symbolic sizes, against JAX's for each size:
  within one grey level (float rounding near a half), almost everywhere equal."""
  frame_geometry, resize_size = GEOMETRIES[geometry]
  p = inference.Preprocessing(frame_geometry, resize_size, num_frames=2, frame_stride=1,
                              image_size=28, num_clips=1, num_crops=1, short_video='loop')
  signature = serving.Signature(
      'preprocess', lambda variables, x: {'views': serving.preprocess_frames(x, p)}, 'frames',
      ('frames', 'height', 'width', 3), 'uint8', {}, 'the views')
  import onnxruntime  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(
      onnx_export.convert(signature, {}).SerializeToString(), providers=['CPUExecutionProvider'])
  preprocess = jax.jit(lambda x: serving.preprocess_frames(x, p))
  for height, width in [(48, 64), (90, 70), (240, 320), (28, 28), (17, 50)]:
    frames = _pattern(2, height, width, seed=height)
    (ours,) = session.run(['views'], {'frames': frames})
    theirs = np.asarray(preprocess(frames))
    assert ours.shape == theirs.shape == (2, 28, 28, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (height, width, diff.max(),
                                                          (diff > 0).mean())


def test_onnx_without_the_converter_is_one_line_naming_the_extra(fresh_workdir, tmp_path,
                                                                 monkeypatch):
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # `import jax2onnx` raises ImportError.
  out = tmp_path / 'out'
  message = _one_line_error(export.export, fresh_workdir, str(out), formats='jax,onnx')
  assert message.startswith('--formats=onnx needs jax2onnx and onnx, which cannot be imported')
  assert message.endswith("install them: pip install '.[onnx]' && pip install --no-deps "
                          'jax2onnx==0.17.1 (bash scripts/setup.sh does both).')
  assert not out.exists() and _leftovers(tmp_path) == []


def test_onnx_loader_refuses_an_export_without_onnx(fresh_workdir, tmp_path):
  out = tmp_path / 'out'
  export.export(fresh_workdir, str(out), formats='jax')
  assert json.loads((out / export.METADATA_FILE).read_text())['onnx'] is None
  assert _one_line_error(artifacts.load_onnx, out).startswith(
      f'{out} has no model.onnx (it was exported without the onnx format). Re-export it')
