"""Streaming recognition: parity with clip prediction, sources, live dropping, the stream script."""

import dataclasses
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import av
import numpy as np
import pytest

from har_jax import inference
from har_jax import predict
from har_jax import streaming
from har_jax.data.prepare import synthetic_actions
from har_jax.video import video_files
from har_jax.video import video_sources
from conftest import training_videos  # pylint: disable=g-bad-import-order
from conftest import write_video  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r'frames=(\d+) seconds=([\d.]+) frames_per_s=([\d.]+) dropped=(\d+)')
WAIT_S = 600  # Upper bound on any wait for a subprocess: a hang fails, slowness does not.


def _av_frame(value: int, size: int = 8):
  return av.VideoFrame.from_ndarray(np.full((size, size, 3), value, np.uint8), format='rgb24')


# --- The recogniser: parity with clip-mode prediction. ---


def _probabilities(result: dict, num_classes: int) -> np.ndarray:
  probabilities = np.zeros(num_classes, np.float32)
  for entry in result['top_k']:
    probabilities[entry['index']] = entry['probability']
  return probabilities


@pytest.mark.parametrize('stride,geometry,resize,size', [
    (1, None, None, (32, 32)),  # The checkpoint's own: squashed to 32x32 as in training.
    (2, {'resize': 'none'}, 36, (45, 61)),  # Short side resized, odd landscape frames.
    (3, {'resize': 'none'}, 0, (61, 45)),  # Stored size: only the centre band is kept.
], ids=['checkpoint', 'resized_stride2', 'band_stride3'])
def test_streaming_equals_clip_prediction(trained, tmp_path, stride, geometry, resize, size):
  """Every full window of a stream gives, to 1e-5, the probabilities that predict_files gives
  for a file holding that window's frames, with one clip and one centre crop."""
  _, workdir = trained
  loaded = inference.load(workdir, 'latest')
  changes = {'num_clips': 1, 'num_crops': 1, 'frame_stride': stride}
  if geometry is not None:
    changes.update(frame_geometry=geometry, resize_size=resize)
  model = dataclasses.replace(loaded, preprocessing=dataclasses.replace(loaded.preprocessing,
                                                                        **changes))
  rng = np.random.default_rng(stride)
  frames = np.concatenate([synthetic_actions.render_video(rng, pair, False, 10, 64)
                           for pair in (1, 3)])[:, :size[0], :size[1]]
  path = write_video(tmp_path / 'stream.avi', frames)
  recogniser = streaming.Recogniser(model)
  with av.open(path) as container:
    outputs = [recogniser.push(frame) for frame in container.decode(video=0)]

  span = (recogniser.num_frames - 1) * stride + 1
  ends = list(range(span - 1, len(frames), stride))
  assert [i for i, p in enumerate(outputs) if p is not None] == ends
  assert recogniser.encoded == len(range(0, len(frames), stride))
  clips = [write_video(tmp_path / f'clip_{end}.avi', frames[end - span + 1:end + 1])
           for end in ends]
  results = predict.predict_files(clips, model=model, top_k=model.num_classes)
  for end, result in zip(ends, results):
    assert result['ok'] and result['views'] == 1
    np.testing.assert_allclose(outputs[end], _probabilities(result, model.num_classes),
                               rtol=0, atol=1e-5, err_msg=f'window ending at frame {end}')
  assert max(p.max() for p in outputs if p is not None) > 0.5  # Not a uniform, vacuous match.


def test_push_checks_its_input_and_conv_impl_keeps_the_values(trained):
  _, workdir = trained
  model = inference.load(workdir, 'latest')
  frames = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  outputs = {}
  for conv_impl in (None, 'xla', 'cpu'):
    recogniser = streaming.Recogniser(model, conv_impl=conv_impl)
    outputs[conv_impl] = [recogniser.push(frame) for frame in frames][3:]
  for conv_impl in ('xla', 'cpu'):
    np.testing.assert_allclose(outputs[conv_impl], outputs[None], rtol=0, atol=1e-6)

  recogniser = streaming.Recogniser(model)
  with pytest.raises(ValueError, match=r'\[H, W, 3\] uint8'):
    recogniser.push(np.zeros((32, 32), np.uint8))
  recogniser.push(np.zeros((32, 32, 3), np.uint8), index=5)
  with pytest.raises(ValueError, match='Frame 3 pushed after frame 5'):
    recogniser.push(np.zeros((32, 32, 3), np.uint8), index=3)


# --- Reports, smoothing and the timeline. ---


class _FakeRecogniser:
  """Returns the given probabilities, one per push (None: no full window yet)."""
  class_names = ('a', 'b')

  def __init__(self, outputs):
    self._outputs = iter(outputs)
    self.classified = []

  def push(self, frame, index, classify=True):
    del frame
    probabilities = next(self._outputs)
    if not classify:
      return None
    self.classified.append(index)
    return probabilities


def test_reports_every_interval_of_video_time_and_smooth():
  one_hot = [np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)]
  outputs = [None, None] + [one_hot[0]] * 3 + [one_hot[1]] * 10
  reported = []
  run = streaming.StreamRun(_FakeRecogniser(outputs), every=0.5, smooth=0.2,
                            on_report=lambda t, p: reported.append((t, p.copy())))
  for i in range(len(outputs)):
    run.feed(i, i * 0.2, None)
  times = [t for t, _ in reported]
  assert times == pytest.approx([0.4, 0.6, 1.0, 1.6, 2.0, 2.6])  # First window, then the grid.
  assert run.timeline.times == pytest.approx(times)
  # Exponential moving average, time constant 0.2 s: after the switch at 1.0 s, b rises as
  # 1 - exp(-(t - 0.8) / 0.2).
  for t, p in reported[2:]:
    assert p[1] == pytest.approx(1 - np.exp(-(t - 0.8) / 0.2), abs=1e-6)
    assert p.sum() == pytest.approx(1.0, abs=1e-6)

  every_window = streaming.StreamRun(_FakeRecogniser(outputs), every=0.0)
  for i in range(len(outputs)):
    every_window.feed(i, i * 0.2, None)
  assert len(every_window.timeline.times) == len(outputs) - 2

  # Without smoothing, only the reported windows (and those before the first) are classified.
  recogniser = _FakeRecogniser(outputs)
  unsmoothed = streaming.StreamRun(recogniser, every=0.5)
  for i in range(len(outputs)):
    unsmoothed.feed(i, i * 0.2, None)
  assert unsmoothed.timeline.times == pytest.approx(times)
  assert recogniser.classified == [0, 1, 2, 3, 5, 8, 10, 13]
  assert unsmoothed.timeline.probabilities[2] == [0.0, 1.0]


def test_report_line_and_threshold():
  probabilities = np.array([0.2, 0.7, 0.1], np.float32)
  names = ('walk', 'run', 'jump')
  line = streaming.format_report(3.5, probabilities, names, top_k=2)
  assert line == '    3.50s  run 0.700 | walk 0.200'
  quiet = streaming.format_report(3.5, probabilities, names, top_k=2, threshold=0.8)
  assert 'nothing recognised' in quiet and 'run 0.700 < 0.8' in quiet


def test_timeline_json_and_plot(tmp_path):
  timeline = streaming.Timeline(('walk', 'run', 'jump'))
  for t in range(20):
    timeline.add(t / 10, np.array([1 - t / 20, t / 20, 0.0]))
  path = tmp_path / 'timeline.json'
  timeline.write(str(path))
  written = json.loads(path.read_text())
  assert set(written) == {'class_names', 'times', 'probabilities'}
  assert written['class_names'] == ['walk', 'run', 'jump'] and len(written['times']) == 20
  assert written['probabilities'][10] == [0.5, 0.5, 0.0]
  timeline.plot(str(tmp_path / 'plot.png'), num_classes=2, threshold=0.6, title='test')
  assert (tmp_path / 'plot.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_timeline_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
  (tmp_path / 'folder.json').mkdir()
  with pytest.raises(OSError):
    streaming.Timeline(('walk',)).write(str(tmp_path / 'folder.json'))
  assert os.listdir(tmp_path) == ['folder.json'] and not os.listdir(tmp_path / 'folder.json')


# --- Sources and the frame reader. ---


def test_live_reader_drops_frames_that_waited_and_counts_them():
  """Frames 1-8 arrive while the consumer holds frame 0: of the kept (even) ones, 2, 4 and 6
  waited while a newer one was there and are dropped; the consumer gets the newest, 8."""
  frames = [(i / 10, _av_frame(i)) for i in range(10)]
  taken, burst_read, resume = threading.Event(), threading.Event(), threading.Event()

  def source():
    yield frames[0]
    assert taken.wait(WAIT_S)
    yield from frames[1:9]
    burst_read.set()  # Runs once frame 8 is queued, when the reader asks for frame 9.
    assert resume.wait(WAIT_S)
    yield frames[9]

  reader = video_sources.FrameReader(source(), live=True, keep=lambda i: i % 2 == 0,
                                     frame_rate=10, max_delay=0.0)
  got = []
  for index, seconds, frame in reader:
    got.append((index, seconds, int(frame.to_ndarray(format='rgb24')[0, 0, 0])))
    if index == 0:
      taken.set()
      assert burst_read.wait(WAIT_S)
    if index == 8:
      assert (reader.frames, reader.dropped) == (9 - 3, 3)
      resume.set()
  reader.close()
  assert got == [(0, 0.0, 0), (8, 0.8, 8)]
  assert reader.ended and reader.error is None
  assert (reader.frames, reader.dropped) == (10 - 3, 3)
  assert reader.seconds == pytest.approx(1.0)


def test_file_reader_never_drops_and_passes_errors_on():
  def source():
    for i in range(30):
      yield i / 10, _av_frame(i)
    raise RuntimeError('lost the stream')

  reader = video_sources.FrameReader(source(), live=False, keep=lambda i: i % 3 == 0,
                                     queue_size=2)
  indices = []
  for index, _, _ in reader:
    threading.Event().wait(0.01)  # A slow consumer: the source waits, nothing is dropped.
    indices.append(index)
  assert indices == list(range(0, 30, 3))
  assert (reader.frames, reader.dropped) == (30, 0)
  assert isinstance(reader.error, RuntimeError) and 'lost the stream' in str(reader.error)


@pytest.mark.parametrize('ext', ['avi', 'mkv'])
def test_truncated_file_ends_early(tmp_path, ext):
  """A truncated AVI fails to decode its last packet; a truncated Matroska file just stops: both
  end early, after the frames that could be read."""
  frames = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
  data = open(write_video(tmp_path / f'full.{ext}', frames), 'rb').read()
  path = tmp_path / f'cut.{ext}'
  path.write_bytes(data[:len(data) // 2])
  source = video_sources.open_source(str(path))
  assert (source.kind, source.live) == ('file', False)
  reader = video_sources.FrameReader(source.frames(), live=False, frame_rate=source.frame_rate)
  count = sum(1 for _ in reader)
  assert 20 < count < 40 and reader.frames == count and reader.error is not None
  complete = video_sources.open_source(str(tmp_path / f'full.{ext}'))
  reader = video_sources.FrameReader(complete.frames(), live=False)
  assert sum(1 for _ in reader) == 60 and reader.error is None


def test_unreadable_sources_are_named(tmp_path):
  (tmp_path / 'garbage.mp4').write_bytes(b'not a video' * 100)
  (tmp_path / 'folder.avi').mkdir()
  cases = {str(tmp_path / 'garbage.mp4'): 'garbage.mp4: cannot be decoded as a video',
           str(tmp_path / 'missing.mp4'): 'missing.mp4: no such file',
           str(tmp_path / 'folder.avi'): 'folder.avi: is a directory'}
  for spec, message in cases.items():
    with pytest.raises(video_files.VideoError, match=re.escape(message)):
      video_sources.open_source(spec)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='cameras: video4linux2')
@pytest.mark.parametrize('spec', ['/dev/video97', '97'])
def test_missing_camera_is_named(spec):
  with pytest.raises(video_files.VideoError, match='camera /dev/video97 does not exist; '):
    video_sources.open_source(spec)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_network_sources(tmp_path):
  """A URL is a live network source; a refused connection is named."""
  url = f'http://127.0.0.1:{_free_port()}/video.mkv'
  with pytest.raises(video_files.VideoError, match=re.escape(f'{url}: cannot be opened')):
    video_sources.open_source(url)
  write_video(tmp_path / 'video.mkv', np.zeros((12, 16, 16, 3), np.uint8))

  class Handler(http.server.SimpleHTTPRequestHandler):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(tmp_path), **kwargs)

    def log_message(self, *args):
      del args

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    source = video_sources.open_source(f'http://127.0.0.1:{server.server_port}/video.mkv')
    assert (source.kind, source.live) == ('network', True)
    reader = video_sources.FrameReader(source.frames(), live=False)
    assert sum(1 for _ in reader) == 12 and reader.error is None
  finally:
    server.shutdown()
    server.server_close()


def _silent_server(head: bytes = b''):
  """A TCP server on 127.0.0.1 that accepts, reads the request, sends `head` (if any) and then
  nothing more; returns (port, close)."""
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(8)
  connections = []

  def serve():
    while True:
      try:
        connection, _ = server.accept()
      except OSError:  # Closed.
        return
      connections.append(connection)
      connection.recv(65536)
      if head:
        connection.sendall(head)

  threading.Thread(target=serve, daemon=True).start()

  def close():
    server.close()
    for connection in connections:
      connection.close()

  return server.getsockname()[1], close


def test_network_source_that_does_not_answer_is_named(tmp_path):
  """A server that accepts and sends nothing, at the start or after half a video: the source is
  said not to have answered in its timeout, not 'Immediate exit requested'."""
  port, close = _silent_server()
  url = f'http://127.0.0.1:{port}/video.mkv'
  try:
    with pytest.raises(video_files.VideoError,
                       match=re.escape(f'{url}: the source did not answer in 1 s')):
      video_sources.open_source(url, timeout=1.0)
  finally:
    close()
  data = open(write_video(tmp_path / 'video.mkv',
                          np.zeros((200, 16, 16, 3), np.uint8)), 'rb').read()
  port, close = _silent_server(b'HTTP/1.0 200 OK\r\nContent-Type: video/x-matroska\r\n\r\n' +
                               data[:len(data) // 2])
  try:
    source = video_sources.open_source(f'http://127.0.0.1:{port}/video.mkv', timeout=1.0)
    reader = video_sources.FrameReader(source.frames(), live=False)
    assert 0 < sum(1 for _ in reader) < 200
    assert isinstance(reader.error, video_files.VideoError), reader.error
    assert str(reader.error) == 'the source sent nothing for 1 s'
  finally:
    close()


# --- The script. ---


class _Script:
  """scripts/stream.py in a subprocess, its stdout and stderr lines collected as they come."""

  def __init__(self, args, **popen):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               PYTHONPATH=REPO)
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'scripts', 'stream.py')] + [str(a) for a in args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    self.stdout, self.stderr = [], []
    self._lines = threading.Condition()
    self._threads = [threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
                     for stream, lines in ((self.proc.stdout, self.stdout),
                                           (self.proc.stderr, self.stderr))]
    for thread in self._threads:
      thread.start()

  def _collect(self, stream, lines):
    for line in stream:
      with self._lines:
        lines.append(line.rstrip('\n'))
        self._lines.notify_all()

  def wait_for(self, lines, predicate):
    """Waits until predicate(lines) holds; fails if the process ends first."""
    with self._lines:
      while not predicate(lines):
        assert self.proc.poll() is None or any(t.is_alive() for t in self._threads), (
            f'stream.py ended (rc={self.proc.returncode}) first:\n' + '\n'.join(self.stderr[-30:]))
        self._lines.wait(1.0)

  def finish(self) -> int:
    returncode = self.proc.wait(WAIT_S)
    for thread in self._threads:
      thread.join(WAIT_S)
    return returncode

  def summary(self):
    assert self.stdout and SUMMARY.fullmatch(self.stdout[-1]), (self.stdout[-3:], self.stderr[-12:])
    frames, seconds, frames_per_s, dropped = SUMMARY.fullmatch(self.stdout[-1]).groups()
    return int(frames), float(seconds), float(frames_per_s), int(dropped)

  def reports(self):
    return [line for line in self.stdout if re.match(r'\s+\d+\.\d\ds  ', line)]


def _unwritable_folder(tmp_path) -> str:
  """A folder this process cannot create files in (root ignores permissions: /sys or /proc)."""
  folder = tmp_path / 'read_only'
  folder.mkdir()
  folder.chmod(0o555)
  for candidate in (str(folder), '/sys', '/proc'):
    try:
      with open(os.path.join(candidate, 'probe'), 'w'):
        pass
      os.remove(os.path.join(candidate, 'probe'))
    except OSError:
      return candidate
  pytest.skip('no folder here refuses writes')


@pytest.mark.slow  # Three script starts: 10-40 s on the 2-core machine.
def test_script_refuses_bad_arguments_before_loading(tmp_path):
  """Two sources, a timeline that is a folder or in a folder that cannot be written, a plot format
  matplotlib does not write: one error line each, before the model is loaded (no workdir here)."""
  (tmp_path / 'folder.json').mkdir()
  unwritable = _unwritable_folder(tmp_path)
  workdir = f'--workdir={tmp_path / "none"}'
  scripts = [_Script([workdir, 'a.mp4', 'b.mp4']),
             _Script([workdir, f'--timeline={tmp_path / "folder.json"}', 'a.mp4']),
             _Script([workdir, f'--timeline={unwritable}/t.json', f'--plot={tmp_path}/t.xyz',
                      'a.mp4'])]
  expected = [['error: give exactly one SOURCE after the flags (a file, a camera, a URL or -); '
               "got 2: 'a.mp4' 'b.mp4'."],
              [f'error: --timeline={tmp_path}/folder.json: it is a folder; name a file.'],
              [f'error: --timeline={unwritable}/t.json: folder {unwritable} cannot be written',
               f'error: --plot={tmp_path}/t.xyz: matplotlib cannot write .xyz files; use one of ']]
  for script, lines, code in zip(scripts, expected, [2, 1, 1]):  # A usage error, then errors.
    assert script.finish() == code
    printed = [line for line in script.stderr if line.startswith('error: ')]
    assert len(printed) == len(lines), script.stderr[-10:]
    for line, start in zip(printed, lines):
      assert line.startswith(start), (line, start)
    assert 'Traceback' not in '\n'.join(script.stderr) and '--workdir:' not in script.stderr
  assert os.listdir(tmp_path / 'folder.json') == []


def _best_classes(config, model) -> list[int]:
  """Classes whose every window of their training videos the model gets right, best first."""
  recogniser = streaming.Recogniser(model)
  right, total, margin = np.zeros(10), np.zeros(10), np.ones(10)
  for _, frames, label in training_videos(config, 40):
    recogniser.reset()
    for probabilities in filter(lambda p: p is not None, map(recogniser.push, frames)):
      total[label] += 1
      right[label] += int(np.argmax(probabilities) == label)
      margin[label] = min(margin[label], probabilities[label])
  perfect = [c for c in range(10) if total[c] and right[c] == total[c]]
  return sorted(perfect, key=lambda c: -margin[c])


def _switching_video(config, tmp_path, classes, fps, rounds=3):
  """A long video alternating between the training videos of two classes: returns (path,
  [(first frame, class) of each segment], number of frames)."""
  by_class = {c: [f for _, f, label in training_videos(config, 40) if label == c]
              for c in classes}
  per_class = min(len(videos) for videos in by_class.values())
  segments, frames = [], []
  for k in range(2 * per_class * rounds):
    label = classes[k % 2]
    segments.append((sum(len(f) for f in frames), label))
    frames.append(by_class[label][(k // 2) % per_class])
  path = write_video(tmp_path / f'switching_{fps}.mkv', np.concatenate(frames), fps=fps)
  return path, segments, sum(len(f) for f in frames)


@pytest.mark.slow
def test_timeline_top_class_switches_at_each_cut(trained, tmp_path):
  """A long video cut between two classes: the timeline's top class is the new class from the
  first window that lies wholly after a cut (num_frames - 1 strides later) to the next cut."""
  config, workdir = trained
  model = inference.load(workdir, 'latest')
  best = _best_classes(config, model)
  assert len(best) >= 2, f'the tiny model learned too few classes ({best}) to test with'
  path, segments, num_frames = _switching_video(config, tmp_path, best[:2], fps=10)
  timeline_path, plot_path = tmp_path / 'timeline.json', tmp_path / 'timeline.png'
  script = _Script([f'--workdir={workdir}', '--checkpoint=latest', '--every=0',
                    f'--timeline={timeline_path}', f'--plot={plot_path}', path])
  assert script.finish() == 0, '\n'.join(script.stderr[-30:])
  assert script.summary()[0] == num_frames and script.summary()[3] == 0
  assert script.summary()[1] == pytest.approx(num_frames / 10)
  assert 'file, 32x32 at 10 fps' in script.stdout[0]
  timeline = json.loads(timeline_path.read_text())
  assert set(timeline) == {'class_names', 'times', 'probabilities'}
  assert timeline['class_names'] == list(model.class_names)
  span = (model.preprocessing.num_frames - 1) * model.preprocessing.frame_stride + 1
  top = {round(t * 10): int(np.argmax(p))
         for t, p in zip(timeline['times'], timeline['probabilities'])}
  assert sorted(top) == list(range(span - 1, num_frames))  # Every window, at its last frame.
  names = model.class_names
  for (start, label), (end, _) in zip(segments, segments[1:] + [(num_frames, None)]):
    wrong = {f: names[top[f]] for f in range(start + span - 1, end) if top[f] != label}
    assert not wrong, f'segment {start}-{end - 1} ({names[label]}): top class {wrong}'
  switches = [f for f in sorted(top)[1:] if top[f] != top[f - 1]]
  assert len(switches) >= len(segments) - 1  # Each cut shows as a switch within the bound.
  assert len(script.reports()) == len(timeline['times'])
  assert plot_path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _paced_writer(path, stdin, loop=False):
  """ffmpeg writing `path` into `stdin` at its frame rate (-re), as Matroska with short
  clusters (one frame each, so frames are not held back in bursts)."""
  command = ['ffmpeg', '-v', 'error', '-re'] + (['-stream_loop', '-1'] if loop else []) + [
      '-i', str(path), '-c', 'copy', '-f', 'matroska', '-cluster_time_limit', '1',
      '-flush_packets', '1', 'pipe:1']
  return subprocess.Popen(command, stdout=stdin, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_pipe_at_real_time_pace(trained, tmp_path):
  """A video paced into stdin at 25 frames/s: reports come while it is still being written, and
  every frame is either processed or counted as dropped."""
  config, workdir = trained
  model = inference.load(workdir, 'latest')
  path, _, num_frames = _switching_video(config, tmp_path, _best_classes(config, model)[:2],
                                         fps=25)
  timeline_path = tmp_path / 'pipe.json'
  script = _Script([f'--workdir={workdir}', '--checkpoint=latest', '--every=0.5',
                    f'--timeline={timeline_path}', '-'], stdin=subprocess.PIPE)
  script.wait_for(script.stderr, lambda lines: any('opening -' in l for l in lines))
  writer = _paced_writer(path, script.proc.stdin)
  script.proc.stdin.close()
  script.wait_for(script.stdout, lambda lines: len(script.reports()) >= 1)
  still_writing = writer.poll() is None
  assert writer.wait(WAIT_S) == 0
  assert script.finish() == 0, '\n'.join(script.stderr[-30:])
  assert still_writing, 'the first report came only after the whole video was written'
  assert 'pipe, 32x32 at 25 fps, live' in script.stdout[0]
  frames, seconds, _, dropped = script.summary()
  assert frames + dropped == num_frames and seconds == pytest.approx(num_frames / 25)
  times = json.loads(timeline_path.read_text())['times']
  assert len(times) == len(script.reports()) >= 2
  intervals = [int(t / 0.5 + 1e-6) for t in times]  # One report per 0.5 s of video at most.
  assert intervals == sorted(set(intervals)), times
  assert times[-1] <= num_frames / 25


@pytest.mark.slow
def test_ctrl_c_prints_the_summary_and_writes_the_timeline(trained, tmp_path):
  config, workdir = trained
  model = inference.load(workdir, 'latest')
  path, _, _ = _switching_video(config, tmp_path, _best_classes(config, model)[:2], fps=25,
                                rounds=1)
  timeline_path = tmp_path / 'interrupted.json'
  script = _Script([f'--workdir={workdir}', '--checkpoint=latest', '--every=0.2',
                    f'--timeline={timeline_path}', '-'], stdin=subprocess.PIPE)
  script.wait_for(script.stderr, lambda lines: any('opening -' in l for l in lines))
  writer = _paced_writer(path, script.proc.stdin, loop=True)  # Endless.
  script.proc.stdin.close()
  try:
    script.wait_for(script.stdout, lambda lines: len(script.reports()) >= 3)
    script.proc.send_signal(signal.SIGINT)
    assert script.finish() == 130, '\n'.join(script.stderr[-30:])
  finally:
    writer.kill()
    writer.wait(WAIT_S)
  assert any(line.startswith('interrupted: processed') for line in script.stderr)
  frames, seconds, _, _ = script.summary()
  timeline = json.loads(timeline_path.read_text())
  assert len(timeline['times']) == len(script.reports()) >= 3
  assert frames > 0 and timeline['times'][-1] <= seconds


def _long_video(config, tmp_path, repeats: int) -> str:
  (_, frames, _), = training_videos(config, 1)
  return write_video(tmp_path / 'long.mkv', np.concatenate([frames] * repeats))


@pytest.mark.slow
@pytest.mark.parametrize('interrupt', [False, True])
def test_closed_stdout_ends_the_run_and_outputs_are_written_first(trained, tmp_path, interrupt):
  """`stream.py ... 2>&1 | tee` and Ctrl-C (which ends tee too), or `| head`: the timeline is
  written before anything is printed, a closed stdout ends the run without a traceback."""
  config, workdir = trained
  path = _long_video(config, tmp_path, repeats=400)  # 4,000 frames: far more than read here.
  timeline_path = tmp_path / 'timeline.json'
  args = [f'--workdir={workdir}', '--checkpoint=latest', '--every=0',
          f'--timeline={timeline_path}', path]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', PYTHONPATH=REPO)
  stderr_path = tmp_path / 'stderr.txt'
  with open(stderr_path, 'w') as stderr:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'scripts', 'stream.py')] + args, cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT if interrupt else stderr, text=True)
    reports = 0
    for line in proc.stdout:
      reports += bool(re.match(r'\s+\d+\.\d\ds  ', line))
      if reports == 3:
        break
    proc.stdout.close()  # As `| tee` when Ctrl-C ends it, or `| head -n 5`.
    if interrupt:
      proc.send_signal(signal.SIGINT)
    returncode = proc.wait(WAIT_S)
  assert returncode == (130 if interrupt else 0), stderr_path.read_text()[-3000:]
  times = json.loads(timeline_path.read_text())['times']
  assert 3 <= len(times) < 4000 - 3
  if not interrupt:
    assert 'Traceback' not in stderr_path.read_text(), stderr_path.read_text()[-3000:]
    assert 'stdout was closed' in stderr_path.read_text()


@pytest.mark.slow
def test_script_bad_sources(trained, tmp_path):
  """A missing camera is named; a truncated file is processed as far as it goes, said to have
  ended early, and its timeline written; a video shorter than the window says so; an output folder
  that does not exist is refused before anything runs."""
  config, workdir = trained
  camera = _Script([f'--workdir={workdir}', '/dev/video97'])
  assert camera.finish() == 1
  assert any(line.startswith('error: camera /dev/video97 does not exist')
             for line in camera.stderr), camera.stderr[-5:]

  (_, frames, _), = training_videos(config, 1)
  full = write_video(tmp_path / 'full.avi', np.concatenate([frames] * 8))
  data = open(full, 'rb').read()
  cut = tmp_path / 'cut.avi'
  cut.write_bytes(data[:len(data) // 2])
  timeline_path = tmp_path / 'cut.json'
  script = _Script([f'--workdir={workdir}', '--checkpoint=latest', '--every=0',
                    f'--timeline={timeline_path}', cut])
  assert script.finish() == 1
  error = [line for line in script.stderr if line.startswith('error: ')]
  assert len(error) == 1 and 'cut.avi ended early' in error[0], script.stderr[-5:]
  frames_done, seconds, _, _ = script.summary()
  assert 10 < frames_done < 64 and f'processed {frames_done} frames ({seconds:.2f} s' in error[0]
  assert len(json.loads(timeline_path.read_text())['times']) == len(script.reports()) > 0

  short = write_video(tmp_path / 'short.avi', frames[:2])  # The window is 4 frames.
  script = _Script([f'--workdir={workdir}', '--checkpoint=latest', short])
  assert script.finish() == 1 and script.summary()[:2] == (2, 0.2)
  assert any('short.avi ended after 2 frames (0.20 s), before the first window of 4 frames' in line
             for line in script.stderr), script.stderr[-5:]

  missing = tmp_path / 'no' / 't.json'
  nowhere = _Script([f'--workdir={workdir}', f'--timeline={missing}', short])
  assert nowhere.finish() == 1
  expected = f'error: --timeline={missing}: folder {missing.parent} does not exist.'
  assert expected in nowhere.stderr, nowhere.stderr[-5:]


@pytest.mark.slow
def test_benchmark_stream_prints_its_figures():
  """scripts/benchmark_stream.py end to end on a few frames (no assertion on time)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'benchmark_stream.py'),
       '--models=small_cnn', '--frames=20', '--rounds=1', '--conv_impls=auto,xla'],
      capture_output=True, text=True, timeout=WAIT_S, env=env, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if line.startswith('small_cnn ')]
  assert len(lines) == 2 and 'conv_impl=auto' in lines[0] and 'conv_impl=xla' in lines[1]
  for line in lines:
    figures = dict(re.findall(r'(\w+)=([0-9.]+)', line.split('): ')[1]))
    assert set(figures) == {'preprocess_ms', 'encoder_ms', 'lstm_ms', 'latency_ms',
                            'kept_per_s', 'source_per_s'}, line
    assert all(float(v) > 0 for v in figures.values()), line
    assert float(figures['source_per_s']) == pytest.approx(2 * float(figures['kept_per_s']),
                                                           rel=0.01)  # Stride 2.


def _write_variable_rate(path, times_ms):
  """An FFV1 .mkv that declares 5 fps and has frames at `times_ms`."""
  import fractions  # pylint: disable=g-import-not-at-top
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('ffv1', rate=5)
    stream.width, stream.height, stream.pix_fmt = 32, 32, 'yuv420p'
    stream.time_base = stream.codec_context.time_base = fractions.Fraction(1, 1000)
    for i, ms in enumerate(times_ms):
      frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 3 % 255, np.uint8),
                                         format='rgb24')
      frame.pts, frame.time_base = ms, fractions.Fraction(1, 1000)
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return str(path)


def test_window_seconds_come_from_the_timestamps_of_a_variable_rate_file(tmp_path):
  """Issue 27.11: a 5 -> 30 fps file was described as '5 fps, window 3.20 s' (its header rate)."""
  times = [i * 200 for i in range(5)] + [1000 + i * 1000 // 30 for i in range(90)]
  source = video_sources.open_source(_write_variable_rate(tmp_path / 'vfr.mkv', times))
  assert source.frame_rate == 5  # What the header says.
  rate, seconds = video_sources.rate_and_window(source, span=16)
  assert 'its header says 5 fps' in rate and 'variable' in rate, rate
  assert re.match(r'5-30(\.\d)? fps', rate) and seconds == '0.53-3.20 s', (rate, seconds)
  steady = video_sources.open_source(write_video(tmp_path / 'steady.mkv',
                                                 np.zeros((12, 16, 16, 3), np.uint8), fps=10))
  assert video_sources.rate_and_window(steady, span=16) == ('10 fps', '1.60 s')
