"""Named, pure tf stages of the input pipeline: sample -> decode -> augment.

Every function here works eagerly and inside `tf.data` (tests check both). Videos are sequences of
JPEG strings `[num_frames] tf.string`; decoded frames are `[time, height, width, 3] uint8`.
"""

from typing import Optional

import tensorflow as tf

from har_jax import geometry

SHORT_VIDEO_MODES = ('loop', 'pad')
ANTIALIAS_ABOVE = 2.0  # Downscale factor above which resizes are antialiased.


def _wrap_indices(indices: tf.Tensor, num_available: tf.Tensor, short_video: str) -> tf.Tensor:
  """Maps indices past the end of a video back inside it (looping or repeating the last frame)."""
  if short_video == 'loop':
    return tf.math.floormod(indices, num_available)
  if short_video == 'pad':
    return tf.minimum(indices, num_available - 1)
  raise ValueError(f'short_video must be one of {SHORT_VIDEO_MODES}, got {short_video!r}.')


def sample_train_indices(num_available: tf.Tensor, num_frames: int, stride: int,
                         short_video: str, seed: tf.Tensor) -> tf.Tensor:
  """Frame indices of one random training clip.

  Args:
    num_available: number of frames in the video, scalar int32.
    num_frames: frames per clip.
    stride: distance between sampled frames.
    short_video: 'loop' or 'pad', for videos shorter than the clip span.
    seed: stateless RNG seed, `[2] int`.

  Returns:
    `[num_frames] int32` indices into the video.
  """
  num_available = tf.cast(num_available, tf.int32)
  span = (num_frames - 1) * stride + 1
  max_start = tf.maximum(num_available - span, 0)
  start = tf.random.stateless_uniform([], seed, 0, max_start + 1, dtype=tf.int32)
  indices = start + tf.range(num_frames, dtype=tf.int32) * stride
  return _wrap_indices(indices, num_available, short_video)


def sample_eval_indices(num_available: tf.Tensor, num_frames: int, stride: int, num_clips: int,
                        short_video: str) -> tf.Tensor:
  """Frame indices of `num_clips` evenly spaced clips covering the video.

  The first clip starts at frame 0 and the last ends at the last frame (when the video is long
  enough); a single clip is centred.

  Returns:
    `[num_clips, num_frames] int32` indices.
  """
  num_available = tf.cast(num_available, tf.int32)
  span = (num_frames - 1) * stride + 1
  max_start = tf.cast(tf.maximum(num_available - span, 0), tf.float32)
  if num_clips == 1:
    starts = tf.reshape(tf.round(max_start / 2), [1])
  else:
    starts = tf.round(tf.linspace(0.0, max_start, num_clips))
  starts = tf.cast(starts, tf.int32)
  indices = starts[:, None] + tf.range(num_frames, dtype=tf.int32)[None, :] * stride
  return _wrap_indices(indices, num_available, short_video)


def jpeg_ratio_index(stored_short_side: tf.Tensor, target_short_side: int) -> tf.Tensor:
  """Index into geometry.JPEG_RATIOS of the largest DCT downscaling ratio keeping the short side
  >= target (`geometry.jpeg_ratio` as a tf op)."""
  index = tf.constant(0, tf.int32)
  if target_short_side <= 0:
    return index
  for i, r in enumerate(geometry.JPEG_RATIOS[1:], start=1):
    index = tf.where(stored_short_side // r >= target_short_side, i, index)
  return index


def decode_frames(jpegs: tf.Tensor, resize_size: int,
                  stored_size: Optional[tuple[int, int]] = None) -> tf.Tensor:
  """Decodes JPEG frames, downscaling in the decoder where the target size allows.

  Args:
    jpegs: `[n] tf.string` JPEG frames of one video (already gathered to the frames needed).
    resize_size: target short side in pixels; 0 keeps the stored size.
    stored_size: (height, width) of every frame, when the dataset says (e.g. 256x256 records):
      the decoder's ratio is then chosen here, once, and the output has the static shape
      `geometry.decoded_size(stored_size, resize_size)`. None: read from the first frame's
      header.

  Returns:
    `[n, height, width, 3] uint8`, short side == resize_size when resize_size > 0.
  """
  if stored_size is not None:
    height, width = geometry.decoded_size(stored_size, resize_size)
    ratio = geometry.jpeg_ratio(min(stored_size), resize_size)
    frames = tf.map_fn(lambda x: tf.io.decode_jpeg(x, channels=3, ratio=ratio), jpegs,
                       fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
                       parallel_iterations=1)
    shape = tf.shape(frames)
    same = tf.logical_and(tf.equal(shape[1], height), tf.equal(shape[2], width))
    frames = tf.cond(same, lambda: frames,
                     lambda: resize_bilinear(frames, tf.constant([height, width])))
    return tf.ensure_shape(frames, [None, height, width, 3])
  shape = tf.io.extract_jpeg_shape(jpegs[0])
  index = jpeg_ratio_index(tf.minimum(shape[0], shape[1]), resize_size)

  def decode_with(ratio):
    return lambda: tf.map_fn(
        lambda x: tf.io.decode_jpeg(x, channels=3, ratio=ratio), jpegs,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8), parallel_iterations=1)

  frames = tf.switch_case(index, [decode_with(r) for r in geometry.JPEG_RATIOS])
  if resize_size > 0:
    frames = resize_short_side(frames, resize_size)
  return frames


def resize_short_side(frames: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes `[t, h, w, 3] uint8` so that min(h, w) == size, keeping the aspect ratio."""
  shape = tf.shape(frames)
  h, w = shape[1], shape[2]
  short = tf.minimum(h, w)

  def resize():
    scale = tf.cast(size, tf.float32) / tf.cast(short, tf.float32)
    new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    return resize_bilinear(frames, tf.stack([new_h, new_w]))

  return tf.cond(tf.equal(short, size), lambda: frames, resize)


def resize_bilinear(frames: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """Bilinear resize of `[t, h, w, 3] uint8` to `size` = [new_h, new_w], rounded to uint8.

  Plain bilinear interpolation when shrinking by at most ANTIALIAS_ABOVE (every input pixel still
  contributes, and it costs a third of the antialiased kernel); antialiased beyond that, so strong
  downscaling does not alias.
  """
  shape = tf.shape(frames)
  shrink = tf.maximum(tf.cast(shape[1], tf.float32) / tf.cast(size[0], tf.float32),
                      tf.cast(shape[2], tf.float32) / tf.cast(size[1], tf.float32))

  def with_antialias(antialias):
    return lambda: tf.image.resize(frames, size, method='bilinear', antialias=antialias)

  resized = tf.cond(shrink > ANTIALIAS_ABOVE, with_antialias(True), with_antialias(False))
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def random_crop_window(frame_shape: tf.Tensor, crop_size: int, min_area: float,
                       max_aspect_ratio: float, seed: tf.Tensor) -> tf.Tensor:
  """A random crop window `[y, x, h, w] int32`, shared by all frames of a clip.

  With min_area == 1 this is a plain random crop_size x crop_size window; otherwise an
  Inception-style random-resized-crop window (area fraction in [min_area, 1], aspect ratio in
  [1/max_aspect_ratio, max_aspect_ratio]) that the caller resizes to crop_size.
  """
  h, w = frame_shape[0], frame_shape[1]
  seeds = tf.random.experimental.stateless_split(seed, 4)
  if min_area >= 1.0:
    ch = tf.minimum(crop_size, h)
    cw = tf.minimum(crop_size, w)
  else:
    area = tf.cast(h * w, tf.float32) * tf.random.stateless_uniform([], seeds[0], min_area, 1.0)
    log_ratio = tf.math.log(max_aspect_ratio)
    aspect = tf.exp(tf.random.stateless_uniform([], seeds[1], -log_ratio, log_ratio))
    ch = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    cw = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    ch = tf.clip_by_value(ch, 1, h)
    cw = tf.clip_by_value(cw, 1, w)
  y = tf.random.stateless_uniform([], seeds[2], 0, h - ch + 1, dtype=tf.int32)
  x = tf.random.stateless_uniform([], seeds[3], 0, w - cw + 1, dtype=tf.int32)
  return tf.stack([y, x, ch, cw])


def crop_and_resize(frames: tf.Tensor, window: tf.Tensor, crop_size: int) -> tf.Tensor:
  """Crops `[t, h, w, 3] uint8` frames to `window` and resizes the crop to crop_size x crop_size."""
  crop = frames[:, window[0]:window[0] + window[2], window[1]:window[1] + window[3], :]

  def resize():
    return resize_bilinear(crop, tf.constant([crop_size, crop_size]))

  same = tf.logical_and(tf.equal(window[2], crop_size), tf.equal(window[3], crop_size))
  out = tf.cond(same, lambda: crop, resize)
  return tf.ensure_shape(out, [None, crop_size, crop_size, 3])


EVAL_NUM_CROPS = (1, 3)  # The centre crop, or three crops along the long side.


def eval_crop_windows(frame_shape: tf.Tensor, crop_size: int, num_crops: int) -> tf.Tensor:
  """Crop windows `[num_crops, 4]` (y, x, h, w): centre, or 3 crops along the long side."""
  h, w = frame_shape[0], frame_shape[1]
  ch, cw = tf.minimum(crop_size, h), tf.minimum(crop_size, w)
  cy, cx = (h - ch) // 2, (w - cw) // 2
  if num_crops == 1:
    return tf.stack([tf.stack([cy, cx, ch, cw])])
  if num_crops not in EVAL_NUM_CROPS:
    raise ValueError(f'eval.num_crops must be one of {EVAL_NUM_CROPS}, got {num_crops}.')
  landscape = w >= h
  first = tf.where(landscape, tf.stack([cy, 0, ch, cw]), tf.stack([0, cx, ch, cw]))
  last = tf.where(landscape, tf.stack([cy, w - cw, ch, cw]), tf.stack([h - ch, cx, ch, cw]))
  return tf.stack([first, tf.stack([cy, cx, ch, cw]), last])


def eval_views(frames: tf.Tensor, num_clips: int, num_frames: int, crop_size: int,
               num_crops: int) -> tf.Tensor:
  """Decoded frames `[num_clips * num_frames, H, W, 3]` (clip order) -> the evaluation views
  `[num_clips * num_crops, num_frames, S, S, 3]`, clip-major: every clip at every crop window."""
  windows = eval_crop_windows(tf.shape(frames)[1:3], crop_size, num_crops)
  clips = tf.reshape(frames, tf.concat([[num_clips, num_frames], tf.shape(frames)[1:]], axis=0))
  views = [crop_and_resize(clips[c], windows[k], crop_size)
           for c in range(num_clips) for k in range(num_crops)]
  return tf.ensure_shape(tf.stack(views),
                         [num_clips * num_crops, num_frames, crop_size, crop_size, 3])


def random_flip(seed: tf.Tensor) -> tf.Tensor:
  """Whether to flip a clip left-right: a bool scalar, True with probability 1/2."""
  return tf.random.stateless_uniform([], seed) < 0.5


def flip_if(frames: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """Flips all frames `[t, h, w, 3]` of a clip left-right together when `flip` is True."""
  return tf.cond(flip, lambda: tf.reverse(frames, axis=[2]), lambda: frames)


def gather_frames(jpegs: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
  """Selects the JPEG strings at `indices` (any shape) without decoding anything else."""
  return tf.gather(jpegs, indices)
