"""Streaming action recognition: push frames one at a time, read class probabilities.

  recogniser = streaming.Recogniser(inference.load('workdirs/synthetic'))
  for frame in frames:  # av.VideoFrame or [H, W, 3] uint8 RGB, from any source.
    probabilities = recogniser.push(frame)  # [num_classes] float32, or None.

An LRCN encodes each frame on its own, so a stream costs one encoder pass per new frame: every
`frame_stride`-th frame (the checkpoint's) is scaled, resized and centre-cropped exactly as
clip-mode prediction does with one clip and one crop (`predict.scaled_rgb`, `predict.eval_views`),
encoded once, and its features kept in a ring of the last `num_frames`. Once the ring is full, the
recurrent part (`LRCN.classify`: LSTM and head) runs over the window for each new encoded frame.
For the same frames the probabilities equal `predict_files` with eval.num_clips = num_crops = 1.

`StreamRun` feeds a stream of timed frames to a recogniser, smooths the probabilities over video
time and reports them at intervals (`Timeline`: what `scripts/stream.py --timeline` writes).
"""

import dataclasses
import functools
import json
import math
from typing import Callable, Optional, Sequence

import av
import jax
import numpy as np

from har_jax import inference
from har_jax import paths
from har_jax import predict


class Recogniser:
  """Class probabilities of the last `num_frames` kept frames of a stream, frame by frame.

  Frames are numbered from 0 in stream order; frame `i` is kept (preprocessed and encoded) when
  `i % frame_stride == 0`. A window is the last num_frames kept frames: a clip as training and
  clip-mode prediction sample it, frame_stride frames apart.

  Attributes:
    class_names: the names of the probabilities, in order.
    preprocessing: the checkpoint's, with one clip and one centre crop.
    num_frames, frame_stride: the window: num_frames kept frames, frame_stride apart.
    encoded: kept frames encoded since the start (or the last `reset`).
    probabilities: [num_classes] float32 of the latest window classified, or None.
  """

  def __init__(self, model: inference.LoadedModel, *, conv_impl: Optional[str] = None):
    """Args:
      model: from `inference.load`.
      conv_impl: run the encoder's convolutions with this `conv.CONV_IMPLS` implementation
        instead of the checkpoint's (same parameters, values equal to float rounding): at one
        frame per call, plain 'xla' convolutions are faster on a CPU than the 'cpu' kernels
        that 'auto' picks there for training (benchmarks/RESULTS.md). None: the checkpoint's.
    """
    module = model.model if conv_impl is None else model.model.clone(conv_impl=conv_impl)
    self.class_names = model.class_names
    self.preprocessing = dataclasses.replace(model.preprocessing, num_clips=1, num_crops=1)
    self._frame_preprocessing = dataclasses.replace(self.preprocessing, num_frames=1)
    self.num_frames = self.preprocessing.num_frames
    self.frame_stride = max(1, self.preprocessing.frame_stride)
    self._variables = jax.device_put(model.variables)
    self._encode = jax.jit(functools.partial(module.apply, train=False, method='encode_frames'))
    classify = functools.partial(module.apply, train=False, method='classify')
    self._classify = jax.jit(lambda v, x: jax.nn.softmax(classify(v, x), axis=-1))
    self._ring = None
    self.reset()

  def reset(self):
    """Forgets the stream: the next frame pushed is frame 0."""
    self._next_index = 0
    self.encoded = 0
    self.probabilities = None

  def keeps(self, index: int) -> bool:
    """Whether frame `index` of the stream is encoded (the checkpoint's frame stride)."""
    return index % self.frame_stride == 0

  def push(self, frame, index: Optional[int] = None, *,
           classify: bool = True) -> Optional[np.ndarray]:
    """Takes the next frame of the stream.

    Args:
      frame: an av.VideoFrame (its display rotation is applied) or [H, W, 3] uint8 RGB.
      index: the frame's number in the stream; by default the one after the last pushed. Give it
        when frames were lost (dropped on a live source), so the stride stays on the stream's
        frames. Must grow.
      classify: run the recurrent part if the window is full; False only encodes the frame
        (when its probabilities are not needed: the window's features stay up to date).

    Returns:
      [num_classes] float32 probabilities when this frame completed a window (a kept frame with
      at least num_frames kept frames so far) and `classify`, else None.
    """
    index = self._next_index if index is None else int(index)
    if index < self._next_index:
      raise ValueError(f'Frame {index} pushed after frame {self._next_index - 1}.')
    self._next_index = index + 1
    if not self.keeps(index):
      return None
    features = self.encode(self.frame_view(frame))
    if self._ring is None:
      self._ring = np.zeros((self.num_frames, features.shape[-1]), np.float32)
    self._ring[self.encoded % self.num_frames] = features
    self.encoded += 1
    if self.encoded < self.num_frames or not classify:
      return None
    self.probabilities = self.classify(self.window())
    return self.probabilities

  def frame_view(self, frame) -> np.ndarray:
    """One frame -> `[S, S, 3] uint8`, the model's input: scaled as it is decoded, short side
    resized, centre crop (the code paths of clip-mode prediction)."""
    if isinstance(frame, np.ndarray):
      if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f'Expected [H, W, 3] uint8 RGB, got {frame.shape} {frame.dtype}.')
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format='rgb24')
    rgb = predict.scaled_rgb(frame, self.preprocessing)
    return predict.eval_views(rgb[None], self._frame_preprocessing)[0, 0]

  def encode(self, view: np.ndarray) -> np.ndarray:
    """`[S, S, 3] uint8` -> `[feature_dim] float32`: one encoder pass on one frame."""
    return np.asarray(self._encode(self._variables, view[None]))[0]

  def window(self) -> np.ndarray:
    """`[num_frames, feature_dim] float32`: the ring's features, oldest first."""
    start = self.encoded % self.num_frames
    return np.concatenate([self._ring[start:], self._ring[:start]])

  def classify(self, window: np.ndarray) -> np.ndarray:
    """`[num_frames, feature_dim]` features -> `[num_classes] float32` probabilities."""
    return np.asarray(self._classify(self._variables, window[None]), np.float32)[0]

  def warm_up(self):
    """Traces the preprocessing and compiles the encoder and the recurrent part (a live stream
    should not wait for them)."""
    size = self.preprocessing.image_size
    features = self.encode(self.frame_view(np.zeros((size, size, 3), np.uint8)))
    self.classify(np.zeros((self.num_frames, features.shape[-1]), np.float32))


@dataclasses.dataclass
class Timeline:
  """Probabilities over video time: one entry per reported time.

  Attributes:
    class_names: the names of the probabilities, in order.
    times: seconds of video from the first frame, one per entry.
    probabilities: [len(times), num_classes] as nested lists.
  """
  class_names: Sequence[str]
  times: list = dataclasses.field(default_factory=list)
  probabilities: list = dataclasses.field(default_factory=list)

  def add(self, time: float, probabilities: np.ndarray):
    self.times.append(round(float(time), 6))
    self.probabilities.append([round(float(p), 6) for p in probabilities])

  def to_json(self) -> dict:
    """{"class_names": [...], "times": [seconds, ...], "probabilities": [[per class], ...]}."""
    return {'class_names': list(self.class_names), 'times': list(self.times),
            'probabilities': [list(p) for p in self.probabilities]}

  def write(self, path: str):
    """Writes `to_json()` to path (through a temporary file, so a reader never sees half)."""
    paths.write_text(path, json.dumps(self.to_json()))

  def plot(self, path: str, *, num_classes: int = 5, threshold: float = 0.0, title: str = ''):
    """Draws the probabilities of the `num_classes` classes that peak highest over time (PNG)."""
    from matplotlib import figure  # pylint: disable=g-import-not-at-top  (only for --plot)
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
    fig = figure.Figure(figsize=(10, 4.5), dpi=100)
    backend_agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    probabilities = np.asarray(self.probabilities, np.float32).reshape(-1, len(self.class_names))
    if len(self.times):
      order = np.argsort(-probabilities.max(axis=0), kind='stable')[:num_classes]
      for i in order:
        ax.plot(self.times, probabilities[:, i], label=self.class_names[i], linewidth=1.6)
      ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize='small')
    else:
      ax.text(0.5, 0.5, 'nothing recognised yet', ha='center', transform=ax.transAxes)
    if threshold > 0:
      ax.axhline(threshold, color='grey', linestyle='--', linewidth=1, label='_threshold')
    ax.set(xlabel='video time (s)', ylabel='probability', ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


class StreamRun:
  """Feeds timed frames to a Recogniser and reports its probabilities every `every` seconds of
  video, smoothed over time. Without smoothing, the recurrent part runs only for the windows
  reported.

  Attributes:
    timeline: the reported (smoothed) probabilities and their times.
    recogniser: as given.
  """

  def __init__(self, recogniser: Recogniser, *, every: float = 1.0, smooth: float = 0.0,
               on_report: Optional[Callable[[float, np.ndarray], None]] = None):
    """Args:
      recogniser: a fresh (or reset) recogniser.
      every: seconds of video between reports; 0: each new window.
      smooth: time constant in seconds of video of an exponential moving average of the
        probabilities (weight 1 - exp(-dt / smooth) for a window dt seconds after the last);
        0: none.
      on_report: called with (time, probabilities) for each report.
    """
    self.recogniser = recogniser
    self.timeline = Timeline(recogniser.class_names)
    self._every, self._smooth, self._on_report = float(every), float(smooth), on_report
    self._smoothed, self._smoothed_time, self._next_report = None, None, None

  def feed(self, index: int, time: float, frame) -> Optional[np.ndarray]:
    """Pushes frame `index` (at `time` seconds of video); returns the probabilities reported
    for it, if it is reported."""
    due = self._next_report is None or time >= self._next_report - 1e-6
    probabilities = self.recogniser.push(frame, index, classify=due or self._smooth > 0)
    if probabilities is None:
      return None
    probabilities = self._smoothed_at(time, probabilities)
    if not due:
      return None
    if self._every > 0:
      self._next_report = (math.floor(time / self._every + 1e-6) + 1) * self._every
    self.timeline.add(time, probabilities)
    if self._on_report:
      self._on_report(time, probabilities)
    return probabilities

  def _smoothed_at(self, time: float, probabilities: np.ndarray) -> np.ndarray:
    if self._smooth <= 0:
      return probabilities
    if self._smoothed is None:
      self._smoothed = probabilities
    else:
      weight = 1.0 - math.exp(-max(time - self._smoothed_time, 0.0) / self._smooth)
      self._smoothed = self._smoothed + weight * (probabilities - self._smoothed)
    self._smoothed_time = time
    return self._smoothed


def format_report(time: float, probabilities: np.ndarray, class_names: Sequence[str], *,
                  top_k: int = 3, threshold: float = 0.0) -> str:
  """One line: `  12.40s  walking 0.912 | running 0.051`, or that nothing is recognised when the
  top probability is below `threshold`."""
  order = np.argsort(-probabilities, kind='stable')[:max(1, top_k)]
  best = order[0]
  if probabilities[best] < threshold:
    return (f'{time:8.2f}s  (nothing recognised: best {class_names[best]} '
            f'{probabilities[best]:.3f} < {threshold:g})')
  return f'{time:8.2f}s  ' + ' | '.join(f'{class_names[i]} {probabilities[i]:.3f}' for i in order)
