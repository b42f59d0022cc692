"""Tests for the synthetic_actions TFDS dataset."""

import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from har_jax.data.prepare import synthetic_actions

_NUM_FRAMES = 8
_RESOLUTION = 32
_VIDEOS_PER_CLASS = 200


@pytest.fixture(scope='module')
def tiny_builder(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  return synthetic_actions.prepare(str(data_dir), 'tiny')


def test_class_names_and_pairs():
  names = synthetic_actions.CLASS_NAMES
  assert len(names) == 10
  assert synthetic_actions.REVERSAL_PAIRS == [(0, 1), (2, 3), (4, 5), (6, 7),
                                              (8, 9)]
  assert names[:4] == ('move_left', 'move_right', 'move_up', 'move_down')
  assert names[-2:] == ('brighten', 'darken')


def test_tiny_builds_with_right_splits_and_features(tiny_builder):
  config = tiny_builder.builder_config
  assert tiny_builder.info.splits['train'].num_examples == config.num_train == 40
  assert tiny_builder.info.splits['test'].num_examples == config.num_test == 20
  assert (tiny_builder.info.features['label'].names ==
          list(synthetic_actions.CLASS_NAMES))
  examples = list(tfds.as_numpy(tiny_builder.as_dataset(split='train')))
  assert len(examples) == 40
  labels = sorted(int(e['label']) for e in examples)
  assert labels == sorted(list(range(10)) * 4)
  for example in examples:
    video = example['video']
    assert video.dtype == np.uint8
    assert video.shape == (8, 32, 32, 3)


def test_tiny_frames_are_jpeg(tiny_builder):
  ds = tiny_builder.as_dataset(
      split='test', decoders={'video': tfds.decode.SkipDecoding()})
  for example in tfds.as_numpy(ds.take(5)):
    frames = example['video']
    assert len(frames) == 8
    for frame in frames:
      assert frame[:2] == b'\xff\xd8'


def test_tiny_examples_match_render_video(tiny_builder):
  config = tiny_builder.builder_config
  rendered = [
      synthetic_actions.render_video(
          np.random.default_rng([config.seed, 1, i]), (i % 10) // 2,
          bool(i % 2), config.num_frames, config.resolution).astype(np.float32)
      for i in range(config.num_test)
  ]
  for example in tfds.as_numpy(tiny_builder.as_dataset(split='test')):
    label = int(example['label'])
    errors = [np.abs(example['video'] - rendered[i]).mean()
              for i in range(label, config.num_test, 10)]
    assert min(errors) < 8.0  # JPEG error only, in 0..255 units.


def test_prepare_logs_and_reuses(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger='absl')  # An earlier test may have set absl's verbosity.
  synthetic_actions.prepare(str(tmp_path), 'tiny')
  assert 'Generating synthetic_actions/tiny' in caplog.text
  assert 'Generated synthetic_actions/tiny in' in caplog.text
  caplog.clear()
  builder = synthetic_actions.prepare(str(tmp_path), 'tiny')
  assert 'Reusing synthetic_actions/tiny' in caplog.text
  assert builder.info.splits['train'].num_examples == 40


def test_render_video_is_deterministic():
  def render(index, reverse=False):
    return synthetic_actions.render_video(
        np.random.default_rng([0, 0, index]), 1, reverse, 16, 64)

  first = render(3)
  assert first.dtype == np.uint8 and first.shape == (16, 64, 64, 3)
  np.testing.assert_array_equal(first, render(3))
  np.testing.assert_array_equal(first[::-1], render(3, reverse=True))
  assert np.abs(first.astype(int) - render(4)).mean() > 5.0


def _render_all(seed):
  """Returns [N, T, H, W] float32 grey videos, labels [N] and pair labels [N]."""
  videos, labels = [], []
  for index in range(_VIDEOS_PER_CLASS * 10):
    label = index % 10
    video = synthetic_actions.render_video(
        np.random.default_rng([seed, index]), label // 2, bool(label % 2),
        _NUM_FRAMES, _RESOLUTION)
    videos.append(video.astype(np.float32).mean(axis=-1) / 255.0)
    labels.append(label)
  labels = np.array(labels)
  return np.stack(videos), labels, labels // 2


def _order_invariant_features(videos):
  """Features of the multiset of frames: [N, F] for [N, T, H, W] videos."""
  n, _, h, w = videos.shape
  mean_frame = videos.mean(axis=1).reshape(n, 4, h // 4, 4, w // 4).mean((2, 4))
  histogram = np.stack([np.histogram(v, bins=8, range=(0, 1))[0] for v in videos])
  temporal_var = videos.var(axis=1)
  weight = np.maximum(
      temporal_var - np.median(temporal_var, axis=(1, 2), keepdims=True), 0)
  weight = weight / (weight.sum(axis=(1, 2), keepdims=True) + 1e-9)
  y, x = np.mgrid[0:h, 0:w] / h
  mean_x = (weight * x).sum((1, 2), keepdims=True)
  mean_y = (weight * y).sum((1, 2), keepdims=True)
  spread_x = (weight * (x - mean_x) ** 2).sum((1, 2))
  spread_y = (weight * (y - mean_y) ** 2).sum((1, 2))
  frame_means = videos.mean(axis=(2, 3))
  frame_stds = videos.std(axis=(2, 3))
  moments = np.stack([
      np.log(temporal_var.mean((1, 2))), np.log(spread_x), np.log(spread_y),
      np.log(spread_x / spread_y),
      np.log(frame_means.std(1) / frame_means.mean(1)),
      np.log(frame_stds.std(1) / frame_stds.mean(1)),
  ], axis=1)
  return np.concatenate(
      [mean_frame.reshape(n, -1), histogram / histogram.sum(1, keepdims=True),
       moments], axis=1)


def _order_aware_features(videos):
  """Global motion estimates from consecutive frame differences: [N, 5]."""
  _, _, h, w = videos.shape
  change = videos[:, 1:] - videos[:, :-1]
  grad_y, grad_x = np.gradient((videos[:, 1:] + videos[:, :-1]) / 2, axis=(2, 3))
  weight = np.abs(change).sum(1)
  weight = weight / weight.sum((1, 2), keepdims=True)
  y, x = np.mgrid[0:h, 0:w] / h
  rel_x = (x - (weight * x).sum((1, 2), keepdims=True))[:, None]
  rel_y = (y - (weight * y).sum((1, 2), keepdims=True))[:, None]

  def project(flow_field):  # Least-squares coefficient of change on the field.
    return (change * flow_field).sum((1, 2, 3)) / (flow_field ** 2).sum((1, 2, 3))

  features = np.stack([
      project(grad_x), project(grad_y),  # Translation.
      project(rel_x * grad_x + rel_y * grad_y),  # Scaling.
      project(rel_x * grad_y - rel_y * grad_x),  # Rotation.
      change.mean((1, 2, 3)) / videos.mean((1, 2, 3)),  # Brightness.
  ], axis=1)
  return np.tanh(features / features.std(0))


def _ridge_accuracy(features, labels, num_train):
  """Fits one-hot ridge regression on the first num_train rows; test accuracy."""
  mean, std = features[:num_train].mean(0), features[:num_train].std(0) + 1e-9
  inputs = np.concatenate(
      [(features - mean) / std, np.ones((len(features), 1))], axis=1)
  classes = np.unique(labels)
  targets = (labels[:, None] == classes[None]).astype(np.float64)
  train = inputs[:num_train]
  weights = np.linalg.solve(train.T @ train + 1.0 * np.eye(train.shape[1]),
                            train.T @ targets[:num_train])
  predictions = classes[np.argmax(inputs[num_train:] @ weights, axis=1)]
  return np.mean(predictions == labels[num_train:])


@pytest.fixture(scope='module')
def rendered():
  videos, labels, pairs = _render_all(seed=7)
  return {
      'labels': labels,
      'pairs': pairs,
      'invariant': _order_invariant_features(videos),
      'aware': _order_aware_features(videos),
  }


@pytest.mark.slow
@pytest.mark.parametrize('pair', range(5))
def test_direction_needs_temporal_order(rendered, pair):
  in_pair = rendered['pairs'] == pair
  labels = rendered['labels'][in_pair]
  num_train = len(labels) // 2
  invariant = _ridge_accuracy(rendered['invariant'][in_pair], labels, num_train)
  aware = _ridge_accuracy(rendered['aware'][in_pair], labels, num_train)
  name = synthetic_actions.CLASS_NAMES[2 * pair]
  assert 0.35 < invariant < 0.65, (name, invariant)
  assert aware > 0.8, (name, aware)


@pytest.mark.slow
def test_pairs_are_distinguishable_without_temporal_order(rendered):
  num_train = len(rendered['pairs']) // 2
  accuracy = _ridge_accuracy(rendered['invariant'], rendered['pairs'], num_train)
  assert accuracy > 0.6  # Chance is 0.2.
