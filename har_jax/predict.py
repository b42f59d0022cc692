"""Recognise actions in video files with a saved checkpoint.

Each file is decoded with PyAV and turned into exactly the views evaluation uses (the checkpoint's
own preprocessing: frames, stride, clips, crops, resize, and the geometry of its training frames),
the logits of all views are averaged, and the top-k classes are returned with their probabilities.
Class names come from the checkpoint (har_jax.inference loads it).

  results = predict_files(['a.avi', 'b.mp4'], workdir='workdirs/synthetic')
  for r in results:
    print(r['path'], r['top_k'][0] if r['ok'] else r['error'])

Frames are scaled as they are decoded: to the geometry of the training frames (e.g. the stock
UCF101 records squash 320x240 to 256x256) and by the power of two the JPEG decoder scaled them by
in training, then resized to dataset.resize_size as evaluation does; memory holds about what the
model input needs, whatever the resolution. Without a resize (dataset.resize_size=0 and frames
used as decoded), only the band the crops use is kept. The training frames went through JPEG and
the JPEG decoder's DCT scaling; frames from a video file are scaled by FFmpeg's area filter: those
are the only differences.
"""

import dataclasses
import functools
from typing import Optional, Sequence

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from har_jax import errors
from har_jax import inference
from har_jax.data import stages
from har_jax.video import video_files


@dataclasses.dataclass
class Clip:
  """The frames of one video file that its evaluation views need."""
  frames: np.ndarray  # [num_clips * num_frames, h, w, 3] uint8 in clip order, scaled (see above).
  num_available: int  # Frames in the video.
  frame_size: tuple[int, int]  # (height, width) of the upright video frames, pixels.


def _video_frames(container):
  """Yields the decoded av.VideoFrames of the first video stream."""
  if not container.streams.video:
    raise video_files.VideoError('it has no video stream')
  yield from container.decode(video=0)


def _upright_size(frame) -> tuple[int, int]:
  """(height, width) of a decoded av.VideoFrame once its display rotation is applied."""
  turned = int(round((frame.rotation or 0) / 90.0)) % 2
  return (frame.width, frame.height) if turned else (frame.height, frame.width)


def _crop_band(image: np.ndarray, crop_size: int, num_crops: int) -> np.ndarray:
  """The part of [H, W, 3] that the eval crop windows cover (their bounding box)."""
  windows = stages.eval_crop_windows(image.shape[:2], crop_size, num_crops).numpy()
  y0, x0 = windows[:, :2].min(axis=0)
  y1, x1 = (windows[:, :2] + windows[:, 2:]).max(axis=0)
  return np.ascontiguousarray(image[y0:y1, x0:x1])


def scaled_rgb(frame, preprocessing: inference.Preprocessing) -> np.ndarray:
  """An av.VideoFrame -> upright [h, w, 3] uint8 at Preprocessing.decode_size, scaled in FFmpeg's
  scaler; without one, the band the crops use."""
  rotation = frame.rotation
  height, width = _upright_size(frame)
  target = preprocessing.decode_size(height, width)
  if target is None:
    rgb = video_files.upright(frame.to_ndarray(format='rgb24'), rotation)
    return _crop_band(rgb, preprocessing.image_size, preprocessing.num_crops)
  if target == (height, width):
    return video_files.upright(frame.to_ndarray(format='rgb24'), rotation)
  turned = (height, width) != (frame.height, frame.width)
  out_height, out_width = target[::-1] if turned else target
  shrink = out_height * out_width < frame.height * frame.width
  frame = frame.reformat(width=out_width, height=out_height, format='rgb24',
                         interpolation='AREA' if shrink else 'BILINEAR')
  return video_files.upright(frame.to_ndarray(format='rgb24'), rotation)


def read_clip_frames(path: str, preprocessing: inference.Preprocessing) -> Clip:
  """Decodes the frames that the eval views of `preprocessing` need from a video file.

  Two passes: the first counts the frames (decoding without converting), the second keeps only the
  sampled ones, each scaled as it is decoded (see `scaled_rgb`), so memory holds
  num_clips x num_frames small frames whatever the video's length and resolution.

  Raises:
    video_files.VideoError: the file is missing, not a video, corrupt, or has no decodable frame.
  """
  try:
    with video_files.open_video(path) as container:
      num_available = sum(1 for _ in _video_frames(container))
    if num_available == 0:
      raise video_files.VideoError('it has no decodable video frame')
    indices = stages.sample_eval_indices(
        num_available, preprocessing.num_frames, preprocessing.frame_stride,
        preprocessing.num_clips, preprocessing.short_video).numpy().reshape(-1)
    wanted, kept, sizes = set(indices.tolist()), {}, set()
    with video_files.open_video(path) as container:
      for i, frame in enumerate(_video_frames(container)):
        if i in wanted:
          sizes.add(_upright_size(frame))
          kept[i] = scaled_rgb(frame, preprocessing)
        if len(kept) == len(wanted):
          break
  except video_files.VideoError as e:
    raise video_files.VideoError(f'{path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    # Any demuxer/decoder failure (av.FFmpegError, UnicodeDecodeError...) means unreadable.
    raise video_files.VideoError(
        f'{path}: cannot be decoded as a video ({type(e).__name__}: {e}).') from None
  missing = sorted(wanted - set(kept))
  if missing:
    raise video_files.VideoError(f'{path}: frames {missing[:5]} could not be decoded on the second '
                                 'pass; the file is damaged.')
  if len(sizes) != 1:
    raise video_files.VideoError(f'{path}: frame size changes within the video ({sorted(sizes)}).')
  return Clip(np.stack([kept[i] for i in indices]), num_available, sizes.pop())


def eval_views(frames: np.ndarray, preprocessing: inference.Preprocessing) -> np.ndarray:
  """The evaluation views of decoded frames, as `pipeline.preprocess_eval` builds them.

  Args:
    frames: [num_clips * num_frames, H, W, 3] uint8, the sampled frames in clip order.
    preprocessing: the checkpoint's; the short side is brought to its resize_size first
      (frames from `read_clip_frames` already have it).

  Returns:
    [num_clips * num_crops, num_frames, S, S, 3] uint8 views, clip-major.
  """
  p = preprocessing
  if frames.shape[0] != p.num_clips * p.num_frames:
    raise ValueError(f'Expected {p.num_clips} x {p.num_frames} frames, got {frames.shape[0]}.')
  views = _views_function(p.num_clips, p.num_frames, p.image_size, p.num_crops, p.resize_size)
  return views(tf.convert_to_tensor(frames)).numpy()


@functools.lru_cache(maxsize=16)
def _views_function(num_clips: int, num_frames: int, image_size: int, num_crops: int,
                    resize_size: int):
  """`eval_views` for one preprocessing as a tf.function: one graph call instead of dozens of
  eager ops (about 1 ms instead of 4-7 ms a call on the 2-core CPU; streaming calls it per
  frame). Traced once for any frame count and size."""

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  def views(frames):
    if resize_size:
      frames = stages.resize_short_side(frames, resize_size)
    return stages.eval_views(frames, num_clips, num_frames, image_size, num_crops)

  return views


def predict_video(model: inference.LoadedModel, path: str, *, top_k: int = 5,
                  resize_short_side: Optional[int] = None) -> dict:
  """Top-k classes of one video file. Raises video_files.VideoError when the file cannot be read.

  Args:
    resize_short_side: overrides the checkpoint's dataset.resize_size (None: keep it).
  """
  preprocessing = model.preprocessing
  if resize_short_side is not None:
    preprocessing = dataclasses.replace(preprocessing, resize_size=resize_short_side)
  clip = read_clip_frames(path, preprocessing)
  height, width = clip.frame_size
  if (preprocessing.decode_size(height, width) is None
      and min(height, width) > 2 * max(preprocessing.image_size, 1)):
    logging.warning('%s is %dx%d but the checkpoint keeps frames at their stored size '
                    '(dataset.resize_size=0): the %dx%d crops see only the centre. Pass '
                    '--resize_short_side (the short side of the training frames) to match.',
                    path, width, height, preprocessing.image_size, preprocessing.image_size)
  views = eval_views(clip.frames, preprocessing)
  logits = model.apply(views).mean(axis=0)
  probs = np.asarray(jax.nn.softmax(logits))
  order = np.argsort(-probs, kind='stable')[:max(1, min(top_k, len(probs)))]
  return {
      'path': path, 'ok': True,
      'top_k': [{'class': model.class_names[i], 'index': int(i),
                 'probability': float(probs[i])} for i in order],
      'logits': logits.tolist(),
      'num_frames': int(clip.num_available), 'frame_size': [int(height), int(width)],
      'views': int(views.shape[0]), 'checkpoint_step': model.step,
  }


MAX_RESIZE_SHORT_SIDE = 4096


def check_resize(resize_short_side: Optional[int], image_size: int):
  """Raises errors.UserError unless `resize_short_side` is None, 0 (keep the decoded size) or
  within [image_size, MAX_RESIZE_SHORT_SIDE]: a smaller frame cannot hold the crop, a larger one
  only costs memory (100,000 asked for tens of GiB)."""
  if resize_short_side in (None, 0):
    return
  if not image_size <= resize_short_side <= MAX_RESIZE_SHORT_SIDE:
    raise errors.UserError(
        f'--resize_short_side={resize_short_side}: must be 0 (keep the decoded size), -1 (the '
        f"checkpoint's own), or from the model's crop size {image_size} to "
        f'{MAX_RESIZE_SHORT_SIDE}.')


def predict_files(paths: Sequence[str], workdir: Optional[str] = None, *,
                  checkpoint: str = 'best', top_k: int = 5,
                  resize_short_side: Optional[int] = None,
                  model: Optional[inference.LoadedModel] = None) -> list[dict]:
  """Predicts the action in every video file; unreadable files are reported, not fatal.

  Args:
    paths: video files (anything FFmpeg reads: .avi, .mp4, .mkv...).
    workdir: training workdir holding checkpoints/ (unless `model` is given).
    checkpoint: 'best' (falls back to the latest without metrics), 'latest' or a step number.
    top_k: how many classes to return per file.
    resize_short_side: overrides the checkpoint's dataset.resize_size (None: keep it).
    model: an `inference.load` result, to reuse one load for many calls.

  Returns:
    One dict per path, in order: {'path', 'ok': True, 'top_k': [{'class', 'index',
    'probability'}], 'logits', 'num_frames', 'frame_size': [H, W], 'views', 'checkpoint_step'}
    or {'path', 'ok': False, 'error': message naming the file}.

  Raises:
    errors.UserError: the workdir or checkpoint cannot be used (nothing could be predicted).
  """
  model = model or inference.load(workdir, checkpoint)
  check_resize(resize_short_side, model.preprocessing.image_size)
  results = []
  for path in paths:
    try:
      results.append(predict_video(model, str(path), top_k=top_k,
                                   resize_short_side=resize_short_side))
    except video_files.VideoError as e:
      logging.warning('Skipping %s', e)
      results.append({'path': str(path), 'ok': False, 'error': str(e)})
  return results


def format_result(result: dict) -> str:
  """A human-readable block for one `predict_files` result."""
  if not result['ok']:
    return f"{result['path']}: ERROR {result['error']}"
  h, w = result['frame_size']
  lines = [f"{result['path']}  ({result['num_frames']} frames, {w}x{h}, {result['views']} "
           f"view(s), checkpoint step {result['checkpoint_step']})"]
  for rank, entry in enumerate(result['top_k'], start=1):
    lines.append(f"  {rank}. {entry['class']:<32s} {entry['probability']:.4f}")
  return '\n'.join(lines)
