"""One training run per workdir (issue 27.6): two runs on one workdir used to interleave their
checkpoints and events, or crash one of them with an orbax traceback."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from har_jax import errors
from har_jax import workdir_lock
from test_resume import tiny_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def test_second_holder_is_refused_naming_the_first(tmp_path):
  with workdir_lock.hold(tmp_path) as record:
    holder = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
    assert (holder['host'], holder['pid']) == (socket.gethostname(), os.getpid())
    with pytest.raises(errors.UserError) as error:
      workdir_lock.acquire(tmp_path)
    assert f'PID {record["pid"]} on host {socket.gethostname()!r}' in str(error.value)
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()  # Released on exit.


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, caplog):
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': _dead_pid(), 'heartbeat': time.time()}))
  with workdir_lock.hold(tmp_path) as record:
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())['pid'] == record['pid']


def test_another_hosts_lock_is_stale_once_its_heartbeat_stops(tmp_path):
  now = time.time()
  other = {'host': 'some-other-host', 'pid': 1, 'heartbeat': now - 30}
  assert workdir_lock.stale_reason(other, now) is None
  other['heartbeat'] = now - workdir_lock.STALE_AFTER_S - 1
  assert 'heartbeat' in workdir_lock.stale_reason(other, now)


def test_heartbeat_is_rewritten(tmp_path):
  with workdir_lock.hold(tmp_path, heartbeat_s=0.05):
    first = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())['heartbeat']
    time.sleep(0.5)
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())['heartbeat'] > first


def test_main_refuses_a_workdir_another_run_holds_in_one_line(tmp_path, synthetic_data_dir):
  with workdir_lock.hold(tmp_path / 'run'):
    done = subprocess.run(
        [sys.executable, 'main.py', '--config=configs/synthetic.py',
         f'--workdir={tmp_path / "run"}', *tiny_flags(synthetic_data_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  errors_ = [line for line in done.stderr.splitlines() if line.startswith('error:')]
  assert len(errors_) == 1 and f'PID {os.getpid()}' in errors_[0], done.stderr[-2000:]
  assert 'Traceback' not in done.stderr
  assert os.listdir(tmp_path / 'run') == []  # The refused run wrote nothing.


def test_a_file_as_workdir_is_one_line_printed_once(tmp_path, synthetic_data_dir):
  """Issue 27.11: a file given as --workdir printed its message twice (then the lock's mkdir made
  it a FileExistsError traceback)."""
  (tmp_path / 'afile').write_text('not a folder')
  done = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/synthetic.py',
       f'--workdir={tmp_path / "afile"}', *tiny_flags(synthetic_data_dir)],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  output = done.stdout + done.stderr
  assert done.returncode == 1 and 'Traceback' not in output, output[-3000:]
  assert output.count('is not a folder') == 1, output[-3000:]
  assert [line for line in done.stderr.splitlines() if line.startswith('error:')] == [
      f'error: {tmp_path / "afile"} is not a folder (it is a file). Pass a --workdir that is a '
      'folder, or a path where one can be created.']
  assert (tmp_path / 'afile').read_text() == 'not a folder'
