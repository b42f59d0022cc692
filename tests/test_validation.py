"""Config validation: every impossible value is rejected, at once, naming the field."""

import logging
import os

import jax
import pytest

from har_jax import config_validation
from har_jax import errors
from har_jax import train
from har_jax.data import datasets

# (overrides, text the message must hold). The tiny dataset stores 32x32 frames; 4 devices.
BAD_VALUES = [
    ({'num_frames': 0}, 'num_frames=0'),
    ({'num_frames': -3}, 'num_frames=-3'),
    ({'num_train_steps': 0}, 'num_train_steps=0'),
    ({'batch_size': -8}, 'batch_size=-8'),
    ({'eval.batch_size': 0}, 'eval.batch_size=0'),
    ({'frame_stride': 0}, 'frame_stride=0'),
    ({'image_size': 40, 'dataset.resize_size': 0}, 'image_size=40: larger than the stored frames'),
    ({'image_size': 28, 'dataset.resize_size': 24}, 'image_size=28: larger than the frames after'),
    ({'model.encoder': 'resnet7'}, "model.encoder='resnet7': unknown"),
    ({'optimizer': 'lion'}, "optimizer='lion': unknown"),
    ({'dataset.name': 'no_such_dataset'}, "dataset.name='no_such_dataset'"),
    ({'batch_size': 6}, 'batch_size=6: must be a multiple of the global device count 4'),
    ({'eval.batch_size': 10}, 'eval.batch_size=10: must be a multiple'),
    ({'learning_rate': 0.0}, 'learning_rate=0.0'),
    ({'model.temporal_pooling': 'max'}, "model.temporal_pooling='max': unknown"),
    ({'augment.min_area': 0.0}, 'augment.min_area=0.0'),
    ({'model.num_lstm_layers': -1}, 'model.num_lstm_layers=-1'),
    ({'eval.num_crops': 2}, 'eval.num_crops=2: must be 1'),  # Was a 60-line autograph traceback.
    ({'eval.num_crops': 5}, 'eval.num_crops=5: must be 1'),
    ({'eval.num_clips': 0}, 'eval.num_clips=0'),
    ({'model.conv_impl': 'gpu'}, "model.conv_impl='gpu': unknown"),  # Was a traceback (27.10).
    ({'model.encoder_init': '/nonexistent'}, "model.encoder_init='/nonexistent': no encoder"),
]


def test_tiny_config_is_valid(tiny_config):
  assert config_validation.find_problems(tiny_config()) == []


@pytest.mark.parametrize('overrides,expected', BAD_VALUES)
def test_each_bad_value_is_named(tiny_config, overrides, expected):
  with pytest.raises(errors.UserError) as error:
    config_validation.validate(tiny_config(**overrides))
  assert expected in str(error.value)
  assert 'invalid value' in str(error.value)


def test_no_lstm_layers_is_valid(tiny_config):
  """num_lstm_layers=0 with 'mean' pooling: the frame-average baseline."""
  config = tiny_config(**{'model.num_lstm_layers': 0, 'model.temporal_pooling': 'mean'})
  assert config_validation.find_problems(config) == []


def test_a_crop_far_smaller_than_the_resize_is_a_warning_naming_both_fields(tiny_config, caplog):
  """image_size 16 of resize_size 32 (50%): the run goes ahead, with a warning that says what to
  set; 28 of 32 (the configs' 7/8) says nothing."""
  caplog.set_level(logging.WARNING)
  config_validation.validate(tiny_config())
  assert 'image_size' not in caplog.text
  config = tiny_config(image_size=16, **{'augment.min_area': 0.5})
  config_validation.validate(config)
  [warning] = config_validation.find_warnings(config)
  assert warning in caplog.text
  assert warning.startswith('image_size=16 is 50% of dataset.resize_size=32')
  assert 'about 1.4-2.0x as large' in warning and 'dataset.resize_size to about 18' in warning


def test_without_a_resize_the_crop_is_compared_with_the_stored_frames(tiny_config):
  config = tiny_config(image_size=16, **{'dataset.resize_size': 0, 'augment.min_area': 1.0})
  [warning] = config_validation.find_warnings(config, frame_size=(32, 48))
  assert warning.startswith('image_size=16 is 50% of the stored short side 32 '
                            '(dataset.resize_size=0)')
  assert 'as large' not in warning  # Plain random crops: training sees the same scale.
  assert config_validation.find_warnings(config) == []  # Stored size unknown: no check.
  assert config_validation.find_warnings(config, frame_size=(20, 30)) == []  # 80%.


def test_every_bad_field_is_listed_in_one_message(tiny_config):
  config = tiny_config(num_frames=0, num_train_steps=-1, batch_size=6, image_size=64,
                       **{'dataset.resize_size': 0, 'model.encoder': 'vgg', 'optimizer': 'rmsprop'})
  with pytest.raises(errors.UserError) as error:
    config_validation.validate(config)
  message = str(error.value)
  for name in ('num_frames=0', 'num_train_steps=-1', 'batch_size=6', 'image_size=64',
               "model.encoder='vgg'", "optimizer='rmsprop'"):
    assert name in message
  assert 'has 6 invalid value(s)' in message


def test_eval_mode_ignores_the_train_batch(tiny_config):
  config = tiny_config(batch_size=6)
  assert config_validation.find_problems(config, mode='eval') == []
  assert config_validation.find_problems(config, num_devices=2) == []


def test_stored_frame_size_of_the_tiny_dataset(tiny_config):
  builder = datasets.get_builder(tiny_config().dataset)
  assert config_validation.stored_frame_size(builder) == (32, 32)


def test_training_rejects_a_bad_config_before_any_compute(tiny_config, tmp_path):
  assert jax.device_count() == 4
  with pytest.raises(errors.UserError, match='num_frames=0'):
    train.train_and_evaluate(tiny_config(num_frames=0), str(tmp_path / 'workdir'))
  assert not os.path.exists(tmp_path / 'workdir')


# Issue 16.3 and 16.9: split names and sizes are checked before any compute. The tiny dataset has
# 'train' (40 videos) and 'test' (20).
BAD_SPLITS = [
    ({'dataset.eval_split': 'tset'}, "dataset.eval_split='tset': .*'test', 'train'"),
    ({'dataset.train_split': 'trian'}, "dataset.train_split='trian': .*'test', 'train'"),
    ({'dataset.eval_split': 'test[:0]'}, r"dataset.eval_split='test\[:0\]': holds no examples"),
    ({'dataset.val_split': 0.01},
     r'dataset.val_split=0.01: the validation split .* is empty.*val_split=0.02'),
    ({'dataset.val_split': 0.999}, r'dataset.val_split=0.999: .*leaves no training examples'),
    ({'dataset.name': 'synthetic_actions/tyni'},
     r"dataset.name='synthetic_actions/tyni': .*'tiny'"),
]


@pytest.mark.parametrize('overrides,expected', BAD_SPLITS)
def test_bad_split_names_and_sizes_are_named(tiny_config, overrides, expected):
  with pytest.raises(errors.UserError, match=expected):
    config_validation.validate(tiny_config(**overrides))


def test_eval_mode_checks_the_requested_split(tiny_config):
  config = tiny_config(**{'dataset.eval_split': 'tset'})
  assert config_validation.find_problems(config, mode='eval', split='test') == []
  with pytest.raises(errors.UserError, match="--split='vla': .*'test', 'train'"):
    config_validation.validate(tiny_config(), mode='eval', split='vla')


def test_training_rejects_a_misspelt_eval_split_before_any_compute(tiny_config, tmp_path):
  with pytest.raises(errors.UserError, match="dataset.eval_split='tset'"):
    train.train_and_evaluate(tiny_config(**{'dataset.eval_split': 'tset'}),
                             str(tmp_path / 'workdir'))
  assert not os.path.exists(tmp_path / 'workdir')


@pytest.mark.parametrize('overrides,expected', [
    ({'eval.batch_size': 6}, 'eval.batch_size=6: must be a multiple'),
    ({'image_size': 40, 'dataset.resize_size': 0}, 'image_size=40: larger than the stored'),
    ({'dataset.eval_split': 'tset'}, "dataset.eval_split='tset'"),
])
def test_eval_mode_runs_the_same_validation(tiny_config, tmp_path, overrides, expected):
  """Issue 16.10: --mode=eval gave a raw ValueError or an 84-line orbax shape error."""
  from har_jax.evaluation import checkpoint_eval  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError, match=expected):
    checkpoint_eval.evaluate(tiny_config(**overrides), str(tmp_path))


def test_unknown_dataset_names_the_closest_few(tiny_config):
  """Issue 16.12: the message listed all ~900 TFDS dataset names."""
  with pytest.raises(errors.UserError) as error:
    config_validation.validate(tiny_config(**{'dataset.name': 'ucf10/ucf101_1_256'}))
  message = str(error.value)
  assert "'ucf101'" in message and 'synthetic_actions' in message and 'video_folder' in message
  assert 'mnist' not in message and len(message) < 1200, message


def test_a_misspelt_split_of_a_set_the_run_generates_stops_before_the_first_step(tmp_path):
  """The synthetic set is generated by the run itself, after validation: a misspelt eval_split
  used to be found only after all the training steps, as TFDS's internal split repr (27.5)."""
  import conftest  # pylint: disable=g-import-not-at-top
  config = conftest.make_tiny_config(tmp_path / 'fresh_data', **{'dataset.eval_split': 'tst'})
  with pytest.raises(errors.UserError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert "dataset.eval_split='tst'" in message and "['test', 'train']" in message, message
  assert '_EvenSplit' not in message
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
