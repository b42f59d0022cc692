r"""Rewrites stock UCF101 records (--dataset, default ucf101/ucf101_1_256) in another number of
files, optionally at UCF101's size, for the input benchmarks.

  python benchmarks/reshard_records.py SRC_DATA_DIR DST_DATA_DIR --files=8
  python benchmarks/reshard_records.py /tmp/rec/one /tmp/rec/ucfsize --files=64 --train_records=9536

Every split is written in --files files, record for record (the records' bytes are unchanged).
With --train_records, the train split instead holds that many records, the source's repeated in
order: TFDS writes UCF101's real train split 1 (9,537 videos at ~892 KB, 8.5 GB) in ~64 files of
~149 records, and the generated sets have a few dozen videos, so a benchmark on them opens a file
every few records where the real set opens one every ~149. Repeated records cost what distinct
ones cost to read, parse and decode. The split's dataset_info.json lengths are rewritten to match.
"""

import json

from absl import app
from absl import flags
import tensorflow as tf

from har_jax import cli
from har_jax import paths

FLAGS = flags.FLAGS
flags.DEFINE_integer('files', 8, 'Files per split.')
flags.DEFINE_integer('train_records', None, 'Records of the train split (default: as in SRC).')
flags.DEFINE_string('dataset', 'ucf101/ucf101_1_256', 'TFDS name/config of the records.')


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('usage: reshard_records.py SRC_DATA_DIR DST_DATA_DIR [--files=N] '
                         '[--train_records=N] [--dataset=NAME/CONFIG]')
  infos = sorted(paths.path(argv[1]).glob(f'{FLAGS.dataset}/*/dataset_info.json'))
  if not infos:
    raise SystemExit(f'No {FLAGS.dataset} records under {argv[1]}: prepare them first '
                     '(scripts/prepare_ucf101.py, see benchmarks/RESULTS.md).')
  src = infos[-1].parent
  dst = paths.path(argv[2]) / src.relative_to(paths.path(argv[1]))
  dst.mkdir(parents=True, exist_ok=True)
  info = json.loads(src.joinpath('dataset_info.json').read_text())
  for name in src.iterdir():
    if '.tfrecord-' not in name.name and name.name != 'dataset_info.json':
      dst.joinpath(name.name).write_bytes(name.read_bytes())
  files = FLAGS.files
  for split in info['splits']:
    prefix = f"{info['name']}-{split['name']}.tfrecord"
    records = list(tf.data.TFRecordDataset(
        sorted(str(p) for p in src.glob(f'{prefix}-*'))).as_numpy_iterator())
    total = FLAGS.train_records if FLAGS.train_records and split['name'] == 'train' else len(
        records)
    bounds = [total * i // files for i in range(files + 1)]
    num_bytes = 0
    for i in range(files):
      with tf.io.TFRecordWriter(str(dst / f'{prefix}-{i:05d}-of-{files:05d}')) as writer:
        for r in range(bounds[i], bounds[i + 1]):
          record = records[r % len(records)]
          writer.write(record)
          num_bytes += len(record)
    split['shardLengths'] = [str(bounds[i + 1] - bounds[i]) for i in range(files)]
    split['numBytes'] = str(num_bytes)
    print(f"{split['name']}: {total} records ({len(records)} distinct) in {files} files, "
          f'{num_bytes / 2**20:.0f} MiB', flush=True)
  dst.joinpath('dataset_info.json').write_text(json.dumps(info, indent=2))
  print(f'{dst}: written')


if __name__ == '__main__':
  cli.run(main)
