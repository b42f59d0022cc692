"""Input pipeline on real TFDS records: bad data, per-host shards, eval views."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import augment
from har_jax import errors
from har_jax.data import datasets
from har_jax.data import pipeline
from har_jax.data import tfds_records

_SIZE = 32


def _jpeg(value: int) -> bytes:
  """A solid-grey JPEG frame, so decoded pixels tell which frame they came from."""
  return tf.io.encode_jpeg(np.full((_SIZE, _SIZE, 3), value, np.uint8), quality=95).numpy()


class _VideosWithBadFrames(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Like TFDS ucf101 (JPEG video + label). Label 1 videos have one bad frame of each kind.

  Frame i of every video is solid grey 8 * i. Video 'bad_garbage' has a non-JPEG frame at index 3
  and 'bad_truncated' a truncated JPEG at index 5; with 8-frame clips of 8-frame videos every clip
  touches them.
  """
  VERSION = tfds.core.Version('1.0.0')
  NUM_FRAMES = 8

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'video': tfds.features.Video((None, _SIZE, _SIZE, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(names=['good', 'bad'])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(6), 'test': self._generate_examples(5)}

  def _generate_examples(self, num_good):
    frames = [_jpeg(8 * i) for i in range(self.NUM_FRAMES)]
    for i in range(num_good):
      yield f'good_{i}', {'video': frames, 'label': 'good'}
    garbage = list(frames)
    garbage[3] = b'this is not a jpeg'
    yield 'bad_garbage', {'video': garbage, 'label': 'bad'}
    truncated = list(frames)
    truncated[5] = frames[5][:len(frames[5]) // 2]
    yield 'bad_truncated', {'video': truncated, 'label': 'bad'}


@pytest.fixture(scope='module')
def bad_builder(tmp_path_factory):
  builder = _VideosWithBadFrames(data_dir=str(tmp_path_factory.mktemp('bad_tfds')))
  builder.download_and_prepare()
  return builder


def _config(tiny_config, **overrides):
  defaults = {'num_frames': 8, 'frame_stride': 1, 'image_size': 24, 'dataset.resize_size': 0,
              'dataset.cache': False, 'deterministic_data': True, 'dataset.shuffle_buffer': 1,
              'augment.min_area': 1.0, 'eval.num_clips': 1, 'eval.num_crops': 1}
  defaults.update(overrides)
  return tiny_config(**defaults)


def _file_order_labels(builder, split):
  ds = builder.as_dataset(split=split, decoders={'video': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  return [int(ex['label']) for ex in ds.as_numpy_iterator()]


@pytest.mark.slow
def test_training_skips_and_counts_corrupt_examples(bad_builder, tiny_config):
  config = _config(tiny_config)
  ds = pipeline.create_train_dataset(bad_builder, config, local_batch=2)
  # shuffle_buffer 1 and one shard: the stream is the file order, repeated.
  order = _file_order_labels(bad_builder, 'train')
  assert sorted(order) == [0] * 6 + [1] * 2
  stream = order * 4
  skipped_at = []
  for batch in ds.take(8).as_numpy_iterator():  # 16 good examples: 2 2/3 epochs.
    assert batch['label'].tolist() == [0, 0], 'a corrupt example reached a batch'
    assert batch['video'].shape == (2, 8, 32, 32, 3)  # As stored; the device crops to 24.
    assert augment.apply_to_batch(batch, 24).shape == (2, 8, 24, 24, 3)
    skipped_at.extend(batch['num_skipped'].tolist())
  # Examples are decoded in groups of local_batch (2): the count attached to an example is the
  # number skipped up to the end of its group.
  expected, bad = [], 0
  for start in range(0, len(stream), 2):
    group = stream[start:start + 2]
    bad += sum(group)
    expected += [bad] * (len(group) - sum(group))
  assert skipped_at == expected[:16]
  assert skipped_at[-1] >= 4


@pytest.mark.slow
def test_training_skip_count_in_fast_nondeterministic_mode(bad_builder, tiny_config):
  config = _config(tiny_config, deterministic_data=False, **{'dataset.shuffle_buffer': 16})
  ds = pipeline.create_train_dataset(bad_builder, config, local_batch=2)
  counts = [b['num_skipped'] for b in ds.take(12).as_numpy_iterator()]
  flat = np.concatenate(counts)
  assert np.all(np.diff(flat) >= 0) and flat[-1] >= 4  # 24 good examples = 4 epochs of 6.
  assert 'num_skipped' in pipeline.HOST_ONLY_KEYS


@pytest.mark.slow
def test_training_fails_when_most_examples_are_bad(bad_builder, tiny_config):
  bad = _file_order_labels(bad_builder, 'train').index(1)
  config = _config(tiny_config, **{'dataset.train_split': f'train[{bad}:{bad + 1}]'})
  ds = pipeline.create_train_dataset(bad_builder, config, local_batch=2)
  with pytest.raises(tf.errors.InvalidArgumentError, match='Skipped.*training examples'):
    next(ds.as_numpy_iterator())


@pytest.mark.slow
def test_eval_corrupt_example_is_left_out_and_named(bad_builder, tiny_config):
  """A damaged eval video used to stop evaluation with a raw InvalidArgumentError (27.4): now it
  is masked out, flagged 'damaged' with its tfds_id, and every other video is evaluated."""
  config = _config(tiny_config)
  ids = {ex['tfds_id'].decode(): int(ex['label']) for ex in bad_builder.as_dataset(
      split='test', read_config=tfds.ReadConfig(add_tfds_id=True),
      decoders={'video': tfds.decode.SkipDecoding()}).as_numpy_iterator()}
  bad_ids = sorted(i for i, label in ids.items() if label == 1)
  data = pipeline.create_eval_dataset(bad_builder, config, 'test', local_batch=2)
  batches = list(data.dataset.as_numpy_iterator())
  damaged = np.concatenate([b['damaged'] for b in batches]).astype(bool)
  mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
  names = np.concatenate([b['tfds_id'] for b in batches]).astype(str)
  assert sorted(names[damaged]) == bad_ids and not np.any(mask & damaged)
  assert sorted(names[mask]) == sorted(set(ids) - set(bad_ids))
  # Good examples alone evaluate normally.
  ok = pipeline.create_eval_dataset(bad_builder, config, 'test[:5]', local_batch=2)
  order = _file_order_labels(bad_builder, 'test')[:5]
  if 1 not in order:
    assert len(list(ok.dataset.as_numpy_iterator())) == ok.num_batches


@pytest.mark.slow
def test_eval_views_hold_the_right_frames(bad_builder, tiny_config):
  """2 clips x 3 crops of an 8-frame video, 4 frames at stride 1: clip starts 0 and 4."""
  config = _config(tiny_config, num_frames=4, **{'eval.num_clips': 2, 'eval.num_crops': 3})
  good_ids = [i for i, label in enumerate(_file_order_labels(bad_builder, 'test')) if not label]
  split = f'test[{good_ids[0]}:{good_ids[0] + 1}]'
  batch = next(pipeline.create_eval_dataset(bad_builder, config, split, local_batch=1)
               .dataset.as_numpy_iterator())
  video = batch['video'][0].astype(int)  # [6 views, 4, 24, 24, 3]
  assert video.shape == (6, 4, 24, 24, 3)
  means = video.mean(axis=(2, 3, 4))
  for view in range(6):
    clip = view // 3
    np.testing.assert_allclose(means[view], 8 * (4 * clip + np.arange(4)), atol=2)


def _eval_ids(builder, config, split, process_index, process_count, local_batch):
  data = pipeline.create_eval_dataset(builder, config, split, local_batch=local_batch,
                                      process_index=process_index, process_count=process_count)
  ids, batches = [], 0
  for batch in data.dataset.as_numpy_iterator():
    batches += 1
    ids += [i.decode() for i, m in zip(batch['tfds_id'], batch['mask']) if m]
  assert batches == data.num_batches
  return ids, data


@pytest.mark.slow
@pytest.mark.parametrize('split', ['test[:13]', 'train[75%:]'])
def test_two_processes_read_disjoint_shards_covering_the_split(tiny_config, split):
  config = tiny_config(**{'eval.num_clips': 1, 'eval.num_crops': 1})
  builder = datasets.get_builder(config.dataset)
  ids0, data0 = _eval_ids(builder, config, split, 0, 2, 4)
  ids1, data1 = _eval_ids(builder, config, split, 1, 2, 4)
  total = datasets.num_examples(builder, split)
  assert data0.num_batches == data1.num_batches and data0.num_examples == total
  assert not set(ids0) & set(ids1)
  reference = {ex['tfds_id'].decode() for ex in builder.as_dataset(
      split=split, read_config=tfds.ReadConfig(add_tfds_id=True),
      decoders={'video': tfds.decode.SkipDecoding()}).as_numpy_iterator()}
  assert set(ids0) | set(ids1) == reference and len(ids0) + len(ids1) == total


def test_two_processes_train_shards_are_disjoint(tiny_config):
  config = tiny_config()
  builder = datasets.get_builder(config.dataset)
  shards = []
  for index in range(2):
    ds = tfds_records.read_examples(builder, 'train', config, process_index=index, process_count=2,
                                shuffle=True, deterministic=True)
    shards.append({ex['tfds_id'].decode() for ex in ds.as_numpy_iterator()})
  assert not shards[0] & shards[1]
  assert len(shards[0] | shards[1]) == datasets.num_examples(builder, 'train')


def test_truncated_record_file_is_a_clear_error(tiny_config, tmp_path):
  """tf.data cannot skip a damaged TFRecord file (ignore_errors loops), so it is a clear error."""
  config = tiny_config(**{'eval.num_clips': 1, 'eval.num_crops': 1})
  copy = tmp_path / 'copy'
  shutil.copytree(datasets.get_builder(config.dataset).data_dir, copy)
  records = sorted(f for f in os.listdir(copy) if 'test.tfrecord' in f)
  for record in records:
    os.truncate(copy / record, os.path.getsize(copy / record) * 2 // 3)
  builder = tfds.builder_from_directory(str(copy))
  data = pipeline.create_eval_dataset(builder, config, 'test', local_batch=4)
  with pytest.raises(errors.UserError, match='truncated or corrupt.*prepare_ucf101'):
    list(pipeline.device_iterator(data.dataset))


@pytest.mark.slow
def test_deterministic_batches_do_not_depend_on_topology_and_resume_exactly(tiny_config):
  """Global batch s = f(seed, s): 1 process x 8 == 2 processes x 4, and start_step skips exactly."""
  from har_jax.data import datasets as datasets_lib  # pylint: disable=g-import-not-at-top
  from har_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(deterministic_data=True)
  builder = datasets_lib.get_builder(config.dataset)

  def batches(process_index, process_count, local_batch, start_step=0, n=3):
    ds = pipeline_lib.create_train_dataset(
        builder, config, local_batch=local_batch, process_index=process_index,
        process_count=process_count, start_step=start_step)
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]

  single = batches(0, 1, 8)
  halves = [batches(p, 2, 4) for p in range(2)]
  for s in range(3):
    np.testing.assert_array_equal(
        single[s]['video'], np.concatenate([halves[0][s]['video'], halves[1][s]['video']]))
    np.testing.assert_array_equal(
        single[s]['label'], np.concatenate([halves[0][s]['label'], halves[1][s]['label']]))
  resumed = batches(1, 2, 4, start_step=2, n=1)[0]
  np.testing.assert_array_equal(resumed['video'], halves[1][2]['video'])
