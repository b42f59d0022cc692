"""What is in `<workdir>/checkpoints` (issue 16.4-16.7): damaged metrics, foreign files, layout
changes, I/O errors and unwritable workdirs are each named, and nothing saved is ever lost."""

import contextlib
import errno
import logging
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from har_jax import checkpoints
from har_jax import errors
from har_jax import inference
from har_jax import optim
from har_jax import train
from test_checkpoints import INFO, _assert_same, _manager, _save_steps, _state, _template

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def read_only(path):
  """Makes folder `path` unwritable for this user (root: the immutable attribute, chattr +i)."""
  path = str(path)
  if os.geteuid() == 0:
    if subprocess.run(['chattr', '+i', path], capture_output=True, check=False).returncode:
      pytest.skip('running as root and chattr +i is not available: cannot make a read-only folder')
    try:
      yield
    finally:
      subprocess.run(['chattr', '-i', path], check=True)
  else:
    mode = os.stat(path).st_mode
    os.chmod(path, 0o555)
    try:
      yield
    finally:
      os.chmod(path, mode)


def _corrupt_dir_entries(workdir) -> list[str]:
  folder = os.path.join(workdir, checkpoints.CORRUPT_DIR)
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _save_with_metrics(workdir, tiny_config, steps=(1, 2, 3)) -> dict:
  manager = _manager(workdir, tiny_config)
  saved = {}
  for step in steps:
    saved[step] = _state(float(step), step)
    manager.save(step, saved[step], metrics={'top1': step / 10})
  manager.close()
  return saved


@pytest.mark.parametrize('content', ['', '{"top1": 0.', '[1, 2]', '\xff\xfe'],
                         ids=['empty', 'garbled', 'not_an_object', 'binary'])
def test_damaged_metrics_file_is_quarantined_and_training_resumes(tmp_path, tiny_config, caplog,
                                                                   content):
  """Issue 16.4: orbax's constructor read every metrics file, so one bad file stopped everything."""
  saved = _save_with_metrics(tmp_path, tiny_config)
  with open(tmp_path / 'checkpoints' / '3' / 'metrics' / 'metrics', 'w',
            encoding='latin-1') as f:
    f.write(content)
  caplog.set_level(logging.WARNING)
  manager = _manager(tmp_path, tiny_config)
  _assert_same(manager.restore_latest(_template()), saved[2])
  assert manager.all_steps() == [1, 2] and manager.best_step() == 2
  assert [e.split('-')[0] for e in _corrupt_dir_entries(tmp_path)] == ['3']
  assert 'Checkpoint 3' in caplog.text and 'metrics' in caplog.text
  manager.save(3, saved[3], metrics={'top1': 0.3})  # The step can be written again.
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2, 3]
  manager.close()


def test_damaged_metrics_file_is_skipped_read_only(tmp_path, tiny_config, caplog):
  """--mode=eval and predict.py (read-only) skip the step, and move nothing."""
  _save_with_metrics(tmp_path, tiny_config)
  open(tmp_path / 'checkpoints' / '3' / 'metrics' / 'metrics', 'w').close()
  caplog.set_level(logging.WARNING)
  manager = inference.open_checkpoints(str(tmp_path))
  assert inference.resolve_steps(manager, 'latest') == [2]
  manager.close()
  assert 'Checkpoint 3' in caplog.text and not _corrupt_dir_entries(tmp_path)
  assert os.path.isdir(tmp_path / 'checkpoints' / '3')


def test_foreign_entries_are_never_deleted_or_replaced(tmp_path, tiny_config, caplog):
  """Issue 16.5: keep-last-N deleted a user's checkpoints/5/model.pt; a file '30' was replaced."""
  folder = tmp_path / 'checkpoints'
  (folder / '5').mkdir(parents=True)
  (folder / '5' / 'model.pt').write_text('weights')
  (folder / '30').write_text('mine')
  (folder / 'notes').mkdir()
  caplog.set_level(logging.WARNING)
  manager = _manager(tmp_path, tiny_config, keep_checkpoints=2)
  assert manager.all_steps() == []
  for name in ("'5'", "'30'", "'notes'"):
    assert name in caplog.text, caplog.text
  for step in (10, 20, 30, 40):
    manager.save(step, _state(float(step), step))
  manager.save_now(50, _state(50.0, 50))
  manager.wait_until_finished()
  assert manager.all_steps() == [40, 50]
  assert (folder / '5' / 'model.pt').read_text() == 'weights'
  assert (folder / '30').read_text() == 'mine' and (folder / 'notes').is_dir()
  assert 'Not saving checkpoint 30' in caplog.text
  manager.close()


def _train_state_template(config):
  state = train.create_train_state(jax.random.PRNGKey(config.seed), config,
                                   len(INFO.class_names), optim.create_learning_rate_fn(config))
  return state.replace(step=np.asarray(state.step, np.int32))


@pytest.mark.parametrize('saved_with,resumed_with,field', [
    ({'grad_clip_norm': 1.0}, {'grad_clip_norm': 0.0}, 'grad_clip_norm'),
    ({'grad_clip_norm': 0.0}, {'grad_clip_norm': 1.0}, 'grad_clip_norm'),
    ({'model.freeze_encoder_steps': 0}, {'model.freeze_encoder_steps': 5},
     'model.freeze_encoder_steps'),
    ({'model.freeze_encoder_steps': 5}, {'model.freeze_encoder_steps': 0},
     'model.freeze_encoder_steps'),
])
@pytest.mark.slow
def test_optimizer_layout_change_names_the_field(tmp_path, tiny_config, saved_with,
                                                 resumed_with, field):
  """Issue 16.6: these were reported as unreadable checkpoints, with advice to move them away."""
  config = tiny_config(**saved_with)
  manager = checkpoints.CheckpointManager(str(tmp_path), config, INFO)
  manager.save_now(2, _train_state_template(config))
  manager.close()
  changed = tiny_config(**resumed_with)
  manager = checkpoints.CheckpointManager(str(tmp_path), changed, INFO)
  with pytest.raises(checkpoints.ConfigMismatchError, match=f'{field}: checkpoint has') as error:
    manager.restore_latest(_train_state_template(changed))
  assert 'Move them away' not in str(error.value)
  assert manager.all_steps() == [2] and not _corrupt_dir_entries(tmp_path)
  manager.close()


def test_any_layout_mismatch_is_a_mismatch_not_corruption(tmp_path, tiny_config):
  _save_steps(tmp_path, tiny_config, steps=(1, 2))
  manager = _manager(tmp_path, tiny_config)
  other = dict(_template(), params=dict(_template()['params'], extra=_template()['params']['b']))
  with pytest.raises(checkpoints.ConfigMismatchError, match=r"(?s)layout.*\['params'\]\['extra'\]"):
    manager.restore_latest(other)
  assert manager.all_steps() == [1, 2] and not _corrupt_dir_entries(tmp_path)
  manager.close()


@pytest.mark.parametrize('error', [OSError(errno.EIO, 'Input/output error'),
                                   PermissionError(errno.EACCES, 'Permission denied'),
                                   ValueError('UNAVAILABLE: Error reading local file')],
                         ids=['eio', 'eacces', 'tensorstore_unavailable'])
def test_transient_io_error_is_not_treated_as_corruption(tmp_path, tiny_config, monkeypatch,
                                                         error):
  _save_steps(tmp_path, tiny_config, steps=(1, 2))
  manager = _manager(tmp_path, tiny_config)
  original = manager._manager.restore  # pylint: disable=protected-access

  def flaky(step, args=None):
    if 'state' in args.keys():
      raise error
    return original(step, args=args)

  monkeypatch.setattr(manager._manager, 'restore', flaky)  # pylint: disable=protected-access
  with pytest.raises(errors.UserError, match='(?s)step 2.*I/O.*nothing was moved'):
    manager.restore_latest(_template())
  assert manager.all_steps() == [1, 2] and not _corrupt_dir_entries(tmp_path)
  manager.close()


def test_workdir_that_is_a_file_or_unwritable_is_a_clear_error(tmp_path, tiny_config):
  """Issue 16.7: both gave a traceback."""
  (tmp_path / 'file').write_text('not a folder')
  with pytest.raises(errors.UserError, match='file.* is not a folder'):
    checkpoints.CheckpointManager(str(tmp_path / 'file'), tiny_config(), INFO)
  locked = tmp_path / 'locked'
  locked.mkdir()
  with read_only(locked):
    with pytest.raises(errors.UserError, match='(?s)locked.*cannot be written'):
      checkpoints.CheckpointManager(str(locked), tiny_config(), INFO)
    with pytest.raises(errors.UserError, match='cannot be written'):
      checkpoints.CheckpointManager(str(locked / 'new'), tiny_config(), INFO)


_MID_RUN = textwrap.dedent('''
    import sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    import conftest
    from har_jax import checkpoints, errors
    from test_checkpoints import INFO, _state
    manager = checkpoints.CheckpointManager({workdir!r}, conftest.make_tiny_config({data!r}), INFO)
    manager.save(1, _state(1.0, 1))
    manager.wait_until_finished()
    print('saved 1', flush=True)
    sys.stdin.readline()  # The test makes checkpoints/ read-only here.
    try:
      manager.save(2, _state(2.0, 2))
      manager.save(3, _state(3.0, 3))
      manager.wait_until_finished()
    except errors.UserError as e:
      print('error:', e, flush=True)
      sys.exit(1)
''')


@pytest.mark.slow
def test_checkpoints_folder_turning_read_only_mid_run_fails_promptly(tmp_path, synthetic_data_dir):
  """Issue 16.7: a traceback, then a ~5-minute hang on orbax's background timeout."""
  workdir = tmp_path / 'workdir'
  script = _MID_RUN.format(tests=os.path.join(REPO, 'tests'), repo=REPO, workdir=str(workdir),
                           data=str(synthetic_data_dir))
  proc = subprocess.Popen([sys.executable, '-c', script], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    assert proc.stdout.readline().strip() == 'saved 1', proc.stderr.read()[-3000:]
    with read_only(workdir / 'checkpoints'):
      start = time.monotonic()
      out, err = proc.communicate('go\n', timeout=120)
      elapsed = time.monotonic() - start
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 1, err[-3000:]
  assert 'error: ' in out and 'checkpoints' in out and 'cannot be written' in out, out
  assert 'Traceback' not in err, err[-3000:]
  assert elapsed < 60, f'took {elapsed:.0f} s to exit'
