"""Train or evaluate an LRCN action recogniser (har-train; python main.py).

  har-train --config=configs/synthetic.py --workdir=workdirs/synthetic
  har-train --config=configs/synthetic.py --workdir=workdirs/synthetic --mode=eval

Config fields can be overridden on the command line, e.g. --config.batch_size=16. Exit codes:
0 done, or stopped by Ctrl-C or SIGTERM after saving a checkpoint (rerun the command to resume);
1 a bad config, dataset, checkpoint or workdir (one line `error: ...`); 2 a bad flag or config
override; 130 a second Ctrl-C, or one before training starts (exits at once).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from har_jax import cli
from har_jax import distributed
from har_jax import hostmem
from har_jax import preemption
from har_jax import train as train_lib
from har_jax.evaluation import checkpoint_eval

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and reports.')
  flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (and evaluate), or only evaluate.')
  flags.DEFINE_string('checkpoint', 'latest', "--mode=eval: 'latest', 'best', 'all' or a step.")
  flags.DEFINE_string('split', None, '--mode=eval: the split to evaluate (default: eval_split).')
  flags.DEFINE_string('coordinator_address', None,
                      'Several processes: host:port of process 0 (else auto-detected on TPU pods, '
                      'SLURM and Open MPI, or read from $HAR_JAX_COORDINATOR).')
  flags.DEFINE_integer('num_processes', None, 'Several processes: how many in total.')
  flags.DEFINE_integer('process_id', None, 'Several processes: this one, 0..num_processes-1.')
  flags.DEFINE_integer('distributed_timeout', 300,
                       'Seconds to wait for all processes to join before failing.')
  config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module).',
                                  lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # TF only reads data; keep the accelerators for JAX.
  with preemption.exit_on_interrupt():  # Ctrl-C exits at once; the train loop saves first.
    distributed.initialize(distributed.DistributedSpec.from_env(
        coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id, timeout_s=FLAGS.distributed_timeout))
    logging.info('JAX devices: %s', jax.devices())
    logging.info('%s', hostmem.status())
    if FLAGS.mode == 'train':
      train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      checkpoint_eval.evaluate(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                               split=FLAGS.split,
                               config_name=config_flags.get_config_filename(FLAGS['config']))


def run():
  """The console command har-train."""
  cli.run(main, define_flags)
