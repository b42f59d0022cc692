"""The three-split protocol (har_jax/splits.py, scripts/run_splits.py): per-split configs, the
table's arithmetic, errors before any training, and an end-to-end run on generated UCF101 data."""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import default
from configs import ucf101_frames
from har_jax import errors
from har_jax import splits
from har_jax.data.prepare import ucf101
import conftest

REPO = conftest.REPO


def test_split_configs_name_the_datasets_and_splits_of_each_protocol():
  config = default.get_config()
  config.image_size = 64  # The copies keep what the resize followed.
  stock = splits.split_config(config, 2, 'stock')
  assert (stock.dataset.name, stock.dataset.train_split, stock.dataset.eval_split) == (
      'ucf101/ucf101_2', 'train', 'test')
  assert stock.dataset.resize_size == 73 and stock.model.num_lstm_layers == 1
  frames = splits.split_config(ucf101_frames.get_config(), 3, 'frames')
  assert (frames.dataset.name, frames.dataset.train_split, frames.dataset.eval_split) == (
      'ucf101_frames/s128', 'train3', 'test3')
  assert splits.split_config(config, 1, 'frames').dataset.name == 'ucf101_frames/s128'
  config.dataset.name = 'ucf101_meta/ucf101_1_256'
  assert splits.split_config(config, 3, 'stock').dataset.name == 'ucf101_meta/ucf101_3'

  config.dataset.name = 'frame_index/ucf101_meta/ucf101_1_256'  # The index of each split's records.
  assert splits.split_config(config, 2, 'stock').dataset.name == 'frame_index/ucf101_meta/ucf101_2'
  config.dataset.name = 'ucf101_meta/ucf101_1_256'

  base = splits.split_config(config, 1, 'stock', 'baseline')
  assert (base.model.num_lstm_layers, base.model.temporal_pooling) == (0, 'mean')
  assert config.model.num_lstm_layers == 1 and config.dataset.name == 'ucf101_meta/ucf101_1_256'
  assert splits.infer_dataset(ucf101_frames.get_config()) == 'frames'
  assert splits.infer_dataset(default.get_config()) == 'stock'
  with pytest.raises(errors.UserError, match=r'splits \[1, 2, 3\]; got 4'):
    splits.split_config(config, 4, 'stock')


def test_mean_and_sample_std():
  assert splits.mean_and_std([0.9, 0.8, 0.7]) == pytest.approx((0.8, 0.1))
  assert splits.mean_and_std([0.5]) == (0.5, None)
  assert splits.mean_and_std([]) == (None, None)


def test_table_rows_means_and_differences():
  top1 = {'lrcn': {1: 0.9, 2: 0.8, 3: 0.7}, 'baseline': {1: 0.5, 2: 0.5, 3: 0.6}}
  summary = splits.summarize(top1, [1, 2, 3], {1: 84, 2: 84, 3: 84})
  lrcn, base, diff = summary['rows']
  assert (lrcn['mean'], lrcn['std']) == pytest.approx((0.8, 0.1))
  assert (base['mean'], base['std']) == pytest.approx((1.6 / 3, np.std([.5, .5, .6], ddof=1)))
  assert diff['top1'] == pytest.approx({1: 0.4, 2: 0.3, 3: 0.1})
  assert (diff['mean'], diff['std']) == pytest.approx((0.8 / 3, np.std([.4, .3, .1], ddof=1)))
  assert splits.markdown_table(summary).splitlines() == [
      '| model | split 1 (84 videos) | split 2 (84 videos) | split 3 (84 videos) | mean ± std |',
      '|---|---:|---:|---:|---:|',
      '| LRCN (the config) | 90.0 | 80.0 | 70.0 | 80.0 ± 10.0 |',
      '| frame-average baseline | 50.0 | 50.0 | 60.0 | 53.3 ± 5.8 |',
      '| LRCN - baseline | +40.0 | +30.0 | +10.0 | +26.7 ± 15.3 |']


def test_a_partial_table_says_so():
  summary = splits.summarize({'lrcn': {1: 0.75, 2: 0.25}, 'baseline': {1: 0.5}}, [1, 2, 3])
  lines = splits.markdown_table(summary).splitlines()
  assert lines[2] == '| LRCN (the config) | 75.0 | 25.0 | — | 50.0 ± 35.4 (partial) |'
  assert lines[3] == '| frame-average baseline | 50.0 | — | — | 50.0 (partial) |'
  assert lines[4] == '| LRCN - baseline | +25.0 | — | — | +25.0 (partial) |'
  only = splits.summarize({'lrcn': {1: 0.6}}, [1])
  assert [r['model'] for r in only['rows']] == ['lrcn'] and only['rows'][0]['complete']


def test_missing_stock_records_name_the_prepare_command(tmp_path):
  config = default.get_config()
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(errors.UserError) as error:
    splits.run(config, str(tmp_path / 'runs'), splits=[1, 2, 3])
  message = str(error.value)
  for split in (1, 2, 3):
    assert f"split {split}: dataset.name='ucf101/ucf101_{split}'" in message
  assert (f'prepare_ucf101.py --source <UCF101 folder or zips> --data_dir {tmp_path} --config '
          'ucf101_1,ucf101_2,ucf101_3 --variant ucf101') in message
  assert not os.path.exists(tmp_path / 'runs')  # Nothing trained, nothing written.
  config.dataset.name = 'frame_index/ucf101/ucf101_1_256'
  with pytest.raises(errors.UserError) as error:
    splits.run(config, str(tmp_path / 'runs'), splits=[3])
  assert "split 3: dataset.name='frame_index/ucf101/ucf101_3'" in str(error.value)
  assert ('--frame_index --data_dir {} --config ucf101_3 --variant ucf101 (add --source'.format(
      tmp_path) in str(error.value))


def test_a_missing_frame_store_names_the_prepare_command(tmp_path):
  config = ucf101_frames.get_config()
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(errors.UserError, match=f'--data_dir {tmp_path} --short_side 128'):
    splits.run(config, str(tmp_path / 'runs'), splits=[2])
  with pytest.raises(errors.UserError, match='distinct splits'):
    splits.run(config, str(tmp_path / 'runs'), splits=[1, 1])


NUM_FRAMES = 10
TINY = ['--config.model.encoder=small_cnn', '--config.model.lstm_size=16',
        '--config.num_frames=4', '--config.frame_stride=2', '--config.image_size=28',
        '--config.batch_size=4', '--config.eval.batch_size=4', '--config.eval.num_clips=1',
        '--config.eval.num_crops=1', '--config.num_train_steps=2', '--config.warmup_steps=1',
        '--config.log_every_steps=2', '--config.eval_every_steps=2',
        '--config.checkpoint_every_steps=2']


@pytest.fixture(scope='module')
def frame_store(tmp_path_factory):
  """A frame store `ucf101_frames/s32` of generated UCF101-format videos whose three test splits
  each hold 2 videos: 2 classes x groups 1, 8, 15, 22 (one test group per split) x 1 clip."""
  if not shutil.which('ffmpeg'):
    pytest.skip('needs ffmpeg (apt-get install -y ffmpeg)')
  source = str(tmp_path_factory.mktemp('ucf101_source'))
  conftest.load_script('make_fake_ucf101').make_fake_ucf101(
      source, classes=('ApplyEyeMakeup', 'HandstandPushups'), groups=(1, 8, 15, 22), clips=1,
      frames=NUM_FRAMES, width=64, height=48, motion='reversal')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  result = ucf101.prepare_frames(source, data_dir, 32, num_workers=2)
  assert result.split_sizes == {'train1': 6, 'test1': 2, 'train2': 6, 'test2': 2,
                                'train3': 6, 'test3': 2}
  return data_dir


@pytest.mark.slow
def test_run_splits_end_to_end_then_resume(frame_store, tmp_path):
  """Three splits x (LRCN, baseline), 2 steps each, through the script with overrides; a rerun
  trains nothing and gives the same table; a changed recipe is refused."""
  root = tmp_path / 'runs'
  command = [sys.executable, os.path.join(REPO, 'scripts', 'run_splits.py'),
             f"--config={os.path.join(REPO, 'configs', 'ucf101_frames.py')}",
             f'--workdir_root={root}', '--config.dataset.name=ucf101_frames/s32',
             f'--config.dataset.data_dir={frame_store}', *TINY]
  run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  table = json.load(open(root / 'splits.json'))
  assert table['splits'] == [1, 2, 3] and table['num_videos'] == {'1': 2, '2': 2, '3': 2}
  assert table['dataset'] == 'frames: ucf101_frames/s32'
  rows = {row['model']: row for row in table['rows']}
  assert sorted(rows) == ['baseline', 'difference', 'lrcn']
  for model in ('lrcn', 'baseline'):
    values = []
    for split in (1, 2, 3):
      result = json.load(open(root / model / f'split{split}' / 'split_result.json'))
      assert result['eval_split'] == f'test{split}' and result['metrics']['num_videos'] == 2
      assert result['config']['num_train_steps'] == 2  # The override passed through.
      assert rows[model]['top1'][str(split)] == result['metrics']['top1']
      values.append(result['metrics']['top1'])
    assert rows[model]['mean'] == pytest.approx(np.mean(values))
    assert rows[model]['std'] == pytest.approx(np.std(values, ddof=1))
    saved = json.load(open(root / model / 'split1' / 'config.json'))
    assert saved['model']['num_lstm_layers'] == (1 if model == 'lrcn' else 0)
  assert saved['model']['temporal_pooling'] == 'mean'
  markdown = open(root / 'splits.md').read()
  assert '| frame-average baseline |' in markdown and 'split 3 (2 videos)' in markdown
  assert markdown in run.stdout

  stamp = os.path.getmtime(root / 'lrcn' / 'split2' / 'split_result.json')
  rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'Training from step' not in rerun.stderr
  assert rerun.stderr.count('finished earlier') == 6
  assert json.load(open(root / 'splits.json'))['rows'] == table['rows']
  assert os.path.getmtime(root / 'lrcn' / 'split2' / 'split_result.json') == stamp

  saved = json.load(open(root / 'lrcn' / 'split1' / 'split_result.json'))['config']
  config = ml_collections.ConfigDict(saved)
  assert splits.read_result(str(root / 'lrcn' / 'split1'), config)['metrics']['num_videos'] == 2
  config.num_train_steps = 3
  with pytest.raises(errors.UserError, match=r'num_train_steps: 2 -> 3.*new --workdir_root'):
    splits.read_result(str(root / 'lrcn' / 'split1'), config)


def test_bad_values_are_named_per_split_before_training(frame_store, tmp_path):
  config = ucf101_frames.get_config()
  config.dataset.name, config.dataset.data_dir = 'ucf101_frames/s32', frame_store
  config.num_frames = 0
  with pytest.raises(errors.UserError) as error:
    splits.run(config, str(tmp_path / 'runs'), splits=[1, 3])
  message = str(error.value)
  assert 'split 1: num_frames=0' in message and 'split 3: num_frames=0' in message
  assert 'split 2' not in message and 'prepare_ucf101' not in message
  assert not os.path.exists(tmp_path / 'runs')
