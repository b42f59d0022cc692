"""End-to-end: train_and_evaluate under tfds.testing.mock_data and on the synthetic set; configs."""

import contextlib
import glob
import importlib.util
import json
import logging
import os
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing import event_accumulator

from har_jax import augment
from har_jax import config_validation
from har_jax import errors
from har_jax import train
from har_jax.data import datasets
from har_jax.data import pipeline
from har_jax.evaluation import checkpoint_eval
from har_jax.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
CONFIG_FILES = [f for f in CONFIG_FILES if not f.endswith('__init__.py')]


def load_config(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_mock_metadata(data_dir, name='ucf101/ucf101_1_256', num_examples=9):
  """Writes dataset_info.json so mock_data serves `name` with real split metadata."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0)
      for s in ('train', 'test')]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


class _NoFakeFileSystem:
  """Stands in for tfds.testing's MockFs (see mock_ucf101)."""

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    return False

  def add_file(self, path, content=None):
    del path, content


@contextlib.contextmanager
def mock_ucf101(data_dir, num_examples=9):
  """TFDS mock data for ucf101/ucf101_1_256 with its metadata written in data_dir.

  While it builds each dataset, tfds's mock as_dataset swaps a fake file system in for the whole
  process (MockFs), only so that data_dir's existence check passes. Orbax's background save
  threads list the real workdir meanwhile and fail (a run of CI did, when the final evaluation
  built its dataset during the last save). data_dir exists here, so the swap is left out.
  """
  write_mock_metadata(data_dir, num_examples=num_examples)
  with mock.patch('tensorflow_datasets.testing.test_utils.MockFs', _NoFakeFileSystem):
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir),
                                policy=tfds.testing.MockPolicy.USE_FILES):
      yield


@pytest.mark.slow
def test_mock_ucf101_end_to_end(tmp_path):
  """A few steps of the UCF101 config (tiny model) on TFDS mock data, 9 videos (odd) evaluated."""
  config = load_config(os.path.join(REPO, 'configs', 'default.py'))
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.model.encoder = 'small_cnn'
  config.model.lstm_size = 16
  config.num_frames, config.frame_stride, config.image_size = 4, 3, 32
  config.dataset.resize_size = 40
  config.batch_size, config.eval.batch_size = 4, 4
  config.eval.num_clips, config.eval.num_crops = 2, 3
  config.num_train_steps, config.warmup_steps = 2, 1
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  with mock_ucf101(tmp_path / 'tfds'):
    final = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert final['num_videos'] == 9
  assert 0.0 <= final['top1'] <= 1.0 and np.isfinite(final['loss'])
  assert os.path.isdir(tmp_path / 'workdir' / 'checkpoints' / '2')


def _scalars(workdir):
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'scalars': 0, 'tensors': 0})
  acc.Reload()
  return {tag: [e.step for e in acc.Tensors(tag)] for tag in acc.Tags()['tensors']}


@pytest.mark.slow
def test_synthetic_train_logs_checkpoints_and_resumes(tiny_config, tmp_path, caplog):
  workdir = tmp_path / 'workdir'
  train.train_and_evaluate(tiny_config(num_train_steps=4), str(workdir))

  tags = _scalars(workdir)
  for tag in ('train/loss', 'train/top1', 'train/top5', 'train/learning_rate', 'train/grad_norm',
              'train/param_norm', 'train/update_norm', 'perf/steps_per_sec',
              'perf/clips_per_sec', 'perf/input_wait_fraction', 'val/top1', 'val/top5',
              'val/loss', 'test/top1'):
    assert tag in tags, f'{tag} missing from TensorBoard events; have {sorted(tags)}'
  assert tags['train/loss'] == [2, 4]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert json.load(open(workdir / 'class_names.json'))[:2] == ['move_left', 'move_right']
  assert json.load(open(workdir / 'config.json'))['num_train_steps'] == 4

  caplog.set_level(logging.INFO, logger='absl')  # Whatever an earlier test left.
  final = train.train_and_evaluate(tiny_config(num_train_steps=6), str(workdir))
  assert 'Resumed from checkpoint at step 4' in caplog.text
  assert 'Training from step 4 to 6' in caplog.text
  assert final['num_videos'] == 20
  assert _scalars(workdir)['train/loss'] == [2, 4, 6]


@pytest.mark.slow
def test_train_and_evaluate_with_xla_convolutions(tiny_config, tmp_path):
  """The path GPUs and TPUs run (conv_impl='xla': XLA's convolutions and max pool, no CPU
  kernels), on a ResNet with its stem max pool: train, then --mode=eval of the final checkpoint
  gives the training run's own test figures."""
  config = tiny_config(**{'model.conv_impl': 'xla', 'model.encoder': 'resnet18',
                          'model.encoder_kwargs': {'num_filters': 8}, 'num_train_steps': 4})
  workdir = str(tmp_path / 'workdir')
  final = train.train_and_evaluate(config, workdir)
  [report] = checkpoint_eval.evaluate(config, workdir, checkpoint='latest', split='test')
  assert report['checkpoint_step'] == 4 and report['metrics']['num_videos'] == 20
  assert report['metrics']['top1'] == pytest.approx(final['top1'], abs=1e-6)
  assert report['metrics']['loss'] == pytest.approx(final['loss'], rel=1e-4)


@pytest.mark.parametrize('path', [  # The synthetic config in the fast subset, all in CI.
    pytest.param(p, id=os.path.basename(p),
                 marks=() if os.path.basename(p) == 'synthetic.py' else pytest.mark.slow)
    for p in CONFIG_FILES])
def test_config_loads_and_builds(path, tmp_path):
  """Every config: its model initialises (shapes only) and its pipelines yield a batch."""
  config = load_config(path)
  assert config.model.encoder and config.num_frames > 0
  assert config_validation.find_warnings(config) == []  # Crop and resize in proportion.
  model = create_model(config.model, 101, dtype=config.dtype)
  video = jax.ShapeDtypeStruct((1, config.num_frames, config.image_size, config.image_size, 3),
                               np.uint8)
  variables = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, train=False), video)
  out = jax.eval_shape(lambda var, v: model.apply(var, v, train=False), variables, video)
  assert out.shape == (1, 101)

  # On mock stock records (configs/ucf101_frames.py also trains on a real frame store in
  # tests/test_ucf101.py).
  config.dataset.name = 'ucf101/ucf101_1_256'
  config.dataset.data_dir = str(tmp_path)
  config.dataset.train_split, config.dataset.eval_split = 'train', 'test'
  config.dataset.val_split = 0.0
  with mock_ucf101(tmp_path, num_examples=3):
    builder = datasets.get_builder(config.dataset)
    batch = next(pipeline.create_train_dataset(builder, config, local_batch=2)
                 .as_numpy_iterator())
    assert batch['video'].dtype == np.uint8
    assert augment.apply_to_batch(batch, config.image_size).shape == (
        2, config.num_frames, config.image_size, config.image_size, 3)
    config.eval.batch_size = 2
    data = pipeline.create_eval_dataset(builder, config, 'test', local_batch=2)
    batch = next(data.dataset.as_numpy_iterator())
    views = config.eval.num_clips * config.eval.num_crops
    assert batch['video'].shape == (2, views, config.num_frames, config.image_size,
                                    config.image_size, 3)
    assert data.num_batches == 2 and data.num_examples == 3


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = load_config(os.path.join(REPO, 'configs', 'default.py'))
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(errors.UserError, match='prepare_ucf101.py'):
    datasets.get_builder(config.dataset)
  config.dataset.name = 'no_such_dataset_xyz'
  with pytest.raises(errors.UserError, match='Unknown dataset'):
    datasets.get_builder(config.dataset)
