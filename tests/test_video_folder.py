"""video_folder: own videos -> TFDS records (PyAV): layouts, splits, errors, reruns, pipeline."""

import inspect
import io
import logging
import os
import subprocess
import sys

import av
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax.data import datasets
from har_jax.data import pipeline
from har_jax.data.prepare import video_folder as vf
from har_jax.video import video_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('clap', 'jump', 'wave')
PER_CLASS = 10
FPS = 20
SHORT_SIDE = 32
PORTRAIT = 'jump/v00.mp4'
CORRUPT = 'wave/broken.mp4'


def _h264() -> str:
  try:
    av.codec.Codec('libx264', 'w')
    return 'libx264'
  except av.error.FFmpegError:  # PyAV built without x264.
    return 'mpeg4'


def render(class_index: int, seed: int, num_frames: int, width: int, height: int) -> np.ndarray:
  """[T, H, W, 3] uint8: a bar of a class colour sweeping across a noisy background."""
  rng = np.random.default_rng(seed)
  colour = np.eye(3, dtype=np.float32)[class_index] * 200 + 40
  frames = np.empty((num_frames, height, width, 3), np.uint8)
  for t in range(num_frames):
    frame = rng.uniform(20, 60, (height, width, 3)).astype(np.float32)
    x = int((t / num_frames) * (width - 8))
    frame[:, x:x + 8] = colour
    frames[t] = frame.astype(np.uint8)
  return frames


def write_video(path: str, frames: np.ndarray, fps: int = FPS):
  """Writes [T, H, W, 3] uint8 frames: MPEG-4 in .avi, H.264 (or MPEG-4) in .mp4."""
  codec = 'mpeg4' if path.endswith('.avi') else _h264()
  with av.open(path, mode='w') as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = 'yuv420p'
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def make_source(root, classes=CLASSES, per_class=PER_CLASS, corrupt=True) -> dict:
  """Writes <root>/<class>/vNN.{avi,mp4}; returns {relative name: (frames, class)}."""
  written = {}
  for c, class_name in enumerate(classes):
    os.makedirs(os.path.join(root, class_name))
    for i in range(per_class):
      name = f'{class_name}/v{i:02d}.{"mp4" if i % 2 == 0 else "avi"}'
      width, height = (80, 48) if i % 3 == 1 else (64, 48)
      if name == PORTRAIT:
        width, height = 48, 64
      frames = render(c, seed=100 * c + i, num_frames=16 + 4 * (i % 3), width=width,
                      height=height)
      write_video(os.path.join(root, name), frames)
      written[name] = (frames, class_name)
  if corrupt:
    with open(os.path.join(root, CORRUPT), 'wb') as f:
      f.write(b'\x00\x00\x00\x18ftypmp42' + np.random.default_rng(0).bytes(3000))
  return written


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('videos'))
  return root, make_source(root)


@pytest.fixture(scope='module')
def built(source, tmp_path_factory):
  """The source built once with short_side=32; returns (result, log messages, data_dir)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  handler, absl_logger = _Records(), logging.getLogger('absl')
  absl_logger.addHandler(handler)
  try:
    result = vf.prepare(vf.VideoFolderConfig(name='lab', source=source[0],
                                             short_side=SHORT_SIDE), data_dir)
  finally:
    absl_logger.removeHandler(handler)
  return result, '\n'.join(handler.messages), data_dir


def test_builds_mixed_folder_with_names_metadata_and_splits(source, built):
  written = source[1]
  result, log, data_dir = built
  assert result.class_names == CLASSES and not result.reused
  assert result.split_sizes == {'train': 24, 'test': 6}  # 2 of 10 per class in test.
  assert [n for n, _ in result.skipped] == [CORRUPT]
  assert f'Skipping unreadable video {os.path.join(source[0], CORRUPT)}' in log
  assert f'Skipped 1 unreadable video file(s): {CORRUPT}' in log

  builder = vf.load(data_dir, 'lab')
  assert builder.info.features['label'].names == list(CLASSES)
  assert builder.info.metadata['skipped'][0][0] == CORRUPT
  assert builder.info.metadata['settings']['short_side'] == SHORT_SIDE
  seen = {}
  for split in ('train', 'test'):
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
      seen[ex['name'].decode()] = (split, ex)
  assert sorted(seen) == sorted(written)  # Every readable video once; the corrupt one nowhere.
  test_by_class = {c: sum(1 for s, ex in seen.values()
                          if s == 'test' and CLASSES[ex['label']] == c) for c in CLASSES}
  assert test_by_class == {c: 2 for c in CLASSES}
  for name, (_, ex) in seen.items():
    frames, class_name = written[name]
    assert CLASSES[ex['label']] == class_name
    assert ex['num_frames'] == ex['video'].shape[0] == frames.shape[0]
    assert ex['fps'] == pytest.approx(FPS)
    _, height, width, _ = ex['video'].shape
    assert min(height, width) == SHORT_SIDE
    assert width / height == pytest.approx(frames.shape[2] / frames.shape[1], rel=0.05)
    expected = np.asarray(Image.fromarray(frames[5]).resize((width, height), Image.BILINEAR))
    assert np.abs(ex['video'][5].astype(int) - expected).mean() < 12  # Codec + JPEG error.
  assert seen[PORTRAIT][1]['video'].shape[1:3] == (43, 32)


def test_split_is_deterministic_and_stratified(source):
  config = vf.VideoFolderConfig(name='x', source=source[0])
  first, again = vf.plan_splits(config), vf.plan_splits(config)
  assert first == again and first.layout == 'fraction'
  names = {s: [v.name for v in first.splits[s]] for s in ('train', 'test')}
  assert not set(names['train']) & set(names['test'])
  assert CORRUPT in names['train'] + names['test']  # Unchecked plan: nothing decoded.
  reseeded = vf.plan_splits(vf.VideoFolderConfig(name='x', source=source[0], split_seed=1))
  assert [v.name for v in reseeded.splits['test']] != names['test']
  assert len(reseeded.splits['test']) == len(first.splits['test']) == 6


def test_decode_video_short_side_fps_and_rotation(tmp_path):
  path = str(tmp_path / 'clip.avi')
  write_video(path, render(0, 0, 20, 64, 48))
  assert len(vf.decode_video(path, short_side=24).jpegs) == 20
  half = vf.decode_video(path, short_side=24, fps=10)
  assert (len(half.jpegs), half.fps) == (10, 10.0)
  faster = vf.decode_video(path, short_side=0, fps=30)  # Never more than the source has.
  assert (len(faster.jpegs), faster.fps) == (20, FPS)
  assert Image.open(io.BytesIO(faster.jpegs[0])).size == (64, 48)
  assert Image.open(io.BytesIO(half.jpegs[0])).size == (32, 24)
  image = np.arange(6, dtype=np.uint8).reshape(2, 3, 1).repeat(3, axis=2)
  clockwise = video_files.upright(image, -90)
  assert clockwise.shape == (3, 2, 3) and clockwise[0, 1, 0] == image[0, 0, 0]
  np.testing.assert_array_equal(video_files.upright(image, 0), image)


def _touch(root, names):
  for name in names:
    os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
    open(os.path.join(root, name), 'wb').close()


def test_train_and_test_folders_layout(tmp_path):
  root = str(tmp_path)
  _touch(root, ['train/run/a.mp4', 'train/run/b.MKV', 'train/sit/c.webm', 'train/sit/x/d.mov',
                'test/run/e.avi', 'test/sit/f.avi', 'test/sit/notes.txt'])
  plan = vf.plan_splits(vf.VideoFolderConfig(name='x', source=root))
  assert plan.layout == 'folders' and plan.class_names == ('run', 'sit')
  assert [(v.name, v.label) for v in plan.splits['train']] == [
      ('train/run/a.mp4', 'run'), ('train/run/b.MKV', 'run'), ('train/sit/c.webm', 'sit'),
      ('train/sit/x/d.mov', 'sit')]
  assert [v.name for v in plan.splits['test']] == ['test/run/e.avi', 'test/sit/f.avi']


def test_ucf101_format_split_lists(tmp_path):
  root = str(tmp_path / 'videos')
  _touch(root, [f'{c}/v_{c}_g0{g}_c01.avi' for c in ('Jog', 'Row') for g in (1, 2, 3)])
  test_list = tmp_path / 'testlist01.txt'
  test_list.write_text('Jog/v_Jog_g01_c01.avi\r\nRow/v_Row_g01_c01.avi\r\n')
  plan = vf.plan_splits(vf.VideoFolderConfig(name='x', source=root, test_list=str(test_list)))
  assert plan.layout == 'lists'
  assert [v.name for v in plan.splits['test']] == ['Jog/v_Jog_g01_c01.avi', 'Row/v_Row_g01_c01.avi']
  assert len(plan.splits['train']) == 4
  train_list = tmp_path / 'trainlist01.txt'
  train_list.write_text('Jog/v_Jog_g02_c01.avi 1\nRow/v_Row_g02_c01.avi 2\n')
  both = vf.plan_splits(vf.VideoFolderConfig(name='x', source=root, test_list=str(test_list),
                                             train_list=str(train_list)))
  assert [v.name for v in both.splits['train']] == ['Jog/v_Jog_g02_c01.avi',
                                                    'Row/v_Row_g02_c01.avi']
  # A list saved in Latin-1 (a user's own list, not UCF101's) was a UnicodeDecodeError traceback.
  test_list.write_bytes('Jog/v_Jog_g01_c01.avi # Jürgen\n'.encode('latin-1'))
  with pytest.raises(errors.UserError) as e:
    vf.plan_splits(vf.VideoFolderConfig(name='x', source=root, test_list=str(test_list)))
  assert str(test_list) in str(e.value) and 'not UTF-8' in str(e.value)
  assert 'iconv' in str(e.value) and '\n' not in str(e.value)


def test_bad_sources_give_clear_errors(tmp_path):
  def plan(root, **kwargs):
    return vf.plan_splits(vf.VideoFolderConfig(name='x', source=str(root), **kwargs))
  with pytest.raises(errors.UserError, match='does not exist'):
    plan(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(errors.UserError, match='No class folders in .*empty'):
    plan(tmp_path / 'empty')
  _touch(str(tmp_path / 'one'), ['walk/a.avi'])
  with pytest.raises(errors.UserError, match="one class folder \\('walk'\\).*at least two"):
    plan(tmp_path / 'one')
  _touch(str(tmp_path / 'novideo'), ['walk/a.avi', 'sit/readme.txt'])
  with pytest.raises(errors.UserError, match='novideo/sit.*holds no video files'):
    plan(tmp_path / 'novideo')
  _touch(str(tmp_path / 'half'), ['train/walk/a.avi', 'train/sit/b.avi'])
  with pytest.raises(errors.UserError, match='not both train/ and test/'):
    plan(tmp_path / 'half')
  with pytest.raises(errors.UserError, match='test_fraction=1.5'):
    plan(tmp_path / 'novideo', test_fraction=1.5)
  for bad in ('', 'a/b', 'my data'):
    with pytest.raises(errors.UserError, match='not valid'):
      vf.check_name(bad)
  with pytest.raises(errors.UserError, match='not prepared.*prepare_video_folder.py'):
    vf.load(str(tmp_path), 'lab')


def test_class_with_no_readable_videos_is_an_error_naming_the_files(tmp_path, caplog):
  root = str(tmp_path / 'videos')
  make_source(root, classes=('sit', 'walk'), per_class=2, corrupt=False)
  for name in ('a.mp4', 'b.avi'):
    (tmp_path / 'videos' / 'sit' / name).write_bytes(b'not a video')
  for name in ('v00.mp4', 'v01.avi'):
    os.remove(os.path.join(root, 'sit', name))
  caplog.set_level(logging.WARNING)
  with pytest.raises(errors.UserError, match=r"\['sit'\].*no readable training videos"):
    vf.prepare(vf.VideoFolderConfig(name='bad', source=root), str(tmp_path / 'tfds'))
  assert 'sit/a.mp4' in caplog.text and 'sit/b.avi' in caplog.text
  assert not os.path.exists(tmp_path / 'tfds' / 'video_folder' / 'bad' / vf.DATASET_VERSION)


def test_interrupted_prepare_reruns_cleanly_and_settings_are_checked(tmp_path, monkeypatch):
  root, data_dir = str(tmp_path / 'videos'), str(tmp_path / 'tfds')
  make_source(root, classes=('sit', 'walk'), per_class=3, corrupt=False)
  config = vf.VideoFolderConfig(name='mini', source=root, short_side=16)
  original, calls = vf.decode_video, []

  def dies_on_third_full_decode(path, short_side=128, fps=0.0, max_frames=None):
    if max_frames is None:
      calls.append(path)
      if len(calls) == 3:
        raise KeyboardInterrupt('simulated interruption')
    return original(path, short_side, fps, max_frames)

  monkeypatch.setattr(vf, 'decode_video', dies_on_third_full_decode)
  with pytest.raises(KeyboardInterrupt):
    vf.prepare(config, data_dir)
  monkeypatch.setattr(vf, 'decode_video', original)
  config_dir = os.path.join(data_dir, 'video_folder', 'mini')
  assert not os.path.exists(os.path.join(config_dir, vf.DATASET_VERSION))  # Nothing readable.
  with pytest.raises(errors.UserError, match='not prepared'):
    vf.load(data_dir, 'mini')

  os.makedirs(os.path.join(config_dir, f'incomplete.ABC123_{vf.DATASET_VERSION}'))  # As SIGKILL.
  result = vf.prepare(config, data_dir)
  assert result.split_sizes == {'train': 4, 'test': 2} and not result.reused
  assert os.listdir(config_dir) == [vf.DATASET_VERSION]  # The leftover was removed.
  assert vf.prepare(config, data_dir).reused
  other = vf.VideoFolderConfig(name='mini', source=root, short_side=24)
  with pytest.raises(errors.UserError, match='other settings.*--overwrite'):
    vf.prepare(other, data_dir)
  rebuilt = vf.prepare(other, data_dir, overwrite=True)
  assert not rebuilt.reused
  video = next(vf.load(data_dir, 'mini').as_dataset(split='test').as_numpy_iterator())['video']
  assert min(video.shape[1:3]) == 24


def _tiny_config(data_dir: str, **overrides):
  from conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  overrides = {'dataset.name': 'video_folder/lab', 'dataset.resize_size': 32, 'image_size': 28,
               **overrides}
  return make_tiny_config(data_dir, **overrides)


@pytest.mark.slow
def test_pipeline_reads_the_records(built):
  config = _tiny_config(built[2])
  builder = vf.load(built[2], 'lab')
  batch = next(pipeline.create_train_dataset(builder, config, local_batch=4).as_numpy_iterator())
  assert batch['video'].shape == (4, config.num_frames, 28, 28, 3)
  assert set(batch['label'].tolist()) <= {0, 1, 2}


def _wired() -> bool:
  return 'video_folder' in inspect.getsource(datasets)


@pytest.mark.slow
@pytest.mark.skipif(not _wired(), reason='datasets.get_builder does not resolve video_folder/ yet')
def test_train_evaluate_predict_with_class_names(source, built, tmp_path):
  from har_jax.evaluation import checkpoint_eval  # pylint: disable=g-import-not-at-top
  from har_jax import predict  # pylint: disable=g-import-not-at-top
  from har_jax import train  # pylint: disable=g-import-not-at-top
  config = _tiny_config(built[2], **{'eval.num_clips': 1, 'eval.num_crops': 1})
  workdir = str(tmp_path / 'workdir')
  final = train.train_and_evaluate(config, workdir)
  assert final['num_videos'] == 6 and np.isfinite(final['loss'])
  [report] = checkpoint_eval.evaluate(config, workdir, checkpoint='latest')
  assert report['class_names'] == list(CLASSES)
  assert set(report['per_class_accuracy']) == set(CLASSES)
  [result] = predict.predict_files([os.path.join(source[0], PORTRAIT)], workdir,
                                   checkpoint='latest')
  assert result['ok'] and result['top_k'][0]['class'] in CLASSES


@pytest.mark.slow
def test_prepare_script_reports_progress_skips_and_errors(source, tmp_path):
  script = os.path.join(REPO, 'scripts', 'prepare_video_folder.py')
  data_dir = str(tmp_path / 'tfds')
  command = [sys.executable, script, f'--source={source[0]}', f'--data_dir={data_dir}',
             '--name=lab', '--short_side=16', '--fps=10']
  run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Prepared video_folder/lab: {'train': 24, 'test': 6} videos of 3 classes" in run.stdout
  assert f'Skipped 1 unreadable file(s):\n  {CORRUPT}: ' in run.stdout
  assert 'videos decoded' in run.stderr and CORRUPT in run.stderr
  example = next(vf.load(data_dir, 'lab').as_dataset(split='train').as_numpy_iterator())
  assert example['fps'] == 10 and example['num_frames'] <= 12  # 16..24 frames at 20 fps.
  # The rerun reuses the records and writes their frame index.
  again = subprocess.run(command + ['--frame_index'], capture_output=True, text=True, timeout=600,
                         cwd=REPO)
  assert again.returncode == 0 and 'Already prepared video_folder/lab' in again.stdout
  assert 'Prepared frame_index/video_folder/lab in ' in again.stdout
  assert '--config.dataset.name=frame_index/video_folder/lab ' in again.stdout
  records = vf.load(data_dir, 'lab')
  index = datasets.get_builder(_tiny_config(data_dir, **{
      'dataset.name': 'frame_index/video_folder/lab'}).dataset)
  assert index.split_sizes == {'train': 24, 'test': 6}
  assert datasets.frame_geometry(index) == datasets.frame_geometry(records)
  assert sorted(index.videos['name']) == sorted(
      ex['name'].decode() for split in ('train', 'test') for ex in records.as_dataset(
          split=split, decoders={'video': tfds.decode.SkipDecoding()}).as_numpy_iterator())
  (tmp_path / 'empty').mkdir()
  empty = subprocess.run(command[:2] + [f'--source={tmp_path / "empty"}', f'--data_dir={data_dir}',
                                        '--name=empty'],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
  assert empty.returncode == 1 and 'error: No class folders in' in empty.stderr


def test_symlink_loop_neither_duplicates_nor_mislabels(tmp_path, caplog):
  """Issue 16.1: `ln -s .. s/c1/loop` made 6 videos 246 records, c2's labelled c1."""
  root, data_dir = str(tmp_path / 's'), str(tmp_path / 'd')
  written = make_source(root, classes=('c1', 'c2'), per_class=3, corrupt=False)
  os.symlink('..', os.path.join(root, 'c1', 'loop'))
  caplog.set_level(logging.WARNING)
  result = vf.prepare(vf.VideoFolderConfig(name='x', source=root, short_side=16), data_dir)
  assert sum(result.split_sizes.values()) == 6
  assert 'c1/loop' in caplog.text and 'back up' in caplog.text
  assert [name for name, _ in result.skipped_links] == ['c1/loop']
  builder = vf.load(data_dir, 'x')
  seen = {}
  for split in ('train', 'test'):
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
      name = ex['name'].decode()
      assert name not in seen, f'{name} is in {seen.get(name)} and {split}'
      seen[name] = split
      assert ('c1', 'c2')[ex['label']] == written[name][1]
  assert sorted(seen) == sorted(written)


def test_directory_links_inside_a_class_are_reported_not_followed(tmp_path, caplog):
  root, elsewhere = str(tmp_path / 's'), str(tmp_path / 'elsewhere')
  _touch(root, ['run/a.avi', 'run/sub/b.avi', 'sit/c.avi', 'sit/d.avi'])
  _touch(elsewhere, ['e.avi'])
  os.symlink(os.path.join(root, 'run', 'sub'), os.path.join(root, 'run', 'alias'))
  os.symlink(os.path.join(root, 'sit'), os.path.join(root, 'run', 'other_class'))
  os.symlink(elsewhere, os.path.join(root, 'run', 'outside'))
  caplog.set_level(logging.WARNING)
  plan = vf.plan_splits(vf.VideoFolderConfig(name='x', source=root, test_fraction=0.5))
  videos = sorted((v.name, v.label) for s in plan.splits.values() for v in s)
  assert videos == [('run/a.avi', 'run'), ('run/sub/b.avi', 'run'), ('sit/c.avi', 'sit'),
                    ('sit/d.avi', 'sit')]
  assert [n for n, _ in plan.skipped_links] == ['run/alias', 'run/other_class', 'run/outside']
  for name in ('run/alias', 'run/other_class', 'run/outside'):
    assert name in caplog.text


def test_linked_class_folder_works_and_one_file_never_counts_twice(tmp_path, caplog):
  store, root = str(tmp_path / 'store'), str(tmp_path / 's')
  _touch(store, ['walking/a.avi', 'walking/b.avi'])
  _touch(root, ['sit/c.avi', 'sit/d.avi'])
  os.symlink(os.path.join(store, 'walking'), os.path.join(root, 'walk'))  # A linked class: fine.
  os.symlink(os.path.join(root, 'sit', 'c.avi'), os.path.join(root, 'sit', 'c_again.avi'))
  caplog.set_level(logging.WARNING)
  plan = vf.plan_splits(vf.VideoFolderConfig(name='x', source=root, test_fraction=0.5))
  names = sorted(v.name for s in plan.splits.values() for v in s)
  assert names == ['sit/c.avi', 'sit/d.avi', 'walk/a.avi', 'walk/b.avi']
  assert 'sit/c_again.avi' in caplog.text and 'same file' in caplog.text
  # The same file in two classes, or in train/ and test/, has no right label or split.
  os.symlink(os.path.join(root, 'sit', 'd.avi'), os.path.join(root, 'walk', 'd.avi'))
  with pytest.raises(errors.UserError, match=r'same file.*sit/d\.avi.*walk/d\.avi'):
    vf.plan_splits(vf.VideoFolderConfig(name='x', source=root))
  split_root = str(tmp_path / 'split')
  _touch(split_root, ['train/a/1.avi', 'train/b/2.avi', 'test/a/3.avi', 'test/b/4.avi'])
  os.symlink(os.path.join(split_root, 'train', 'a', '1.avi'),
             os.path.join(split_root, 'test', 'a', 'leak.avi'))
  with pytest.raises(errors.UserError, match=r'same file.*test/a/leak\.avi.*train/a/1\.avi'):
    vf.plan_splits(vf.VideoFolderConfig(name='x', source=split_root))


def test_class_link_back_up_the_tree_is_skipped(tmp_path, caplog):
  root = str(tmp_path / 's')
  _touch(root, ['run/a.avi', 'run/b.avi', 'sit/c.avi', 'sit/d.avi'])
  os.symlink('..', os.path.join(root, 'up'))  # A "class" that would scan everything above.
  caplog.set_level(logging.WARNING)
  plan = vf.plan_splits(vf.VideoFolderConfig(name='x', source=root, test_fraction=0.5))
  assert plan.class_names == ('run', 'sit')
  assert [n for n, _ in plan.skipped_links] == ['up']


@pytest.mark.parametrize('bad', ['two\nlines', 'carriage\rreturn', ' padded', 'trailing\t'])
def test_class_names_that_a_label_file_cannot_hold_are_refused(tmp_path, bad):
  """Issue 16.2: ClassLabel stores one name per line, stripped; such a name shifts every label."""
  root = str(tmp_path / 's')
  _touch(root, ['a/1.avi', 'a/2.avi', f'{bad}/3.avi', f'{bad}/4.avi', 'z/5.avi', 'z/6.avi'])
  with pytest.raises(errors.UserError, match='Class folder .*' + repr(bad)[1:-1].replace(
      '\\', '\\\\') + '.*rename'):
    vf.plan_splits(vf.VideoFolderConfig(name='x', source=root))


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path, monkeypatch):
  """--overwrite checks the new source first and builds beside the old dataset: a typo, a single
  class or an interruption leaves the old one readable; a finished rebuild replaces it."""
  root, data_dir = str(tmp_path / 'videos'), str(tmp_path / 'tfds')
  make_source(root, classes=('sit', 'walk'), per_class=3, corrupt=False)
  vf.prepare(vf.VideoFolderConfig(name='mini', source=root, short_side=16), data_dir)
  config_dir = os.path.join(data_dir, 'video_folder', 'mini')

  def old_is_intact():
    assert os.listdir(config_dir) == [vf.DATASET_VERSION]
    builder = vf.load(data_dir, 'mini')
    assert builder.info.metadata['settings']['short_side'] == 16
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {'train': 4, 'test': 2}

  typo = vf.VideoFolderConfig(name='mini', source=root + 'x', short_side=24)
  with pytest.raises(errors.UserError, match='does not exist'):
    vf.prepare(typo, data_dir, overwrite=True)
  old_is_intact()
  one_class = str(tmp_path / 'one')
  make_source(one_class, classes=('sit',), per_class=3, corrupt=False)
  with pytest.raises(errors.UserError):
    vf.prepare(vf.VideoFolderConfig(name='mini', source=one_class), data_dir, overwrite=True)
  old_is_intact()

  original = vf.decode_video

  def interrupted(path, short_side=128, fps=0.0, max_frames=None):
    if max_frames is None:
      raise KeyboardInterrupt('simulated interruption')
    return original(path, short_side, fps, max_frames)

  other = vf.VideoFolderConfig(name='mini', source=root, short_side=24)
  monkeypatch.setattr(vf, 'decode_video', interrupted)
  with pytest.raises(KeyboardInterrupt):
    vf.prepare(other, data_dir, overwrite=True)
  monkeypatch.setattr(vf, 'decode_video', original)
  old_is_intact()

  os.makedirs(os.path.join(config_dir, f'{vf.DATASET_VERSION}.incomplete-0123abcd'))  # SIGKILL.
  rebuilt = vf.prepare(other, data_dir, overwrite=True)
  assert not rebuilt.reused and rebuilt.split_sizes == {'train': 4, 'test': 2}
  assert os.listdir(config_dir) == [vf.DATASET_VERSION]
  builder = vf.load(data_dir, 'mini')
  assert builder.info.metadata['settings']['short_side'] == 24
  video = next(builder.as_dataset(split='test').as_numpy_iterator())['video']
  assert min(video.shape[1:3]) == 24


@pytest.mark.parametrize('prefix', ['', 'train/'])
def test_class_folders_that_differ_only_in_case_are_refused(tmp_path, prefix):
  """Issue 27.11: `Walk` and `walk` were accepted silently as two classes (one action, two
  labels; and one folder on a case-insensitive disk)."""
  root = str(tmp_path / 's')
  _touch(root, [f'{prefix}{c}/{i}.avi' for c in ('Walk', 'walk', 'sit') for i in (1, 2)] +
         (['test/sit/3.avi', 'test/walk/3.avi'] if prefix else []))
  with pytest.raises(errors.UserError) as raised:
    vf.plan_splits(vf.VideoFolderConfig(name='x', source=root))
  message = str(raised.value)
  assert '\n' not in message and "'Walk'" in message and "'walk'" in message, message
  assert 'differ only in case' in message and 'rename' in message, message
