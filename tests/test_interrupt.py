"""Ctrl-C and SIGTERM on `main.py` (issue 16.8): finish the step, save, exit; a second Ctrl-C exits
at once; a signal during the first compile is logged when it arrives, not when the compile ends.

Each test runs main.py in its own session (start_new_session) and kills the whole group at the end.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from test_resume import _committed_steps, tiny_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420
# A ResNet-18 train step compiles for tens of seconds on CPU: long enough to signal during it.
SLOW_COMPILE = {'model.encoder': 'resnet18', 'image_size': 32, 'dataset.resize_size': 32}


class _Main:
  """main.py in its own process group, with its output lines collected as they come (timed)."""

  def __init__(self, workdir, data_dir, **overrides):
    flags = tiny_flags(data_dir, **dict(dict(num_train_steps=1000, log_every_steps=1,
                                             checkpoint_every_steps=1000, eval_every_steps=1000),
                                        **overrides))
    self.lines = []
    self.proc = subprocess.Popen(
        [sys.executable, 'main.py', '--config=configs/synthetic.py', f'--workdir={workdir}',
         *flags], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED='1'),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append((time.monotonic(), line))

  def text(self) -> str:
    return ''.join(line for _, line in list(self.lines))

  def first(self, pattern: str):
    """(time, line) of the first line matching `pattern`, or None."""
    return next(((t, l) for t, l in list(self.lines) if re.search(pattern, l)), None)

  def wait_for(self, pattern: str, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while self.first(pattern) is None:
      assert self.proc.poll() is None, f'exited before {pattern!r}:\n{self.text()[-4000:]}'
      assert time.monotonic() < deadline, f'no {pattern!r} in time:\n{self.text()[-4000:]}'
      time.sleep(0.02)
    return self.first(pattern)

  def finish(self, timeout: float = TIMEOUT_S) -> int:
    rc = self.proc.wait(timeout)
    self._reader.join(10)
    return rc

  def signal_and_finish(self, signum: int, timeout: float) -> tuple[int, float]:
    """Sends `signum`; returns (exit code, seconds from the signal to the exit)."""
    sent = time.monotonic()
    self.proc.send_signal(signum)
    rc = self.finish(timeout)
    return rc, time.monotonic() - sent

  def kill(self):
    """Kills the process group if it still runs; closes the output pipe."""
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()
    self._reader.join(10)
    self.proc.stdout.close()


def _signal_during_the_first_compile(run: _Main, signum: int) -> tuple[float, float]:
  """Sends `signum` while the first train step compiles; waits for it to be logged.

  Returns:
    (when it was sent, when the log line came), time.monotonic() seconds.
  """
  run.wait_for('Training from step 0')
  time.sleep(1.0)
  sent = time.monotonic()
  run.proc.send_signal(signum)
  logged, _ = run.wait_for(f'Received {signal.Signals(signum).name}', timeout=5)
  assert run.first(r'train/loss=') is None, 'the first step finished too soon to test this'
  return sent, logged


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_exits(tmp_path, synthetic_data_dir):
  run = _Main(tmp_path, synthetic_data_dir)
  try:
    run.wait_for(r'\] \[3\] .*train/loss=')
    rc, took = run.signal_and_finish(signal.SIGINT, timeout=120)
  finally:
    run.kill()
  text = run.text()
  assert rc == 0, text[-4000:]
  assert 'Traceback' not in text and 'KeyboardInterrupt' not in text, text[-4000:]
  saved = int(re.search(r'Interrupted: saved checkpoint (\d+)', text).group(1))
  assert saved >= 3 and _committed_steps(tmp_path) == [saved]
  assert took < 30, f'took {took:.0f} s to exit after Ctrl-C'


@pytest.mark.slow
def test_signal_during_the_first_compile_is_logged_at_once(tmp_path, synthetic_data_dir):
  """SIGTERM while the first step compiles: logged when it arrives; then the usual save and exit."""
  run = _Main(tmp_path, synthetic_data_dir, **SLOW_COMPILE)
  try:
    sent, logged = _signal_during_the_first_compile(run, signal.SIGTERM)
    rc = run.finish()
  finally:
    run.kill()
  assert logged - sent < 5
  assert rc == 0 and 'Preempted: saved checkpoint 1' in run.text(), run.text()[-4000:]
  assert _committed_steps(tmp_path) == [1]


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path, synthetic_data_dir):
  run = _Main(tmp_path, synthetic_data_dir, **SLOW_COMPILE)
  try:
    _signal_during_the_first_compile(run, signal.SIGINT)
    rc, took = run.signal_and_finish(signal.SIGINT, timeout=30)
  finally:
    run.kill()
  text = run.text()
  assert run.first(r'train/loss=') is None, 'the first step finished before the second Ctrl-C'
  assert rc == 128 + signal.SIGINT, text[-4000:]
  assert 'exiting now without saving' in text and 'Traceback' not in text, text[-4000:]
  assert took < 10, f'took {took:.0f} s to exit after the second Ctrl-C'
  assert _committed_steps(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_before_training_starts_exits_without_a_traceback(tmp_path, synthetic_data_dir):
  run = _Main(tmp_path, synthetic_data_dir)
  try:
    run.wait_for('JAX devices')
    run.proc.send_signal(signal.SIGINT)
    rc = run.finish(timeout=60)
  finally:
    run.kill()
  text = run.text()
  assert rc == 128 + signal.SIGINT, text[-4000:]
  assert 'Traceback' not in text and 'Received SIGINT: exiting now' in text, text[-4000:]


_SLOW_PREPARE = '''
import sys, time
sys.path[:0] = [{tests!r}, {repo!r}]
import conftest
from har_jax.commands import {command} as command
from har_jax.data.prepare import {module} as target
original = target.{function}
def slow(*args, **kwargs):  # Long enough to press Ctrl-C while the videos are being decoded.
  time.sleep(0.5)
  return original(*args, **kwargs)
target.{function} = slow
command.run()
'''


@pytest.mark.parametrize('script', ['prepare_video_folder', 'prepare_ucf101'])
def test_ctrl_c_in_a_prepare_script_is_one_line_and_exit_130(tmp_path, script):
  """Issue 27.10: rc 130 was right, the KeyboardInterrupt traceback was not."""
  import conftest  # pylint: disable=g-import-not-at-top
  from har_jax.data import frame_store  # pylint: disable=g-import-not-at-top
  from har_jax.data.prepare import video_folder  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'data'
  if script == 'prepare_video_folder':
    from test_video_folder import make_source  # pylint: disable=g-import-not-at-top
    make_source(str(tmp_path / 'videos'), per_class=4, corrupt=False)
    module, function, marker = 'video_folder', 'decode_video', 'classes;'
    args = [f'--source={tmp_path / "videos"}', f'--data_dir={data_dir}', '--name=mini',
            '--short_side=16', '--num_workers=1']
  else:
    conftest.load_script('make_fake_ucf101').make_fake_ucf101(
        str(tmp_path / 'ucf'), classes=('ApplyEyeMakeup', 'HandstandPushups'), groups=(1, 8, 9),
        clips=1, frames=6, width=32, height=24)
    module, function, marker = 'ucf101', 'extract_frames', 'Extracting the frames'
    args = [f'--source={tmp_path / "ucf"}', f'--data_dir={data_dir}', '--short_side=16',
            '--num_workers=1']
  command = {'prepare_video_folder': 'prepare_videos', 'prepare_ucf101': 'prepare_ucf101'}[script]
  code = _SLOW_PREPARE.format(tests=os.path.join(REPO, 'tests'), repo=REPO, module=module,
                              function=function, command=command)
  proc = subprocess.Popen([sys.executable, '-c', code, *args], cwd=REPO,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if marker in line:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        break
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  text = ''.join(lines)
  assert rc == 128 + signal.SIGINT, text[-4000:]
  assert 'Traceback' not in text and 'KeyboardInterrupt' not in text, text[-4000:]
  interrupted = [line for line in text.splitlines() if line.startswith('interrupted:')]
  assert len(interrupted) == 1 and 'rerun' in interrupted[0], text[-4000:]
  if script == 'prepare_video_folder':
    assert not video_folder.VideoFolder(config=video_folder.VideoFolderConfig(
        name='mini', source=str(tmp_path / 'videos'), short_side=16),
        data_dir=str(data_dir)).is_prepared()
  else:
    assert not frame_store.exists(os.path.join(data_dir, 'ucf101_frames', 's16'))
