"""How TFDS records are read: several files at once, every record once per epoch, exact when asked."""

import collections
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax.data import pipeline
from har_jax.data import tfds_records

NUM_FILES = 4
NUM_VIDEOS = 80  # 20 records per file: more than a block of RECORDS_PER_FILE_BLOCK.


class _ShardedVideos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """NUM_VIDEOS 3-frame 8x8 JPEG videos in NUM_FILES train files; video i is solid grey 3 * i."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'video': tfds.features.Video((None, 8, 8, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(names=['even', 'odd'])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(NUM_VIDEOS):
      frame = tf.io.encode_jpeg(np.full((8, 8, 3), 3 * i, np.uint8), quality=100).numpy()
      yield f'v{i:03d}', {'video': [frame] * 3, 'label': i % 2}


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  builder = _ShardedVideos(data_dir=str(tmp_path_factory.mktemp('sharded_tfds')))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=NUM_FILES))
  assert builder.info.splits['train'].num_shards == NUM_FILES
  return builder


def _config(tiny_config, **overrides):
  settings = {'num_frames': 2, 'frame_stride': 1, 'image_size': 8, 'dataset.resize_size': 0,
              'dataset.train_split': 'train', 'dataset.shuffle_buffer': 1,
              'augment.min_area': 1.0, 'deterministic_data': True}
  settings.update(overrides)
  return tiny_config(**settings)


def _file_of(tfds_id: bytes) -> str:
  return tfds_id.decode().rsplit('__', 1)[0]  # 'ucf-train.tfrecord-00001-of-00004__17'


def test_several_files_are_read_at_once(sharded, tiny_config, monkeypatch):
  read_configs = []
  as_dataset = sharded.as_dataset

  def recording(*args, read_config, **kwargs):
    read_configs.append(read_config)
    return as_dataset(*args, read_config=read_config, **kwargs)

  monkeypatch.setattr(sharded, 'as_dataset', recording)
  ds = tfds_records.read_examples(sharded, 'train', _config(tiny_config), process_index=0,
                              process_count=1, shuffle=True, deterministic=True)
  ids = [ex['tfds_id'] for ex in ds.as_numpy_iterator()]
  (read_config,) = read_configs
  assert read_config.interleave_cycle_length == tfds_records.FILES_READ_AT_ONCE > 1
  assert read_config.num_parallel_calls_for_interleave_files == tf.data.AUTOTUNE
  assert read_config.interleave_block_length == tfds_records.RECORDS_PER_FILE_BLOCK
  # Interleaved: blocks of RECORDS_PER_FILE_BLOCK records from each file in turn, not file after
  # file.
  files = [_file_of(i) for i in ids]
  block = tfds_records.RECORDS_PER_FILE_BLOCK
  assert len(set(files[:block * NUM_FILES])) == NUM_FILES
  assert files[block] != files[0]
  assert collections.Counter(files) == {f: NUM_VIDEOS // NUM_FILES for f in set(files)}


def test_reshard_records_rewrites_a_split_in_n_files_at_a_chosen_size(sharded, tmp_path):
  # benchmarks/reshard_records.py makes the UCF101-sized sets of benchmarks/RESULTS.md.
  root = pathlib.Path(__file__).resolve().parents[1]
  name = f'{sharded.name}/{sharded.version}'
  subprocess.run([sys.executable, str(root / 'benchmarks' / 'reshard_records.py'),
                  sharded.data_dir.rsplit('/' + name, 1)[0], str(tmp_path), '--files=3',
                  '--train_records=100', f'--dataset={sharded.name}'], check=True,
                 capture_output=True)
  out = tfds.builder_from_directory(str(tmp_path / name))
  assert out.info.splits['train'].num_shards == 3
  assert out.info.splits['train'].shard_lengths == [33, 33, 34]
  read = [bytes(r) for r in tf.data.TFRecordDataset(sorted(
      str(p) for p in (tmp_path / name).glob('*train.tfrecord*'))).as_numpy_iterator()]
  original = [bytes(r) for r in tf.data.TFRecordDataset(sorted(
      str(p) for p in pathlib.Path(sharded.data_dir).glob('*train.tfrecord*'))).as_numpy_iterator()]
  assert read == [original[i % NUM_VIDEOS] for i in range(100)]
  assert sum(1 for _ in out.as_dataset(split='train')) == 100


def _batches(builder, config, n, local_batch=8, **kwargs):
  ds = pipeline.create_train_dataset(builder, config, local_batch=local_batch, **kwargs)
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def test_deterministic_data_on_several_files_is_exact_across_epochs_and_resumes(sharded,
                                                                                tiny_config):
  config = _config(tiny_config, **{'dataset.shuffle_buffer': 16})
  steps = NUM_VIDEOS // 8 + 2  # Over an epoch boundary.
  first, second = _batches(sharded, config, steps), _batches(sharded, config, steps)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['tfds_id'], b['tfds_id'])
    np.testing.assert_array_equal(a['video'], b['video'])
  resumed = _batches(sharded, config, 3, start_step=steps - 3)
  for a, b in zip(first[-3:], resumed):
    np.testing.assert_array_equal(a['tfds_id'], b['tfds_id'])
    np.testing.assert_array_equal(a['video'], b['video'])
  # Two processes of 4 see the global batches of one process of 8.
  halves = [_batches(sharded, config, 3, local_batch=4, process_index=p, process_count=2,
                     start_step=steps - 3) for p in range(2)]
  for s in range(3):
    np.testing.assert_array_equal(
        first[steps - 3 + s]['tfds_id'],
        np.concatenate([halves[0][s]['tfds_id'], halves[1][s]['tfds_id']]))


@pytest.mark.parametrize('deterministic,cache,shuffle_buffer',
                         [(True, False, 1), (False, False, 1), (False, True, 1), (False, True, 32)])
def test_each_epoch_reads_every_record_once(sharded, tiny_config, deterministic, cache,
                                            shuffle_buffer):
  """Epochs do not mix, also when the next one is read ahead (non-deterministic) from a cache."""
  config = _config(tiny_config, deterministic_data=deterministic,
                   **{'dataset.cache': cache, 'dataset.shuffle_buffer': shuffle_buffer})
  ids = np.concatenate([b['tfds_id'] for b in _batches(sharded, config, 3 * NUM_VIDEOS // 8)])
  for epoch in (ids[:NUM_VIDEOS], ids[NUM_VIDEOS:2 * NUM_VIDEOS], ids[2 * NUM_VIDEOS:]):
    assert len(set(epoch.tolist())) == NUM_VIDEOS
  assert len({_file_of(i) for i in ids[:NUM_VIDEOS]}) == NUM_FILES
