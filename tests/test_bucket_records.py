"""TFDS records in a bucket (gs:// data_dir), read by main.py against a local GCS emulator.

The dataset checks before training read the bucket through the path layer (gcsfs); tf.data reads
the record files with TensorFlow's own GCS client, which reaches the emulator only through the
test proxy of tests/gcs_tf_proxy.py (it cannot be pointed at an emulator). Nothing leaves
127.0.0.1.
"""

import os
import subprocess
import sys

import pytest

from gcs_emulator import GcsEmulator
from gcs_tf_proxy import TfGcsProxy
from test_object_storage import _main_args

BUCKET = 'bkt'
DATA_DIR = f'gs://{BUCKET}/tfds'
DATASET = 'synthetic_actions/tiny/1.0.0'
RUN = 'runs/records'
STEPS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def gcs(tmp_path_factory, synthetic_data_dir):
  """The emulator, its bucket holding the prepared tiny dataset under tfds/."""
  with GcsEmulator(tmp_path_factory.mktemp('gcs') / 'root', buckets=[BUCKET]) as emulator:
    local = synthetic_data_dir / DATASET
    for name in sorted(os.listdir(local)):
      emulator.write(BUCKET, f'tfds/{DATASET}/{name}', (local / name).read_bytes())
    yield emulator


@pytest.fixture(scope='module')
def proxy(gcs, tmp_path_factory):
  with TfGcsProxy(gcs, tmp_path_factory.mktemp('proxy')) as tf_proxy:
    yield tf_proxy


def _main(gcs, proxy, cwd, synthetic_data_dir, run, **overrides):
  args = _main_args(synthetic_data_dir, workdir=f'gs://{BUCKET}/{run}',
                    **{'dataset.data_dir': DATA_DIR, **overrides})
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=gcs.env(PYTHONUNBUFFERED='1', **proxy.env()))


def test_training_reads_tfds_records_from_a_bucket(gcs, proxy, tmp_path, synthetic_data_dir):
  done = _main(gcs, proxy, tmp_path, synthetic_data_dir, RUN, num_train_steps=STEPS,
               checkpoint_every_steps=STEPS, eval_every_steps=STEPS, log_every_steps=STEPS)
  assert done.returncode == 0, done.stderr[-3000:]
  # Validation read the uploaded dataset (a missing one would be generated into the bucket).
  assert f'Reusing synthetic_actions/tiny at {DATA_DIR}/{DATASET}.' in done.stderr, done.stderr
  assert "Dataset synthetic_actions/tiny/1.0.0: 10 classes, splits {'train': 40, 'test': 20}" in (
      done.stderr), done.stderr
  final = [line for line in done.stderr.splitlines()
           if f'Final test metrics at step {STEPS}' in line]
  assert final and "'num_videos': 20" in final[0], done.stderr[-3000:]
  assert f'{RUN}/checkpoints/{STEPS}/commit_success.txt' in gcs.names(BUCKET, RUN + '/')
  # tf.data read both splits' record files through TensorFlow's client (so through the proxy).
  for split in ('train', 'test'):
    assert any(f'synthetic_actions-{split}.tfrecord' in r for r in proxy.requests), proxy.requests
  assert not os.path.exists(tmp_path / 'gs:'), 'wrote a local gs: folder'


def test_a_misspelt_split_is_refused_with_the_splits_in_the_bucket(gcs, proxy, tmp_path,
                                                                    synthetic_data_dir):
  done = _main(gcs, proxy, tmp_path, synthetic_data_dir, 'runs/misspelt',
               **{'dataset.eval_split': 'tst'})
  assert done.returncode == 1, done.stderr[-3000:]
  message = done.stderr[done.stderr.index('error:'):]
  assert "dataset.eval_split='tst'" in message and "'test', 'train'" in message, message
  assert 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert gcs.names(BUCKET, 'runs/misspelt') == []
