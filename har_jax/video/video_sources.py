"""Video sources for streaming: files, cameras, network streams and pipes, read on a thread.

  source = video_sources.open_source('rtsp://camera.local/live')  # or a file, 0, /dev/video0, '-'
  reader = video_sources.FrameReader(source.frames(), live=source.live, keep=lambda i: i % 2 == 0)
  for index, time, frame in reader:  # Frame `index` of the source, `time` seconds in.
    ...
  reader.close()
  print(reader.frames, reader.dropped, reader.seconds, reader.error)

A live source (a camera, a network stream, a pipe) runs at its own pace; the reader never lets
its consumer fall behind it: a frame that has waited longer than `max_delay` seconds for the
consumer while a newer one is there is dropped and counted, so the consumer is at most about
max_delay behind the source. (Network streams and muxers deliver frames in bursts, a fraction of
a second of video at once: dropping every frame but the newest would drop most of a burst that
the consumer has time for.) A file is read as fast as the consumer takes its frames, and nothing
is dropped.
"""

import collections
import dataclasses
import glob
import os
import re
import sys
import threading
import time as time_lib
from typing import Callable, Iterable, Iterator, Optional

import av
import numpy as np

from har_jax.video import video_files

SOURCE_KINDS = ('file', 'camera', 'network', 'pipe')
NETWORK_TIMEOUT_S = 10.0  # Default seconds a network source may take to connect or send data.


@dataclasses.dataclass
class Source:
  """An opened video source.

  Attributes:
    name: as the user named it ('-' for stdin).
    kind: one of SOURCE_KINDS.
    live: whether it runs at its own pace (frames that are not taken in time are dropped).
    container: the PyAV input container (closed when `frames()` ends).
    timeout: network sources: seconds the source may send nothing before it counts as ended.
  """
  name: str
  kind: str
  live: bool
  container: object
  timeout: Optional[float] = None

  @property
  def stream(self):
    return self.container.streams.video[0]

  @property
  def frame_rate(self) -> Optional[float]:
    """Frames per second the stream declares, or None."""
    rate = self.stream.average_rate or self.stream.guessed_rate
    return float(rate) if rate else None

  def measured_rates(self, max_seconds: float = 60.0) -> Optional[tuple[float, float, float]]:
    """(mean, low, high) frames per second from a file's packet timestamps over its first
    `max_seconds` (demuxed, not decoded; low and high: the lowest and highest frame-to-frame
    rate), or None for a source that is not a file or has too few timestamps."""
    if self.kind != 'file':
      return None
    path = self.name[len('file://'):] if self.name.startswith('file://') else self.name
    times = []
    try:
      with video_files.open_video(path) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
          if packet.pts is not None and packet.time_base:
            times.append(float(packet.pts * packet.time_base))
            if times[-1] - times[0] > max_seconds:
              break
    except Exception:  # pylint: disable=broad-except  (the read itself names a damaged file)
      return None
    times = sorted(times)
    steps = np.diff(times)
    steps = steps[steps > 0]
    if len(steps) < 2:
      return None
    low, high = 1 / steps.max(), 1 / steps.min()
    return (len(times) - 1) / (times[-1] - times[0]), float(low), float(high)

  def frames(self) -> Iterator[tuple[float, object]]:
    """Yields (seconds since the first frame, av.VideoFrame) in display order, then closes the
    container.

    Raises:
      video_files.VideoError: a file ended before the frames or duration its header announces;
        a network source sent nothing for `timeout` seconds.
      Any PyAV error of a source that fails while it is read (a damaged file, a lost stream).
    """
    rate = self.frame_rate
    first, started, count, last = None, None, 0, 0.0
    try:
      for frame in self.container.decode(video=0):
        started = time_lib.monotonic() if started is None else started
        if frame.time is not None:  # Presentation time.
          first = frame.time if first is None else first
          last = frame.time - first
        elif rate and not self.live:  # No timestamps: the declared rate.
          last = count / rate
        else:  # A live source without timestamps: the wall clock.
          last = time_lib.monotonic() - started
        count += 1
        yield last, frame
      if not self.live:
        self._check_complete(count, last)
    except (av.error.ExitError, av.error.TimeoutError):  # PyAV's and FFmpeg's read timeouts.
      if self.timeout is None:
        raise
      raise video_files.VideoError(f'the source sent nothing for {self.timeout:g} s') from None
    finally:
      self.container.close()

  def _check_complete(self, count: int, last: float):
    stream, rate = self.stream, self.frame_rate
    if stream.frames and count < stream.frames:
      raise video_files.VideoError(
          f'its header announces {stream.frames} frames, {count} could be decoded')
    if stream.duration and stream.time_base:
      duration = float(stream.duration * stream.time_base)
    elif len(self.container.streams) == 1:  # The container's duration is the video's.
      duration = (self.container.duration or 0) / av.time_base
    else:
      duration = 0.0
    frame_time = 1 / rate if rate else 0.0
    if duration and last + frame_time < duration - max(0.5, 2 * frame_time):
      raise video_files.VideoError(f'its header announces {duration:.2f} s of video, the frames '
                                   f'end at {last + frame_time:.2f} s')


def rate_and_window(source: Source, span: int) -> tuple[str, str]:
  """('<rate>', '<seconds> s') of a window of `span` frames: from the header's rate or, where a
  file's timestamps disagree with it (a variable frame rate), from the timestamps; the seconds
  are '' when the rate is unknown."""
  rate, measured = source.frame_rate, source.measured_rates()
  if measured:
    mean, low, high = measured
    variable = high > 1.1 * low
    if variable or not rate or abs(mean - rate) > 0.05 * mean:
      header = f'its header says {rate:g} fps' if rate else 'its header gives no rate'
      if variable:
        return (f'{low:.3g}-{high:.3g} fps (variable, from its timestamps; {header})',
                f'{span / high:.2f}-{span / low:.2f} s')
      return f'{mean:.3g} fps (from its timestamps; {header})', f'{span / mean:.2f} s'
  if not rate:
    return 'an unknown frame rate', ''
  return f'{rate:g} fps', f'{span / rate:.2f} s'


def open_source(spec: str, *, live: Optional[bool] = None,
                timeout: float = NETWORK_TIMEOUT_S) -> Source:
  """Opens a video file, a camera, a network stream or stdin for streaming.

  Args:
    spec: a video file path; a camera as '/dev/videoN' or its index N (Linux, video4linux2); a
      URL FFmpeg reads (rtsp://, rtmp://, http(s)://, udp://, srt://...; file:// is a file);
      or '-' for a video piped into stdin (a streamable container: matroska, nut, mpegts...).
    live: override whether the source runs at its own pace (None: cameras, network streams and
      pipes are live, files are not).
    timeout: network sources: seconds to connect and answer, and that the stream may then send
      nothing before it counts as ended.

  Raises:
    video_files.VideoError: the source cannot be opened or has no video stream; the message
      names it and says why.
  """
  spec = str(spec)
  if spec == '-':
    kind, container = 'pipe', _open_pipe()
  elif re.fullmatch(r'\d+', spec) or spec.startswith('/dev/video'):
    kind, container = 'camera', _open_camera(spec)
  elif spec.startswith('file://'):
    kind, container = 'file', _open_file(spec[len('file://'):])
  elif re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', spec):
    kind, container = 'network', _open_url(spec, timeout)
  else:
    kind, container = 'file', _open_file(spec)
  if not container.streams.video:
    container.close()
    raise video_files.VideoError(f'{spec}: it has no video stream.')
  return Source(name=spec, kind=kind, live=kind != 'file' if live is None else bool(live),
                container=container, timeout=timeout if kind == 'network' else None)


def _open_file(path: str):
  try:
    return video_files.open_video(path)
  except video_files.VideoError as e:
    raise video_files.VideoError(f'{path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  (FFmpeg: any failure to read the header)
    raise video_files.VideoError(
        f'{path}: cannot be decoded as a video ({type(e).__name__}: {e}).') from None


def _open_pipe():
  if sys.stdin is None or sys.stdin.isatty():
    raise video_files.VideoError("'-' reads a video piped into stdin, but stdin is a terminal; "
                                 'pipe a video in (ffmpeg ... -f matroska - | ...).')
  try:
    return av.open('pipe:0')
  except Exception as e:  # pylint: disable=broad-except
    raise video_files.VideoError(
        f'stdin: cannot be read as a video ({type(e).__name__}: {e}); pipe a streamable '
        'container (matroska, nut, mpegts).') from None


def _open_camera(spec: str):
  device = f'/dev/video{spec}' if spec.isdigit() else spec
  if not sys.platform.startswith('linux'):
    raise video_files.VideoError(f'camera {device}: cameras are opened with video4linux2, which '
                                 f'only Linux has; pass a stream URL instead.')
  if not os.path.exists(device):
    found = sorted(glob.glob('/dev/video*'))
    listing = (f'cameras on this machine: {", ".join(found)}' if found
               else 'this machine has no camera (no /dev/video* device)')
    raise video_files.VideoError(f'camera {device} does not exist; {listing}.')
  try:
    return av.open(device, format='v4l2')
  except Exception as e:  # pylint: disable=broad-except  (busy, no access, not a capture device)
    raise video_files.VideoError(
        f'camera {device} cannot be opened ({type(e).__name__}: {e}).') from None


def _open_url(url: str, timeout: float):
  microseconds = str(int(timeout * 1e6))
  options = {'rw_timeout': microseconds}
  if url.lower().startswith('rtsp'):
    options['timeout'] = microseconds
  try:
    return av.open(url, options=options, timeout=timeout)
  except (av.error.ExitError, av.error.TimeoutError):  # Connected, then nothing came.
    raise video_files.VideoError(f'{url}: the source did not answer in {timeout:g} s.') from None
  except Exception as e:  # pylint: disable=broad-except  (refused, not found, not a video...)
    raise video_files.VideoError(f'{url}: cannot be opened ({type(e).__name__}: {e}).') from None


class FrameReader:
  """Reads (time, frame) pairs on a thread and hands the kept ones to one consumer, in order.

  Iterating yields (index, seconds, av.VideoFrame): the frame's number in the source and its time.
  Frames that `keep` refuses are read and counted but never handed out (they cost nothing).

  Attributes, up to the last frame handed out (all frames once the source has ended):
    frames: source frames taken: handed out, or refused by `keep`; not dropped.
    dropped: kept frames dropped because they waited longer than max_delay (live sources).
    seconds: seconds of video covered.
    error: the exception that ended the source early, or None.
    ended: whether the source ended (rather than the consumer stopping).
    wall_seconds: wall-clock seconds from the first frame read to the last handed out (or the
      end).
  """

  def __init__(self, frames: Iterable[tuple[float, object]], *, live: bool,
               keep: Callable[[int], bool] = lambda index: True,
               frame_rate: Optional[float] = None, max_delay: float = 0.5,
               queue_size: Optional[int] = None):
    """Args:
      frames: (seconds, frame) pairs, e.g. `Source.frames()`.
      live: drop frames that waited longer than max_delay, rather than make the source wait.
      keep: which frame indices the consumer wants.
      frame_rate: frames per second, for `seconds` (the last frame's duration); None: 0.
      max_delay: live: wall-clock seconds a frame may wait while a newer one is there.
      queue_size: frames that may wait (live: 64, the oldest dropped beyond; otherwise 8, the
        source waits).
    """
    self._frames, self._live, self._keep = frames, live, keep
    self._frame_time = 1 / frame_rate if frame_rate else 0.0
    self._max_delay = float(max_delay)
    self._queue = collections.deque()
    self._queue_size = queue_size or (64 if live else 8)
    self._lock = threading.Condition()
    self._read, self._read_time, self._dropped_total = 0, 0.0, 0
    self._done, self._stop = False, False
    self._first_at, self._last_at = None, None
    self.frames, self.dropped, self._through_time = 0, 0, None
    self.error, self.ended = None, False
    self._thread = threading.Thread(target=self._run, name='FrameReader', daemon=True)
    self._thread.start()

  @property
  def seconds(self) -> float:
    return 0.0 if self._through_time is None else self._through_time + self._frame_time

  @property
  def wall_seconds(self) -> float:
    if self._first_at is None:
      return 0.0
    return (self._last_at or time_lib.monotonic()) - self._first_at

  def _run(self):
    try:
      for index, (seconds, frame) in enumerate(self._frames):
        with self._lock:
          if self._stop:
            return
          if self._first_at is None:
            self._first_at = time_lib.monotonic()
          self._read, self._read_time = index + 1, seconds
          if not self._keep(index):
            continue
          while not self._live and len(self._queue) >= self._queue_size and not self._stop:
            self._lock.wait(0.1)
          if self._live and len(self._queue) >= self._queue_size:
            self._queue.popleft()
            self._dropped_total += 1
          self._queue.append((index, seconds, frame, time_lib.monotonic()))
          self._lock.notify_all()
    except Exception as e:  # pylint: disable=broad-except  (handed to the consumer)
      with self._lock:
        self.error = e
    finally:
      if hasattr(self._frames, 'close'):
        self._frames.close()
      with self._lock:
        self._done = True
        self._lock.notify_all()

  def __iter__(self) -> Iterator[tuple[int, float, object]]:
    while True:
      with self._lock:
        while not self._queue and not self._done:
          self._lock.wait(0.1)
        if not self._queue:
          self.frames = self._read - self._dropped_total
          self.dropped = self._dropped_total
          self._through_time = self._read_time if self._read else None
          self._last_at = time_lib.monotonic() if self._first_at is not None else None
          self.ended = True
          return
        if self._live:
          now = time_lib.monotonic()
          while len(self._queue) > 1 and now - self._queue[0][3] >= self._max_delay:
            self._queue.popleft()
            self._dropped_total += 1
        index, seconds, frame, _ = self._queue.popleft()
        self._lock.notify_all()
        self.frames = index + 1 - self._dropped_total
        self.dropped = self._dropped_total
        self._through_time = seconds
      yield index, seconds, frame
      self._last_at = time_lib.monotonic()

  def close(self, timeout: float = 2.0):
    """Stops reading (the thread ends at its next frame; a source blocked in a read is left to
    end with the process)."""
    with self._lock:
      self._stop = True
      self._lock.notify_all()
    self._thread.join(timeout)
