"""Multi-host data parallelism on one machine: 2 processes x 2 fake CPU devices over 127.0.0.1."""

import contextlib
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from har_jax import distributed
from har_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420


def _free_port() -> int:
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _overrides(data_dir, **extra):
  values = {
      'dataset.name': 'synthetic_actions/tiny', 'dataset.data_dir': str(data_dir),
      'num_frames': 4, 'frame_stride': 1, 'image_size': 28, 'model.lstm_size': 16,
      'model.dropout_rate': 0.0, 'batch_size': 8, 'eval.batch_size': 8, 'num_train_steps': 4,
      'warmup_steps': 1, 'log_every_steps': 2, 'eval_every_steps': 4,
      'checkpoint_every_steps': 2, 'deterministic_data': True, 'optimizer': 'sgd',
      'learning_rate': 0.01}
  values.update(extra)
  return [f'--config.{k}={v}' for k, v in values.items()]


def _env(num_devices: int):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['PYTHONPATH'] = REPO
  env.pop('HAR_JAX_COORDINATOR', None)
  return env


@contextlib.contextmanager
def _processes(commands, env, logs_dir):
  """Starts processes in their own groups; always kills them (and their children) on exit."""
  procs = []
  try:
    for i, cmd in enumerate(commands):
      log = open(os.path.join(logs_dir, f'process_{i}.log'), 'w')
      procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=REPO), log))
    yield [p for p, _ in procs]
  finally:
    for p, log in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
      log.close()


def _run(commands, env, logs_dir, timeout=TIMEOUT_S):
  with _processes(commands, env, logs_dir) as procs:
    for p in procs:
      try:
        p.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        pass
  logs = [open(os.path.join(logs_dir, f'process_{i}.log')).read() for i in range(len(commands))]
  codes = [p.returncode for p in procs]
  return codes, logs


def _main(workdir, overrides, *extra):
  return [sys.executable, os.path.join(REPO, 'main.py'), '--config=configs/synthetic.py',
          f'--workdir={workdir}', *overrides, *extra]


def _committed_steps(workdir):
  return sorted(int(os.path.basename(d))
                for d in glob.glob(os.path.join(workdir, 'checkpoints', '[0-9]*')))


def _final_params(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = _committed_steps(workdir)[-1]
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return step, state['params']


@pytest.mark.slow
def test_two_processes_match_one_process(synthetic_data_dir, tmp_path):
  port = _free_port()
  multi = tmp_path / 'multi'
  overrides = _overrides(synthetic_data_dir)
  commands = [_main(multi, overrides, f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}', '--distributed_timeout=60')
              for i in range(2)]
  codes, logs = _run(commands, _env(2), tmp_path)
  assert codes == [0, 0], '\n\n'.join(log[-3000:] for log in logs)
  for i, log in enumerate(logs):
    assert f'Process {i} of 2: 2 local devices, 4 global devices' in log

  single = tmp_path / 'single'
  codes, logs1 = _run([_main(single, overrides)], _env(4), tmp_path)
  assert codes == [0], logs1[0][-3000:]

  step_m, params_m = _final_params(str(multi))
  step_s, params_s = _final_params(str(single))
  assert step_m == step_s == 4
  flat_m = dict(_flatten(params_m))
  flat_s = dict(_flatten(params_s))
  assert flat_m.keys() == flat_s.keys()
  for k in flat_m:
    np.testing.assert_allclose(flat_m[k], flat_s[k], rtol=1e-5, atol=1e-6, err_msg=k)

  # Only process 0 wrote TensorBoard events.
  # Only process 0 wrote TensorBoard events: one writer (one event file), not one per process.
  events = glob.glob(str(multi / 'events.out.tfevents.*'))
  assert len(events) == 1, events

  # The two processes read disjoint training examples: rebuild each process's stream as main.py
  # did (same config, process_index 0 and 1 of 2) and check that no clip appears in both.
  clips = [_first_clips(synthetic_data_dir, p) for p in range(2)]
  assert not clips[0] & clips[1]

  # A checkpoint written by the 2-process run is restored by a 1-process run.
  codes, logs2 = _run([_main(multi, _overrides(synthetic_data_dir, num_train_steps=6))],
                      _env(1), tmp_path)
  assert codes == [0], logs2[0][-3000:]
  assert 'Resumed from checkpoint at step 4' in logs2[0]


def _records_read(log: str) -> int:
  return int(re.search(r'Input: process \d+ of \d+ read (\d+) records', log).group(1))


@pytest.mark.slow
def test_two_processes_on_a_frame_store_read_half_the_frames_each(synthetic_data_dir,
                                                                   synthetic_frames, tmp_path):
  """Two epochs from a frame store: each of 2 processes reads exactly the frames of its half of
  every global batch, and the params equal those of 1 process x 4 devices."""
  steps, batch, clip_frames = 10, 8, 4  # 10 steps of 8 clips: 2 epochs of the 40 train videos.
  overrides = _overrides(synthetic_data_dir, **{'dataset.name': synthetic_frames,
                                                'num_train_steps': steps, 'eval_every_steps': steps,
                                                'checkpoint_every_steps': steps})
  multi = tmp_path / 'multi'
  port = _free_port()
  commands = [_main(multi, overrides, f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}', '--distributed_timeout=60')
              for i in range(2)]
  codes, logs = _run(commands, _env(2), tmp_path)
  assert codes == [0, 0], '\n\n'.join(log[-3000:] for log in logs)
  single = tmp_path / 'single'
  codes, logs1 = _run([_main(single, overrides)], _env(4), tmp_path)
  assert codes == [0], logs1[0][-3000:]

  assert [_records_read(log) for log in logs] == [steps * batch // 2 * clip_frames] * 2
  assert _records_read(logs1[0]) == steps * batch * clip_frames
  flat_m = dict(_flatten(_final_params(str(multi))[1]))
  flat_s = dict(_flatten(_final_params(str(single))[1]))
  for k in flat_m:
    np.testing.assert_allclose(flat_m[k], flat_s[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _wait_for_text(path, text, procs, timeout=TIMEOUT_S):
  """Polls the log at `path` until it contains `text`; fails if a process exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    with open(path) as f:
      if text in f.read():
        return
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.2)
  with open(path) as f:
    pytest.fail(f'{text!r} did not appear in {path}:\n{f.read()[-3000:]}')


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_every_process_at_one_step(synthetic_data_dir,
                                                                      tmp_path):
  """A preemption notice that reaches one host only: every process saves the same step and
  exits cleanly, and the next 2-process run resumes from it."""
  workdir = tmp_path / 'wd'
  overrides = _overrides(synthetic_data_dir, num_train_steps=5000, log_every_steps=1,
                         checkpoint_every_steps=100000, eval_every_steps=100000)

  def commands(port, overrides):
    return [_main(workdir, overrides, f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}', '--distributed_timeout=60')
            for i in range(2)]

  logs_dir = tmp_path / 'preempted'
  logs_dir.mkdir()
  with _processes(commands(_free_port(), overrides), _env(2), logs_dir) as procs:
    for i in range(2):  # Both are training: step 5's metrics are logged.
      _wait_for_text(logs_dir / f'process_{i}.log', '] [5] ', procs)
    procs[1].send_signal(signal.SIGTERM)  # Not the chief: process 0 learns of it from process 1.
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  logs = [(logs_dir / f'process_{i}.log').read_text() for i in range(2)]
  assert [p.returncode for p in procs] == [0, 0], '\n\n'.join(log[-3000:] for log in logs)
  saved = []
  for log in logs:
    assert 'Preempted: saved checkpoint ' in log, log[-3000:]
    saved.append(int(log.split('Preempted: saved checkpoint ')[1].split()[0]))
  assert 5 <= saved[0] == saved[1] < 5000
  for log in logs:
    assert f'Received a preemption notice: saving a checkpoint at step {saved[0]}' in log
  assert _committed_steps(workdir) == [saved[0]]

  logs_dir = tmp_path / 'resumed'
  logs_dir.mkdir()
  resume = _overrides(synthetic_data_dir, num_train_steps=saved[0] + 2, eval_every_steps=100000)
  codes, logs = _run(commands(_free_port(), resume), _env(2), logs_dir)
  assert codes == [0, 0], '\n\n'.join(log[-3000:] for log in logs)
  for log in logs:
    assert f'Resumed from checkpoint at step {saved[0]}' in log, log[-3000:]
  assert _committed_steps(workdir)[-1] == saved[0] + 2


@pytest.mark.slow
def test_ctrl_c_to_one_process_checkpoints_every_process_at_one_step(synthetic_data_dir, tmp_path):
  """Issue 16.8: Ctrl-C is passed to the preemption sync service like SIGTERM."""
  workdir = tmp_path / 'wd'
  overrides = _overrides(synthetic_data_dir, num_train_steps=5000, log_every_steps=1,
                         checkpoint_every_steps=100000, eval_every_steps=100000)
  port = _free_port()
  commands = [_main(workdir, overrides, f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}', '--distributed_timeout=60')
              for i in range(2)]
  with _processes(commands, _env(2), tmp_path) as procs:
    for i in range(2):
      _wait_for_text(tmp_path / f'process_{i}.log', '] [5] ', procs)
    procs[1].send_signal(signal.SIGINT)
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  logs = [(tmp_path / f'process_{i}.log').read_text() for i in range(2)]
  assert [p.returncode for p in procs] == [0, 0], '\n\n'.join(log[-3000:] for log in logs)
  saved = [int(log.split('saved checkpoint ')[1].split()[0]) for log in logs]
  assert 5 <= saved[0] == saved[1] < 5000 and _committed_steps(workdir) == [saved[0]]
  assert 'Received SIGINT' in logs[1] and 'Traceback' not in logs[1], logs[1][-3000:]


def _first_clips(data_dir, process_index, num_steps=4):
  """Hashes of the training clips a process of 2 reads in its first steps."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  from har_jax.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  config = make_tiny_config(data_dir, deterministic_data=True)
  ds = pipeline.create_train_dataset(datasets.get_builder(config.dataset), config, local_batch=4,
                                     process_index=process_index, process_count=2)
  return {hashlib.sha1(clip.tobytes()).hexdigest()
          for _, batch in zip(range(num_steps), ds.as_numpy_iterator()) for clip in batch['video']}


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f'{prefix}/{k}')
  else:
    yield prefix, np.asarray(tree)


def test_process_id_out_of_range_is_rejected():
  spec = distributed.DistributedSpec(coordinator_address='127.0.0.1:1234', num_processes=2,
                                  process_id=2)
  with pytest.raises(errors.UserError, match='out of range'):
    spec.validate()
  with pytest.raises(errors.UserError, match='missing: process_id'):
    distributed.DistributedSpec(coordinator_address='127.0.0.1:1', num_processes=2).validate()


@pytest.mark.slow
def test_unreachable_coordinator_fails_instead_of_hanging(synthetic_data_dir, tmp_path):
  port = _free_port()  # Nothing listens there: process 1 waits for a coordinator that never comes.
  cmd = _main(tmp_path / 'wd', _overrides(synthetic_data_dir),
              f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--process_id=1',
              '--distributed_timeout=10')
  codes, logs = _run([cmd], _env(1), tmp_path, timeout=240)
  assert codes[0] not in (0, None, -signal.SIGKILL), logs[0][-2000:]
  assert 'Could not join the distributed runtime' in logs[0], logs[0][-2000:]
