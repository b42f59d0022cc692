"""On-device crop-resize-flip: the same pixels as the host's crop and resize, inside the window."""

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from har_jax import augment


@pytest.fixture(scope='module')
def frames():
  """[2 clips, 3 frames, 64, 80, 3] uint8, smooth (upsampled noise), like camera frames."""
  rng = np.random.default_rng(0)
  small = rng.integers(0, 255, (6, 16, 20, 3)).astype(np.float32)
  smooth = tf.image.resize(small, [64, 80]).numpy()
  return np.clip(np.round(smooth), 0, 255).astype(np.uint8).reshape(2, 3, 64, 80, 3)


@pytest.mark.slow
@pytest.mark.parametrize('window', [[10, 5, 40, 50], [3, 7, 20, 20], [0, 0, 64, 80]],
                         ids=['enlarge', 'shrink', 'whole'])
def test_crop_resize_matches_tf_inside_the_window(frames, window):
  """Bilinear with half-pixel centres, antialiased when shrinking, like tf.image.resize of the
  crop; only the border pixels differ, where the device samples the frame beyond the window."""
  y, x, h, w = window
  want = tf.image.resize(frames[0, :, y:y + h, x:x + w].astype(np.float32), [28, 28],
                         antialias=True).numpy()
  got = np.asarray(augment.crop_resize_flip(
      jnp.asarray(frames[:1]), jnp.asarray([window], jnp.float32), jnp.asarray([False]), 28))[0]
  assert got.shape == (3, 28, 28, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got[:, 2:-2, 2:-2], want[:, 2:-2, 2:-2], atol=1e-3)
  if window[2:] == [64, 80]:
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.slow
def test_identity_window_and_flip_are_exact(frames):
  window = jnp.asarray([[0, 0, 28, 28], [4, 9, 28, 28]], jnp.float32)
  got = np.asarray(augment.crop_resize_flip(jnp.asarray(frames), window,
                                            jnp.asarray([False, True]), 28))
  np.testing.assert_array_equal(got[0], frames[0, :, :28, :28])
  np.testing.assert_array_equal(got[1], frames[1, :, 4:32, 9:37][:, :, ::-1])


def test_batches_without_a_window_pass_through():
  video = np.zeros((2, 3, 28, 28, 3), np.uint8)
  assert augment.apply_to_batch({'video': video}, 28) is video
