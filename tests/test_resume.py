"""Preemption-proof training: exact resume after SIGKILL/SIGTERM, and non-finite steps.

The resume tests run `main.py` as subprocesses on the tiny synthetic config. They share one
persistent JAX compilation cache, so only the first process pays for compiling the train step.
"""

import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import conftest
from configs import synthetic
from har_jax import errors
from har_jax import models
from har_jax import parallel
from har_jax import steps
from har_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12
RUN_TIMEOUT_S = 600


def tiny_flags(data_dir, **overrides) -> list[str]:
  """conftest.make_tiny_config as --config.x=y flags over configs/synthetic.py."""
  base = traverse_util.flatten_dict(synthetic.get_config().to_dict(), sep='.')
  tiny = traverse_util.flatten_dict(conftest.make_tiny_config(data_dir, **overrides).to_dict(),
                                    sep='.')
  return [f'--config.{k}={v}' for k, v in sorted(tiny.items()) if base.get(k) != v]


class Run:
  """A `main.py` subprocess whose log lines are collected as they come."""

  def __init__(self, workdir, flags, env, log_path):
    self.lines = []
    self._log = open(log_path, 'a')
    self.proc = subprocess.Popen(
        [sys.executable, 'main.py', '--config=configs/synthetic.py', f'--workdir={workdir}',
         *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)
      self._log.write(line)
    self._log.flush()

  def text(self) -> str:
    return ''.join(self.lines)

  def last_train_step(self) -> int:
    """The newest step whose train metrics were logged (0 if none)."""
    steps = [int(line.split('] [', 1)[1].split(']')[0]) for line in list(self.lines)
             if '] [' in line and 'train/loss=' in line]
    return max(steps, default=0)

  def wait_for(self, predicate, what: str, timeout: float = RUN_TIMEOUT_S, poll: float = 0.05):
    deadline = time.time() + timeout
    while not predicate():
      if self.proc.poll() is not None:
        self._reader.join(5)
        if predicate():
          return
        raise AssertionError(f'Process ended (rc {self.proc.returncode}) before {what}:\n'
                             + self.text()[-5000:])
      if time.time() > deadline:
        self.proc.kill()
        raise AssertionError(f'Timed out waiting for {what}:\n' + self.text()[-5000:])
      time.sleep(poll)

  def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
    rc = self.proc.wait(timeout)
    self._reader.join(10)
    self._log.close()
    return rc


def _committed_steps(workdir) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _tmp_checkpoints(workdir) -> list[str]:
  folder = os.path.join(workdir, 'checkpoints')
  return [n for n in os.listdir(folder) if 'tmp' in n] if os.path.isdir(folder) else []


def _read_state(workdir, step: int) -> dict:
  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'), item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(read_only=True))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return jax.tree.map(np.asarray, state['state'])


def _resumed_from(run: Run):
  for line in run.lines:
    if 'Resumed from checkpoint at step' in line:
      return int(line.split('Resumed from checkpoint at step ')[1].split()[0])
  return None


@pytest.fixture(scope='module')
def resume_runs(synthetic_data_dir, tmp_path_factory):
  """An uninterrupted run and one killed 3 times (SIGKILL, SIGTERM, SIGKILL during a save)."""
  root = tmp_path_factory.mktemp('resume')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', PYTHONUNBUFFERED='1')
  flags = tiny_flags(synthetic_data_dir, num_train_steps=NUM_STEPS, deterministic_data=True,
                     log_every_steps=1, checkpoint_every_steps=2, eval_every_steps=NUM_STEPS)
  log_path = root / 'runs.log'
  seed = int(os.environ.get('HAR_JAX_TEST_SEED', time.time()))
  rng = random.Random(seed)
  events = {'seed': seed, 'runs': []}

  straight = Run(root / 'straight', flags, env, log_path)
  assert straight.finish() == 0, straight.text()[-5000:]
  events['straight'] = root / 'straight'

  workdir = root / 'interrupted'
  # 1. SIGKILL at a random step.
  kill_step = rng.randint(3, 6)
  run = Run(workdir, flags, env, log_path)
  run.wait_for(lambda: _committed_steps(workdir) and run.last_train_step() >= kill_step,
               f'step {kill_step} after a committed checkpoint')
  run.proc.send_signal(signal.SIGKILL)
  run.finish()
  events['sigkill_step'] = kill_step
  events['runs'].append(run)

  # 2. SIGTERM at a later random step: saves there and exits by itself.
  run = Run(workdir, flags, env, log_path)
  start = _resumed_from_wait(run)
  term_step = rng.randint(start + 1, max(start + 1, min(start + 3, NUM_STEPS - 3)))
  run.wait_for(lambda: run.last_train_step() >= term_step, f'step {term_step}')
  run.proc.send_signal(signal.SIGTERM)
  events['sigterm_rc'] = run.finish(timeout=120)
  events['sigterm_start'] = start
  events['sigterm_requested'] = term_step
  events['committed_after_sigterm'] = _committed_steps(workdir)
  events['runs'].append(run)

  # 3. SIGKILL while an async checkpoint save is being written.
  run = Run(workdir, flags, env, log_path)
  run.wait_for(lambda: run.last_train_step() > 0, 'the first train step')
  run.wait_for(lambda: _tmp_checkpoints(workdir), 'an async save', poll=0.0005)
  run.proc.send_signal(signal.SIGKILL)
  run.finish()
  events['killed_save'] = _tmp_checkpoints(workdir)
  events['committed_after_save_kill'] = _committed_steps(workdir)
  events['runs'].append(run)

  # 4. Finish.
  run = Run(workdir, flags, env, log_path)
  events['final_rc'] = run.finish()
  events['runs'].append(run)
  events['interrupted'] = workdir
  print(f'resume_runs: seed {seed}; log in {log_path}')
  return events


def _resumed_from_wait(run: Run) -> int:
  run.wait_for(lambda: _resumed_from(run) is not None or any(
      'starting from scratch' in line for line in run.lines), 'the resume decision')
  return _resumed_from(run) or 0


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes_there(resume_runs):
  runs = resume_runs['runs']
  sigterm_run = runs[1]
  assert resume_runs['sigterm_rc'] == 0, sigterm_run.text()[-3000:]
  text = sigterm_run.text()
  assert 'Received SIGTERM: saving a checkpoint at step' in text
  saved = int(text.split('Received SIGTERM: saving a checkpoint at step ')[1].split()[0])
  assert saved >= resume_runs['sigterm_requested']
  assert f'Preempted: saved checkpoint {saved}' in text
  assert saved in resume_runs['committed_after_sigterm']
  assert max(resume_runs['committed_after_sigterm']) == saved
  assert _resumed_from(runs[2]) == saved


@pytest.mark.slow
def test_kill_during_async_save_resumes_from_the_previous_checkpoint(resume_runs):
  runs = resume_runs['runs']
  killed = resume_runs['killed_save']
  assert killed, 'the SIGKILL did not land during a save'
  killed_step = int(killed[0].split('.')[0])
  assert killed_step not in resume_runs['committed_after_save_kill']
  resumed = _resumed_from(runs[3])
  assert resumed == max(resume_runs['committed_after_save_kill']) < killed_step
  assert not _tmp_checkpoints(resume_runs['interrupted'])  # Cleaned up by the next run.


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_bitwise_identical_params(resume_runs):
  assert resume_runs['final_rc'] == 0, resume_runs['runs'][-1].text()[-3000:]
  assert _committed_steps(resume_runs['interrupted'])[-1] == NUM_STEPS
  expected = _read_state(resume_runs['straight'], NUM_STEPS)
  actual = _read_state(resume_runs['interrupted'], NUM_STEPS)
  assert int(actual['step']) == NUM_STEPS
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert len(paths) == len(jax.tree.leaves(actual))
  for (path, want), got in zip(paths, jax.tree.leaves(actual)):
    assert want.dtype == got.dtype and want.shape == got.shape, jax.tree_util.keystr(path)
    as_bytes = lambda x: np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    assert np.array_equal(as_bytes(want), as_bytes(got)), (
        f'{jax.tree_util.keystr(path)} differs (seed {resume_runs["seed"]})')


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_named_and_no_nan_checkpoint(tiny_config, tmp_path):
  # An absurd learning rate blows the params up within a few steps.
  config = tiny_config(learning_rate=1e38, num_train_steps=8, checkpoint_every_steps=1,
                       eval_every_steps=8, grad_clip_norm=0.0)
  with pytest.raises(errors.UserError, match=r'Non-finite .* at step \d+\. No checkpoint'):
    train.train_and_evaluate(config, str(tmp_path))
  steps = _committed_steps(tmp_path)
  assert steps, 'expected the finite steps before the failure to be checkpointed'
  for step in steps:
    state = _read_state(tmp_path, step)
    for leaf in jax.tree.leaves({'p': state['params'], 'o': state['opt_state']}):
      assert np.all(np.isfinite(leaf)), f'checkpoint {step} holds a non-finite value'


@pytest.mark.slow
def test_skip_nonfinite_updates_keeps_the_state_and_counts_the_step(tiny_config):
  config = tiny_config(skip_nonfinite_updates=True)
  devices = jax.devices()[:1]
  # A NaN learning rate at optimizer count 1: the second update is NaN.
  lr_fn = lambda step: jnp.where(step == 1, jnp.nan, 1e-3)  # pylint: disable=g-long-lambda
  state = train.create_train_state(jax.random.PRNGKey(0), config, 10, lr_fn)
  model = models.create_model(config.model, 10, dtype=config.dtype, bn_axis_name='batch')
  p_step = jax.pmap(functools.partial(steps.train_step, model=model, learning_rate_fn=lr_fn,
                                      config=config), axis_name='batch', devices=devices)
  rng = np.random.RandomState(0)
  batch = {'video': rng.randint(0, 256, (1, 8, 4, 28, 28, 3)).astype(np.uint8),
           'label': rng.randint(0, 10, (1, 8)).astype(np.int32)}
  s0 = parallel.replicate(state, devices)
  s1, out1 = p_step(s0, batch)
  s2, out2 = p_step(s1, batch)
  assert [bool(o['finite'][0]) for o in (out1, out2)] == [True, False]
  assert [int(s.step[0]) for s in (s1, s2)] == [1, 2]  # The data position still advances.
  # Step 2's update was skipped: params, optimizer state and BatchNorm statistics are unchanged.
  for a, b in zip(jax.tree.leaves((s1.params, s1.opt_state, s1.batch_stats)),
                  jax.tree.leaves((s2.params, s2.opt_state, s2.batch_stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_guard_counts_consecutive_skips():
  config = ml_collections.ConfigDict({'skip_nonfinite_updates': True,
                                      'max_consecutive_nonfinite': 3})
  guard = train.NonFiniteGuard(config)
  for step, finite in enumerate([True, False, False, True, False, False], start=1):
    guard.push(step, np.array([finite]))
  guard.flush()
  assert (guard.skipped, guard.consecutive) == (4, 2)
  guard.push(7, np.array([False]))
  with pytest.raises(errors.UserError, match='3 consecutive non-finite steps up to step 7'):
    guard.flush()


def test_nonfinite_guard_without_skipping_names_the_step():
  guard = train.NonFiniteGuard(ml_collections.ConfigDict())
  guard.push(1, np.array([True, True]))
  guard.push(2, np.array([True, False]))  # One replica is enough.
  with pytest.raises(errors.UserError, match='at step 2'):
    guard.push(3, np.array([True, True]))


@pytest.mark.slow
def test_fresh_shuffle_only_without_deterministic_data(tiny_config):
  """Non-deterministic resume reshuffles; deterministic resume continues the same stream."""
  from har_jax.data import datasets, pipeline  # pylint: disable=g-import-not-at-top

  def labels(config, start_step):
    ds = pipeline.create_train_dataset(datasets.get_builder(config.dataset), config,
                                       local_batch=8, start_step=start_step)
    return np.concatenate([b['label'] for _, b in zip(range(4), ds.as_numpy_iterator())])

  det = tiny_config(deterministic_data=True)
  np.testing.assert_array_equal(labels(det, 2)[:16], labels(det, 0)[16:])
  fast = tiny_config(deterministic_data=False)
  assert not np.array_equal(labels(fast, 2)[:16], labels(fast, 0)[16:])
