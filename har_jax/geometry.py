"""Frame geometry: the sizes frames are stored at, decoded at and resized to, in pixels.

One place for the arithmetic that preparation (storing frames), the input pipeline (decoding
them), inference and serving (giving other videos the same frames) must agree on:

- short-side sizing: a frame scaled so its short side has a given length, aspect kept;
- squash: every frame resized to one height x width, aspect not kept (the stock 256x256 UCF101
  records);
- the JPEG decoder's power-of-two downscaling ratio, capped at 8 (libjpeg's DCT scaling).

A dataset's `frame_geometry` dict says how its frames were made from the source videos:
{'resize': 'squash', 'size': [h, w]}, {'resize': 'short_side', 'size': s} or {'resize': 'none'}.
"""

from typing import Optional

import numpy as np

JPEG_RATIOS = (1, 2, 4, 8)  # The downscaling ratios of the JPEG decoder (tf.io.decode_jpeg).


def stored_short_side(settings: dict) -> dict:
  """The frame_geometry of frames stored at settings['short_side'] pixels (0 or absent: as
  decoded from the source)."""
  short_side = int(settings.get('short_side', 0) or 0)
  return {'resize': 'short_side', 'size': short_side} if short_side else {'resize': 'none'}


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(height, width) with the short side at `short_side` pixels and the other in proportion
  (rounded to the nearest pixel); the size itself for short_side <= 0."""
  if short_side <= 0:
    return height, width
  scale = short_side / min(height, width)
  return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def resized_short_side(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(height, width) that the pipeline's short-side resize gives (`stages.resize_short_side`):
  as short_side_size, computed in float32 and rounded half to even as the tf graph does."""
  if short_side <= 0 or min(height, width) == short_side:
    return height, width
  scale = np.float32(short_side) / np.float32(min(height, width))
  return (max(short_side, int(np.round(np.float32(height) * scale))),
          max(short_side, int(np.round(np.float32(width) * scale))))


def jpeg_ratio(stored_short_side: int, resize_size: int) -> int:
  """The largest of JPEG_RATIOS that keeps the short side >= resize_size (1 for resize_size 0)."""
  return max(r for r in JPEG_RATIOS
             if r == 1 or (resize_size > 0 and stored_short_side // r >= resize_size))


def jpeg_scaled_size(stored_size: tuple[int, int], resize_size: int) -> tuple[int, int]:
  """(height, width) the JPEG decoder gives for frames stored at `stored_size`, scaled down by
  `jpeg_ratio` and rounded up as libjpeg does."""
  height, width = stored_size
  ratio = jpeg_ratio(min(height, width), resize_size)
  return -(-height // ratio), -(-width // ratio)


def decoded_size(stored_size: tuple[int, int], resize_size: int) -> tuple[int, int]:
  """(height, width) that the pipeline's decode gives for frames stored at `stored_size`: scaled
  in the JPEG decoder (`jpeg_scaled_size`), then the short side resized to resize_size
  (`resized_short_side`; 0 keeps the decoded size)."""
  height, width = jpeg_scaled_size(stored_size, resize_size)
  return resized_short_side(height, width, resize_size)


def squash_size(frame_geometry: dict, resize_size: int) -> tuple[int, int]:
  """(height, width) of a squashed dataset's frames as the JPEG decoder gave them in training."""
  return jpeg_scaled_size(tuple(int(v) for v in frame_geometry['size']), resize_size)


def decode_size(frame_geometry: dict, height: int, width: int,
                resize_size: int) -> Optional[tuple[int, int]]:
  """(height, width) to scale a source frame of height x width to as it is decoded, so that it
  matches the training frames of a dataset with this geometry (before the short side is resized
  to resize_size and the crops are taken).

  With a known geometry: the training frame the source frame would have become, scaled as the
  JPEG decoder scaled it in training. Otherwise (frames as decoded): the frame scaled by the
  decoder's ratio for resize_size (`jpeg_scaled_size`). None: use the frame as decoded (training
  used its frames at their stored size, and so does prediction).
  """
  if frame_geometry.get('resize') == 'squash':
    return squash_size(frame_geometry, resize_size)
  if frame_geometry.get('resize') == 'short_side':
    stored = short_side_size(height, width, int(frame_geometry['size']))
    return jpeg_scaled_size(stored, resize_size)
  if not resize_size:
    return None
  return jpeg_scaled_size((height, width), resize_size)
