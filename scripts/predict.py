r"""Recognise the action in your own video files with a trained har_jax checkpoint.

  python scripts/predict.py --workdir=workdirs/synthetic [--checkpoint=best] [--top_k=5] \
      [--json] video1.avi video2.mp4 ...

Each file is decoded with PyAV and evaluated with exactly the views of the checkpoint's config; the
class names come from the checkpoint. A file that cannot be read is reported by name and skipped.
Exit status: 0 when at least one file was answered, 1 when none was, 2 when the workdir/checkpoint
cannot be used.
"""

import json
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
from har_jax import predict

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir (the folder holding checkpoints/).')
flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a checkpoint step.")
flags.DEFINE_integer('top_k', 5, 'Classes to print per video.')
flags.DEFINE_bool('json', False, 'Print one JSON document instead of text blocks.')
flags.DEFINE_integer('resize_short_side', -1,
                     'Resize frames to this short side before cropping; -1 -> the checkpoint '
                     "config's dataset.resize_size (0 keeps the decoded size).")
flags.mark_flag_as_required('workdir')


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more video files after the flags.')
  tf.config.set_visible_devices([], 'GPU')
  distributed.quiet_library_logs()
  resize = None if FLAGS.resize_short_side < 0 else FLAGS.resize_short_side
  try:
    results = predict.predict_files(paths, FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                                    top_k=FLAGS.top_k, resize_short_side=resize)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for r in results:
    if not r['ok']:
      print(f"error: {r['error']}", file=sys.stderr)
  if FLAGS.json:
    print(json.dumps([{k: v for k, v in r.items() if k != 'logits'} for r in results], indent=2))
  else:
    print('\n\n'.join(predict.format_result(r) for r in results))
  if not any(r['ok'] for r in results):
    print(f'error: none of the {len(results)} file(s) could be read.', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
