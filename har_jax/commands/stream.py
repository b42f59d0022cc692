r"""Recognise actions in a stream: a camera, a network stream, a pipe or a long video file.

  har-stream --workdir=workdirs/synthetic [--checkpoint=best] SOURCE \
      [--every=1] [--smooth=0] [--threshold=0] [--top_k=3] [--live=auto] \
      [--max_delay=0.5] [--conv_impl=xla] [--timeline=out.json] [--plot=out.png]

(or python scripts/stream.py with the same arguments).

SOURCE: a video file; a camera, /dev/video0 or its index 0 (Linux); a URL FFmpeg reads (rtsp://,
http://, udp://...); '-' for a video piped into stdin (ffmpeg ... -f matroska - | har-stream ... -).

Each frame at the checkpoint's frame stride is encoded once; the LSTM runs over the last
num_frames encoded frames. Every --every seconds of video it prints the time and the top-k
classes (or that nothing is recognised, when the top probability is below --threshold). A live
source (cameras, network streams, pipes; --live overrides) is never fallen behind: a frame that
has waited more than --max_delay seconds for the model while newer ones arrived is dropped and
counted. The last line is

  frames=<n> seconds=<video seconds> frames_per_s=<frames per wall-clock second> dropped=<n>

Ctrl-C stops it, writes the timeline and plot so far, then prints that summary; a closed stdout
(the reader of `| head` or `| tee` gone) ends the run the same way. The output paths are checked
before the model is loaded. Exit codes: 0; 1 when the workdir/checkpoint cannot be used, an
output cannot be written, or the source cannot be read, ends early (what was processed is
reported and written) or ends before the first window; 2 for bad flags or not exactly one
SOURCE; 130 after Ctrl-C.
"""

import os
import sys

from absl import app
from absl import flags
import tensorflow as tf

from har_jax import checkpoint_files
from har_jax import cli
from har_jax import distributed
from har_jax import inference
from har_jax import paths
from har_jax import streaming
from har_jax.video import video_files
from har_jax.video import video_sources

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir', None, 'Training workdir (the folder holding checkpoints/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a checkpoint step.")
  flags.DEFINE_float('every', 1.0, 'Seconds of video between printed reports (and timeline '
                     'entries); 0: every new window.', lower_bound=0.0)
  flags.DEFINE_float('smooth', 0.0, 'Time constant, in seconds of video, of an exponential moving '
                     'average of the probabilities; 0: no smoothing.', lower_bound=0.0)
  flags.DEFINE_float('threshold', 0.0, 'Below this top probability, report that nothing is '
                     'recognised.', lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_integer('top_k', 3, 'Classes per report.', lower_bound=1)
  flags.DEFINE_enum('live', 'auto', ['auto', 'yes', 'no'],
                    'Drop frames rather than fall behind: auto = for cameras, network streams and '
                    'pipes, not for files.')
  flags.DEFINE_float('max_delay', 0.5, 'Live sources: seconds a frame may wait for the model '
                     'while newer ones arrive; older ones are dropped.', lower_bound=0.0)
  flags.DEFINE_enum('conv_impl', 'xla', ['', 'auto', 'xla', 'cpu'],
                    "The encoder's convolutions ('' = the checkpoint's, 'auto' on a CPU = the "
                    "'cpu' kernels made for training's gradients). Plain 'xla' gives the same "
                    'values and is about 2x faster for ResNet-18 at one frame per call on a CPU '
                    '(docs/streaming.md, "Speed"); on GPU/TPU the checkpoint\'s \'auto\' is '
                    '\'xla\' too.')
  flags.DEFINE_string('timeline', '', 'Write {"class_names", "times", "probabilities"} JSON here.')
  flags.DEFINE_string('plot', '', 'Draw the probabilities of the top classes over time (PNG).')
  flags.DEFINE_integer('plot_classes', 5, 'Classes drawn by --plot.', lower_bound=1)
  flags.mark_flag_as_required('workdir')


class _StdoutClosed(Exception):
  """The reader of stdout is gone (`| head` ended, or Ctrl-C ended `| tee` too)."""


def _say(text: str, file=None) -> bool:
  """Prints a line and flushes; False when the stream is closed (its later output is dropped)."""
  file = file or sys.stdout
  try:
    print(text, file=file, flush=True)
    return True
  except BrokenPipeError:
    cli.silence_closed_pipe(file)
    return False


def _output_problems() -> list[str]:
  """What is wrong with --timeline and --plot, found before anything runs (one line each)."""
  problems = []
  for flag in ('timeline', 'plot'):
    value = FLAGS[flag].value
    if not value:
      continue
    if paths.is_url(value):
      if flag == 'plot':
        problems.append(f'--plot={value}: write the plot to a local file (a bucket is fine for '
                        '--timeline).')
      continue
    path = os.path.abspath(value)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
      problems.append(f'--{flag}={value}: folder {folder} does not exist.')
    elif os.path.isdir(path):
      problems.append(f'--{flag}={value}: it is a folder; name a file.')
    elif problem := checkpoint_files.write_problem(folder):
      problems.append(f'--{flag}={value}: folder {folder} cannot be written ({problem}).')
    if flag == 'plot':
      from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
      formats = backend_agg.FigureCanvasAgg.get_supported_filetypes()
      extension = os.path.splitext(path)[1][1:].lower()
      if extension and extension not in formats:
        problems.append(f'--plot={value}: matplotlib cannot write .{extension} files; use one of '
                        f'{", ".join(sorted(formats))} (png without an extension).')
  return problems


def main(argv) -> int:
  if len(argv) != 2:
    given = f'; got {len(argv) - 1}: {" ".join(map(repr, argv[1:]))}' if argv[1:] else ''
    raise app.UsageError(
        f'give exactly one SOURCE after the flags (a file, a camera, a URL or -){given}.')
  problems = _output_problems()
  for problem in problems:
    print(f'error: {problem}', file=sys.stderr)
  if problems:
    return cli.EXIT_ERROR
  tf.config.set_visible_devices([], 'GPU')
  distributed.quiet_library_logs()
  try:
    model = inference.load(FLAGS.workdir, FLAGS.checkpoint)
    recogniser = streaming.Recogniser(model, conv_impl=FLAGS.conv_impl or None)
    recogniser.warm_up()
    live = {'auto': None, 'yes': True, 'no': False}[FLAGS.live]
    _say(f'model ready; opening {argv[1]}', sys.stderr)
    source = video_sources.open_source(argv[1], live=live)
  except KeyboardInterrupt:
    _say('interrupted before the stream started.', sys.stderr)
    return cli.EXIT_INTERRUPTED
  reader = video_sources.FrameReader(source.frames(), live=source.live, keep=recogniser.keeps,
                                     frame_rate=source.frame_rate, max_delay=FLAGS.max_delay)

  def report(time, probabilities):
    if not _say(streaming.format_report(time, probabilities, recogniser.class_names,
                                        top_k=FLAGS.top_k, threshold=FLAGS.threshold)):
      raise _StdoutClosed()

  run = streaming.StreamRun(recogniser, every=FLAGS.every, smooth=FLAGS.smooth,
                            on_report=report)
  interrupted = closed = False
  try:
    if not _say(_describe(source, recogniser, model.step)):
      raise _StdoutClosed()
    for index, time, frame in reader:
      run.feed(index, time, frame)
  except KeyboardInterrupt:
    interrupted = True
  except _StdoutClosed:
    closed = True
  finally:
    reader.close()
  return _finish(source, reader, run, interrupted, closed)


def _describe(source, recogniser, step) -> str:
  stream = source.stream
  span = (recogniser.num_frames - 1) * recogniser.frame_stride + 1
  rate, seconds = video_sources.rate_and_window(source, span)
  return (f'{source.name}: {source.kind}, {stream.width}x{stream.height} at {rate}'
          f'{", live: late frames are dropped" if source.live else ""}. Checkpoint step {step}: '
          f'{recogniser.num_frames} frames at stride {recogniser.frame_stride} (a window of '
          f'{span} frames{f" = {seconds}" if seconds else ""}).')


def _finish(source, reader, run, interrupted: bool, closed: bool) -> int:
  """Writes the timeline and plot, then reports how the stream ended and prints the summary line
  (the outputs first: a closed stdout or stderr loses only what is printed)."""
  status, messages = cli.EXIT_OK, []
  reports = len(run.timeline.times)
  for path, write in ((FLAGS.timeline, run.timeline.write),
                      (FLAGS.plot, lambda p: run.timeline.plot(
                          p, num_classes=FLAGS.plot_classes, threshold=FLAGS.threshold,
                          title=f'{source.name}: top classes over time'))):
    if path:
      try:
        write(path)
        messages.append(f'wrote {path} ({reports} report(s))')
      except OSError as e:
        messages.append(f'error: cannot write {path}: {e}')
        status = cli.EXIT_ERROR
  processed = (f'processed {reader.frames} frames ({reader.seconds:.2f} s of video), '
               f'{reports} report(s)')
  if interrupted:
    ending, status = f'interrupted: {processed}.', cli.EXIT_INTERRUPTED
  elif closed:
    ending = f'stdout was closed, so the stream was stopped: {processed}.'
  elif reader.error is not None:
    reason = f'{type(reader.error).__name__}: {reader.error}'
    if isinstance(reader.error, video_files.VideoError):
      reason = str(reader.error)
    ending, status = f'error: {source.name} ended early ({reason}); {processed}.', cli.EXIT_ERROR
  elif not reports:
    recogniser = run.recogniser
    ending = (f'error: {source.name} ended after {reader.frames} frames ({reader.seconds:.2f} s), '
              f'before the first window of {recogniser.num_frames} frames at stride '
              f'{recogniser.frame_stride}; nothing was recognised.')
    status = cli.EXIT_ERROR
  else:
    ending = ''
  for line in ([ending] if ending else []) + messages:
    _say(line, sys.stderr)
  frames_per_s = reader.frames / reader.wall_seconds if reader.wall_seconds > 0 else 0.0
  _say(f'encoded={run.recogniser.encoded} reports={reports}')
  _say(f'frames={reader.frames} seconds={reader.seconds:.2f} frames_per_s={frames_per_s:.1f} '
       f'dropped={reader.dropped}')
  return status



def run():
  """The console command har-stream."""
  cli.run(main, define_flags)
