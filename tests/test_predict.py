"""Prediction on video files: PyAV decoding, eval-identical views, the right class, errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from har_jax import checkpoints
from har_jax import errors
from har_jax import inference
from har_jax import models
from har_jax import optim
from har_jax import predict
from har_jax import train
from har_jax.data import datasets
from har_jax.data import pipeline
from har_jax.data import stages
from har_jax.data.prepare import synthetic_actions
from har_jax.evaluation import checkpoint_eval
from har_jax.video import video_files
from conftest import training_videos  # pylint: disable=g-bad-import-order
from conftest import write_video  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prep(config, geometry=None) -> inference.Preprocessing:
  return inference.Preprocessing.from_config(config, geometry or {'resize': 'none'})


def _views_config(tiny_config, **overrides):
  return tiny_config(**dict({'eval.num_clips': 2, 'eval.num_crops': 3, 'num_frames': 3,
                             'frame_stride': 2, 'image_size': 16}, **overrides))


@pytest.mark.parametrize('shape,resize', [((9, 33, 45), 0), ((9, 45, 33), 0), ((5, 40, 54), 24),
                                          ((2, 20, 12), 0)],
                         ids=['odd_landscape', 'odd_portrait', 'resized', 'short_and_small'])
def test_views_equal_the_eval_pipeline(tiny_config, shape, resize):
  """Same frames in, same views out as pipeline.preprocess_eval (JPEG decoded by the same
  decoder on both sides, so the comparison is exact)."""
  config = _views_config(tiny_config, **{'dataset.resize_size': resize})
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  jpegs = tf.stack([tf.io.encode_jpeg(f, quality=95) for f in frames])
  reference = pipeline.preprocess_eval(
      {'video': jpegs, 'label': 0, 'tfds_id': 'x'}, config)['video'].numpy()
  decoded = tf.map_fn(lambda j: tf.io.decode_jpeg(j, channels=3), jpegs,
                      fn_output_signature=tf.uint8).numpy()
  indices = stages.sample_eval_indices(shape[0], 3, 2, 2, 'loop').numpy().reshape(-1)
  views = predict.eval_views(decoded[indices], _prep(config))
  assert views.shape == (6, 3, 16, 16, 3) and views.dtype == np.uint8
  np.testing.assert_array_equal(views, reference)


def test_read_clip_frames_avi_mp4_portrait_short(tiny_config, tmp_path):
  config = _views_config(tiny_config)  # 2 clips x 3 frames at stride 2: span 5 frames.
  rng = np.random.default_rng(1)
  frames = rng.integers(0, 256, (11, 33, 45, 3), dtype=np.uint8)
  clip = predict.read_clip_frames(write_video(tmp_path / 'odd.avi', frames), _prep(config))
  indices = stages.sample_eval_indices(11, 3, 2, 2, 'loop').numpy().reshape(-1)
  assert clip.num_available == 11 and clip.frame_size == (33, 45)
  np.testing.assert_array_equal(clip.frames, frames[indices])  # Lossless: the sampled frames.

  portrait = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None, None],
                       4, axis=0) * np.ones((1, 1, 40, 3), np.uint8)
  clip = predict.read_clip_frames(write_video(tmp_path / 'tall.mp4', portrait,
                                               lossless=False), _prep(config))
  got = clip.frames
  assert clip.num_available == 4 and got.shape == (6, 64, 40, 3)  # Short video: indices loop.
  assert abs(int(got[0, 60, 20, 0]) - int(portrait[0, 60, 20, 0])) < 12
  views = predict.eval_views(got, _prep(config))
  assert views.shape == (6, 3, 16, 16, 3)


@pytest.mark.parametrize('content', [b'', b'not a video at all' * 100, 'missing', 'truncated'])
def test_unreadable_files_raise_video_error_naming_the_file(tiny_config, tmp_path, content):
  config = _views_config(tiny_config)
  path = tmp_path / 'bad.mp4'
  if content == 'truncated':
    good = write_video(tmp_path / 'good.mp4', np.zeros((8, 32, 32, 3), np.uint8), lossless=False)
    path.write_bytes(open(good, 'rb').read()[:300])
  elif content != 'missing':
    path.write_bytes(content)
  with pytest.raises(video_files.VideoError, match='bad.mp4'):
    predict.read_clip_frames(str(path), _prep(config))


def _save_fresh_state(workdir, config, num_classes: int, class_names: str, step: int = 3):
  """Saves checkpoint `step` of a fresh `num_classes`-way state, with `class_names` as metadata."""
  state = train.create_train_state(jax.random.PRNGKey(0), config, num_classes,
                                   optim.create_learning_rate_fn(config))
  info = datasets.DatasetInfo(name='fresh', class_names=tuple(class_names), split_sizes={})
  manager = checkpoints.CheckpointManager(str(workdir), config, info)
  manager.save_now(step, state)
  manager.close()


@pytest.mark.slow
def test_checkpoint_not_matching_its_metadata_is_refused(tiny_config, tmp_path):
  """Saved with 10-class weights but 5 class names: a clear error, not a shape crash."""
  _save_fresh_state(tmp_path, tiny_config(), 10, 'abcde')
  with pytest.raises(errors.UserError, match='Checkpoint 3 .* does not match its saved '
                                           'config \\(5 classes'):
    inference.load(str(tmp_path), 'latest')
  with pytest.raises(errors.UserError, match=r'No checkpoint at step 8 .* \[3\]'):
    inference.load(str(tmp_path), '8')
  with pytest.raises(errors.UserError, match='is not a directory'):
    inference.load(str(tmp_path / 'nope'))
  with pytest.raises(errors.UserError, match='No checkpoints directory'):
    inference.load(str(tmp_path / 'checkpoints' / '3'))


def _record_logits(config, model: inference.LoadedModel, split: str) -> dict:
  """{tfds_id: video logits} that evaluation gives the records of `split`, with model's weights."""
  builder = datasets.get_builder(config.dataset)
  devices = jax.devices()[:1]
  eval_model = models.create_model(config.model, model.num_classes, dtype=config.dtype,
                                   bn_axis_name='batch')
  outputs, _ = checkpoint_eval.evaluate_variables(
      model.variables, checkpoint_eval.eval_steps(eval_model, devices), builder, config, split,
      devices=devices)
  return dict(zip(outputs.tfds_ids, outputs.logits))


@pytest.mark.slow
def test_predict_names_the_right_class(trained, tmp_path):
  """AVI and MP4 files of videos the model learned: mostly right, and the same answer as the
  eval pipeline gives for those videos; a corrupt file in the list is skipped by name."""
  config, workdir = trained
  model = inference.load(workdir, 'latest')
  assert model.class_names == tuple(synthetic_actions.CLASS_NAMES)
  assert model.step == 300
  videos = training_videos(config, 20)
  paths, labels = [], []
  for i, (_, frames, label) in enumerate(videos):
    ext, lossless = ('avi', True) if i % 2 == 0 else ('mp4', False)
    paths.append(write_video(tmp_path / f'video_{i}.{ext}', frames, lossless=lossless))
    labels.append(label)
  corrupt = tmp_path / 'corrupt.avi'
  corrupt.write_bytes(b'\x00garbage' * 50)
  results = predict.predict_files(paths[:10] + [str(corrupt)] + paths[10:], top_k=3,
                                  model=model)
  assert not results[10]['ok'] and 'corrupt.avi' in results[10]['error']
  results = results[:10] + results[11:]
  assert all(r['ok'] for r in results)
  predicted = [r['top_k'][0]['index'] for r in results]
  for r in results:
    assert len(r['top_k']) == 3 and r['views'] == 1 and r['num_frames'] == 8
    probs = [e['probability'] for e in r['top_k']]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert r['top_k'][0]['class'] == synthetic_actions.CLASS_NAMES[r['top_k'][0]['index']]

  # What evaluation says about the same (JPEG-stored) training videos, with the same weights.
  by_id = _record_logits(config, model, 'train[:20]')
  eval_pred = [int(np.argmax(by_id[tfds_id])) for tfds_id, _, _ in videos]
  eval_right = np.mean(np.array(eval_pred) == labels)
  right = np.mean(np.array(predicted) == labels)
  agree = np.mean(np.array(predicted) == eval_pred)
  assert eval_right >= 0.5, f'the tiny model learned too little ({eval_right:.2f}) to test with'
  assert right > 0.5, f'predict right on {right:.2f} of 20 learned videos: {predicted} vs {labels}'
  assert agree >= 0.8, f'predict and eval agree on only {agree:.2f}: {predicted} vs {eval_pred}'


def _run_script(args, timeout=600):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'predict.py')] + args,
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        check=False)


@pytest.mark.slow
def test_predict_script_json_and_exit_codes(trained, tmp_path):
  config, workdir = trained
  (_, frames, _), = training_videos(config, 1)
  good = write_video(tmp_path / 'walk.avi', frames)
  bad = tmp_path / 'broken.mp4'
  bad.write_bytes(b'garbage')
  out = _run_script([f'--workdir={workdir}', '--checkpoint=best', '--json', '--top_k=2', good,
                     str(bad)])
  assert out.returncode == 0, out.stderr[-3000:]
  answer = json.loads(out.stdout)
  assert [r['ok'] for r in answer] == [True, False]
  assert answer[0]['path'] == good and len(answer[0]['top_k']) == 2
  assert answer[0]['top_k'][0]['class'] in synthetic_actions.CLASS_NAMES
  assert 'broken.mp4' in answer[1]['error'] and 'broken.mp4' in out.stderr

  text = _run_script([f'--workdir={workdir}', good])
  assert text.returncode == 0 and 'walk.avi' in text.stdout and '1. ' in text.stdout
  all_bad = _run_script([f'--workdir={workdir}', str(bad)])
  assert all_bad.returncode == 1 and 'none of the 1 file(s)' in all_bad.stderr
  no_step = _run_script([f'--workdir={workdir}', '--checkpoint=12345', good])
  assert no_step.returncode == 1 and 'No checkpoint at step 12345' in no_step.stderr
  no_dir = _run_script([f'--workdir={tmp_path / "nope"}', good])
  assert no_dir.returncode == 1 and 'is not a directory' in no_dir.stderr


def _gradient_video(path, num_frames, height, width, lossless=False):
  """A moving gradient (compresses well, so large sizes encode fast)."""
  y, x = np.mgrid[:height, :width]
  frames = np.stack([np.stack([(x + 8 * t) % 256, (y + 4 * t) % 256, (x + y) % 256], -1)
                     for t in range(num_frames)]).astype(np.uint8)
  return write_video(path, frames, lossless=lossless), frames


def test_frames_are_downscaled_while_decoding(tiny_config, tmp_path):
  """Issue 16.13: full-resolution frames were kept; now the decoder scales them down by powers
  of two while the short side stays >= the resize target, as the JPEG decoder does in training
  (by at most 8, libjpeg's largest ratio: issue 28 put both on har_jax.geometry)."""
  config = _views_config(tiny_config, **{'dataset.resize_size': 32})
  path, _ = _gradient_video(tmp_path / 'hd.mp4', 6, 720, 1280)
  clip = predict.read_clip_frames(path, _prep(config))
  assert clip.frame_size == (720, 1280) and clip.num_available == 6
  assert clip.frames.shape == (6, 90, 160, 3)  # 720 / 8 = 90 >= 32: the ratio is capped at 8.
  views = predict.eval_views(clip.frames, _prep(config))
  assert views.shape == (6, 3, 16, 16, 3)


def test_without_resize_only_the_crop_band_is_kept(tiny_config, tmp_path):
  """dataset.resize_size=0 crops at the stored size: keep only the rows or columns the crops use,
  and get exactly the views of the full frames."""
  config = _views_config(tiny_config, **{'dataset.resize_size': 0})
  for name, (height, width) in (('wide.avi', (40, 90)), ('tall.avi', (90, 40))):
    path, frames = _gradient_video(tmp_path / name, 11, height, width, lossless=True)
    clip = predict.read_clip_frames(path, _prep(config))
    assert min(clip.frames.shape[1:3]) == config.image_size and clip.frame_size == (height, width)
    indices = stages.sample_eval_indices(11, 3, 2, 2, 'loop').numpy().reshape(-1)
    np.testing.assert_array_equal(predict.eval_views(clip.frames, _prep(config)),
                                  predict.eval_views(frames[indices], _prep(config)))


_PEAK_RSS = '''
import resource, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import conftest
from har_jax import inference
from har_jax import predict
config = conftest.make_tiny_config({data!r}, **{{
    'num_frames': 16, 'frame_stride': 2, 'image_size': 112, 'dataset.resize_size': 128,
    'eval.num_clips': 5, 'eval.num_crops': 3}})
preprocessing = inference.Preprocessing.from_config(config, {{'resize': 'none'}})
for path in sys.argv[1:]:
  clip = predict.read_clip_frames(path, preprocessing)
  predict.eval_views(clip.frames, preprocessing)
  print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, flush=True)
'''


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_resolution(synthetic_data_dir, tmp_path):
  """Issue 16.13: a 2-second 4K clip took 6.8 GB. Here 1080p (24 frames) against 128x128 in one
  process: the peak RSS may grow by what the model input needs, not by 80 full-HD frames."""
  small, _ = _gradient_video(tmp_path / 'small.mp4', 24, 128, 160)
  large, _ = _gradient_video(tmp_path / 'large.mp4', 24, 1080, 1920)
  script = _PEAK_RSS.format(tests=os.path.join(REPO, 'tests'), repo=REPO,
                            data=str(synthetic_data_dir))
  out = subprocess.run([sys.executable, '-c', script, small, large], capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  after_small, after_large = (int(x) for x in out.stdout.split())
  assert after_large - after_small < 300, f'peak RSS grew by {after_large - after_small} MiB'


def test_file_names_are_never_read_as_protocols(tiny_config, tmp_path, monkeypatch):
  """Issue 16.14: FFmpeg read the relative path 'a:b.mp4' as protocol 'a'."""
  config = _views_config(tiny_config)
  _gradient_video(tmp_path / 'a:b.mp4', 4, 32, 48)
  monkeypatch.chdir(tmp_path)
  assert predict.read_clip_frames('a:b.mp4', _prep(config)).num_available == 4


def test_directories_and_playlists_are_refused_by_name(tiny_config, tmp_path):
  """Issue 16.14: a directory was 'no such file'; a playlist was followed to the files it names."""
  config = _views_config(tiny_config)
  (tmp_path / 'folder.mp4').mkdir()
  with pytest.raises(video_files.VideoError, match='folder.mp4: is a directory'):
    predict.read_clip_frames(str(tmp_path / 'folder.mp4'), _prep(config))
  _gradient_video(tmp_path / 'segment.ts.mp4', 4, 32, 48)
  segment = tmp_path / 'segment.ts'
  subprocess.run(['ffmpeg', '-v', 'error', '-y', '-i', str(tmp_path / 'segment.ts.mp4'), '-c',
                  'copy', str(segment)], check=True)
  playlist = tmp_path / 'list.m3u8'
  playlist.write_text('#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n'
                      'segment.ts\n#EXT-X-ENDLIST\n')
  with pytest.raises(video_files.VideoError, match='list.m3u8: not a video container'):
    predict.read_clip_frames(str(playlist), _prep(config))
  assert predict.read_clip_frames(str(segment), _prep(config)).num_available == 4  # MPEG-TS.


@pytest.mark.slow
def test_corrupt_checkpoint_is_called_corrupt(tiny_config, tmp_path):
  """Issue 16.14: a CRC failure was reported as 'does not match its saved config'."""
  _save_fresh_state(tmp_path, tiny_config(), 10, 'abcdefghij')
  folder = tmp_path / 'checkpoints' / '3' / 'state'
  largest = max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  for start in range(len(data) // 8, len(data), len(data) // 8):  # Params and optimizer state.
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
  largest.write_bytes(bytes(data))
  with pytest.raises(errors.UserError, match='Checkpoint 3 .* is corrupt') as error:
    inference.load(str(tmp_path), 'latest')
  assert 'does not match' not in str(error.value)


@pytest.mark.slow
def test_raw_videos_get_the_geometry_of_the_training_records(trained, tmp_path):
  """Raw files at another aspect ratio than the records (as UCF101's 320x240 AVIs are to the
  stock 256x256 records): prediction squashes them as the records were made, and then agrees
  with evaluation on the records; keeping the raw aspect ratio agrees less."""
  config, workdir = trained
  model = inference.load(workdir, 'latest')
  assert model.preprocessing.frame_geometry == {'resize': 'squash', 'size': [32, 32]}
  videos = training_videos(config, 20)
  paths = []
  for i, (_, frames, _) in enumerate(videos):  # 32x32 records -> 48x36 (4:3) "raw" files.
    wide = tf.image.resize(frames, (36, 48), method='bilinear', antialias=True)
    paths.append(write_video(tmp_path / f'raw_{i}.avi',
                             np.asarray(tf.round(tf.clip_by_value(wide, 0, 255)), np.uint8)))
  by_id = _record_logits(config, model, 'train[:20]')
  on_records = np.stack([np.asarray(jax.nn.softmax(by_id[t])) for t, _, _ in videos])

  kept_aspect = dataclasses.replace(model, preprocessing=dataclasses.replace(
      model.preprocessing, frame_geometry={'resize': 'none'}))
  agreement, distance = {}, {}
  for name, loaded in (('squash', model), ('kept', kept_aspect)):
    results = predict.predict_files(paths, top_k=10, model=loaded)
    probs = np.zeros_like(on_records)
    for row, r in enumerate(results):
      for entry in r['top_k']:
        probs[row, entry['index']] = entry['probability']
    agreement[name] = np.mean(probs.argmax(-1) == on_records.argmax(-1))
    distance[name] = np.abs(probs - on_records).sum(-1).mean()
  assert agreement['squash'] >= 0.9, (agreement, distance)
  assert distance['squash'] < distance['kept'], (agreement, distance)
  assert agreement['squash'] >= agreement['kept'], (agreement, distance)


@pytest.mark.parametrize('value', [1, 27, 100_000])
def test_resize_short_side_out_of_bounds_is_one_error(value):
  """--resize_short_side=100000 ran out of memory (ResourceExhausted), 1 was accepted (27.10)."""
  with pytest.raises(errors.UserError, match=f'--resize_short_side={value}: must be 0'):
    predict.check_resize(value, image_size=28)
  for fine in (None, 0, 28, 4096):
    predict.check_resize(fine, image_size=28)
