"""The real TensorBoard server, on 127.0.0.1, reads back a trained and evaluated run over HTTP."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import jax
import pytest

from har_jax.evaluation import checkpoint_eval

STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _get_json(port: int, path: str, **params):
  query = f'?{urllib.parse.urlencode(params)}' if params else ''
  with urllib.request.urlopen(f'http://127.0.0.1:{port}{path}{query}', timeout=10) as response:
    return json.loads(response.read().decode())


def _wait_for(port: int, server, ready) -> dict:
  """Polls until `ready(responses)` or the timeout; returns the last responses."""
  deadline = time.monotonic() + STARTUP_TIMEOUT_S
  last = {}
  while time.monotonic() < deadline:
    if server.poll() is not None:
      raise AssertionError(f'tensorboard exited with {server.returncode}: '
                           f'{server.stderr.read()[-2000:]}')
    try:
      last = {'scalars': _get_json(port, '/data/plugin/scalars/tags'),
              'images': _get_json(port, '/data/plugin/images/tags')}
      if ready(last):
        return last
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
      pass
    time.sleep(1.0)
  raise AssertionError(f'TensorBoard did not show the run within {STARTUP_TIMEOUT_S} s; '
                       f'last answer: {last}')


@pytest.mark.slow
def test_tensorboard_server_shows_train_and_eval(trained, tmp_path):
  config, trained_workdir = trained
  # A copy of the run without the evaluations other tests wrote (in any step order).
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, workdir, ignore=shutil.ignore_patterns('eval'))
  checkpoint_eval.evaluate(config, workdir, checkpoint='latest', devices=jax.devices()[:1])
  report = json.load(open(os.path.join(workdir, 'eval', 'test_step_300.json')))

  port = _free_port()
  tensorboard = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
  server = subprocess.Popen(
      [tensorboard, '--logdir', workdir, '--port', str(port), '--host', '127.0.0.1',
       '--reload_interval', '1',
       # As the README advises: keep later points when an earlier checkpoint is re-evaluated.
       '--purge_orphaned_data', 'false'],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    def ready(r):
      if not ('test/top1' in r['scalars'].get('eval', {}) and
              'train/loss' in r['scalars'].get('.', {}) and
              'test/confusion_matrix' in r['images'].get('eval', {})):
        return False
      values = _get_json(port, '/data/plugin/scalars/scalars', run='eval', tag='test/top1')
      return 300 in {int(step) for _, step, _ in values}  # All event files loaded.
    tags = _wait_for(port, server, ready)
    train_tags, eval_tags = tags['scalars']['.'], tags['scalars']['eval']
    for tag in ('train/loss', 'train/top1', 'val/top1', 'perf/steps_per_sec'):
      assert tag in train_tags, f'{tag} not in {sorted(train_tags)}'
    for tag in ('test/top5', 'test/mean_class_accuracy', 'test/clip_top1',
                'test/shuffled_time/top1', 'test/temporal_order_top1_drop'):
      assert tag in eval_tags, f'{tag} not in {sorted(eval_tags)}'
    values = _get_json(port, '/data/plugin/scalars/scalars', run='eval', tag='test/top1')
    by_step = {int(step): value for _, step, value in values}
    assert by_step[300] == pytest.approx(report['metrics']['top1'], abs=1e-6)
    losses = _get_json(port, '/data/plugin/scalars/scalars', run='.', tag='train/loss')
    assert [int(s) for _, s, _ in losses][-1] == 300
    assert tags['images']['eval']['test/confusion_matrix']['samples'] == 1
  finally:
    server.terminate()
    try:
      server.wait(timeout=20)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()
