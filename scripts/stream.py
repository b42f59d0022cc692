r"""Recognise actions in a stream: a camera, a network stream, a pipe or a long video file.

  python scripts/stream.py --workdir=workdirs/synthetic [--checkpoint=best] SOURCE \
      [--every=1] [--smooth=0] [--threshold=0] [--top_k=3] [--live=auto] \
      [--max_delay=0.5] [--conv_impl=xla] [--timeline=out.json] [--plot=out.png]

SOURCE: a video file; a camera, /dev/video0 or its index 0 (Linux); a URL FFmpeg reads (rtsp://,
http://, udp://...); '-' for a video piped into stdin (ffmpeg ... -f matroska - | stream.py -).

Each frame at the checkpoint's frame stride is encoded once; the LSTM runs over the last
num_frames encoded frames. Every --every seconds of video it prints the time and the top-k
classes (or that nothing is recognised, when the top probability is below --threshold). A live
source (cameras, network streams, pipes; --live overrides) is never fallen behind: a frame that
has waited more than --max_delay seconds for the model while newer ones arrived is dropped and
counted. The last line is

  frames=<n> seconds=<video seconds> frames_per_s=<frames per wall-clock second> dropped=<n>

Ctrl-C stops it, prints that summary and writes the timeline so far. Exit status: 0; 1 when the
source cannot be read, ends early (what was processed is reported and written) or ends before
the first window; 2 when the workdir/checkpoint cannot be used; 130 after Ctrl-C.
"""

import os
import sys

from absl import app
from absl import flags
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from har_jax import cli
from har_jax import distributed
from har_jax import errors
from har_jax import paths
from har_jax import inference
from har_jax import streaming
from har_jax.data import video_files
from har_jax.data import video_sources

FLAGS = flags.FLAGS
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
flags.DEFINE_float('max_delay', 0.5, 'Live sources: seconds a frame may wait for the model while '
                   'newer ones arrive; older ones are dropped.', lower_bound=0.0)
flags.DEFINE_enum('conv_impl', 'xla', ['', 'auto', 'xla', 'cpu'],
                  "The encoder's convolutions ('' = the checkpoint's, 'auto' on a CPU = the 'cpu' "
                  "kernels made for training's gradients). Plain 'xla' gives the same values and "
                  'is about 2x faster for ResNet-18 at one frame per call on a CPU (README '
                  '"Streaming recognition"); on GPU/TPU the checkpoint\'s \'auto\' is \'xla\' too.')
flags.DEFINE_string('timeline', '', 'Write {"class_names", "times", "probabilities"} JSON here.')
flags.DEFINE_string('plot', '', 'Draw the probabilities of the top classes over time (PNG).')
flags.DEFINE_integer('plot_classes', 5, 'Classes drawn by --plot.', lower_bound=1)
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Give exactly one SOURCE after the flags (a file, a camera, a URL or -).')
  for flag in ('timeline', 'plot'):
    folder = paths.path(FLAGS[flag].value).parent if FLAGS[flag].value else None
    if folder and not paths.is_url(folder) and not folder.is_dir():
      print(f'error: --{flag}={FLAGS[flag].value}: folder {folder} does not exist.',
            file=sys.stderr)
      return 1
  tf.config.set_visible_devices([], 'GPU')
  distributed.quiet_library_logs()
  try:
    model = inference.load(FLAGS.workdir, FLAGS.checkpoint)
    recogniser = streaming.Recogniser(model, conv_impl=FLAGS.conv_impl or None)
    recogniser.warm_up()
    live = {'auto': None, 'yes': True, 'no': False}[FLAGS.live]
    print(f'model ready; opening {argv[1]}', file=sys.stderr, flush=True)
    source = video_sources.open_source(argv[1], live=live)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1 if isinstance(e, video_files.VideoError) else 2
  except KeyboardInterrupt:
    print('interrupted before the stream started.', file=sys.stderr)
    return 130
  print(_describe(source, recogniser, model.step), flush=True)
  reader = video_sources.FrameReader(source.frames(), live=source.live, keep=recogniser.keeps,
                                     frame_rate=source.frame_rate, max_delay=FLAGS.max_delay)
  run = streaming.StreamRun(recogniser, every=FLAGS.every, smooth=FLAGS.smooth,
                            on_report=lambda time, p: print(streaming.format_report(
                                time, p, recogniser.class_names, top_k=FLAGS.top_k,
                                threshold=FLAGS.threshold), flush=True))
  interrupted = False
  try:
    for index, time, frame in reader:
      run.feed(index, time, frame)
  except KeyboardInterrupt:
    interrupted = True
  finally:
    reader.close()
  return _finish(source, reader, run, interrupted)


def _describe(source, recogniser, step) -> str:
  stream, rate = source.stream, source.frame_rate
  span = (recogniser.num_frames - 1) * recogniser.frame_stride + 1
  window = f' = {span / rate:.2f} s' if rate else ''
  return (f'{source.name}: {source.kind}, {stream.width}x{stream.height} at '
          f'{f"{rate:g} fps" if rate else "an unknown frame rate"}'
          f'{", live: late frames are dropped" if source.live else ""}. Checkpoint step {step}: '
          f'{recogniser.num_frames} frames at stride {recogniser.frame_stride} (a window of '
          f'{span} frames{window}).')


def _finish(source, reader, run, interrupted: bool) -> int:
  """Reports how the stream ended, writes the timeline and plot, prints the summary line."""
  status = 0
  reports = len(run.timeline.times)
  processed = (f'processed {reader.frames} frames ({reader.seconds:.2f} s of video), '
               f'{reports} report(s)')
  if interrupted:
    print(f'interrupted: {processed}.', file=sys.stderr)
    status = 130
  elif reader.error is not None:
    reason = f'{type(reader.error).__name__}: {reader.error}'
    if isinstance(reader.error, video_files.VideoError):
      reason = str(reader.error)
    print(f'error: {source.name} ended early ({reason}); {processed}.', file=sys.stderr)
    status = 1
  elif not reports:
    recogniser = run.recogniser
    print(f'error: {source.name} ended after {reader.frames} frames ({reader.seconds:.2f} s), '
          f'before the first window of {recogniser.num_frames} frames at stride '
          f'{recogniser.frame_stride}; nothing was recognised.', file=sys.stderr)
    status = 1
  for path, write in ((FLAGS.timeline, run.timeline.write),
                      (FLAGS.plot, lambda p: run.timeline.plot(
                          p, num_classes=FLAGS.plot_classes, threshold=FLAGS.threshold,
                          title=f'{source.name}: top classes over time'))):
    if path:
      try:
        write(path)
        print(f'wrote {path} ({reports} report(s))', file=sys.stderr)
      except OSError as e:
        print(f'error: cannot write {path}: {e}', file=sys.stderr)
        status = status or 1
  print(f'encoded={run.recogniser.encoded} reports={reports}', flush=True)
  frames_per_s = reader.frames / reader.wall_seconds if reader.wall_seconds > 0 else 0.0
  print(f'frames={reader.frames} seconds={reader.seconds:.2f} frames_per_s={frames_per_s:.1f} '
        f'dropped={reader.dropped}', flush=True)
  return status


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
