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
import errno
import json
import logging as py_logging
import time
from typing import Any, Callable, Optional
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
from har_jax import config_fields
from har_jax import errors
from har_jax import paths

BEST_METRIC = 'top1'

# Orbax warns at every save without metrics when it tracks a best checkpoint; periodic checkpoints
# between evaluations have none by design (BestN ignores them). Only that message is dropped.
_NO_METRICS_WARNING = 'Requested `tracked_metric`; did not provide metrics.'
# Orbax also warns at every read-only open ('Given directory is read only=...'): readers (eval,
# predict, stream, export) open read-only on purpose.
_READ_ONLY_WARNING = 'Given directory is read only'


class _DropNoMetricsWarning(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    message = record.getMessage()
    return message != _NO_METRICS_WARNING and not message.startswith(_READ_ONLY_WARNING)


def install_log_filter():
  """Drops orbax's two expected warnings from absl's logger (once per process): called when a
  CheckpointManager opens, not when this module is imported."""
  absl_logger = py_logging.getLogger('absl')
  if not any(isinstance(f, _DropNoMetricsWarning) for f in absl_logger.filters):
    absl_logger.addFilter(_DropNoMetricsWarning())


# Config fields that change the parameter tree or the meaning of the outputs: a resume with any of
# these changed is refused. Everything else (steps, eval cadence, learning rate...) may change.
STRUCTURAL_FIELDS = ('model.encoder', 'model.lstm_size', 'model.num_lstm_layers',
                     'model.temporal_pooling', 'model.preprocessing', 'model.encoder_kwargs',
                     'num_classes', 'dataset.name', 'optimizer')
# Config fields whose switching on (> 0) or off (0) changes the optimizer state's layout.
LAYOUT_FIELDS = {'grad_clip_norm': 'gradient clipping',
                 'model.freeze_encoder_steps': 'a frozen-encoder phase'}
CORRUPT_DIR = 'checkpoints_corrupt'


class ConfigMismatchError(errors.UserError):
  """The checkpoint was written with a different model/dataset config (true of every checkpoint)."""



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


def config_mismatches(saved_config: dict, config: ml_collections.ConfigDict,
                      num_classes: int, saved_num_classes: int) -> list[str]:
  """Structural fields that differ between a saved config and the current one."""
  current = json.loads(config.to_json_best_effort())
  current['num_classes'], saved = num_classes, dict(saved_config, num_classes=saved_num_classes)
  problems = []
  for f in STRUCTURAL_FIELDS:
    was, now = config_fields.get_or_none(saved, f), config_fields.get_or_none(current, f)
    if (was or None) != (now or None):
      problems.append(f'{f}: checkpoint has {was!r}, config has {now!r}')
  for field, what in LAYOUT_FIELDS.items():
    was, now = config_fields.get_or_none(saved, field), config_fields.get_or_none(current, field)
    if _switched_on(was) != _switched_on(now):
      problems.append(f'{field}: checkpoint has {was!r}, config has {now!r} (turning {what} on '
                      'or off changes the optimizer state)')
  return problems


def _variables(state_dict: dict) -> dict:
  """The model variables of a state dict: {'params', 'batch_stats'}."""
  return {'params': state_dict['params'], 'batch_stats': state_dict.get('batch_stats', {})}


def _switched_on(value) -> bool:
  return isinstance(value, (int, float)) and value > 0


def _best_metric(metrics: Optional[dict]) -> float:
  return float(metrics[BEST_METRIC])


def unwritable_message(folder: paths.PathLike, reason: str) -> str:
  return (f'{folder} cannot be written ({reason}). Give this user write access to it (and free '
          'space), or pass another --workdir.')


def make_writable_folder(folder: paths.PathLike,
                         unwritable: Callable[[str, str], str] = unwritable_message):
  """Creates the workdir (or a folder in it) unless it exists; raises errors.UserError (one line)
  when it is a file or cannot be written, with `unwritable(folder, reason)` as the message."""
  folder = paths.path(folder)
  if folder.exists() and not folder.is_dir():
    raise errors.UserError(f'{folder} is not a folder (it is a file). Pass a --workdir that is '
                           'a folder, or a path where one can be created.')
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.UserError(unwritable(folder, f'{type(e).__name__}: {e.strerror}')) from None
  problem = checkpoint_files.write_problem(folder)
  if problem:
    raise errors.UserError(unwritable(folder, problem))


class CheckpointManager:
  """Saves and restores TrainStates under `<workdir>/checkpoints`.

  Training passes its config and DatasetInfo (saved with every checkpoint and checked on
  restore). Readers (har_jax.inference) open it read-only without them: the checkpoints carry
  their own.
  """

  def __init__(self, workdir: str, config: Optional[ml_collections.ConfigDict] = None,
               dataset_info=None, *, read_only: bool = False):
    if config is None and not read_only:
      raise ValueError('A CheckpointManager that writes needs the config and the DatasetInfo.')
    install_log_filter()
    self.workdir = paths.path(workdir)
    self.read_only = read_only
    self.directory = self.workdir / 'checkpoints'
    self.config = config
    self.meta = None
    if config is not None:
      self.class_names = list(dataset_info.class_names)
      self.meta = {
          'config': json.loads(config.to_json_best_effort()),
          'class_names': self.class_names,
          'dataset': dataset_info.name,
          'num_classes': len(self.class_names),
          'frame_geometry': dataset_info.frame_geometry,
      }
    # At least 2: the previous checkpoint must survive a newer save that fails to complete.
    keep = max(2, int(config_fields.get(config, 'keep_checkpoints'))) if config is not None else 2
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    if read_only and not self.directory.is_dir():
      raise errors.UserError(f'No checkpoints directory at {self.directory}. Is --workdir right?')
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
      with self._write_errors(self.workdir):
        paths.write_text(self.workdir / 'config.json', config.to_json_best_effort(indent=2))
        paths.write_text(self.workdir / 'class_names.json',
                         json.dumps(self.class_names, indent=2))

  def _check_writable(self):
    """Raises errors.UserError unless the workdir and its checkpoints folder can be written."""
    for folder in (self.workdir, self.directory):
      make_writable_folder(folder, self._unwritable)

  def _unwritable(self, folder: str, reason: str) -> str:
    steps = self._manager.all_steps() if hasattr(self, '_manager') else []
    kept = (f' The checkpoints already saved are intact (newest: step {max(steps)}); rerun the '
            'same command to resume from it.') if steps else ''
    return unwritable_message(folder, reason) + kept

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
    path = self.directory / str(int(step))
    if checkpoint_files.lexists(path) and int(step) not in self.all_steps():
      logging.warning('Not saving checkpoint %d: %s exists and is not a har_jax checkpoint. Move '
                      'it out of %s so that this step can be saved.', step, path, self.directory)
      return
    problem = checkpoint_files.write_problem(self.directory)
    state_dict = jax.device_get(flax.serialization.to_state_dict(state))
    needed = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state_dict)) * 11 // 10 + 2**20
    problem = problem or checkpoint_files.space_problem(self.directory, needed)
    if problem:
      raise errors.UserError(self._unwritable(self.directory, problem))
    meta = dict(self.meta, step=int(step), state_crc32=state_checksum(state_dict),
                variables_crc32=state_checksum(_variables(state_dict)))
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
  def _write_errors(self, folder=None):
    """Turns a failed write (an OSError, or tensorstore's RESOURCE_EXHAUSTED of a background
    save, which arrives as a ValueError) into an errors.UserError naming the folder."""
    try:
      yield
    except (OSError, ValueError) as e:
      if isinstance(e, OSError) and e.errno == errno.ENOSPC or 'RESOURCE_EXHAUSTED' in str(e):
        reason = 'the disk is full'
      elif isinstance(e, OSError):
        reason = f'{type(e).__name__}: {e.strerror or e}'
      else:
        raise
      raise errors.UserError(self._unwritable(folder or self.directory, reason)) from None

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']

  def restore_variables(self, step: int, target: dict) -> dict:
    """Restores only the model variables {'params', 'batch_stats'} of checkpoint `step`, into the
    shapes and dtypes of `target` (arrays or jax.ShapeDtypeStruct), as host numpy arrays.

    No optimizer state is read. Their CRC-32 is checked against the one saved with them; a
    checkpoint saved before that existed is restored whole and checked against the state's.
    """
    meta = self.read_meta(step)
    self._check_layout(step, target)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    expected = meta.get('variables_crc32')
    if expected is None:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))['state']
      self._check_crc(step, restored, meta.get('state_crc32'))
      return _variables(restored)
    path = self.directory / self._steps_format.build_name(step) / 'state'
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=restore_args, partial_restore=True))
    restored = _variables(restored)
    self._check_crc(step, restored, expected)
    return restored

  def _check_layout(self, step: int, target_dict):
    """Raises ConfigMismatchError when the saved state's tree does not fit `target_dict` (a
    state dict, or the part of one to restore)."""
    saved_tree = self._manager.item_metadata(step)['state']
    if not jax.tree.leaves(saved_tree):
      raise errors.UserError(f'Checkpoint {step} in {self.directory} is incomplete: its '
                             'state has no tree metadata (state/_METADATA).')
    saved_tree = {k: v for k, v in saved_tree.items() if k in target_dict}
    differences = checkpoint_files.layout_differences(saved_tree, target_dict)
    if differences:
      raise ConfigMismatchError(
          f'Checkpoint {step} in {self.directory} holds a state of a different layout than this '
          'config builds (a config change that alters the parameters or the optimizer state):\n  '
          + '\n  '.join(differences) + '\nUse a new --workdir, or restore the original config.')

  def _check_crc(self, step: int, restored, expected: Optional[str]):
    if expected is not None and state_checksum(restored) != expected:
      raise errors.UserError(
          f'Checkpoint {step} in {self.directory} is corrupt: the CRC-32 of its state is '
          f'{state_checksum(restored)}, but {expected} was saved. Its bytes changed on disk; use '
          'another checkpoint (--checkpoint=<step>).')

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
    self._check_layout(step, target_dict)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_dict)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
    self._check_crc(step, restored, meta.get('state_crc32'))
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
          raise errors.UserError(
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
      raise errors.UserError(
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
      target_dir = self.workdir / CORRUPT_DIR
      for step in steps:
        source = self.directory / str(step)
        if not source.is_dir():
          logging.warning('Cannot move unusable checkpoint %d aside: %s is not a folder.', step,
                          source)
          continue
        destination = target_dir / f'{step}-{int(time.time())}'
        paths.move_tree(source, destination)
        logging.warning('Moved unusable checkpoint %d to %s.', step, destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('har_jax_checkpoint_quarantine')

  def close(self):
    self._manager.close()
