"""Orbax checkpoints in `<workdir>/checkpoints`: async saves, last-N + best retention, safe restore.

Each checkpoint holds two items:
  'state': the unreplicated TrainState as a state dict (params, opt_state, batch_stats, step, rng).
  'meta':  JSON with the config, the class names, the dataset and a CRC-32 of every byte of the
           state, so evaluation and prediction need nothing but the checkpoint, and a checkpoint
           whose bytes changed on disk is detected (orbax itself restores garbled data silently).
`<workdir>/config.json` and `<workdir>/class_names.json` are written beside it for people.

Safety: orbax writes each checkpoint into a temporary folder and commits it by renaming, so a save
cut short is never listed; old checkpoints are deleted only after a newer one is committed, and at
least the two newest are kept. A committed checkpoint that cannot be read (or fails its CRC) is
skipped by restore_latest, with the reason logged, and moved to `<workdir>/checkpoints_corrupt/`
once an older one restores, so that training can write that step again. A step whose metrics file
is damaged is moved there at start (read-only users skip it). Entries of `checkpoints/` that
har_jax did not write are never deleted or replaced (see `checkpoint_files`). A config change that
changes the saved state's layout, and an I/O error while reading, are reported as such: neither
moves a checkpoint. An unwritable workdir is an error at start, and at the next save.
"""

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any, Optional
import zlib

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from har_jax import checkpoint_files

BEST_METRIC = 'top1'
# Config fields that change the parameter tree or the meaning of the outputs: a resume with any of
# these changed is refused. Everything else (steps, eval cadence, learning rate...) may change.
STRUCTURAL_FIELDS = ('model.encoder', 'model.lstm_size', 'model.num_lstm_layers',
                     'model.temporal_pooling', 'model.preprocessing', 'model.encoder_kwargs',
                     'num_classes', 'dataset.name', 'optimizer')
# Config fields whose switching on (> 0) or off (0) changes the optimizer state's layout.
LAYOUT_FIELDS = {'grad_clip_norm': 'gradient clipping',
                 'model.freeze_encoder_steps': 'a frozen-encoder phase'}
CORRUPT_DIR = 'checkpoints_corrupt'


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, with the reason."""


class ConfigMismatchError(CheckpointError):
  """The checkpoint was written with a different model/dataset config (true of every checkpoint)."""


class CorruptCheckpointError(CheckpointError):
  """The checkpoint's bytes differ from those that were saved."""


def _canonical(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  array = np.asarray(jax.device_get(leaf))
  if array.ndim == 0 and np.issubdtype(array.dtype, np.integer):
    array = array.astype(np.int64)  # A counter may come back as a Python int (an int64).
  return array


def state_checksum(state_dict) -> str:
  """CRC-32 (8 hex digits) over the paths, dtypes, shapes and bytes of every leaf of a state dict."""
  crc = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state_dict)[0]:
    array = _canonical(leaf)
    crc = zlib.crc32(f'{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};'.encode(), crc)
    crc = zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data, crc)
  return f'{crc:08x}'


class _SignalWatcher:
  """Calls `callback(signum)` from a thread as soon as a signal with a Python handler arrives.

  Python runs signal handlers only between bytecodes of the main thread, so not while it is inside
  an XLA compile or step; the C-level handler writes the signal number to `signal.set_wakeup_fd`
  at once, and this thread reads it. Main thread only; `close()` restores the previous wakeup fd.
  """

  def __init__(self, callback, signals):
    self._read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)
    self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._run, args=(callback, set(signals)),
                                    name='har_jax_signals', daemon=True)
    self._thread.start()

  def _run(self, callback, signals):
    while data := os.read(self._read_fd, 64):  # b'' once close() closed the write end.
      for signum in data:
        if signum in signals:
          callback(signum)

  def close(self):
    signal.set_wakeup_fd(self._previous_fd)
    os.close(self._write_fd)
    self._thread.join(5)
    os.close(self._read_fd)


def _exit_at_once(signum: int, what: str):
  """Logs 'Received <signal><what>' and ends the process now, exit code 128 + signum."""
  logging.warning('Received %s%s The checkpoints already committed are kept; rerun the same '
                  'command to resume.', signal.Signals(signum).name, what)
  logging.flush()
  os._exit(128 + signum)  # pylint: disable=protected-access


@contextlib.contextmanager
def exit_on_interrupt():
  """Within this context, Ctrl-C exits at once (exit code 130), for phases with nothing to save.

  A PreemptionNotice entered inside takes over until it closes. Orbax commits checkpoints
  atomically, so those already committed are kept; without this, a KeyboardInterrupt can be
  swallowed (raised inside a garbage-collection callback) or wait for an XLA compile to end.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  previous = signal.signal(signal.SIGINT, lambda *_: None)
  watcher = _SignalWatcher(lambda signum: _exit_at_once(signum, ': exiting now.'), [signal.SIGINT])
  try:
    yield
  finally:
    watcher.close()
    signal.signal(signal.SIGINT, previous)


class PreemptionNotice:
  """Turns SIGTERM (a preemption notice) or SIGINT (Ctrl-C) into one step at which every process
  saves a checkpoint and stops.

  One process: the signal is logged the moment it arrives (even during the first compile) and
  `reached(step)` is True from the next step on. A second Ctrl-C exits at once, without saving
  (exit code 130): the checkpoints already committed stay. Several processes: JAX's preemption
  sync service (started by jax.distributed.initialize) picks a step that every process reaches,
  and Ctrl-C is passed to it as a SIGTERM; where the service is off, the local flags are OR-ed
  across processes at every step. Use as a context manager: the previous handlers are restored.
  """

  def __init__(self, initial_step: int, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signum = None
    self._received = []  # Every signal the watcher saw, in order.
    self._stepped = False  # Whether reached() was called, i.e. a step has finished.
    self._announced = False
    self._previous = {}
    self._use_service = False
    self._watcher = None
    if jax.process_count() > 1:
      try:
        multihost_utils.reached_preemption_sync_point(int(initial_step))
        self._use_service = True
      except RuntimeError:
        pass
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not in the main thread: SIGTERM and Ctrl-C will not trigger a checkpoint.')
      return
    # With the service, SIGTERM belongs to it (its own handler); Ctrl-C is forwarded to it.
    handled = [s for s in signals if not (self._use_service and s == signal.SIGTERM)]
    for signum in handled:
      self._previous[signum] = signal.signal(signum, self._handle)
    self._watcher = _SignalWatcher(self._on_signal, handled)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._watcher is None:  # The watcher logs and counts signals; without it, do it here.
      self._on_signal(signum)
    elif not self._use_service:
      self._signum = self._signum or signum

  def _on_signal(self, signum: int):
    """Logs a signal when it arrives and records it (only a flag: the loop acts between steps);
    exits at once on a second Ctrl-C."""
    name = signal.Signals(signum).name
    self._received.append(signum)
    if self._received.count(signal.SIGINT) > 1:
      _exit_at_once(signum, ' again: exiting now without saving.')
    if len(self._received) > 1:
      logging.warning('Received %s again; still finishing the step to save a checkpoint.', name)
      return
    logging.warning(
        'Received %s: finishing the current step%s, then saving a checkpoint and stopping.%s', name,
        '' if self._stepped else ' (the first one includes compiling, which can take minutes)',
        ' Press Ctrl-C again to exit at once without saving.' if signum == signal.SIGINT else '')
    if self._use_service:
      os.kill(os.getpid(), signal.SIGTERM)  # The preemption sync service's own notice.
    else:
      self._signum = self._signum or signum

  @property
  def cause(self) -> str:
    """'Interrupted' after Ctrl-C, else 'Preempted'."""
    return 'Interrupted' if self._signum == signal.SIGINT else 'Preempted'

  def reached(self, step: int) -> bool:
    """True when training should save a checkpoint at `step` and stop."""
    if self._use_service:
      flag = bool(multihost_utils.reached_preemption_sync_point(int(step)))
    else:
      flag = self._signum is not None
      if jax.process_count() > 1:
        flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    self._stepped = True
    if flag and not self._announced:
      self._announced = True
      name = signal.Signals(self._signum).name if self._signum else 'a preemption notice'
      logging.warning('Received %s: saving a checkpoint at step %d and stopping.', name, step)
    return flag

  def close(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    if self._watcher is not None:
      self._watcher.close()
      self._watcher = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _get(tree: dict, dotted: str):
  for part in dotted.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def config_mismatches(saved_config: dict, config: ml_collections.ConfigDict,
                      num_classes: int, saved_num_classes: int) -> list[str]:
  """Structural fields that differ between a saved config and the current one."""
  current = json.loads(config.to_json_best_effort())
  current['num_classes'], saved = num_classes, dict(saved_config, num_classes=saved_num_classes)
  problems = [f'{f}: checkpoint has {_get(saved, f)!r}, config has {_get(current, f)!r}'
              for f in STRUCTURAL_FIELDS if (_get(saved, f) or None) != (_get(current, f) or None)]
  for field, what in LAYOUT_FIELDS.items():
    if _switched_on(_get(saved, field)) != _switched_on(_get(current, field)):
      problems.append(f'{field}: checkpoint has {_get(saved, field)!r}, config has '
                      f'{_get(current, field)!r} (turning {what} on or off changes the optimizer '
                      'state)')
  return problems


def _switched_on(value) -> bool:
  return isinstance(value, (int, float)) and value > 0


def _best_metric(metrics: Optional[dict]) -> float:
  return float(metrics[BEST_METRIC])


class CheckpointManager:
  """Saves and restores TrainStates under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, dataset_info,
               *, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.read_only = read_only
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.config = config
    self.class_names = list(dataset_info.class_names)
    self.meta = {
        'config': json.loads(config.to_json_best_effort()),
        'class_names': self.class_names,
        'dataset': dataset_info.name,
        'num_classes': len(self.class_names),
    }
    # At least 2: the previous checkpoint must survive a newer save that fails to complete.
    keep = max(2, int(config.get('keep_checkpoints', 3)))
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'No checkpoints directory at {self.directory}. Is --workdir right?')
    if not read_only:
      self._check_writable()
    self._steps_format = checkpoint_files.OwnStepsFormat(hidden=self._set_aside_damaged())
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_metric, best_mode='max',
        create=not read_only, read_only=read_only, enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only, step_name_format=self._steps_format)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    if not read_only and jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
      with open(os.path.join(self.workdir, 'class_names.json'), 'w') as f:
        json.dump(self.class_names, f, indent=2)

  def _check_writable(self):
    """Raises CheckpointError unless the workdir and its checkpoints folder can be written."""
    for folder in (self.workdir, self.directory):
      if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f'{folder} is not a folder (it is a file). Pass a --workdir that is '
                              'a folder, or a path where one can be created.')
      try:
        os.makedirs(folder, exist_ok=True)
      except OSError as e:
        reason = f'{type(e).__name__}: {e.strerror}'
        raise CheckpointError(self._unwritable(folder, reason)) from None
      problem = checkpoint_files.write_problem(folder)
      if problem:
        raise CheckpointError(self._unwritable(folder, problem))

  def _unwritable(self, folder: str, reason: str) -> str:
    steps = self._manager.all_steps() if hasattr(self, '_manager') else []
    kept = (f' The checkpoints already saved are intact (newest: step {max(steps)}); rerun the '
            'same command to resume from it.') if steps else ''
    return (f'{folder} cannot be written ({reason}). Give this user write access to it (and free '
            f'space), or pass another --workdir.{kept}')

  def _set_aside_damaged(self) -> set[int]:
    """Quarantines (read-only: hides) own steps with a damaged metrics file; warns about foreign
    entries. Returns the steps orbax must not see."""
    found = checkpoint_files.inventory(self.directory, BEST_METRIC)
    if found.foreign:
      logging.warning(
          'Leaving alone %d entries of %s that are not har_jax checkpoints: %s. They are never '
          'deleted or replaced; a checkpoint whose step number one of them occupies is not saved.',
          len(found.foreign), self.directory, ', '.join(repr(n) for n in found.foreign))
    for step, reason in sorted(found.damaged_metrics.items()):
      logging.warning('Checkpoint %d in %s is unusable: %s.', step, self.directory, reason)
    if found.damaged_metrics and not self.read_only:
      self._move_aside(sorted(found.damaged_metrics))
      return set()
    return set(found.damaged_metrics)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state, metrics: Optional[dict] = None, *, force: bool = False):
    """Starts an asynchronous save of an unreplicated state (all processes must call this).

    The state is copied to host numpy first: every process holds the same replicated values, and
    orbax writes host arrays once (from process 0) in a multi-host run.
    """
    path = os.path.join(self.directory, str(int(step)))
    if os.path.lexists(path) and int(step) not in self.all_steps():
      logging.warning('Not saving checkpoint %d: %s exists and is not a har_jax checkpoint. Move '
                      'it out of %s so that this step can be saved.', step, path, self.directory)
      return
    problem = checkpoint_files.write_problem(self.directory)
    if problem:
      raise CheckpointError(self._unwritable(self.directory, problem))
    state_dict = jax.device_get(flax.serialization.to_state_dict(state))
    meta = dict(self.meta, step=int(step), state_crc32=state_checksum(state_dict))
    with self._write_errors():
      self._manager.save(
          int(step), args=ocp.args.Composite(
              state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(meta)),
          metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
          force=force)

  def save_now(self, step: int, state, metrics: Optional[dict] = None):
    """Saves synchronously: returns once checkpoint `step` is committed (e.g. on preemption)."""
    if step not in self.all_steps():
      self.save(step, state, metrics, force=True)
    self.wait_until_finished()

  def wait_until_finished(self):
    with self._write_errors():
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _write_errors(self):
    """Turns an OSError of a (background) save into a CheckpointError naming the folder."""
    try:
      yield
    except OSError as e:
      raise CheckpointError(self._unwritable(
          self.directory, f'{type(e).__name__}: {e.strerror or e}')) from None

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']

  def restore(self, step: int, target) -> Any:
    """Restores checkpoint `step` into the structure of `target` (an unreplicated state)."""
    meta = self.read_meta(step)
    problems = config_mismatches(meta.get('config', {}), self.config, len(self.class_names),
                                 meta.get('num_classes'))
    if problems:
      raise ConfigMismatchError(
          f'Checkpoint {step} in {self.directory} was written with a different model/dataset '
          'config:\n  ' + '\n  '.join(problems) +
          '\nUse a new --workdir, or restore the original values of these fields.')
    target_dict = flax.serialization.to_state_dict(target)
    saved_tree = self._manager.item_metadata(step)['state']
    if not jax.tree.leaves(saved_tree):
      raise CorruptCheckpointError(f'Checkpoint {step} in {self.directory} is incomplete: its '
                                   'state has no tree metadata (state/_METADATA).')
    differences = checkpoint_files.layout_differences(saved_tree, target_dict)
    if differences:
      raise ConfigMismatchError(
          f'Checkpoint {step} in {self.directory} holds a state of a different layout than this '
          'config builds (a config change that alters the parameters or the optimizer state):\n  '
          + '\n  '.join(differences) + '\nUse a new --workdir, or restore the original config.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_dict)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
    expected = meta.get('state_crc32')
    if expected is not None and state_checksum(restored) != expected:
      raise CorruptCheckpointError(
          f'Checkpoint {step} in {self.directory} is corrupt: the CRC-32 of its state is '
          f'{state_checksum(restored)}, but {expected} was saved.')
    return flax.serialization.from_state_dict(target, restored)

  def restore_latest(self, target):
    """Restores the newest checkpoint that can be read; returns `target` if there is none.

    An unreadable, incomplete or corrupt checkpoint is skipped with a logged reason. Once an
    older one restores, the skipped ones are moved to `<workdir>/checkpoints_corrupt/` (never
    deleted), so that their steps can be saved again. A config mismatch is an error (it would be
    an error for every checkpoint).
    """
    failed = []
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(step, target)
      except ConfigMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = f'{type(e).__name__}: {str(e)[:500]}'
        if checkpoint_files.is_io_error(e):
          raise CheckpointError(
              f'Could not read checkpoint step {step} in {self.directory}: {reason}\nThis is an '
              'I/O problem (access, disk or network), not a damaged checkpoint, so nothing was '
              'moved. Fix access to the folder and rerun the same command.') from None
        logging.warning('Checkpoint %d in %s is unusable (%s); trying an older one.',
                        step, self.directory, reason)
        failed.append((step, reason))
        continue
      if failed:
        self._quarantine([s for s, _ in failed])
      logging.info('Resumed from checkpoint at step %d in %s.', step, self.directory)
      return state
    if failed:
      raise CheckpointError(
          f'None of the checkpoints in {self.directory} could be read:\n  ' +
          '\n  '.join(f'step {s}: {r}' for s, r in failed) +
          '\nThey are damaged and were left in place; use a new --workdir to start from '
          'scratch (or move them away to inspect them).')
    logging.info('No checkpoint in %s; starting from scratch.', self.directory)
    return target

  def _quarantine(self, steps: list[int]):
    """Moves unusable checkpoints to <workdir>/checkpoints_corrupt/<step>-<unix time>."""
    if self.read_only:
      return
    self._move_aside(steps)
    self._manager.reload()

  def _move_aside(self, steps: list[int]):
    """Process 0 moves checkpoint folders `steps` to <workdir>/checkpoints_corrupt/; all wait."""
    if jax.process_index() == 0:
      target_dir = os.path.join(self.workdir, CORRUPT_DIR)
      os.makedirs(target_dir, exist_ok=True)
      for step in steps:
        source = os.path.join(self.directory, str(step))
        if not os.path.isdir(source):
          logging.warning('Cannot move unusable checkpoint %d aside: %s is not a folder.', step,
                          source)
          continue
        destination = os.path.join(target_dir, f'{step}-{int(time.time())}')
        os.rename(source, destination)
        logging.warning('Moved unusable checkpoint %d to %s.', step, destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('har_jax_checkpoint_quarantine')

  def close(self):
    self._manager.close()
