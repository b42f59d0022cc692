"""har_jax entry point: train or evaluate an LRCN action recogniser.

  python main.py --config=configs/synthetic.py --workdir=workdirs/synthetic
  python main.py --config=configs/synthetic.py --workdir=workdirs/synthetic --mode=eval

Config fields can be overridden on the command line, e.g. --config.batch_size=16.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from har_jax import platform
from har_jax import train

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and reports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (and evaluate), or only evaluate.')
flags.DEFINE_string('checkpoint', 'latest', "--mode=eval: 'latest', 'best', 'all' or a step.")
flags.DEFINE_string('split', None, '--mode=eval: the split to evaluate (default: eval_split).')
config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # TF only reads data; keep the accelerators for JAX.
  platform.initialize()
  logging.info('JAX process %d of %d; local devices: %s; global device count %d.',
               jax.process_index(), jax.process_count(), jax.local_devices(), jax.device_count())
  if FLAGS.mode == 'train':
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    from har_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, split=FLAGS.split)


if __name__ == '__main__':
  app.run(main)
