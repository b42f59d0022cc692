r"""Export a trained har_jax checkpoint for serving: a TensorFlow SavedModel, a JAX artifact and
ONNX models.

  python scripts/export.py --workdir=workdirs/synthetic --out=exports/synthetic \
      [--checkpoint=best] [--formats=saved_model,jax,onnx] [--overwrite]

Writes <out>/saved_model (signatures serving_default, encode_frames, classify_features and
class_names), <out>/model.jax (jax.export, serialized StableHLO), with --formats including onnx
<out>/model.onnx, encode_frames.onnx and classify_features.onnx (jax2onnx; `pip install
'.[onnx]' && pip install --no-deps jax2onnx==0.17.1`), <out>/model.json (class
names, input and output shapes, preprocessing, provenance) and <out>/manifest.json (the SHA-256
of every file; har_jax.artifacts.verify checks it). See har_jax/export.py and the README section
"Exporting a model". An existing --out is refused unless --overwrite is given, and then only an
earlier export is replaced. Exit status: 0 on success, 1 with a one-line `error:` otherwise.
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
from har_jax import paths
from har_jax import export

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir (the folder holding checkpoints/).')
flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a checkpoint step.")
flags.DEFINE_string('out', None, 'Folder to create for the export.')
flags.DEFINE_string('formats', ','.join(export.DEFAULT_FORMATS),
                    f'Comma-separated, any of {",".join(export.FORMATS)}.')
flags.DEFINE_bool('overwrite', False, 'Replace --out if it holds an earlier export.')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')
  distributed.quiet_library_logs()
  try:
    metadata = export.export(FLAGS.workdir, FLAGS.out, checkpoint=FLAGS.checkpoint,
                             formats=FLAGS.formats, overwrite=FLAGS.overwrite)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  serving = metadata['signatures']['serving_default']['inputs']['frames']
  print(json.dumps({'out': str(paths.path(FLAGS.out)), 'files': metadata['files'],
                    'step': metadata['source']['step'],
                    'num_classes': len(metadata['class_names']),
                    'serving_default_input': serving}))
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
