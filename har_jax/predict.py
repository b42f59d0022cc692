"""Recognise actions in video files with a saved checkpoint.

Each file is decoded with PyAV and turned into exactly the views evaluation uses (the checkpoint's
saved config: frames, stride, clips, crops, resize), the logits of all views are averaged, and the
top-k classes are returned with their probabilities. Class names come from the checkpoint.

  results = predict_files(['a.avi', 'b.mp4'], workdir='workdirs/synthetic')
  for r in results:
    print(r['path'], r['top_k'][0] if r['ok'] else r['error'])

Frames are downscaled as they are decoded (by powers of two, as the JPEG decoder does in
training), or cut to the band the crops use when the config keeps the stored size, so memory holds
about what the model input needs, whatever the video's resolution. The training frames went
through JPEG; frames decoded from a video file do not, and the decoder's downscaling filter is
FFmpeg's area filter, not JPEG's DCT scaling: those are the only differences.
"""

import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from har_jax import checkpoint_files
from har_jax import checkpoints
from har_jax import evaluate
from har_jax import train
from har_jax.data import datasets
from har_jax.data import stages
from har_jax.data import video_files


class PredictError(RuntimeError):
  """The checkpoint cannot be used (wrong workdir, missing step, inconsistent checkpoint)."""


class VideoError(ValueError):
  """One video file that cannot be read; the message names the file."""


@dataclasses.dataclass
class Predictor:
  """A restored model with the config and class names saved beside it."""
  config: ml_collections.ConfigDict
  class_names: list[str]
  step: int
  variables: dict
  apply: Callable  # (variables, [views, T, S, S, 3] uint8) -> [views, num_classes] float32.

  def video_logits(self, views: np.ndarray) -> np.ndarray:
    """[views, T, S, S, 3] uint8 -> [num_classes] float32, the mean of the per-view logits."""
    return np.asarray(self.apply(self.variables, views), np.float32).mean(axis=0)


def _read_meta(workdir: str, checkpoint: str) -> tuple[int, dict]:
  """(step, meta) of the checkpoint named by `checkpoint`, read before its config is known."""
  if not workdir or not os.path.isdir(workdir):
    raise PredictError(f'--workdir {workdir!r} is not a directory. Point it at the workdir of a '
                       'training run (the folder holding checkpoints/).')
  placeholder = datasets.DatasetInfo(name='', class_names=(), split_sizes={})
  try:
    manager = checkpoints.CheckpointManager(workdir, ml_collections.ConfigDict(), placeholder,
                                            read_only=True)
  except checkpoints.CheckpointError as e:
    raise PredictError(str(e)) from None
  try:
    steps = evaluate.resolve_steps(manager, checkpoint)
    if len(steps) != 1:
      raise PredictError(f'--checkpoint={checkpoint!r} names {len(steps)} checkpoints; predict '
                         "uses one: 'best', 'latest' or a step number.")
    meta = manager.read_meta(steps[0])
  except evaluate.EvaluationError as e:
    raise PredictError(str(e)) from None
  finally:
    manager.close()
  for key in ('config', 'class_names'):
    if not meta.get(key):
      raise PredictError(f'Checkpoint {steps[0]} in {workdir} has no saved {key!r}; it was not '
                         'written by har_jax training and cannot be used for prediction.')
  return steps[0], meta


def load_predictor(workdir: str, checkpoint: str = 'best') -> Predictor:
  """Restores checkpoint 'best' | 'latest' | <step> of `workdir` for prediction on one device."""
  step, meta = _read_meta(workdir, checkpoint)
  config = ml_collections.ConfigDict(meta['config'])
  class_names = [str(c) for c in meta['class_names']]
  num_classes = len(class_names)
  if meta.get('num_classes') not in (None, num_classes):
    raise PredictError(f'Checkpoint {step} in {workdir} lists {num_classes} class names but '
                       f"num_classes={meta['num_classes']}; the checkpoint metadata is damaged.")
  info = datasets.DatasetInfo(name=str(meta.get('dataset', '')), class_names=tuple(class_names),
                              split_sizes={})
  manager = checkpoints.CheckpointManager(workdir, config, info, read_only=True)
  try:
    template = evaluate.restore_template(config, num_classes)
    state = manager.restore(step, template)
  except checkpoints.ConfigMismatchError as e:
    raise PredictError(
        f'Checkpoint {step} in {workdir} does not match its saved config ({num_classes} classes, '
        f'encoder {config.model.encoder!r}, lstm_size {config.model.lstm_size}): '
        f'{str(e)[:400]}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise PredictError(_restore_failure(step, workdir, e)) from None
  finally:
    manager.close()
  model = train.build_model(config, num_classes)
  apply = jax.jit(functools.partial(model.apply, train=False))
  logging.info('Restored checkpoint %d of %s (%d classes).', step, workdir, num_classes)
  return Predictor(config=config, class_names=class_names, step=step,
                   variables={'params': state.params, 'batch_stats': state.batch_stats},
                   apply=apply)


@dataclasses.dataclass
class Clip:
  """The frames of one video file that its evaluation views need."""
  frames: np.ndarray  # [num_clips * num_frames, h, w, 3] uint8 in clip order, reduced (see below).
  num_available: int  # Frames in the video.
  frame_size: tuple[int, int]  # (height, width) of the upright video frames, pixels.


def _restore_failure(step: int, workdir: str, error: Exception) -> str:
  """Why checkpoint `step` could not be restored: corrupt, unreachable (I/O) or unreadable."""
  others = f"pass --checkpoint=<step> to use another one in {os.path.join(workdir, 'checkpoints')}"
  if isinstance(error, checkpoints.CorruptCheckpointError):
    return f'{error} Its bytes changed on disk; {others}.'
  reason = f'{type(error).__name__}: {str(error)[:400]}'
  if checkpoint_files.is_io_error(error):
    return (f'Checkpoint {step} in {workdir} could not be read ({reason}): an I/O problem (access, '
            'disk or network). Fix access to the folder and try again.')
  return f'Checkpoint {step} in {workdir} is damaged or unreadable ({reason}); {others}.'


def _video_frames(container):
  """Yields the decoded av.VideoFrames of the first video stream."""
  if not container.streams.video:
    raise VideoError('it has no video stream')
  yield from container.decode(video=0)


def _short_side(config, resize_short_side: Optional[int]) -> int:
  """The short side frames are resized to before cropping (0: kept as decoded)."""
  size = config.dataset.resize_size if resize_short_side is None else resize_short_side
  return max(int(size or 0), 0)


def _decode_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(width, height) after the largest power-of-two reduction that keeps the short side >=
  short_side (0: no reduction), rounded up as the JPEG decoder's ratio decoding does."""
  ratio = 1
  while short_side > 0 and min(width, height) // (2 * ratio) >= short_side:
    ratio *= 2
  return -(-width // ratio), -(-height // ratio)


def _crop_band(image: np.ndarray, crop_size: int, num_crops: int) -> np.ndarray:
  """The part of [H, W, 3] that the eval crop windows cover (their bounding box)."""
  windows = stages.eval_crop_windows(image.shape[:2], crop_size, num_crops).numpy()
  y0, x0 = windows[:, :2].min(axis=0)
  y1, x1 = (windows[:, :2] + windows[:, 2:]).max(axis=0)
  return np.ascontiguousarray(image[y0:y1, x0:x1])


def _reduced_rgb(frame, short_side: int, config) -> np.ndarray:
  """An av.VideoFrame -> upright [h, w, 3] uint8, scaled down in the decoder's scaler when
  short_side > 0, else cut to the crop band: never much larger than the views need."""
  rotation = frame.rotation
  width, height = _decode_size(frame.width, frame.height, short_side)
  if (width, height) != (frame.width, frame.height):
    frame = frame.reformat(width=width, height=height, format='rgb24', interpolation='AREA')
  rgb = video_files.upright(frame.to_ndarray(format='rgb24'), rotation)
  return rgb if short_side else _crop_band(rgb, config.image_size, config.eval.num_crops)


def read_clip_frames(path: str, config, resize_short_side: Optional[int] = None) -> Clip:
  """Decodes the frames that the eval views of `config` need from a video file.

  Two passes: the first counts the frames (decoding without converting), the second keeps only the
  sampled ones, each reduced as it is decoded (see `_reduced_rgb`), so memory holds
  num_clips x num_frames small frames whatever the video's length and resolution.

  Args:
    resize_short_side: see `eval_views`.

  Raises:
    VideoError: the file is missing, not a video, corrupt, or has no decodable frame.
  """
  short_side = _short_side(config, resize_short_side)
  try:
    with video_files.open_video(path) as container:
      num_available = sum(1 for _ in _video_frames(container))
    if num_available == 0:
      raise VideoError('it has no decodable video frame')
    indices = stages.sample_eval_indices(
        num_available, config.num_frames, config.frame_stride, config.eval.num_clips,
        config.dataset.short_video).numpy().reshape(-1)
    wanted, kept, sizes = set(indices.tolist()), {}, set()
    with video_files.open_video(path) as container:
      for i, frame in enumerate(_video_frames(container)):
        if i in wanted:
          turned = int(round((frame.rotation or 0) / 90.0)) % 2
          sizes.add((frame.width, frame.height) if turned else (frame.height, frame.width))
          kept[i] = _reduced_rgb(frame, short_side, config)
        if len(kept) == len(wanted):
          break
  except (VideoError, video_files.VideoFileError) as e:
    raise VideoError(f'{path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    # Any demuxer/decoder failure (av.FFmpegError, UnicodeDecodeError...) means unreadable.
    raise VideoError(f'{path}: cannot be decoded as a video ({type(e).__name__}: {e}).') from None
  missing = sorted(wanted - set(kept))
  if missing:
    raise VideoError(f'{path}: frames {missing[:5]} could not be decoded on the second pass; '
                     'the file is damaged.')
  if len(sizes) != 1:
    raise VideoError(f'{path}: frame size changes within the video ({sorted(sizes)}).')
  return Clip(np.stack([kept[i] for i in indices]), num_available, sizes.pop())


def eval_views(frames: np.ndarray, config, resize_short_side: Optional[int] = None) -> np.ndarray:
  """The evaluation views of decoded frames, as `pipeline.preprocess_eval` builds them.

  Args:
    frames: [num_clips * num_frames, H, W, 3] uint8, the sampled frames in clip order.
    config: the checkpoint's config.
    resize_short_side: short side to resize to before cropping; None -> config.dataset.resize_size
      (0 keeps the decoded size, as training did with the stored frames).

  Returns:
    [num_clips * num_crops, num_frames, S, S, 3] uint8 views, clip-major.
  """
  num_clips, num_crops = config.eval.num_clips, config.eval.num_crops
  t, s = config.num_frames, config.image_size
  if frames.shape[0] != num_clips * t:
    raise ValueError(f'Expected {num_clips} x {t} frames, got {frames.shape[0]}.')
  short_side = _short_side(config, resize_short_side)
  frames = tf.convert_to_tensor(frames)
  if short_side:
    frames = stages.resize_short_side(frames, short_side)
  return stages.eval_views(frames, num_clips, t, s, num_crops).numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits.astype(np.float64) - logits.max()
  e = np.exp(shifted)
  return e / e.sum()


def predict_video(predictor: Predictor, path: str, *, top_k: int = 5,
                  resize_short_side: Optional[int] = None) -> dict:
  """Top-k classes of one video file. Raises VideoError when the file cannot be read."""
  config = predictor.config
  clip = read_clip_frames(path, config, resize_short_side)
  height, width = clip.frame_size
  if not _short_side(config, resize_short_side) and min(height, width) > 2 * max(
      config.image_size, 1):
    logging.warning('%s is %dx%d but the checkpoint config keeps frames at their stored size '
                    '(dataset.resize_size=0): the %dx%d crops see only the centre. Pass '
                    '--resize_short_side (the short side of the training frames) to match.',
                    path, width, height, config.image_size, config.image_size)
  views = eval_views(clip.frames, config, resize_short_side)
  logits = predictor.video_logits(views)
  probs = _softmax(logits)
  order = np.argsort(-probs, kind='stable')[:max(1, min(top_k, len(probs)))]
  return {
      'path': path, 'ok': True,
      'top_k': [{'class': predictor.class_names[i], 'index': int(i),
                 'probability': float(probs[i])} for i in order],
      'logits': logits.tolist(),
      'num_frames': int(clip.num_available), 'frame_size': [int(height), int(width)],
      'views': int(views.shape[0]), 'checkpoint_step': predictor.step,
  }


def predict_files(paths: Sequence[str], workdir: Optional[str] = None, *,
                  checkpoint: str = 'best', top_k: int = 5,
                  resize_short_side: Optional[int] = None,
                  predictor: Optional[Predictor] = None) -> list[dict]:
  """Predicts the action in every video file; unreadable files are reported, not fatal.

  Args:
    paths: video files (anything FFmpeg reads: .avi, .mp4, .mkv...).
    workdir: training workdir holding checkpoints/ (unless `predictor` is given).
    checkpoint: 'best' (falls back to the latest without metrics), 'latest' or a step number.
    top_k: how many classes to return per file.
    resize_short_side: see `eval_views`.
    predictor: a `load_predictor` result, to reuse one restore for many calls.

  Returns:
    One dict per path, in order: {'path', 'ok': True, 'top_k': [{'class', 'index',
    'probability'}], 'logits', 'num_frames', 'frame_size': [H, W], 'views', 'checkpoint_step'}
    or {'path', 'ok': False, 'error': message naming the file}.

  Raises:
    PredictError: the workdir or checkpoint cannot be used (nothing could be predicted).
  """
  if predictor is None:
    predictor = load_predictor(workdir, checkpoint)
  results = []
  for path in paths:
    try:
      results.append(predict_video(predictor, str(path), top_k=top_k,
                                   resize_short_side=resize_short_side))
    except VideoError as e:
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
