"""A workdir in object storage (gs://), end to end, against a local GCS emulator on 127.0.0.1.

The commands run as a user would run them with only STORAGE_EMULATOR_HOST set: train, SIGKILL in
the middle, rerun (it resumes), --mode=eval (its report lands in the bucket), then predict, stream
and export reading the bucket workdir. Nothing may be written to a local `gs:` folder (what
`os.path.abspath('gs://...')` used to make of the workdir).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import write_video
from gcs_emulator import GcsEmulator
from test_resume import tiny_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_S = 600
STEPS = 30
BUCKET = 'bkt'
RUN = 'runs/tiny'
WORKDIR = f'gs://{BUCKET}/{RUN}'

pytestmark = pytest.mark.slow


def _python(args, env, timeout=WAIT_S, cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _main_args(data_dir, workdir=WORKDIR, **overrides):
  flags = tiny_flags(data_dir, **dict(dict(num_train_steps=STEPS, checkpoint_every_steps=10,
                                           eval_every_steps=STEPS, log_every_steps=5),
                                      **overrides))
  return [os.path.join(REPO, 'main.py'), f'--config={REPO}/configs/synthetic.py',
          f'--workdir={workdir}', *flags]


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  with GcsEmulator(tmp_path_factory.mktemp('gcs') / 'root', buckets=[BUCKET]) as emulator:
    yield emulator


@pytest.fixture(scope='module')
def cwd(tmp_path_factory):
  """The commands' working directory: a relative `gs:/...` folder would appear here."""
  return tmp_path_factory.mktemp('cwd')


@pytest.fixture(scope='module')
def bucket_run(gcs, cwd, synthetic_data_dir, tmp_path_factory):
  """Trains in the bucket, SIGKILLs the run once checkpoint 20 is committed, reruns it."""
  cache = tmp_path_factory.mktemp('jax_cache')
  env = gcs.env(PYTHONUNBUFFERED='1', JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  args = _main_args(synthetic_data_dir)
  log = open(cwd / 'first.log', 'w')
  first = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
  committed = f'{RUN}/checkpoints/20/commit_success.txt'
  deadline = time.monotonic() + WAIT_S
  try:
    while committed not in gcs.names(BUCKET, f'{RUN}/checkpoints/20/'):
      assert first.poll() is None, (cwd / 'first.log').read_text()[-3000:]
      assert time.monotonic() < deadline, 'checkpoint 20 never committed'
      time.sleep(0.05)
  finally:
    first.kill()
    first.wait()
    log.close()
  second = _python(args, env, cwd=cwd)
  return {'env': env, 'first': (cwd / 'first.log').read_text(), 'second': second,
          'data_dir': synthetic_data_dir}


def test_training_in_a_bucket_resumes_after_sigkill(gcs, cwd, bucket_run):
  second = bucket_run['second']
  assert second.returncode == 0, second.stderr[-3000:]
  resumed = [line for line in second.stderr.splitlines() if 'Resumed from checkpoint' in line]
  assert resumed and f'in {WORKDIR}/checkpoints' in resumed[0], second.stderr[-3000:]
  assert int(resumed[0].split('at step ')[1].split()[0]) >= 20
  assert f'Final test metrics at step {STEPS}' in second.stderr
  names = gcs.names(BUCKET, RUN + '/')
  for expected in ('config.json', 'class_names.json', f'checkpoints/{STEPS}/commit_success.txt',
                   f'checkpoints/{STEPS}/state/_METADATA', f'checkpoints/{STEPS}/meta/metadata'):
    assert f'{RUN}/{expected}' in names, names
  assert json.loads(gcs.read(BUCKET, f'{RUN}/class_names.json'))
  # TensorBoard events of both runs, uploaded through the path layer.
  assert len([n for n in names if n.startswith(f'{RUN}/events.out.tfevents')]) == 2, names
  assert not os.path.exists(cwd / 'gs:'), 'wrote a local gs: folder'


def test_eval_writes_its_report_into_the_bucket(gcs, cwd, bucket_run):
  args = _main_args(bucket_run['data_dir'])
  done = _python(args + ['--mode=eval'], bucket_run['env'], cwd=cwd)
  assert done.returncode == 0, done.stderr[-3000:]
  report = f'{RUN}/eval/test_step_{STEPS}.json'
  assert f'report: gs://{BUCKET}/{report}' in done.stdout
  names = gcs.names(BUCKET, f'{RUN}/eval/')
  assert report in names and f'{RUN}/eval/test_step_{STEPS}_videos.npz' in names, names
  assert json.loads(gcs.read(BUCKET, report))['metrics']['num_videos'] == 20
  assert not os.path.exists(cwd / 'gs:')


def test_predict_stream_and_export_read_the_bucket_workdir(gcs, cwd, bucket_run):
  video = write_video(cwd / 'clip.avi',
                      np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), np.uint8))
  env = bucket_run['env']
  predicted = _python([os.path.join(REPO, 'scripts', 'predict.py'), f'--workdir={WORKDIR}',
                       '--json', video], env, cwd=cwd)
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  streamed = _python([os.path.join(REPO, 'scripts', 'stream.py'), f'--workdir={WORKDIR}',
                      f'--timeline=gs://{BUCKET}/outputs/timeline.json', video], env, cwd=cwd)
  assert streamed.returncode == 0, streamed.stderr[-3000:]
  timeline = json.loads(gcs.read(BUCKET, 'outputs/timeline.json'))
  assert len(timeline['class_names']) == 10 and timeline['times']
  exported = _python([os.path.join(REPO, 'scripts', 'export.py'), f'--workdir={WORKDIR}',
                      f'--out=gs://{BUCKET}/outputs/export', '--formats=jax'], env, cwd=cwd)
  assert exported.returncode == 0, exported.stderr[-3000:]
  names = gcs.names(BUCKET, 'outputs/export/')
  assert names == ['outputs/export/manifest.json', 'outputs/export/model.jax',
                   'outputs/export/model.json'], names
  assert json.loads(gcs.read(BUCKET, 'outputs/export/model.json'))['source']['workdir'] == WORKDIR
  assert not os.path.exists(cwd / 'gs:')


def test_frame_store_in_a_bucket_is_refused_before_anything_runs(gcs, cwd, synthetic_data_dir):
  args = _main_args(synthetic_data_dir, workdir=f'gs://{BUCKET}/runs/frames',
                    **{'dataset.name': 'ucf101_frames/s128',
                       'dataset.data_dir': f'gs://{BUCKET}/tfds'})
  done = _python(args, gcs.env(), cwd=cwd)
  assert done.returncode == 1
  message = done.stderr[done.stderr.index('error:'):]
  assert 'The frame store is in object storage (gs://bkt/tfds/ucf101_frames/s128)' in message
  assert 'gcsfuse' in message and 'Traceback' not in done.stderr, message
  assert gcs.names(BUCKET, 'runs/frames') == []


def test_an_encoder_checkpoint_in_the_bucket_initialises_a_config(gcs, cwd):
  """model.encoder_init=gs://...: written, read back (its meta and its arrays) through the bucket."""
  encoder = f'gs://{BUCKET}/pretrained/r18'
  code = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from har_jax import paths
paths.configure_storage()
from configs import ucf101_imagenet
from har_jax import pretrained, torch_weights
import test_torch_weights
variables, meta = torch_weights.convert_state_dict(test_torch_weights._numpy_state_dict('resnet18'),
                                                   'resnet18')
pretrained.save_encoder({encoder!r}, variables, dict(meta, source='test'))
config = ucf101_imagenet.get_config()
config.model.encoder_init = {encoder!r}
resolved = pretrained.resolve_encoder_init(config)
template = pretrained.encoder_template('resnet18', resolved.model.encoder_kwargs)
loaded, _ = pretrained.load_encoder({encoder!r}, template)
same = all((a == b).all() for a, b in zip(
    __import__('jax').tree.leaves(loaded), __import__('jax').tree.leaves(variables)))
print('loaded', resolved.model.preprocessing, same)
"""
  result = _python(['-c', code], gcs.env(), cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == 'loaded imagenet True', result.stdout
  assert gcs.names(BUCKET, 'pretrained/r18/'), 'nothing was written to the bucket'
  assert not (cwd / 'gs:').exists()
