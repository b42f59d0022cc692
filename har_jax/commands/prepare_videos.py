r"""Builds TFDS records from your own videos, one folder per class (`video_folder/<name>`).

  har-prepare-videos --source ~/clips --data_dir ~/tensorflow_datasets --name lab

(or python scripts/prepare_video_folder.py with the same flags).

--source: `<root>/<class>/<video>.{avi,mp4,mkv,webm,mov}` (split by --test_fraction, stratified
and deterministic), or `<root>/train/<class>/...` and `<root>/test/<class>/...`; or the first with
UCF101-format split lists (--train_list and/or --test_list; lines '<class>/<file> [label]').
Class names are the sorted class folder names. Videos are decoded with PyAV (no ffmpeg binary),
resized so the short side is --short_side pixels, optionally subsampled to --fps.

Unreadable files are skipped with a warning naming each, and counted at the end. Rerunning the
command after an interruption starts over cleanly (TFDS writes into an `incomplete.*` folder and
renames it when done); rerunning after success does nothing. --overwrite (other settings) checks
the new source first and builds beside the old dataset, which stays readable until the new one
is complete. Then train with
--config.dataset.name=video_folder/<name> --config.dataset.data_dir=<data_dir>.

--frame_index also writes the frame index `frame_index/video_folder/<name>` of the records: the
offset and CRC-32 of every JPEG frame inside the record files, nothing copied. Trained with
--config.dataset.name=frame_index/video_folder/<name>, a clip reads only its own frames instead
of its whole video's record (docs/own_videos.md). Rerun the command that prepared the records,
adding --frame_index: the records are reused, and a current index too.

Exit codes: 0 prepared (or already there); 1 with a one-line `error:` when the source, the split
lists or data_dir cannot be used; 2 for bad flags; 130 after Ctrl-C (one line starting
'interrupted:').
"""

from absl import app
from absl import flags
from absl import logging

from har_jax import cli
from har_jax import preemption
from har_jax.data.prepare import common
from har_jax.data.prepare import frame_store_writer
from har_jax.data.prepare import video_folder

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('source', None, 'Folder of class folders (or of train/ and test/).')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir to write into.')
  flags.DEFINE_string('name', None, "Dataset name: config.dataset.name='video_folder/<name>'.")
  flags.DEFINE_integer('short_side', 128, 'Short side of the stored frames, pixels (0: keep).')
  flags.DEFINE_float('fps', 0.0, 'Store at most this many frames per second (0: every frame).')
  flags.DEFINE_float('test_fraction', 0.2, 'Fraction of each class put in test (no train/ test/ '
                     'folders or lists).')
  flags.DEFINE_string('train_list', '', 'UCF101-format list of training videos (relative paths).')
  flags.DEFINE_string('test_list', '', 'UCF101-format list of test videos (relative paths).')
  flags.DEFINE_integer('split_seed', 0, 'Seed of the --test_fraction split.')
  flags.DEFINE_integer('num_workers', 2, 'Videos decoded in parallel.')
  flags.DEFINE_bool('overwrite', False,
                    'Rebuild a dataset of this name that was prepared with other settings.')
  flags.DEFINE_bool('frame_index', False,
                    'Also write the frame index frame_index/video_folder/<name> of the records, '
                    'which lets a clip read only its own frames from them (nothing is copied).')
  flags.mark_flags_as_required(['source', 'data_dir', 'name'])


def main(argv):
  with preemption.exit_on_interrupt(common.INTERRUPTED):  # Ctrl-C: one line, exit 130.
    _main(argv)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  config = video_folder.VideoFolderConfig(
      name=FLAGS.name, source=FLAGS.source, short_side=FLAGS.short_side, fps=FLAGS.fps,
      test_fraction=FLAGS.test_fraction, train_list=FLAGS.train_list,
      test_list=FLAGS.test_list, split_seed=FLAGS.split_seed, num_workers=FLAGS.num_workers)
  result = video_folder.prepare(config, FLAGS.data_dir, overwrite=FLAGS.overwrite)
  verb = 'Already prepared' if result.reused else 'Prepared'
  print(f'{verb} {result.name}: {result.split_sizes} videos of {len(result.class_names)} '
        f'classes {list(result.class_names)} in {result.data_dir}', flush=True)
  if result.skipped_links:
    print(f'Did not follow {len(result.skipped_links)} directory link(s):', flush=True)
    for name, reason in result.skipped_links:
      print(f'  {name}: it {reason}', flush=True)
  if result.skipped:
    print(f'Skipped {len(result.skipped)} unreadable file(s):', flush=True)
    for name, reason in result.skipped:
      print(f'  {name}: {reason}', flush=True)
  if FLAGS.frame_index:
    index = frame_store_writer.prepare_index(video_folder.load(FLAGS.data_dir, FLAGS.name),
                                             FLAGS.data_dir, result.name)
    verb = 'Already prepared' if index.reused else 'Prepared'
    print(f'{verb} {index.name} in {index.data_dir}', flush=True)
    result = index
  print(f'Train with: python main.py --config=configs/default.py --workdir=workdirs/{FLAGS.name} '
        f'--config.dataset.name={result.name} --config.dataset.data_dir={FLAGS.data_dir}',
        flush=True)


def run():
  """The console command har-prepare-videos."""
  cli.run(main, define_flags)
