"""Shared fixtures. Four fake CPU devices, so pmap code runs as it would on a 4-chip host."""

import contextlib
import importlib.util
import logging
import os
import shutil
import subprocess

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import av  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
  """The module scripts/<name>.py (scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_tiny_config(data_dir: str, **overrides):
  """A seconds-sized synthetic config: 4 frames of 28x28, a small CNN, a few steps."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config()
  config.dataset.name = 'synthetic_actions/tiny'
  config.dataset.data_dir = str(data_dir)
  config.dataset.val_split = 0.0  # Periodic eval on the test split: tests count its 20 videos.
  config.num_frames = 4
  config.frame_stride = 1
  config.image_size = 28
  # Fixed at the tiny set's stored 32x32, whatever image_size a test sets (the configs' default
  # follows image_size: tests/test_cli.py).
  config.dataset.resize_size = 32
  config.model.lstm_size = 16
  config.model.dropout_rate = 0.0
  config.batch_size = 8
  config.eval.batch_size = 8
  config.num_train_steps = 4
  config.warmup_steps = 1
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@contextlib.contextmanager
def tmpfs(folder, size: str = '3m', read_only: bool = False):
  """A small tmpfs mounted at `folder` (a full or read-only disk, even for root); skips the
  test where mounting is not allowed (it needs root, as CI runs)."""
  os.makedirs(folder, exist_ok=True)
  options = f'size={size}' + (',ro' if read_only else '')
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)],
                    capture_output=True).returncode != 0:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  try:
    yield folder
  finally:
    subprocess.run(['umount', '-l', str(folder)], check=False)


def fill_disk(folder, leave_bytes: int = 100_000):
  """Fills the file system of `folder` up to `leave_bytes`; returns the filler file."""
  filler = os.path.join(folder, 'filler')
  free = shutil.disk_usage(folder).free
  with open(filler, 'wb') as f:
    os.posix_fallocate(f.fileno(), 0, max(free - leave_bytes, 1))
  return filler


def write_video(path, frames: np.ndarray, *, lossless: bool = True, fps: int = 10) -> str:
  """Writes [T, H, W, 3] uint8 frames: lossless FFV1 (any size) or H.264 (even sizes)."""
  codec, pix_fmt = ('ffv1', 'bgr0') if lossless else ('libx264', 'yuv420p')
  with av.open(str(path), 'w') as container:
    stream = container.add_stream(codec, rate=fps, options={} if lossless else {'crf': '12'})
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(stream.encode())
  return str(path)


def training_videos(config, count):
  """[(tfds_id, frames [T, H, W, 3] uint8, label)] of the first `count` training videos."""
  from har_jax.data import datasets  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = datasets.get_builder(config.dataset)
  ds = builder.as_dataset(split=f'train[:{count}]', read_config=tfds.ReadConfig(add_tfds_id=True))
  return [(ex['tfds_id'].decode(), ex['video'], int(ex['label'])) for ex in tfds.as_numpy(ds)]


@pytest.fixture(scope='session')
def synthetic_data_dir(tmp_path_factory):
  """A data_dir holding the prepared tiny synthetic dataset (built once per test session)."""
  from har_jax.data.prepare import synthetic_actions  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('tfds')
  synthetic_actions.prepare(str(data_dir), 'tiny')
  return data_dir


SYNTHETIC_FRAMES = 'synthetic_frames/tiny'


@pytest.fixture(scope='session')
def synthetic_frames(synthetic_data_dir):
  """The tiny synthetic set copied into a frame store, `synthetic_frames/tiny` in the same
  data_dir (the JPEG frames byte for byte); returns that dataset name."""
  from har_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from har_jax.data import frame_store  # pylint: disable=g-import-not-at-top
  from har_jax.data.prepare import frame_store_writer  # pylint: disable=g-import-not-at-top
  path = os.path.join(str(synthetic_data_dir), SYNTHETIC_FRAMES)
  if not frame_store.exists(path):
    builder = datasets.get_builder(make_tiny_config(synthetic_data_dir).dataset)
    frame_store_writer.convert(builder, path, name=SYNTHETIC_FRAMES)
  return SYNTHETIC_FRAMES


@pytest.fixture
def tiny_config(synthetic_data_dir):
  return lambda **overrides: make_tiny_config(synthetic_data_dir, **overrides)


# The trained tiny run used by the evaluation, prediction, TensorBoard, streaming and export tests
# (session-scoped: built once per pytest-xdist worker that runs one of them, ~1-2 min).
TRAINED_TINY = {'num_train_steps': 300, 'checkpoint_every_steps': 100, 'eval_every_steps': 100,
                'log_every_steps': 50, 'learning_rate': 5e-3, 'warmup_steps': 10,
                'keep_checkpoints': 3, 'deterministic_data': True}


@pytest.fixture(scope='session')
def trained(tmp_path_factory, synthetic_data_dir):
  """(config, workdir) of a tiny synthetic run trained for 300 steps, once per test session."""
  from har_jax import train  # pylint: disable=g-import-not-at-top
  config = make_tiny_config(synthetic_data_dir, **TRAINED_TINY)
  workdir = str(tmp_path_factory.mktemp('trained_tiny_300'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def pytest_collection_modifyitems(items):
  """Marks every test that needs the `trained` run slow: building it takes a worker 1-2 min, so
  the fast subset (`-m "not slow"`) never builds it. The full suite (CI) runs them all."""
  for item in items:
    if 'trained' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _restore_absl_logger_level():
  """Tests that run main() or a script set absl's verbosity (the 'absl' logger's level); restore it
  after each test, so that a later test's caplog sees INFO records whatever ran before it."""
  logger = logging.getLogger('absl')
  level = logger.level
  yield
  logger.setLevel(level)
