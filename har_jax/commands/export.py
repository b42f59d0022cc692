r"""Export a trained har_jax checkpoint for serving: a TensorFlow SavedModel, a JAX artifact and
ONNX models.

  har-export --workdir=workdirs/synthetic --out=exports/synthetic \
      [--checkpoint=best] [--formats=saved_model,jax,onnx] [--overwrite]

(or python scripts/export.py with the same flags). Writes <out>/saved_model (signatures
serving_default, encode_frames, classify_features and class_names), <out>/model.jax (jax.export,
serialized StableHLO), with --formats including onnx <out>/model.onnx, encode_frames.onnx and
classify_features.onnx (jax2onnx; `pip install '.[onnx]' && pip install --no-deps
jax2onnx==0.17.1`, which scripts/setup.sh does), <out>/model.json (class names, input and output
shapes, preprocessing, provenance) and <out>/manifest.json (the SHA-256 of every file;
har_jax.artifacts.verify checks it). See har_jax/export.py and docs/export.md. An existing --out
is refused unless --overwrite is given, and then only an earlier export is replaced. Exit codes:
0 on success, printing one JSON line; 1 with a one-line `error:` when the export cannot be made;
2 for bad flags.
"""

import json

from absl import app
from absl import flags
import tensorflow as tf

from har_jax import cli
from har_jax import distributed
from har_jax import export as export_lib
from har_jax import paths

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir', None, 'Training workdir (the folder holding checkpoints/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a checkpoint step.")
  flags.DEFINE_string('out', None, 'Folder to create for the export.')
  flags.DEFINE_string('formats', ','.join(export_lib.DEFAULT_FORMATS),
                      f'Comma-separated, any of {",".join(export_lib.FORMATS)}.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it holds an earlier export.')
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')
  distributed.quiet_library_logs()
  metadata = export_lib.export(FLAGS.workdir, FLAGS.out, checkpoint=FLAGS.checkpoint,
                               formats=FLAGS.formats, overwrite=FLAGS.overwrite)
  serving = metadata['signatures']['serving_default']['inputs']['frames']
  print(json.dumps({'out': str(paths.path(FLAGS.out)), 'files': metadata['files'],
                    'step': metadata['source']['step'],
                    'num_classes': len(metadata['class_names']),
                    'serving_default_input': serving}))


def run():
  """The console command har-export."""
  cli.run(main, define_flags)
