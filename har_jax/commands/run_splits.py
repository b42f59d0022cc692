r"""The UCF101 three-split protocol: train and test splits 1-3, with a frame-average baseline.

  har-run-splits --config=configs/ucf101_frames.py --workdir_root=workdirs/splits \
      --config.dataset.data_dir=$HOME/tensorflow_datasets

(or python scripts/run_splits.py with the same flags).

Trains and tests the config on each official split, then the same recipe with the LSTM removed
(the frame-average baseline: features averaged over time, no recurrence), on identical pipelines,
and writes `<workdir_root>/splits.md` and `splits.json`: video top-1 per split and mean ± std
(sample std over the splits), per model, and their difference (see har_jax/splits.py).

--dataset=frames reads the frame store named by config.dataset.name (prepare_ucf101.py
--short_side N; splits train1/test1 ... train3/test3); --dataset=stock the TFDS records
ucf101/ucf101_1, ucf101_2, ucf101_3 (prepare_ucf101.py --config ucf101_1,ucf101_2,ucf101_3). By
default, frames when config.dataset.name is a frame store, else stock.

Config overrides pass through (--config.num_train_steps=...). Rerunning the same command skips
the runs that finished (reading their results) and resumes an interrupted one from its
checkpoints. Exit codes: 0 done (or stopped by Ctrl-C or preemption after saving; it says so);
1 with a one-line `error:` for a bad config or missing records; 2 for bad flags.
"""

import datetime
import os
import platform
import shlex
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import tensorflow as tf

from har_jax import cli
from har_jax import distributed
from har_jax import paths
from har_jax import preemption
from har_jax import splits as splits_lib

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir_root', None, 'Folder for the runs (<model>/split<k>) and the table.')
  flags.DEFINE_enum('dataset', None, list(splits_lib.DATASETS),
                    'stock: TFDS records ucf101/ucf101_<k>; frames: the frame store of '
                    'config.dataset.name. Default: frames if config.dataset.name is a frame store.')
  flags.DEFINE_list('splits', ['1', '2', '3'], 'Official splits to run.')
  flags.DEFINE_bool('baseline', True, 'Also train and test the frame-average baseline.')
  config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module).',
                                  lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir_root'])


def _splits() -> list[int]:
  try:
    return [int(s) for s in FLAGS.splits]
  except ValueError:
    raise app.UsageError(
        f'--splits={",".join(FLAGS.splits)}: use numbers from 1, 2, 3.') from None


def _command_line() -> str:
  """This command as typed: 'har-run-splits ...' or 'python scripts/run_splits.py ...'."""
  program = sys.argv[0]
  program = f'python {program}' if program.endswith('.py') else os.path.basename(program)
  return ' '.join([program] + [shlex.quote(arg) for arg in sys.argv[1:]])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  split_numbers = _splits()
  tf.config.set_visible_devices([], 'GPU')  # TF only reads data; keep the accelerators for JAX.
  with preemption.exit_on_interrupt():  # Ctrl-C exits at once; the train loop saves first.
    distributed.initialize()
    meta = {
        'config': config_flags.get_config_filename(FLAGS['config']),
        'command': _command_line(),
        'started': datetime.datetime.now().isoformat(timespec='seconds'),
        'machine': f'{platform.node()}: {jax.device_count()} x {jax.devices()[0].device_kind}, '
                   f'{os.cpu_count()} host CPUs',
    }
    summary = splits_lib.run(FLAGS.config, FLAGS.workdir_root, splits=split_numbers,
                             dataset=FLAGS.dataset, baseline=FLAGS.baseline, meta=meta)
  if summary['paths']:
    print(paths.read_text(summary['paths'][1]), flush=True)
  if summary['preempted']:
    print('Interrupted; run the same command to resume.', flush=True)


def run():
  """The console command har-run-splits."""
  cli.run(main, define_flags)
