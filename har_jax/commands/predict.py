r"""Recognise the action in your own video files with a trained har_jax checkpoint.

  har-predict --workdir=workdirs/synthetic [--checkpoint=best] [--top_k=5] [--json] \
      video1.avi video2.mp4 ...

(or python scripts/predict.py with the same arguments). Each file is decoded with PyAV and
evaluated with exactly the views of the checkpoint's config; the class names come from the
checkpoint. A file that cannot be read is reported by name and skipped. Exit codes: 0 when at
least one file was answered; 1 when none was, or when the workdir/checkpoint cannot be used;
2 for bad flags or no file given.
"""

import json
import sys

from absl import app
from absl import flags
import tensorflow as tf

from har_jax import cli
from har_jax import distributed
from har_jax import predict as predict_lib

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir', None, 'Training workdir (the folder holding checkpoints/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a checkpoint step.")
  flags.DEFINE_integer('top_k', 5, 'Classes to print per video.')
  flags.DEFINE_bool('json', False, 'Print one JSON document instead of text blocks.')
  flags.DEFINE_integer('resize_short_side', -1,
                       'Resize frames to this short side before cropping; -1 -> the checkpoint '
                       "config's dataset.resize_size (0 keeps the decoded size).")
  flags.mark_flag_as_required('workdir')


def main(argv) -> int:
  videos = argv[1:]
  if not videos:
    raise app.UsageError('Give one or more video files after the flags.')
  tf.config.set_visible_devices([], 'GPU')
  distributed.quiet_library_logs()
  resize = None if FLAGS.resize_short_side < 0 else FLAGS.resize_short_side
  results = predict_lib.predict_files(videos, FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                                      top_k=FLAGS.top_k, resize_short_side=resize)
  for r in results:
    if not r['ok']:
      print(f"error: {r['error']}", file=sys.stderr)
  if FLAGS.json:
    print(json.dumps([{k: v for k, v in r.items() if k != 'logits'} for r in results], indent=2))
  else:
    print('\n\n'.join(predict_lib.format_result(r) for r in results))
  if not any(r['ok'] for r in results):
    print(f'error: none of the {len(results)} file(s) could be read.', file=sys.stderr)
    return cli.EXIT_ERROR
  return cli.EXIT_OK


def run():
  """The console command har-predict."""
  cli.run(main, define_flags)
