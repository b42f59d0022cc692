"""Orbax checkpoints in `<workdir>/checkpoints`: async saves, last-N + best retention, safe restore.

Each checkpoint holds two items:
  'state': the unreplicated TrainState as a state dict (params, opt_state, batch_stats, step, rng).
  'meta':  JSON with the config, the class names and the dataset, so evaluation and prediction
           need nothing but the checkpoint.
`<workdir>/config.json` and `<workdir>/class_names.json` are written beside it for people.
"""

import json
import os
from typing import Any, Optional

from absl import logging
import flax
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = 'top1'
# Config fields that change the parameter tree or the meaning of the outputs: a resume with any of
# these changed is refused. Everything else (steps, eval cadence, learning rate...) may change.
STRUCTURAL_FIELDS = ('model.encoder', 'model.lstm_size', 'model.num_lstm_layers',
                     'model.temporal_pooling', 'model.preprocessing', 'num_classes',
                     'dataset.name', 'optimizer')


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, with the reason."""


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
  return [f'{f}: checkpoint has {_get(saved, f)!r}, config has {_get(current, f)!r}'
          for f in STRUCTURAL_FIELDS if _get(saved, f) != _get(current, f)]


def _best_metric(metrics: Optional[dict]) -> float:
  return float(metrics[BEST_METRIC])


class CheckpointManager:
  """Saves and restores TrainStates under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, dataset_info,
               *, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.config = config
    self.class_names = list(dataset_info.class_names)
    self.meta = {
        'config': json.loads(config.to_json_best_effort()),
        'class_names': self.class_names,
        'dataset': dataset_info.name,
        'num_classes': len(self.class_names),
    }
    keep = max(1, int(config.get('keep_checkpoints', 3)))
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_metric, best_mode='max',
        create=not read_only, read_only=read_only, enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'No checkpoints directory at {self.directory}. Is --workdir right?')
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'meta'))
    if not read_only and jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
      with open(os.path.join(self.workdir, 'class_names.json'), 'w') as f:
        json.dump(self.class_names, f, indent=2)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state, metrics: Optional[dict] = None, *, force: bool = False):
    """Starts an asynchronous save of an unreplicated state (all processes must call this)."""
    meta = dict(self.meta, step=int(step))
    self._manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            meta=ocp.args.JsonSave(meta)),
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
        force=force)

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']

  def restore(self, step: int, target) -> Any:
    """Restores checkpoint `step` into the structure of `target` (an unreplicated state)."""
    meta = self.read_meta(step)
    problems = config_mismatches(meta.get('config', {}), self.config, len(self.class_names),
                                 meta.get('num_classes'))
    if problems:
      raise CheckpointError(
          f'Checkpoint {step} in {self.directory} was written with a different model/dataset '
          'config:\n  ' + '\n  '.join(problems) +
          '\nUse a new --workdir, or restore the original values of these fields.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            flax.serialization.to_state_dict(target))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return flax.serialization.from_state_dict(target, restored['state'])

  def restore_latest(self, target):
    """Restores the newest checkpoint that can be read; returns `target` if there is none.

    An unreadable or incomplete checkpoint is skipped with a logged reason, never deleted.
    A config mismatch is an error (it would be an error for every checkpoint).
    """
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(step, target)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint %d in %s is unreadable (%s: %s); trying an older one.',
                        step, self.directory, type(e).__name__, e)
        continue
      logging.info('Resumed from checkpoint at step %d in %s.', step, self.directory)
      return state
    if self.all_steps():
      raise CheckpointError(f'None of the checkpoints {self.all_steps()} in {self.directory} '
                            'could be read (see the warnings above).')
    logging.info('No checkpoint in %s; starting from scratch.', self.directory)
    return target

  def close(self):
    self._manager.close()
