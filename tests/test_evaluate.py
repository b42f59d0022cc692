"""Checkpoint evaluation: exact report numbers, --checkpoint=all, other device counts, errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax import inference
from har_jax.data import datasets
from har_jax.data.prepare import synthetic_actions
from har_jax.evaluation import checkpoint_eval
from har_jax.evaluation import metrics
from har_jax.evaluation import reports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outputs(logits, labels, view_top1=None):
  logits = np.asarray(logits, np.float32)
  view_top1 = np.ones(len(labels), np.float32) if view_top1 is None else np.asarray(view_top1)
  return metrics.EvalOutputs(logits=logits, labels=np.asarray(labels), view_top1=view_top1,
                             tfds_ids=np.array([f'v{i}' for i in range(len(labels))]))


def test_report_numbers_exact_from_known_logits():
  names = list(synthetic_actions.CLASS_NAMES)  # 10 classes in 5 reversal pairs.
  logits = np.zeros((6, 10), np.float32)
  # Rank lists, best first; every other class stays at 0 < all listed values.
  ranks = [[0, 1], [0, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4], [3, 2], [8, 9], [5, 6, 7, 8, 9, 4]]
  for row, order in enumerate(ranks):
    logits[row, order] = np.arange(len(order), 0, -1) * 2.0
  labels = np.array([0, 1, 4, 2, 9, 4])
  # top-1: video 0 only. top-5: videos 0, 1 (label 1 2nd), 2 (label 4 6th: no), 3 (label 2 2nd),
  # 4 (label 9 2nd), 5 (label 4 6th: no) -> 4/6. Per class: 0 -> 1, 1 -> 0, 2 -> 0, 4 -> 0 (2
  # videos), 9 -> 0; mean over the 5 classes present = 1/5.
  outputs = _outputs(logits, labels, view_top1=[1, 0.5, 0, 0, 0, 0])
  shuffled = _outputs(np.roll(logits, 1, axis=1), labels, view_top1=[0, 0, 0, 0, 0, 0])
  report = reports.build_report(outputs, shuffled, names,
                                 {'checkpoint_step': 7, 'split': 'test'})
  m = report['metrics']
  assert m['top1'] == pytest.approx(1 / 6)
  assert m['top5'] == pytest.approx(4 / 6)
  assert m['mean_class_accuracy'] == pytest.approx(1 / 5)
  assert m['clip_top1'] == pytest.approx(1.5 / 6)
  assert m['num_videos'] == 6
  assert report['per_class_accuracy']['move_left'] == 1.0
  assert report['per_class_accuracy']['grow'] == 0.0
  assert np.isnan(report['per_class_accuracy']['move_down'])  # No video of class 3.
  counts = np.array(report['confusion_matrix']['counts'])
  assert counts.sum() == 6 and counts[0, 0] == 1 and counts[1, 0] == 1 and counts[4, 9] == 1
  assert counts[4, 5] == 1 and counts[2, 3] == 1 and counts[9, 8] == 1
  assert report['most_confused'][0] == {'true': 'move_right', 'predicted': 'move_left', 'count': 1}
  assert len(report['most_confused']) == 5
  # Pairs: video 0 (0 vs 1: 4 > 2 right), 1 (1 vs 0: 10 < 12 wrong), 2 (4 vs 5: 2 < 4 wrong),
  # 3 (2 vs 3: 2 < 4 wrong), 4 (9 vs 8: 2 < 4 wrong), 5 (4 vs 5: 2 < 12 wrong) -> 1/6.
  pairs = report['temporal_order']['reversal_pairs']
  assert pairs['accuracy'] == pytest.approx(1 / 6)
  assert pairs['per_pair'][0] == pytest.approx(0.5) and pairs['per_pair'][2] == 0.0
  # Shuffled logits rolled by one class: predictions become [1, 1, 0, 4, 9, 6]; videos 1, 4 right.
  assert report['temporal_order']['shuffled']['top1'] == pytest.approx(2 / 6)
  assert report['temporal_order']['top1_drop'] == pytest.approx(1 / 6 - 2 / 6)
  assert report['temporal_order']['shuffled']['clip_top1'] == 0.0


def test_json_report_has_no_nan_and_names_its_files(tmp_path):
  path = reports.report_path(str(tmp_path), 'test[:50%]', 12)
  assert path == str(tmp_path / 'eval' / 'test_50pct_step_12.json')
  reports.write_json(path, {'a': float('nan'), 'b': np.float32(0.5), 'c': np.arange(3)})
  assert json.load(open(path)) == {'a': None, 'b': 0.5, 'c': [0, 1, 2]}
  assert reports.videos_path(path).endswith('test_50pct_step_12_videos.npz')


def test_confusion_matrix_image_is_rendered_with_names():
  matrix = np.diag([3, 2, 1])
  matrix[0, 2] = 4
  image = reports.confusion_matrix_image(matrix, ['walk', 'run', 'jump'], 'title')
  assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
  assert image.shape[0] >= 400 and image.shape[1] >= 400
  assert image.min() < 60 and image.max() == 255  # Dark cells on a white background.
  with pytest.raises(ValueError, match='does not match 2 class names'):
    reports.confusion_matrix_image(matrix, ['walk', 'run'])


def test_confusion_order_puts_confused_classes_together_and_drops_absent_ones():
  matrix = np.zeros((101, 101), np.int64)
  for c in (3, 50, 7, 90, 12):
    matrix[c, c] = 5
  matrix[50, 90] = 4  # 50 and 90 are confused most, then 90 and 12, then 3 and 7.
  matrix[12, 90] = 2
  matrix[90, 12] = 1
  matrix[3, 7] = 1
  assert metrics.confusion_order(matrix) == [50, 90, 12, 3, 7]
  assert metrics.most_confused(matrix, 3) == [(50, 90, 4), (12, 90, 2), (3, 7, 1)]
  names = [f'class_{i}' for i in range(101)]
  pairs = reports.most_confused_pairs(matrix, names, 2)
  assert pairs == [{'true': 'class_50', 'predicted': 'class_90', 'count': 4},
                   {'true': 'class_12', 'predicted': 'class_90', 'count': 2}]
  assert '| class_50 | class_90 | 4 |' in reports.most_confused_markdown(pairs)
  # Five classes drawn, not 101: the image is about the size of a 5-class one.
  small = reports.confusion_matrix_image(matrix, names, 'test')
  full = reports.confusion_matrix_image(np.eye(101, dtype=np.int64), names, 'test')
  assert small.shape[0] < full.shape[0] / 2, (small.shape, full.shape)


class _OrderSensitiveModel:
  """Known logits: per-frame mean brightness [T] (0..1) times a fixed [T, 10] matrix."""
  num_classes = 10

  def __init__(self, num_frames):
    t = np.arange(num_frames)[:, None]
    c = np.arange(10)[None, :]
    self.weights = (10.0 * np.cos(1.3 * t * (c + 1) + 0.7 * c)).astype(np.float32)

  def logits(self, video):
    """[B, T, H, W, 3] -> [B, 10]; numpy or jax."""
    xp = jnp if isinstance(video, jax.Array) else np
    brightness = video.astype(xp.float32).mean(axis=(2, 3, 4)) / 255.0
    return brightness @ self.weights

  def apply(self, variables, video, train=False):
    del variables, train
    return self.logits(video)


@pytest.mark.slow
def test_report_matches_independent_recomputation(tiny_config, tmp_path):
  """Fake model with known logits over the real eval pipeline: JSON == recomputation by hand.

  8 frames of 32x32, one clip and one 32x32 crop: the single view of a video is the whole decoded
  video, so the expected logits follow from the dataset alone.
  """
  config = tiny_config(num_frames=8, image_size=32, **{'eval.batch_size': 8})
  builder = datasets.get_builder(config.dataset)
  model = _OrderSensitiveModel(config.num_frames)
  devices = jax.devices()[:2]
  variables = {'params': {}, 'batch_stats': {}}
  outputs, shuffled = checkpoint_eval.evaluate_variables(
      variables, checkpoint_eval.eval_steps(model, devices), builder, config, 'test',
      devices=devices)
  names = list(synthetic_actions.CLASS_NAMES)
  report = reports.build_report(outputs, shuffled, names,
                                reports.protocol(config, 'test', 3, len(outputs.labels)))
  path = reports.write_report(str(tmp_path), report, outputs, shuffled)
  saved = json.load(open(path))
  videos = np.load(reports.videos_path(path))

  expected = {}
  for ex in tfds.as_numpy(builder.as_dataset(split='test', read_config=tfds.ReadConfig(
      add_tfds_id=True))):
    expected[ex['tfds_id'].decode()] = (model.logits(ex['video'][None].astype(np.float64))[0],
                                        int(ex['label']))
  assert sorted(videos['tfds_ids']) == sorted(expected)  # Every video exactly once.
  want = np.stack([expected[i][0] for i in videos['tfds_ids']])
  labels = np.array([expected[i][1] for i in videos['tfds_ids']])
  np.testing.assert_array_equal(videos['labels'], labels)
  np.testing.assert_allclose(videos['logits'], want, rtol=1e-4, atol=1e-4)
  ordered = np.sort(want, axis=1)[:, ::-1]
  assert np.min(ordered[:, 0] - ordered[:, 1]) > 1e-2, 'near-tie: pick other test weights'
  assert np.min(ordered[:, 4] - ordered[:, 5]) > 1e-2, 'near-tie: pick other test weights'

  top1 = [int(np.argmax(l) == y) for l, y in zip(want, labels)]
  top5 = [int(y in np.argsort(-l)[:5]) for l, y in zip(want, labels)]
  per_class = {c: np.mean([t for t, y in zip(top1, labels) if y == c]) for c in set(labels)}
  assert saved['metrics']['top1'] == pytest.approx(np.mean(top1), abs=1e-12)
  assert saved['metrics']['top5'] == pytest.approx(np.mean(top5), abs=1e-12)
  assert saved['metrics']['mean_class_accuracy'] == pytest.approx(
      np.mean(list(per_class.values())), abs=1e-12)
  assert saved['metrics']['num_videos'] == 20
  assert 0 < np.mean(top5) < 1, 'degenerate test: every or no video in the top 5'
  for c, acc in per_class.items():
    assert saved['per_class_accuracy'][names[c]] == pytest.approx(acc)
  # The diagnostic permuted frames: order-sensitive logits moved, labels and videos did not.
  assert not np.allclose(videos['shuffled_logits'], videos['logits'], atol=1e-3)
  shuffled_top1 = np.mean(np.argmax(videos['shuffled_logits'], 1) == labels)
  assert saved['temporal_order']['shuffled']['top1'] == pytest.approx(shuffled_top1)
  assert saved['temporal_order']['top1_drop'] == pytest.approx(np.mean(top1) - shuffled_top1)
  assert saved['protocol']['views_per_video'] == 1 and saved['protocol']['num_frames'] == 8
  assert saved['class_names'] == names and saved['per_video_file'] == os.path.basename(
      reports.videos_path(path))


def _event_steps(logdir, tag):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={'tensors': 0})
  acc.Reload()
  return [e.step for e in acc.Tensors(tag)], acc.Tags()['tensors']


@pytest.mark.slow  # Needs the shared 300-step training run.
def test_all_checkpoints_evaluated_on_one_device(trained, capsys):
  """Trained on 4 devices, evaluated on 1: a report per kept checkpoint, each at its step."""
  config, workdir = trained
  reports_ = checkpoint_eval.evaluate(config, workdir, checkpoint='all', devices=jax.devices()[:1])
  assert [r['checkpoint_step'] for r in reports_] == [100, 200, 300]
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1] == f"report: {os.path.join(workdir, 'eval', 'test_step_300.json')}"
  for r in reports_:
    saved = json.load(open(r['report_path']))
    videos = np.load(reports.videos_path(r['report_path']))
    assert saved['protocol']['checkpoint_step'] == r['checkpoint_step']
    assert saved['metrics']['top1'] == pytest.approx(
        np.mean(np.argmax(videos['logits'], 1) == videos['labels']))
    assert len(videos['labels']) == 20
  steps, tags = _event_steps(os.path.join(workdir, 'eval'), 'test/top1')
  assert steps == [100, 200, 300]
  for tag in ('test/top5', 'test/mean_class_accuracy', 'test/clip_top1',
              'test/shuffled_time/top1', 'test/temporal_order_top1_drop',
              'test/reversal_pair_accuracy', 'test/confusion_matrix', 'test/most_confused'):
    assert tag in tags, f'{tag} not in {tags}'
  # The final periodic eval of training saw the same 20 videos with the same weights.
  val = json.load(open(reports_[-1]['report_path']))['metrics']['top1']
  train_steps, _ = _event_steps(workdir, 'val/top1')
  assert train_steps[-1] == 300 and 0.0 <= val <= 1.0


@pytest.mark.slow  # Needs the shared 300-step training run.
def test_checkpoint_selection_and_clear_errors(trained, tmp_path):
  config, workdir = trained
  manager = inference.open_checkpoints(workdir)
  try:
    assert inference.resolve_steps(manager, 'latest') == [300]
    assert inference.resolve_steps(manager, 'all') == [100, 200, 300]
    assert inference.resolve_steps(manager, '100') == [100]
    assert inference.resolve_steps(manager, 'best') == [manager.best_step()]
    with pytest.raises(errors.UserError, match=r'step 7 .* kept steps are \[100, 200'):
      inference.resolve_steps(manager, '7')
    with pytest.raises(errors.UserError, match="'newest' is not one of"):
      inference.resolve_steps(manager, 'newest')
  finally:
    manager.close()
  with pytest.raises(errors.UserError, match='is not a directory'):
    checkpoint_eval.evaluate(config, str(tmp_path / 'no_such_dir'))
  with pytest.raises(errors.UserError, match='No checkpoints directory'):
    checkpoint_eval.evaluate(config, str(tmp_path))
  wrong = config.copy_and_resolve_references()
  wrong.model.lstm_size = 32
  with pytest.raises(errors.UserError, match=r'model.lstm_size: checkpoint has 16'):
    checkpoint_eval.evaluate(wrong, workdir, checkpoint='latest')


def _tiny_flags(config):
  return [f'--config.dataset.name={config.dataset.name}',
          f'--config.dataset.data_dir={config.dataset.data_dir}',
          f'--config.num_frames={config.num_frames}', '--config.frame_stride=1',
          f'--config.image_size={config.image_size}',
          f'--config.model.lstm_size={config.model.lstm_size}',
          '--config.eval.batch_size=8', '--config.batch_size=8']


@pytest.mark.slow
def test_main_eval_cli_on_one_device(trained, tmp_path):
  """`main.py --mode=eval` in a fresh 1-device process: last line 'report: ...'; bad input exits."""
  config, workdir = trained
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  base = [sys.executable, os.path.join(REPO, 'main.py'), '--mode=eval',
          f"--config={os.path.join(REPO, 'configs', 'synthetic.py')}"] + _tiny_flags(config)
  ok = subprocess.run(base + [f'--workdir={workdir}', '--checkpoint=100'], env=env, cwd=REPO,
                      capture_output=True, text=True, timeout=600, check=False)
  assert ok.returncode == 0, ok.stderr[-3000:]
  last = ok.stdout.strip().splitlines()[-1]
  assert last == f"report: {os.path.join(workdir, 'eval', 'test_step_100.json')}"
  bad = subprocess.run(base + [f'--workdir={workdir}', '--checkpoint=99'], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600, check=False)
  assert bad.returncode != 0
  assert 'No checkpoint at step 99' in bad.stderr


@pytest.mark.slow  # Needs the shared 300-step training run.
def test_all_checkpoints_report_the_rest_when_the_newest_is_corrupt(trained, tmp_path, capsys):
  """--checkpoint=all stopped with rc 1 at a corrupt newest checkpoint (27.4): now the others are
  reported and the bad one is named."""
  config, workdir = trained
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  state = copy / 'checkpoints' / '300' / 'state'
  for chunk in (p for p in state.rglob('*') if p.is_file() and p.parent.name == 'd'):
    data = bytearray(chunk.read_bytes())  # Every data file: the variables are damaged too.
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    chunk.write_bytes(bytes(data))
  reports_ = checkpoint_eval.evaluate(config, str(copy), checkpoint='all',
                                      devices=jax.devices()[:1])
  assert [r['checkpoint_step'] for r in reports_] == [100, 200]
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1 and 'checkpoint 300 was not evaluated' in warnings[0], warnings
