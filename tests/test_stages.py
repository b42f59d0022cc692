"""Exact-index tests of the input-pipeline stages, eagerly and inside tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from har_jax.data import stages


def _in_tf_data(fn, *args):
  """Runs fn(*args) inside a tf.data map (graph mode) and returns the numpy result."""
  ds = tf.data.Dataset.from_tensors(tuple(args)).map(lambda *a: fn(*a))
  return next(iter(ds.as_numpy_iterator()))


@pytest.mark.parametrize('run', ['eager', 'tf_data'])
def test_train_sampler_long_video(run):
  seed = tf.constant([3, 4], tf.int64)
  fn = lambda n, s: stages.sample_train_indices(n, 8, 2, 'loop', s)
  got = fn(tf.constant(100), seed).numpy() if run == 'eager' else _in_tf_data(
      fn, tf.constant(100), seed)
  assert got.shape == (8,)
  np.testing.assert_array_equal(np.diff(got), 2)
  assert 0 <= got[0] <= 100 - 15
  # Same seed -> same clip; all starts reachable over seeds.
  again = stages.sample_train_indices(tf.constant(100), 8, 2, 'loop', seed).numpy()
  np.testing.assert_array_equal(got, again)
  starts = {int(stages.sample_train_indices(tf.constant(20), 4, 2, 'loop',
                                            tf.constant([i, 0], tf.int64))[0])
            for i in range(300)}
  assert starts == set(range(20 - 7 + 1))


@pytest.mark.parametrize('mode,expected', [
    ('loop', [0, 1, 2, 3, 4, 0, 1, 2]),
    ('pad', [0, 1, 2, 3, 4, 4, 4, 4]),
])
def test_train_sampler_short_video(mode, expected):
  got = stages.sample_train_indices(tf.constant(5), 8, 1, mode, tf.constant([0, 1], tf.int64))
  np.testing.assert_array_equal(got.numpy(), expected)
  got = _in_tf_data(lambda n: stages.sample_train_indices(n, 8, 1, mode,
                                                          tf.constant([0, 1], tf.int64)),
                    tf.constant(5))
  np.testing.assert_array_equal(got, expected)


def test_short_video_stride_loops():
  got = stages.sample_train_indices(tf.constant(5), 4, 2, 'loop', tf.constant([0, 1], tf.int64))
  np.testing.assert_array_equal(got.numpy(), [0, 2, 4, 1])


def test_sampled_indices_index_the_video():
  video = tf.range(37) * 10  # The "video": frame i holds the value 10 * i.
  idx = stages.sample_train_indices(tf.shape(video)[0], 6, 3, 'loop', tf.constant([7, 7], tf.int64))
  frames = stages.gather_frames(video, idx).numpy()
  np.testing.assert_array_equal(frames, idx.numpy() * 10)


@pytest.mark.parametrize('run', ['eager', 'tf_data'])
def test_eval_clip_positions(run):
  fn = lambda n: stages.sample_eval_indices(n, 4, 2, 3, 'loop')
  got = fn(tf.constant(100)).numpy() if run == 'eager' else _in_tf_data(fn, tf.constant(100))
  # span 7 -> starts 0, 46.5 (rounds half to even: 46), 93; the last clip ends on frame 99.
  np.testing.assert_array_equal(got[:, 0], [0, 46, 93])
  np.testing.assert_array_equal(got[2], [93, 95, 97, 99])
  np.testing.assert_array_equal(np.diff(got, axis=1), 2)


def test_eval_single_clip_is_centred_and_short_video_padded():
  np.testing.assert_array_equal(stages.sample_eval_indices(tf.constant(11), 3, 2, 1, 'loop'),
                                [[3, 5, 7]])
  np.testing.assert_array_equal(stages.sample_eval_indices(tf.constant(3), 4, 1, 2, 'pad'),
                                [[0, 1, 2, 2], [0, 1, 2, 2]])


def _numbered_frames(t=6, h=40, w=50):
  """Frame k = a fixed random image + k, so a crop shared by all frames differs by exactly k."""
  base = np.random.RandomState(0).randint(0, 200, (h, w, 3)).astype(np.uint8)
  return np.stack([base + k for k in range(t)])


@pytest.mark.parametrize('min_area', [1.0, 0.3])
def test_crop_identical_across_frames(min_area):
  frames = tf.constant(_numbered_frames())
  for i in range(10):
    window = stages.random_crop_window(tf.shape(frames)[1:3], 24, min_area, 4 / 3,
                                       tf.constant([i, 2], tf.int64))
    crop = stages.crop_and_resize(frames, window, 24).numpy().astype(int)
    assert crop.shape == (6, 24, 24, 3)
    for k in range(6):
      np.testing.assert_allclose(crop[k] - crop[0], k, atol=1)  # Resize rounding only.
    if min_area == 1.0:
      y, x = window.numpy()[:2]
      np.testing.assert_array_equal(crop[0], _numbered_frames()[0, y:y + 24, x:x + 24])


def test_flip_is_shared_by_all_frames():
  frames = tf.constant(_numbered_frames())
  flips = []
  for i in range(8):
    flip = stages.random_flip(tf.constant([i, 0], tf.int64))
    out = stages.flip_if(frames, flip).numpy().astype(int)
    flipped = bool(flip)
    flips.append(flipped)
    for k in range(6):
      expected = _numbered_frames()[k, :, ::-1] if flipped else _numbered_frames()[k]
      np.testing.assert_array_equal(out[k], expected)
  assert 0 < sum(flips) < len(flips)


def test_eval_three_crops_along_long_side():
  windows = stages.eval_crop_windows(tf.constant([40, 100]), 32, 3).numpy()
  np.testing.assert_array_equal(windows, [[4, 0, 32, 32], [4, 34, 32, 32], [4, 68, 32, 32]])
  portrait = stages.eval_crop_windows(tf.constant([90, 40]), 32, 3).numpy()
  np.testing.assert_array_equal(portrait[:, 0], [0, 29, 58])
  np.testing.assert_array_equal(stages.eval_crop_windows(tf.constant([40, 100]), 32, 1).numpy(),
                                [[4, 34, 32, 32]])


@pytest.mark.parametrize('stored,target,ratio_index,short', [
    ((256, 256), 128, 1, 128), ((240, 320), 128, 0, 128), ((256, 256), 64, 2, 64),
    ((256, 256), 0, 0, 256), ((64, 96), 32, 1, 32)])
def test_decode_downscales_in_the_jpeg_decoder(stored, target, ratio_index, short):
  h, w = stored
  img = np.random.RandomState(1).randint(0, 255, (h, w, 3)).astype(np.uint8)
  jpeg = tf.io.encode_jpeg(img)
  assert int(stages.jpeg_ratio_index(tf.constant(min(h, w)), target)) == ratio_index
  frames = stages.decode_frames(tf.stack([jpeg, jpeg]), target).numpy()
  assert frames.shape[0] == 2 and min(frames.shape[1:3]) == short
  assert frames.shape[1] * w == pytest.approx(frames.shape[2] * h, rel=0.02)  # Aspect kept.
  in_graph = _in_tf_data(lambda j: stages.decode_frames(tf.stack([j, j]), target), jpeg)
  np.testing.assert_array_equal(in_graph, frames)
