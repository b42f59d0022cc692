"""Frame stores: one random-access record per frame; global batches from (seed, step) alone."""

import io
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax.data import datasets
from har_jax.data import frame_store
from har_jax.data import pipeline
from har_jax.data import tfds_records
from har_jax.data.prepare import frame_store_writer
import conftest

NUM_TRAIN, NUM_TEST, FRAMES = 40, 20, 8  # The tiny synthetic set: 8 frames of 32x32 per video.
CLIP = 4  # Frames per clip in the tiny config.


@pytest.fixture
def store_config(tiny_config, synthetic_frames):
  def make(**overrides):
    config = tiny_config(**overrides)
    config.dataset.name = synthetic_frames
    return config
  return make


def test_store_holds_the_tfds_frames_byte_for_byte(tiny_config, synthetic_frames):
  config = tiny_config()
  records = datasets.get_builder(config.dataset)
  config.dataset.name = synthetic_frames
  store = datasets.get_builder(config.dataset)
  assert isinstance(store, frame_store.FrameStore)
  assert store.split_sizes == {'train': NUM_TRAIN, 'test': NUM_TEST}
  assert store.frame_size == (32, 32) == datasets.static_frame_size(records)
  assert datasets.get_info(store).class_names == datasets.get_info(records).class_names
  reader = frame_store.Reader(store)
  ds = records.as_dataset(split='test', decoders=tfds_records.jpeg_decoders(),
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  rows = store.split_rows('test')
  for row, example in zip(rows, ds.as_numpy_iterator()):
    assert store.videos['name'][row] == example['tfds_id'].decode()
    assert store.videos['label'][row] == example['label']
    frames = reader.read(tf.constant(row), tf.range(FRAMES)).numpy()
    assert list(frames) == list(example['video'])
  assert reader.records_read == NUM_TEST * FRAMES
  assert reader.bytes_read == sum(len(j) for ex in ds.as_numpy_iterator() for j in ex['video'])


def test_split_slices_follow_tfds_and_unknown_splits_are_named(store_config):
  store = datasets.get_builder(store_config().dataset)
  train = store.split_rows('train')
  np.testing.assert_array_equal(store.split_rows('train[:25%]'), train[:10])
  np.testing.assert_array_equal(store.split_rows('train[10:12]'), train[10:12])
  assert datasets.num_examples(store, 'train[75%:]') == 10
  with pytest.raises(errors.UserError, match=r"'valid'.*\['test', 'train'\]"):
    datasets.num_examples(store, 'valid')


def _batches(config, process_index, process_count, local_batch, steps, start_step=0):
  store = datasets.get_builder(config.dataset)
  ds = pipeline.create_train_dataset(store, config, local_batch=local_batch,
                                     process_index=process_index, process_count=process_count,
                                     start_step=start_step)
  return [b for _, b in zip(range(steps), ds.as_numpy_iterator())]


@pytest.mark.slow
def test_global_batches_depend_on_seed_and_step_only(store_config):
  """1 process x 8 == 2 processes x 4, step by step; a resume at step 3 continues exactly."""
  config = store_config(deterministic_data=True)
  single = _batches(config, 0, 1, 8, steps=6)
  halves = [_batches(config, p, 2, 4, steps=6) for p in range(2)]
  for step in range(6):
    for key in ('video', 'label', 'crop', 'flip', 'tfds_id'):
      np.testing.assert_array_equal(
          single[step][key], np.concatenate([halves[0][step][key], halves[1][step][key]]),
          err_msg=f'{key} of step {step}')
  resumed = _batches(config, 1, 2, 4, steps=3, start_step=3)
  for step in range(3):
    np.testing.assert_array_equal(resumed[step]['video'], halves[1][step + 3]['video'])
  assert _batches(store_config(seed=1, deterministic_data=True), 0, 1, 8, steps=1)[0][
      'tfds_id'].tolist() != single[0]['tfds_id'].tolist()


@pytest.mark.slow
def test_each_process_reads_its_share_of_every_epoch(store_config):
  """Two epochs of a 2-process run: each process reads half the clips of each epoch, and
  exactly their frames: NUM_TRAIN / 2 clips x CLIP records per epoch."""
  config = store_config()
  steps_per_epoch = NUM_TRAIN // 8
  for epoch in range(2):
    seen = []
    for p in range(2):
      batches = _batches(config, p, 2, 4, steps=steps_per_epoch,
                         start_step=epoch * steps_per_epoch)
      ids = [i for b in batches for i in b['tfds_id']]
      assert sum(int(np.sum(b['read_records'])) for b in batches) == NUM_TRAIN // 2 * CLIP
      assert len(set(ids)) == len(ids) == NUM_TRAIN // 2
      seen.append(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == NUM_TRAIN


@pytest.mark.slow
def test_tfds_records_with_deterministic_data_are_all_read_by_every_process(tiny_config):
  """The contrast: with TFDS records each process reads the whole split (P records per clip)."""
  config = tiny_config(deterministic_data=True)
  batches = _batches(config, 1, 2, 4, steps=NUM_TRAIN // 8)
  assert sum(int(np.sum(b['read_records'])) for b in batches) == NUM_TRAIN


@pytest.mark.slow
def test_eval_covers_every_video_exactly_once_across_processes(store_config):
  config = store_config(**{'eval.num_clips': 2, 'eval.num_crops': 3})
  store = datasets.get_builder(config.dataset)
  ids, num_batches = [], set()
  for p in range(3):
    data = pipeline.create_eval_dataset(store, config, 'test', local_batch=4, process_index=p,
                                        process_count=3)
    batches = list(data.dataset.as_numpy_iterator())
    num_batches.add(len(batches))
    assert batches[0]['video'].shape == (4, 6, 4, 28, 28, 3)
    ids += [i.decode() for b in batches for i, m in zip(b['tfds_id'], b['mask']) if m]
  assert len(num_batches) == 1 and data.num_examples == NUM_TEST
  assert sorted(ids) == sorted(store.videos['name'][store.split_rows('test')])


def _jpeg(value):
  buffer = io.BytesIO()
  Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buffer, format='JPEG')
  return buffer.getvalue()


@pytest.fixture
def bad_store(tmp_path):
  """Videos of 4 solid-grey frames; 'bad' has a truncated frame 2."""
  writer = frame_store_writer.Writer(str(tmp_path / 'bad_frames' / 'v1'), name='bad_frames/v1',
                              class_names=['good', 'bad'], settings={})
  good = [_jpeg(40 * i) for i in range(4)]
  bad = list(good)
  bad[2] = bad[2][:len(bad[2]) // 2]
  rows = [writer.add_video(good, label=0, name=f'good_{i}') for i in range(5)]
  rows.append(writer.add_video(bad, label=1, name='bad'))
  writer.add_split('train', rows)
  writer.add_split('test', rows)
  writer.finish()
  return tmp_path


@pytest.mark.slow
def test_bad_frames_are_skipped_in_training_and_named_in_evaluation(tiny_config, bad_store,
                                                                     capfd):
  config = tiny_config(num_frames=4, image_size=16, deterministic_data=True,
                       **{'dataset.name': 'bad_frames/v1', 'dataset.data_dir': str(bad_store),
                          'dataset.resize_size': 0})
  store = datasets.get_builder(config.dataset)
  batches = _batches(config, 0, 1, 2, steps=6)  # 12 good clips: at least 2 epochs of 6 videos.
  assert all(b['label'].tolist() == [0, 0] for b in batches)
  assert batches[-1]['num_skipped'][-1] >= 1
  data = pipeline.create_eval_dataset(store, config, 'test', local_batch=2)
  batches = list(data.dataset.as_numpy_iterator())
  damaged = np.concatenate([b['damaged'] for b in batches]).astype(bool)
  names = np.concatenate([b['tfds_id'] for b in batches]).astype(str)
  assert names[damaged].tolist() == ['bad']
  assert np.concatenate([b['mask'] for b in batches]).sum() == 5
  # One line per damaged video and use, never a traceback (27.8: one per skip, 104 in 60 steps).
  err = capfd.readouterr().err
  assert err.count('Skipping damaged training example bad:') == 1, err[-3000:]
  assert err.count("Skipping damaged video of split 'test' bad:") == 1, err[-3000:]
  assert 'Traceback' not in err and 'CRC' not in err, err[-3000:]


def test_interrupted_write_leaves_nothing_readable(tmp_path):
  path = str(tmp_path / 'x' / 'y')
  writer = frame_store_writer.Writer(path, name='x/y', class_names=['a'], settings={})
  writer.add_video([_jpeg(0)], label=0, name='v')
  assert not frame_store.exists(path)  # Not finished: nothing at `path`.
  assert frame_store_writer.remove_incomplete(path) and not os.listdir(tmp_path / 'x')
  with pytest.raises(errors.UserError, match='label 3'):
    frame_store_writer.Writer(path, name='x/y', class_names=['a'], settings={}).add_video(
        [_jpeg(0)], label=3, name='v')


def test_replacing_a_store_keeps_it_until_the_new_one_is_in(tmp_path, monkeypatch):
  path = str(tmp_path / 'x' / 'y')

  def write(names, replace=False):
    writer = frame_store_writer.Writer(path, name='x/y', class_names=['a'], settings={})
    writer.add_split('train', [writer.add_video([_jpeg(0)], label=0, name=n) for n in names])
    return writer.finish(replace=replace)

  write(['old'])
  with pytest.raises(errors.UserError, match='appeared while writing'):
    write(['new'])
  frame_store_writer.remove_incomplete(path)
  assert list(write(['new'], replace=True).videos['name']) == ['new']
  assert os.listdir(tmp_path / 'x') == ['y']
  # A crash between the two renames: the old store waits in y.replaced-*; the next start puts it
  # back, and deletes it once a store is at `path`.
  monkeypatch.setattr(frame_store_writer.shutil, 'rmtree', lambda *args, **kwargs: None)
  write(['newer'], replace=True)
  monkeypatch.undo()
  [replaced] = [d for d in os.listdir(tmp_path / 'x') if d.startswith('y.replaced-')]
  os.rename(tmp_path / 'x' / 'y', tmp_path / 'x' / 'lost')
  frame_store_writer.remove_incomplete(path)
  assert list(frame_store.FrameStore(path).videos['name']) == ['new']
  assert sorted(os.listdir(tmp_path / 'x')) == ['lost', 'y']


def test_missing_or_damaged_store_files_are_clear_errors(bad_store, tiny_config):
  config = tiny_config(**{'dataset.name': 'bad_frames/v1', 'dataset.data_dir': str(bad_store)})
  folder = bad_store / 'bad_frames' / 'v1'
  frames = next(f for f in os.listdir(folder) if f.endswith('.bin'))
  os.rename(folder / frames, folder / 'moved')
  with pytest.raises(errors.UserError, match=f'incomplete.*{frames}'):
    datasets.get_builder(config.dataset)
  os.rename(folder / 'moved', folder / frames)
  (folder / frame_store.INFO_FILE).write_text('{"format": "something else"}')
  with pytest.raises(errors.UserError, match='not a version-1'):
    datasets.get_builder(config.dataset)
  config.dataset.name = 'ucf101_frames/s64'
  with pytest.raises(errors.UserError, match='prepare_ucf101.py.*--short_side 64'):
    datasets.get_builder(config.dataset)


# Frame indexes: frame stores whose frames stay in TFDS record files.


def _index(records_dir, name='frame_index/synthetic_actions/tiny'):
  config = conftest.make_tiny_config(records_dir)
  builder = datasets.get_builder(config.dataset)
  path = os.path.join(str(records_dir), name)
  return frame_store_writer.index_records(builder, path, name=name), config


@pytest.fixture
def copied_records(tmp_path, synthetic_data_dir):
  """A copy of the tiny synthetic records (tests here change its files)."""
  shutil.copytree(synthetic_data_dir / 'synthetic_actions', tmp_path / 'synthetic_actions')
  return tmp_path


def test_frame_index_reads_the_records_frames_in_place(copied_records):
  store, config = _index(copied_records)
  records = datasets.get_builder(config.dataset)
  assert store.split_sizes == {'train': NUM_TRAIN, 'test': NUM_TEST}
  assert store.indexed_records == records.info.full_name
  assert not [f for f in os.listdir(store.path) if f.endswith('.bin')]  # Nothing copied.
  assert all(f.startswith('../../../synthetic_actions/') for f in store.info['files'])
  config.dataset.name = datasets.frame_index_name('synthetic_actions/tiny')
  assert isinstance(datasets.get_builder(config.dataset), frame_store.FrameStore)
  reader = frame_store.Reader(store)
  ds = records.as_dataset(split='test', decoders=tfds_records.jpeg_decoders(),
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  for row, example in zip(store.split_rows('test'), ds.as_numpy_iterator(), strict=True):
    assert store.videos['name'][row] == example['tfds_id'].decode()
    assert store.videos['label'][row] == example['label']
    assert list(reader.read(tf.constant(row), tf.range(FRAMES)).numpy()) == list(example['video'])

  # Evaluation through the index is evaluation through the records, view for view.
  config.eval.num_clips, config.eval.num_crops = 2, 3
  through = {}
  for dataset in (records, store):
    data = pipeline.create_eval_dataset(dataset, config, 'test', local_batch=4)
    through[type(dataset)] = list(data.dataset.as_numpy_iterator())
  for a, b in zip(*through.values(), strict=True):
    for key in ('video', 'label', 'mask', 'tfds_id'):
      np.testing.assert_array_equal(a[key], b[key])


def test_frame_index_refuses_changed_or_damaged_records(copied_records):
  store, config = _index(copied_records, 'frame_index/copy')
  record_file = store.file_path(0)
  size = os.path.getsize(record_file)
  with open(record_file, 'ab') as f:  # The records were rebuilt, or the file grew.
    f.write(b'\0' * 16)
  config.dataset.name = 'frame_index/copy'
  with pytest.raises(errors.UserError, match=f'{record_file} is {size + 16} bytes, {size} when.*'
                     'rebuild the index of synthetic_actions/tiny.*--frame_index'):
    datasets.get_builder(config.dataset)
  with open(record_file, 'r+b') as f:
    f.truncate(size)
  store = datasets.get_builder(config.dataset)
  # A frame changed in place fails its CRC-32 when read, as in any frame store.
  offset = int(store.frames['offset'][store.videos['first'][0]])
  with open(record_file, 'r+b') as f:
    f.seek(offset + 20)
    byte = f.read(1)
    f.seek(offset + 20)
    f.write(bytes([byte[0] ^ 0xFF]))
  files, frames = store.videos['file_index'][:1], store.videos['first'][:1, None]
  assert not frame_store.Reader(store).read_numpy(files, frames)[1]
  # Indexing checks every record's CRC-32C: a damaged file is named, and nothing is written.
  with pytest.raises(errors.UserError, match=f'{record_file} is truncated or corrupt'):
    _index(copied_records, 'frame_index/again')
  assert not os.path.exists(copied_records / 'frame_index' / 'again')
  # A folder in the index's place that is not an index is left alone, and named.
  os.makedirs(copied_records / 'frame_index' / 'other' / 'yours')
  with pytest.raises(errors.UserError, match='holds no frame index.*move it away'):
    _index(copied_records, 'frame_index/other')
  assert os.path.isdir(copied_records / 'frame_index' / 'other' / 'yours')


def test_bytes_feature_spans_follow_the_wire_format():
  video = [b'', b'\xff\xd8 first', b'x' * 300]  # A 300-byte value has a 2-byte length.
  example = tf.train.Example(features=tf.train.Features(feature={
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
      'fps': tf.train.Feature(float_list=tf.train.FloatList(value=[25.0])),
      'name': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'video'])),
      'video': tf.train.Feature(bytes_list=tf.train.BytesList(value=video))})).SerializeToString()
  spans = frame_store_writer.bytes_feature_spans(example, 'video')
  assert [example[a:a + n] for a, n in spans] == video
  assert [example[a:a + n] for a, n in frame_store_writer.bytes_feature_spans(
      example, 'name')] == [b'video']
  assert frame_store_writer.bytes_feature_spans(example, 'missing') == []
  with pytest.raises(ValueError, match='runs past'):
    frame_store_writer.bytes_feature_spans(example[:-5], 'video')


def test_a_missing_frame_index_names_the_command(tmp_path, tiny_config):
  config = tiny_config(**{'dataset.name': 'frame_index/ucf101_meta/ucf101_2',
                          'dataset.data_dir': str(tmp_path)})
  with pytest.raises(errors.UserError, match='prepare_ucf101.py --frame_index --data_dir .* '
                     '--config ucf101_2 --variant ucf101_meta'):
    datasets.get_builder(config.dataset)
  config.dataset.name = 'frame_index/video_folder/lab'
  with pytest.raises(errors.UserError, match='prepare_video_folder.py --source <your folder> '
                     '--data_dir .* --name lab <its other flags> --frame_index'):
    datasets.get_builder(config.dataset)
  config.dataset.name = 'frame_index/synthetic_actions/tiny'
  with pytest.raises(errors.UserError, match='written for UCF101 records.*and video folders'):
    datasets.get_builder(config.dataset)
