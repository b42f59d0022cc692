"""UCF101 from a local copy: fake layout, prepare_ucf101, group validation, errors, training."""

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax import train
from har_jax.data import datasets
from har_jax.data import pipeline
from har_jax.data import tfds_records
from har_jax.data.prepare import ucf101
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('ApplyEyeMakeup', 'HandstandPushups')
GROUPS = (1, 8, 9, 10)  # Split 1: g01 test; g08-g10 train.
NUM_FRAMES = 10

pytestmark = pytest.mark.skipif(not shutil.which('ffmpeg'),
                                reason='needs ffmpeg (apt-get install -y ffmpeg)')


make_fake_ucf101 = conftest.load_script('make_fake_ucf101')


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A fake UCF101 copy: 8 videos of 10 frames of 64x48, the official layout plus the zips."""
  out = tmp_path_factory.mktemp('ucf101_source')
  make_fake_ucf101.make_fake_ucf101(str(out), classes=CLASSES, groups=GROUPS, clips=1,
                                    frames=NUM_FRAMES, width=64, height=48, zips=True)
  zips = tmp_path_factory.mktemp('ucf101_zips')
  for name in ('UCF101_videos.zip', 'UCF101TrainTestSplits-RecognitionTask.zip'):
    os.rename(out / name, zips / name)
  return {'folder': str(out), 'zips': str(zips)}


@pytest.fixture(scope='module')
def meta_dir(source, tmp_path_factory):
  """ucf101_meta/ucf101_1 (full size) built in-process from the two zip files."""
  data_dir = str(tmp_path_factory.mktemp('meta_tfds'))
  result = ucf101.prepare(source['zips'], data_dir, 'ucf101_1', variant='ucf101_meta')
  assert result.split_sizes == {'train': 6, 'test': 2} and not result.reused
  return data_dir


def test_fake_ucf101_has_the_official_layout(source):
  root = source['folder']
  lists = os.path.join(root, 'ucfTrainTestlist')
  class_ind = open(os.path.join(lists, 'classInd.txt'), newline='').read()
  assert class_ind.startswith('1 ApplyEyeMakeup\r\n') and '37 HandstandPushups\r\n' in class_ind
  assert len(class_ind.splitlines()) == 101
  train = open(os.path.join(lists, 'trainlist01.txt')).read().split()
  assert 'HandstandPushups/v_HandStandPushups_g08_c01.avi' in train and '37' in train
  assert open(os.path.join(lists, 'testlist01.txt')).read().split() == [
      'ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi',
      'HandstandPushups/v_HandStandPushups_g01_c01.avi']
  assert 'v_HandStandPushups_g10_c01.avi' in os.listdir(
      os.path.join(root, 'UCF-101', 'HandstandPushups'))
  video = os.path.join(root, 'UCF-101', 'ApplyEyeMakeup', 'v_ApplyEyeMakeup_g09_c01.avi')
  with av.open(video) as c:
    frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
  assert len(frames) == NUM_FRAMES and frames[0].shape == (48, 64, 3)
  assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 5  # It moves.
  names = zipfile.ZipFile(os.path.join(source['zips'], 'UCF101_videos.zip')).namelist()
  assert 'UCF101/v_HandstandPushups_g08_c01.avi' in names  # The TFDS zip's spelling.


def test_reversal_motion_pairs_differ_only_in_time_order(tmp_path):
  """--motion reversal: with the same seed, the odd class of a pair is the even one played
  backwards; the stretch to 4:3 keeps every rendered column; more than 6 classes is refused."""
  forward = make_fake_ucf101.render_reversal_video(2, seed=7, num_frames=6, width=64, height=48)
  backward = make_fake_ucf101.render_reversal_video(3, seed=7, num_frames=6, width=64, height=48)
  assert forward.shape == (6, 48, 64, 3) and forward.dtype == np.uint8
  np.testing.assert_array_equal(backward, forward[::-1])
  assert np.abs(forward[-1].astype(int) - forward[0]).mean() > 1  # It changes over time.
  other_pair = make_fake_ucf101.render_reversal_video(4, seed=7, num_frames=6, width=64, height=48)
  assert not np.array_equal(other_pair, forward)
  with pytest.raises(ValueError, match='at most 6 classes'):
    make_fake_ucf101.make_fake_ucf101(
        str(tmp_path), classes=make_fake_ucf101.ucf101_class_names()[:7], motion='reversal')
  assert make_fake_ucf101.parse_groups('1,3-5,8') == [1, 3, 4, 5, 8]


@pytest.mark.slow
def test_prepare_script_then_train_end_to_end(source, tmp_path):
  """The acceptance path: prepare_ucf101.py on the official layout, then configs/default.py."""
  data_dir = str(tmp_path / 'tfds')
  command = [sys.executable, os.path.join(REPO, 'scripts', 'prepare_ucf101.py'),
             f'--source={source["folder"]}', f'--data_dir={data_dir}', '--config=ucf101_1_256']
  run = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Prepared ucf101/ucf101_1_256: {'train': 6, 'test': 2}" in run.stdout

  builder = tfds.builder('ucf101/ucf101_1_256', data_dir=data_dir)  # The stock TFDS reader.
  examples = list(builder.as_dataset(split='train').as_numpy_iterator())
  assert {ex['video'].shape for ex in examples} == {(NUM_FRAMES, 256, 256, 3)}
  names = builder.info.features['label'].names
  assert sorted({names[ex['label']] for ex in examples}) == sorted(CLASSES)

  config = _load_default_config()
  config.dataset.data_dir = data_dir
  config.model.encoder, config.model.lstm_size = 'small_cnn', 16
  config.num_frames, config.frame_stride, config.image_size = 4, 2, 32
  config.dataset.resize_size = 40
  config.batch_size = config.eval.batch_size = 4
  config.eval.num_clips, config.eval.num_crops = 2, 1
  config.num_train_steps, config.warmup_steps = 2, 1
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  final = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert final['num_videos'] == 2 and np.isfinite(final['loss'])

  assert ucf101.prepare(source['folder'], data_dir, 'ucf101_1_256').reused

  # The frame index of those records, written without the source; training reads it.
  index = subprocess.run(command[:2] + [f'--data_dir={data_dir}', '--frame_index'],
                         capture_output=True, text=True, timeout=600)
  assert index.returncode == 0, index.stderr[-3000:]
  assert ("Prepared frame_index/ucf101/ucf101_1_256: {'test': 2, 'train': 6}"
          in index.stdout), index.stdout
  config.dataset.name = 'frame_index/ucf101/ucf101_1_256'
  store = datasets.get_builder(config.dataset)
  assert store.indexed_records == builder.info.full_name and store.frame_size == (256, 256)
  assert datasets.frame_geometry(store) == datasets.frame_geometry(builder)
  final = train.train_and_evaluate(config, str(tmp_path / 'workdir_index'))
  assert final['num_videos'] == 2 and np.isfinite(final['loss'])
  assert ucf101.prepare_frame_index(data_dir, 'ucf101_1_256').reused
  no_source = subprocess.run(command[:2] + [f'--data_dir={data_dir}'], capture_output=True,
                             text=True, timeout=600)
  assert no_source.returncode == 2 and '--source is required' in no_source.stderr
  shards = subprocess.run(command[:2] + [f'--data_dir={data_dir}', '--frame_index',
                                         '--num_shards=2'], capture_output=True, text=True,
                          timeout=600)
  assert shards.returncode == 2 and 'apply to building records from --source' in shards.stderr


def _load_default_config(name='default'):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.slow
def test_prepare_frames_then_train_with_a_group_validation_split(source, tmp_path):
  """prepare_ucf101.py --short_side: one frame store for the three splits, short side 32 px with
  the aspect kept (64x48 -> 43x32), trained with configs/ucf101_frames.py."""
  data_dir = str(tmp_path / 'data')
  command = [sys.executable, os.path.join(REPO, 'scripts', 'prepare_ucf101.py'),
             f'--source={source["zips"]}', f'--data_dir={data_dir}', '--short_side=32',
             '--num_workers=2']
  run = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert ("Prepared ucf101_frames/s32: {'train1': 6, 'test1': 2, 'train2': 2, 'test2': 6, "
          "'train3': 8, 'test3': 0}") in run.stdout
  assert '--config.dataset.name=ucf101_frames/s32' in run.stdout

  config = _load_default_config('ucf101_frames')
  config.dataset.name, config.dataset.data_dir = 'ucf101_frames/s32', data_dir
  store = datasets.get_builder(config.dataset)
  assert store.frame_size == (32, 43) and len(store.class_names) == 101
  rows = store.split_rows('train1')
  assert sorted(store.videos['group'][rows]) == [8, 8, 9, 9, 10, 10]
  assert set(store.videos['num_frames']) == {NUM_FRAMES}
  assert np.allclose(store.videos['fps'], 25.0)
  quirk = list(store.videos['name']).index('v_HandStandPushups_g08_c01')
  assert store.class_names[store.videos['label'][quirk]] == 'HandstandPushups'

  config.model.encoder, config.model.lstm_size = 'small_cnn', 16
  config.num_frames, config.frame_stride, config.image_size = 4, 2, 28
  config.dataset.resize_size, config.dataset.val_split = 32, 0.34
  config.batch_size = config.eval.batch_size = 4
  config.eval.num_clips, config.eval.num_crops = 2, 3
  config.num_train_steps, config.warmup_steps = 2, 1
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  assert datasets.num_examples(store, datasets.resolve_split(config.dataset, 'val')) == 2
  final = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert final['num_videos'] == 2 and np.isfinite(final['loss'])

  rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0 and 'Already prepared ucf101_frames/s32' in rerun.stdout
  other = [c for c in command if not c.startswith('--source=')] + [f'--source={source["folder"]}']
  refused = subprocess.run(other, capture_output=True, text=True, timeout=600)
  errors_printed = [line for line in refused.stderr.splitlines() if line.startswith('error: ')]
  assert refused.returncode == 1 and len(errors_printed) == 1, refused.stderr[-3000:]
  assert 'made with other settings' in errors_printed[0] and '--overwrite' in errors_printed[0]
  assert 'Traceback' not in refused.stderr
  mixed = subprocess.run(command + ['--config=ucf101_1'], capture_output=True, text=True,
                         timeout=600)
  assert mixed.returncode == 2 and 'do not combine it with --config' in mixed.stderr


def test_meta_variant_from_zips_has_names_groups_and_counts(meta_dir):
  config = _load_default_config()
  config.dataset.name, config.dataset.data_dir = 'ucf101_meta/ucf101_1', meta_dir
  builder = datasets.get_builder(config.dataset)
  assert builder.info.metadata['group_counts'] == {'train': {'8': 2, '9': 2, '10': 2},
                                                   'test': {'1': 2}}
  labels = builder.info.features['label'].names
  examples = list(builder.as_dataset(split='train', decoders={
      'video': tfds.decode.SkipDecoding()}).as_numpy_iterator())
  by_name = {ex['name'].decode(): ex for ex in examples}
  quirk = by_name['v_HandStandPushups_g08_c01']
  assert labels[quirk['label']] == 'HandstandPushups' and quirk['group'] == 8
  assert quirk['clip'] == 1 and quirk['num_frames'] == NUM_FRAMES == len(quirk['video'])
  assert quirk['fps'] == pytest.approx(25.0)
  assert sorted(ex['group'] for ex in examples) == [8, 8, 9, 9, 10, 10]

  # Its frame index keeps the names and groups: validation by group works on it too.
  result = ucf101.prepare_frame_index(meta_dir, 'ucf101_1', variant='ucf101_meta')
  assert result.name == 'frame_index/ucf101_meta/ucf101_1' and not result.reused
  config.dataset.name, config.dataset.val_split = result.name, 0.34
  store = datasets.get_builder(config.dataset)
  rows = store.split_rows('train')
  assert sorted(store.videos['name'][rows]) == sorted(by_name)
  assert sorted(store.videos['group'][rows]) == [8, 8, 9, 9, 10, 10]
  val_split = datasets.resolve_split(config.dataset, 'val')
  assert val_split == 'train|val_groups=0.34' and datasets.num_examples(store, val_split) == 2


@pytest.mark.slow
def test_group_validation_split_holds_out_whole_groups(meta_dir, tiny_config):
  config = tiny_config(**{'dataset.name': 'ucf101_meta/ucf101_1', 'dataset.data_dir': meta_dir,
                          'dataset.val_split': 0.34, 'eval.num_clips': 1, 'eval.num_crops': 1})
  builder = datasets.get_builder(config.dataset)
  train_split = datasets.resolve_split(config.dataset, 'train')
  val_split = datasets.resolve_split(config.dataset, 'val')
  assert (train_split, val_split) == ('train|train_groups=0.34', 'train|val_groups=0.34')
  assert datasets.num_examples(builder, train_split) == 4
  assert datasets.num_examples(builder, val_split) == 2
  group_of = {ex['tfds_id'].decode(): int(ex['group']) for ex in builder.as_dataset(
      split='train', read_config=tfds.ReadConfig(add_tfds_id=True),
      decoders={'video': tfds.decode.SkipDecoding()}).as_numpy_iterator()}

  val_ids = []
  for index in range(2):
    data = pipeline.create_eval_dataset(builder, config, val_split, local_batch=1,
                                        process_index=index, process_count=2)
    assert data.num_batches == 1 and data.num_examples == 2
    val_ids.append([i.decode() for b in data.dataset.as_numpy_iterator()
                    for i, m in zip(b['tfds_id'], b['mask']) if m])
  assert len(val_ids[0]) == len(val_ids[1]) == 1 and val_ids[0] != val_ids[1]
  assert {group_of[i] for i in val_ids[0] + val_ids[1]} == {10}

  train_groups = set()
  for index in range(2):
    ds = tfds_records.read_examples(builder, train_split, config, process_index=index,
                                process_count=2, shuffle=True, deterministic=True)
    train_groups |= {int(ex['group']) for ex in ds.as_numpy_iterator()}
  assert train_groups == {8, 9}
  batch = next(pipeline.create_train_dataset(builder, config, local_batch=2).as_numpy_iterator())
  assert batch['video'].shape[0] == 2


def test_val_split_without_groups_warns_and_splits_by_percent(tiny_config, caplog, monkeypatch):
  config = tiny_config(**{'dataset.val_split': 0.25})
  caplog.set_level(logging.WARNING)
  monkeypatch.setattr(datasets, '_WARNED_PLAIN_VAL_SPLIT', set())
  assert datasets.resolve_split(config.dataset, 'val') == 'train[75%:]'
  assert datasets.resolve_split(config.dataset, 'train') == 'train[:75%]'
  assert caplog.text.count('no UCF101 group information') == 1  # Once per run, not per call.


def test_interrupted_prepare_leaves_nothing_readable_and_rerun_completes(source, tmp_path,
                                                                         monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  calls = []
  original = ucf101.LocalUcf101._example  # pylint: disable=protected-access

  def dies_on_third(self, class_name, file_name):
    calls.append(file_name)
    if len(calls) == 3:
      raise KeyboardInterrupt('simulated interruption')
    return original(self, class_name, file_name)

  monkeypatch.setattr(ucf101.LocalUcf101, '_example', dies_on_third)
  with pytest.raises(KeyboardInterrupt):
    ucf101.prepare(source['folder'], data_dir, 'ucf101_2')
  monkeypatch.setattr(ucf101.LocalUcf101, '_example', original)
  config_dir = os.path.join(data_dir, 'ucf101', 'ucf101_2')
  assert not os.path.exists(os.path.join(config_dir, '2.0.0', 'dataset_info.json'))
  config = _load_default_config()
  config.dataset.name, config.dataset.data_dir = 'ucf101/ucf101_2', data_dir
  with pytest.raises(errors.UserError, match='not prepared'):
    datasets.get_builder(config.dataset)

  stale = os.path.join(config_dir, 'incomplete.ABC123_2.0.0')  # As a SIGKILLed run leaves it.
  os.makedirs(stale)
  result = ucf101.prepare(source['folder'], data_dir, 'ucf101_2')
  # Split 2 tests on groups 8-14: g01 trains.
  assert result.split_sizes == {'train': 2, 'test': 6} and not os.path.exists(stale)
  assert datasets.get_builder(config.dataset).info.splits['test'].num_examples == 6
  assert ucf101.prepare(source['folder'], data_dir, 'ucf101_2').reused


def test_frame_store_from_another_source_is_refused_or_rebuilt(source, tmp_path):
  """A frame store records its source: another source is refused in one line naming both, unless
  overwrite, which checks the new source first and replaces the old store only once complete."""
  other = str(tmp_path / 'other')
  make_fake_ucf101.make_fake_ucf101(other, classes=CLASSES, groups=(1, 8), clips=1,
                                    frames=NUM_FRAMES, width=64, height=48)
  data_dir = str(tmp_path / 'data')
  first = ucf101.prepare_frames(source['folder'], data_dir, 16, num_workers=2)
  assert first.split_sizes['train1'] == 6 and not first.reused
  assert ucf101.prepare_frames(source['folder'], data_dir, 16).reused

  with pytest.raises(errors.UserError) as refused:
    ucf101.prepare_frames(other, data_dir, 16)
  message = str(refused.value)
  assert '\n' not in message and source['folder'] in message and other in message
  assert '--overwrite' in message
  with pytest.raises(errors.UserError, match='does not exist'):
    ucf101.prepare_frames(other + 'x', data_dir, 16, overwrite=True)
  store_dir = os.path.join(data_dir, ucf101.FRAMES_NAME)
  assert os.listdir(store_dir) == ['s16']
  assert ucf101.prepare_frames(source['folder'], data_dir, 16).split_sizes['train1'] == 6

  rebuilt = ucf101.prepare_frames(other, data_dir, 16, overwrite=True, num_workers=2)
  assert rebuilt.split_sizes['train1'] == 2 and not rebuilt.reused
  assert os.listdir(store_dir) == ['s16']
  assert ucf101.prepare_frames(other, data_dir, 16).reused


def test_missing_ffmpeg_is_a_clear_error(source, tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))  # A PATH without ffmpeg.
  with pytest.raises(errors.UserError, match='ffmpeg was not found.*apt-get install'):
    ucf101.prepare(source['folder'], str(tmp_path / 'tfds'), 'ucf101_1')


def test_source_errors_say_what_is_wrong(source, tmp_path):
  with pytest.raises(errors.UserError, match='does not exist'):
    ucf101.UcfSource(str(tmp_path / 'nowhere'))
  rar = tmp_path / 'UCF101.rar'
  rar.write_bytes(b'Rar!')
  with pytest.raises(errors.UserError, match='unrar x'):
    ucf101.UcfSource(str(rar))
  with pytest.raises(errors.UserError, match='No UCF101 split lists'):
    ucf101.UcfSource(os.path.join(source['folder'], 'UCF-101'))
  with pytest.raises(errors.UserError, match='unknown|Unknown UCF101 config'):
    ucf101.prepare(source['folder'], str(tmp_path), 'ucf101_9')

  partial = ucf101.UcfSource([os.path.join(source['folder'], 'ucfTrainTestlist'),
                              os.path.join(source['folder'], 'UCF-101', 'ApplyEyeMakeup')])
  strict = ucf101.LocalUcf101(config='ucf101_1', data_dir=str(tmp_path), source=partial)
  with pytest.raises(errors.UserError, match='3 of 6 videos.*--allow_missing'):
    strict._available_entries('train')  # pylint: disable=protected-access
  lenient = ucf101.LocalUcf101(config='ucf101_1', data_dir=str(tmp_path), source=partial,
                               allow_missing=True)
  assert len(lenient._available_entries('train')) == 3  # pylint: disable=protected-access


def test_dataset_name_errors(tmp_path):
  config = _load_default_config()
  config.dataset.data_dir = str(tmp_path)
  config.dataset.name = 'ucf101/ucf101_9'
  with pytest.raises(errors.UserError, match="Unknown UCF101 config 'ucf101_9'.*ucf101_1_256"):
    datasets.get_builder(config.dataset)
  config.dataset.name = 'ucf101_meta/ucf101_1_256'
  with pytest.raises(errors.UserError, match='not prepared.*prepare_ucf101.py.*ucf101_meta'):
    datasets.get_builder(config.dataset)


def _small_copy(folder):
  make_fake_ucf101.make_fake_ucf101(str(folder), classes=CLASSES, groups=(1, 8), clips=1,
                                    frames=6, width=32, height=24)
  return str(folder)


def test_an_unreadable_split_list_is_one_line_naming_it(tmp_path):
  """Issue 27.10: a split list that cannot be read (not UTF-8, a dangling link) was a
  UnicodeDecodeError / FileNotFoundError traceback."""
  root = _small_copy(tmp_path / 'copy')
  lists = os.path.join(root, 'ucfTrainTestlist')
  train = os.path.join(lists, 'trainlist01.txt')
  with open(train, 'wb') as f:
    f.write(b'\xff\xfe not text\n')
  with pytest.raises(errors.UserError) as raised:
    ucf101.UcfSource(root)
  message = str(raised.value)
  assert '\n' not in message and train in message and 'UTF-8' in message, message
  os.remove(train)
  os.symlink(str(tmp_path / 'gone.txt'), train)
  with pytest.raises(errors.UserError, match=f'{train}.*cannot be read.*No such file'):
    ucf101.UcfSource(root)
  os.remove(train)
  zipped = str(tmp_path / 'splits.zip')
  with zipfile.ZipFile(zipped, 'w') as archive:
    archive.writestr('ucfTrainTestlist/trainlist01.txt', b'\xff\xfe not text\n')
  with pytest.raises(errors.UserError, match=f'ucfTrainTestlist/trainlist01.txt in {zipped}'):
    ucf101.UcfSource([root, zipped])


def test_an_unreadable_video_in_stock_records_is_one_line_naming_it(tmp_path):
  """Issue 27.10: a zero-byte .avi built into TFDS records gave 2 tracebacks (ffmpeg's
  CalledProcessError, then TFDS's 'Failed to encode example'); the frame store names the file
  in one line, and so do the records now (both variants), leaving no readable dataset."""
  root = _small_copy(tmp_path / 'copy')
  empty = os.path.join(root, 'UCF-101', 'ApplyEyeMakeup', 'v_ApplyEyeMakeup_g08_c01.avi')
  open(empty, 'wb').close()
  for variant in ('ucf101', 'ucf101_meta'):
    with pytest.raises(errors.UserError) as raised:
      ucf101.prepare(root, str(tmp_path / 'tfds'), 'ucf101_1', variant=variant)
    message = str(raised.value)
    assert '\n' not in message and 'v_ApplyEyeMakeup_g08_c01.avi' in message, message
    assert 'cannot be read' in message and '--allow_missing' in message, message
    assert not ucf101.BUILDERS[variant](config='ucf101_1',
                                        data_dir=str(tmp_path / 'tfds')).is_prepared()
  with pytest.raises(errors.UserError, match='v_ApplyEyeMakeup_g08_c01.avi.*cannot be read'):
    ucf101.prepare_frames(root, str(tmp_path / 'frames'), 16, num_workers=1)
