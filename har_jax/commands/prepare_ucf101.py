r"""Builds TFDS UCF101 records from a UCF101 copy you already have. Downloads nothing.

  har-prepare-ucf101 --source ~/data/ucf101 --data_dir ~/tensorflow_datasets --config ucf101_1_256

(or python scripts/prepare_ucf101.py with the same flags).

--source: a folder holding the extracted `UCF-101/` (from UCF101.rar; or `UCF101/` from the TFDS
zip) and `ucfTrainTestlist/` (from UCF101TrainTestSplits-RecognitionTask.zip), or a folder holding
those zip files, or the zip files themselves (comma separated). Zips are read in place.

--config: ucf101_1_256 (frames scaled to 256x256, as har_jax's configs expect), ucf101_1, ucf101_2
or ucf101_3 (full size), exactly as the stock TFDS configs.

--variant ucf101 writes records the stock TFDS reader reads (`ucf101/<config>`); --variant
ucf101_meta adds per-video 'name', 'group', 'clip', 'num_frames', 'fps' features and group counts,
which lets config.dataset.val_split hold out whole UCF101 groups (`ucf101_meta/<config>`).

--short_side N writes the compact, random-access frame store `ucf101_frames/sN` instead
(har_jax/data/frame_store.py): every video once, frames with the short side at N pixels and the
aspect kept (171x128 at 128), one record per frame, so a clip reads only its own frames; the
splits of all three official splits are 'train1', 'test1', ..., 'test3'. Train on it with
configs/ucf101_frames.py. --config and --variant do not apply to it. The store records its
source: a rerun from the same source reuses it; another source is refused (naming both) unless
--overwrite, which checks the new source first and replaces the store only once the new one is
complete.

  har-prepare-ucf101 --source ~/data/ucf101 --data_dir ~/tensorflow_datasets --short_side 128

--frame_index also writes the frame index `frame_index/<variant>/<config>` of the records
(har_jax/data/frame_store.py): the byte offset and CRC-32 of every JPEG frame inside the record
files, ~16 bytes per frame, nothing copied. Trained with
--config.dataset.name=frame_index/ucf101/ucf101_1_256, a clip reads only its own frames from the
stock records, as from a frame store, instead of reading, checksumming and parsing its whole
video (docs/speed.md). Without --source it indexes records already prepared in --data_dir, including
ones built by `tfds build ucf101`; a rerun reuses an index that still matches its records.

  har-prepare-ucf101 --frame_index --data_dir ~/tensorflow_datasets --config ucf101_1_256

Needs ffmpeg (not for --frame_index alone). TFDS shows progress bars per split. An interrupted
run leaves no readable partial dataset (TFDS writes into an `incomplete.*` folder and renames it
at the end); rerun the same command to start that config over. A finished dataset is detected
and left alone.

Exit codes: 0 prepared (or already there); 1 with a one-line `error:` when the source or data_dir
cannot be used; 2 for bad flags or flags that do not combine; 130 after Ctrl-C (one line starting
'interrupted:').
"""

from absl import app
from absl import flags
from absl import logging

from har_jax import cli
from har_jax import preemption
from har_jax.data.prepare import common
from har_jax.data.prepare import ucf101

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list('source', None, 'UCF101 folder(s) and/or zip file(s).')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir to write into.')
  flags.DEFINE_list('config', ['ucf101_1_256'], f'One or more of {ucf101.CONFIG_NAMES}.')
  flags.DEFINE_enum('variant', 'ucf101', sorted(ucf101.BUILDERS), 'Which builder to write.')
  flags.DEFINE_bool('allow_missing', False,
                    'Build without videos that the split lists name but the copy lacks.')
  flags.DEFINE_integer('short_side', 0,
                       'N > 0: write the frame store ucf101_frames/sN (short side N pixels, aspect '
                       'kept) instead of TFDS records.')
  flags.DEFINE_integer('num_shards', 0,
                       'N > 0: write N record files per split (default: TFDS chooses by size, one '
                       'file under 128 MiB). Not for --short_side.')
  flags.DEFINE_integer('num_workers', 4, '--short_side: videos extracted in parallel.')
  flags.DEFINE_bool('overwrite', False, '--short_side: rebuild a frame store made from another '
                    'source (the old one is replaced once the new one is complete).')
  flags.DEFINE_bool('frame_index', False,
                    'Also write the frame index frame_index/<variant>/<config> of the records, '
                    'which lets a clip read only its own frames from them (nothing is copied). '
                    'Without --source: index records already prepared in --data_dir.')
  flags.mark_flags_as_required(['data_dir'])


def main(argv):
  with preemption.exit_on_interrupt(common.INTERRUPTED):  # Ctrl-C: one line, exit 130.
    _main(argv)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.short_side and (FLAGS['config'].present or FLAGS['variant'].present
                           or FLAGS.num_shards):
    raise app.UsageError('--short_side writes the frame store of all three splits; do not '
                         'combine it with --config, --variant or --num_shards.')
  if FLAGS.overwrite and not FLAGS.short_side:
    raise app.UsageError('--overwrite applies to the frame store (--short_side) only.')
  if FLAGS.short_side and FLAGS.frame_index:
    raise app.UsageError('--frame_index indexes TFDS records; the frame store of --short_side '
                         'reads single frames already.')
  if not FLAGS.source and not FLAGS.frame_index:
    raise app.UsageError('--source is required (the UCF101 folder or zips), unless '
                         '--frame_index indexes records already prepared in --data_dir.')
  if not FLAGS.source and (FLAGS.allow_missing or FLAGS.num_shards):
    raise app.UsageError('--allow_missing and --num_shards apply to building records from '
                         '--source.')
  logging.set_verbosity(logging.INFO)
  if FLAGS.short_side:
    result = ucf101.prepare_frames(FLAGS.source, FLAGS.data_dir, FLAGS.short_side,
                                   allow_missing=FLAGS.allow_missing,
                                   num_workers=FLAGS.num_workers, overwrite=FLAGS.overwrite)
    verb = 'Already prepared' if result.reused else 'Prepared'
    print(f'{verb} {result.name}: {result.split_sizes} in {result.data_dir}\n'
          f'  train with --config=configs/ucf101_frames.py '
          f'--config.dataset.name={result.name} --config.dataset.data_dir={FLAGS.data_dir}\n'
          '  (split N of 3: --config.dataset.train_split=trainN '
          '--config.dataset.eval_split=testN)', flush=True)
    return
  for config in FLAGS.config:
    if FLAGS.source:
      result = ucf101.prepare(FLAGS.source, FLAGS.data_dir, config, variant=FLAGS.variant,
                              allow_missing=FLAGS.allow_missing, num_shards=FLAGS.num_shards)
      if FLAGS.frame_index:
        _print_result(result)
    if FLAGS.frame_index:
      result = ucf101.prepare_frame_index(FLAGS.data_dir, config, variant=FLAGS.variant)
    _print_result(result)


def _print_result(result):
  verb = 'Already prepared' if result.reused else 'Prepared'
  print(f'{verb} {result.name}: {result.split_sizes} in {result.data_dir}\n'
        f'  train with --config.dataset.name={result.name} '
        f'--config.dataset.data_dir={FLAGS.data_dir}', flush=True)


def run():
  """The console command har-prepare-ucf101."""
  cli.run(main, define_flags)
