"""Checkpoint safety: corrupt/incomplete checkpoints are skipped, mismatched configs refused."""

import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest

from har_jax import checkpoints
from har_jax import errors
from har_jax import parallel
from har_jax import preemption
from har_jax.data import datasets

INFO = datasets.DatasetInfo(name='toy', class_names=('a', 'b', 'c'), split_sizes={})


def _state(value: float, step: int) -> dict:
  """A small state: a 64k-float 'w' (so its bytes fill a file of their own) and a step."""
  rng = np.random.RandomState(step)
  return {'params': {'w': jnp.asarray(rng.randn(256, 256).astype(np.float32) + value),
                     'b': jnp.full((3,), value, jnp.float32)},
          'step': jnp.asarray(step, jnp.int32)}


def _template() -> dict:
  """What a fresh TrainState looks like: the step is a Python int."""
  return dict(_state(0.0, 0), step=0)


def _manager(workdir, tiny_config, **overrides):
  return checkpoints.CheckpointManager(str(workdir), tiny_config(**overrides), INFO)


def _save_steps(workdir, tiny_config, steps=(1, 2, 3)) -> dict:
  manager = _manager(workdir, tiny_config)
  saved = {}
  for step in steps:
    saved[step] = _state(float(step), step)
    manager.save(step, saved[step])
  manager.close()
  return saved


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(folder: str) -> str:
  files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def test_checksum_changes_with_any_byte():
  state = _state(1.0, 1)
  assert checkpoints.state_checksum(state) == checkpoints.state_checksum(_state(1.0, 1))
  w = np.array(state['params']['w'])
  w.reshape(-1).view(np.uint8)[12345] ^= 1
  changed = dict(state, params=dict(state['params'], w=jnp.asarray(w)))
  assert checkpoints.state_checksum(changed) != checkpoints.state_checksum(state)


@pytest.mark.parametrize('damage', ['garble', 'truncate', 'delete_manifest', 'garble_meta',
                                    'delete_tree_metadata'])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, tiny_config, caplog, damage):
  saved = _save_steps(tmp_path, tiny_config)
  newest = os.path.join(tmp_path, 'checkpoints', '3')
  if damage == 'delete_manifest':
    os.remove(os.path.join(newest, 'state', 'manifest.ocdbt'))
  elif damage == 'delete_tree_metadata':
    os.remove(os.path.join(newest, 'state', '_METADATA'))
  elif damage == 'garble_meta':
    with open(os.path.join(newest, 'meta', 'metadata'), 'w') as f:
      f.write('{"config": {"model": ')
  else:
    path = _largest_file(os.path.join(newest, 'state'))
    data = bytearray(open(path, 'rb').read())
    if damage == 'garble':
      middle = len(data) // 2
      data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    else:
      data = data[:len(data) // 3]
    with open(path, 'wb') as f:
      f.write(bytes(data))

  manager = _manager(tmp_path, tiny_config)
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger='absl'):
    restored = manager.restore_latest(_template())
  _assert_same(restored, saved[2])
  assert 'Checkpoint 3' in caplog.text and 'unusable' in caplog.text
  assert 'Resumed from checkpoint at step 2' in caplog.text
  # Moved aside (kept for inspection), so that training can write step 3 again.
  assert manager.all_steps() == [1, 2]
  assert os.listdir(os.path.join(tmp_path, checkpoints.CORRUPT_DIR))[0].startswith('3-')
  manager.save(3, saved[3])
  manager.wait_until_finished()
  _assert_same(manager.restore(3, _template()), saved[3])
  manager.close()


def test_incomplete_save_is_ignored(tmp_path, tiny_config):
  saved = _save_steps(tmp_path, tiny_config, steps=(1, 2))
  # What a process killed during an async save leaves: an uncommitted temporary folder.
  partial = os.path.join(tmp_path, 'checkpoints', '3.orbax-checkpoint-tmp-1234567890')
  os.makedirs(os.path.join(partial, 'state'))
  with open(os.path.join(partial, 'state', 'junk'), 'wb') as f:
    f.write(b'\0' * 100)
  manager = _manager(tmp_path, tiny_config)
  assert manager.all_steps() == [1, 2]
  _assert_same(manager.restore_latest(_template()), saved[2])
  manager.close()
  # A writing manager (orbax's cleanup of temporary folders) removes it at start (27.7).
  assert not os.path.exists(partial)


@pytest.fixture
def small_disk(tmp_path):
  with conftest.tmpfs(tmp_path / 'disk') as folder:
    yield folder


def test_full_disk_is_one_error_keeping_the_last_checkpoint(small_disk, tiny_config):
  """A full disk during a save used to end in ~900 log lines and 79 tracebacks, with the partial
  folder left behind (27.7). Now: one UserError naming the disk, nothing partial, the previous
  checkpoint intact, and a save works again once space is freed."""
  workdir = small_disk / 'run'
  manager = _manager(workdir, tiny_config)
  manager.save(1, _state(1.0, 1))
  manager.wait_until_finished()
  filler = conftest.fill_disk(small_disk)
  with pytest.raises(errors.UserError, match='the disk is full') as error:
    manager.save(2, _state(2.0, 2))
  assert str(workdir / 'checkpoints') in str(error.value)
  assert 'newest: step 1' in str(error.value)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1']
  os.remove(filler)
  manager.save(2, _state(2.0, 2))
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2]
  manager.close()


def test_all_checkpoints_unreadable_is_an_error(tmp_path, tiny_config):
  _save_steps(tmp_path, tiny_config, steps=(1, 2))
  for step in (1, 2):
    os.remove(os.path.join(tmp_path, 'checkpoints', str(step), 'state', 'manifest.ocdbt'))
  manager = _manager(tmp_path, tiny_config)
  with pytest.raises(errors.UserError, match=r'(?s)step 2: .*step 1: '):
    manager.restore_latest(_template())
  assert manager.all_steps() == [1, 2]  # Nothing moved when nothing could be restored.
  manager.close()


def test_keeps_at_least_two_checkpoints(tmp_path, tiny_config):
  manager = _manager(tmp_path, tiny_config, keep_checkpoints=1)
  for step in (1, 2, 3):
    manager.save(step, _state(float(step), step))
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  manager.close()


def test_saves_without_metrics_log_no_orbax_warning(tmp_path, tiny_config, caplog):
  """Periodic checkpoints between evaluations have no metrics by design: no warning per save.
  The filter drops only that message."""
  caplog.set_level(logging.WARNING)
  manager = _manager(tmp_path, tiny_config)
  manager.save(1, _state(1.0, 1))
  manager.save(2, _state(2.0, 2), {'top1': 0.5})
  manager.wait_until_finished()
  manager.close()
  assert 'tracked_metric' not in caplog.text, caplog.text
  # Readers open read-only on purpose: orbax's warning about it is dropped too (27.11).
  reader = checkpoints.CheckpointManager(str(tmp_path), read_only=True)
  reader.close()
  assert 'read only' not in caplog.text, caplog.text
  logging.getLogger('absl').warning('another orbax warning')
  assert 'another orbax warning' in caplog.text


def test_config_mismatch_names_fields_and_safe_fields_are_allowed(tmp_path, tiny_config):
  saved = _save_steps(tmp_path, tiny_config, steps=(1,))
  safe = _manager(tmp_path, tiny_config, num_train_steps=99, eval_every_steps=7,
                  learning_rate=0.5, checkpoint_every_steps=3)
  _assert_same(safe.restore_latest(_template()), saved[1])
  safe.close()
  changed = _manager(tmp_path, tiny_config, **{'model.lstm_size': 32, 'model.encoder': 'resnet18'})
  with pytest.raises(checkpoints.ConfigMismatchError) as error:
    changed.restore_latest(_template())
  assert 'model.lstm_size: checkpoint has 16, config has 32' in str(error.value)
  assert "model.encoder: checkpoint has 'small_cnn', config has 'resnet18'" in str(error.value)
  changed.close()
  other_classes = checkpoints.CheckpointManager(
      str(tmp_path), tiny_config(), datasets.DatasetInfo('toy', ('a', 'b'), {}))
  with pytest.raises(checkpoints.ConfigMismatchError, match='num_classes: checkpoint has 3'):
    other_classes.restore_latest(_template())
  other_classes.close()


def test_restore_onto_fewer_devices(tmp_path, tiny_config):
  """A checkpoint holds one unreplicated copy, so any device count can resume from it."""
  state = _state(5.0, 4)
  replicated = parallel.replicate(state, jax.devices())
  manager = _manager(tmp_path, tiny_config)
  manager.save(4, parallel.unreplicate(replicated))
  manager.wait_until_finished()
  restored = manager.restore_latest(_template())
  on_two = parallel.replicate(restored, jax.devices()[:2])
  assert on_two['params']['w'].shape == (2, 256, 256)
  _assert_same(parallel.unreplicate(on_two), state)
  manager.close()


def test_replicate_matches_pmap_output_sharding():
  """Otherwise the first train step compiles twice (once per sharding)."""
  state = {'w': np.ones((3,), np.float32)}
  double = jax.pmap(lambda s: jax.tree.map(lambda x: x * 2, s), axis_name='batch')
  out = double(parallel.replicate(state))
  assert out['w'].sharding == parallel.replicate(state)['w'].sharding


def test_preemption_notice_turns_sigterm_into_a_flag():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionNotice(initial_step=0) as notice:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.reached(2)
    assert notice.reached(3)
  assert signal.getsignal(signal.SIGTERM) is previous


def test_preemption_notice_turns_ctrl_c_into_a_flag(caplog):
  """Issue 16.8: Ctrl-C is a request to save and stop, like SIGTERM, not a KeyboardInterrupt."""
  previous = signal.getsignal(signal.SIGINT)
  caplog.set_level(logging.WARNING)
  with preemption.PreemptionNotice(initial_step=0) as notice:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(100):  # The notice is logged by a watcher thread.
      if 'Received SIGINT' in caplog.text:
        break
      time.sleep(0.01)
    assert notice.reached(2)
    assert notice.cause == 'Interrupted'
  assert 'Received SIGINT' in caplog.text and 'Ctrl-C again' in caplog.text
  assert signal.getsignal(signal.SIGINT) is previous
