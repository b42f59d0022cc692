"""Training augmentation on the accelerator: the crop-resize and flip the host only describes.

The host decodes each clip's frames at the size they are stored or JPEG-downscaled to, draws one
random-resized-crop window and one flip decision per clip (har_jax.data.stages), and ships the
frames with those numbers. Resizing is the costliest per-pixel step after the JPEG decode on a host
CPU (about 2 ms for 16 frames of 112x112 on one core); on an accelerator it is a pair of small
matrix products per clip, so the train step does it here.
"""

import jax
import jax.numpy as jnp


def crop_resize_flip(video: jax.Array, crop: jax.Array, flip: jax.Array, size: int) -> jax.Array:
  """Crops every clip to its window, resizes the window to size x size, and flips it if asked.

  Bilinear with half-pixel centres; when a window shrinks, the triangle filter widens with the
  scale (antialiasing), so every input pixel contributes. All frames of a clip share its window
  and flip.

  Args:
    video: `[batch, time, height, width, 3]` uint8 (or float) frames.
    crop: `[batch, 4]` float32 windows (y, x, h, w) in pixels of the frames.
    flip: `[batch]` bool, True to flip the clip left-right.
    size: output height and width, pixels.

  Returns:
    `[batch, time, size, size, 3]` float32, in the units of `video` (0..255 for uint8).
  """

  def one(clip, window, flip_clip):
    scale = jnp.stack([size / window[2], size / window[3]])
    translation = -window[:2] * scale
    out = jax.image.scale_and_translate(
        clip.astype(jnp.float32), (clip.shape[0], size, size, clip.shape[3]), (1, 2), scale,
        translation, method='linear', antialias=True)
    return jnp.where(flip_clip, out[:, :, ::-1], out)

  return jax.vmap(one)(video, crop.astype(jnp.float32), flip)


def apply_to_batch(batch: dict, size: int) -> jax.Array:
  """The video a train step feeds the model: augmented here when the batch carries 'crop'."""
  if 'crop' not in batch:
    return batch['video']
  return crop_resize_flip(batch['video'], batch['crop'], batch['flip'], size)
