"""Runs a pmapped eval step over a split: every video exactly once, on any topology.

Eval datasets are padded to the same number of batches on every process and padded rows carry
mask 0; per-video outputs are gathered from all processes and unpadded.
"""

from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from har_jax.data import pipeline
from har_jax.evaluation import metrics


def run_eval(p_eval_step, variables, source, config, split: str, *, max_examples: int = 0,
             devices: Optional[list] = None, **step_kwargs) -> metrics.EvalOutputs:
  """Runs a pmapped eval step over `split` and gathers the per-video outputs of all processes.

  Args:
    p_eval_step: har_jax.steps.eval_step, pmapped over `devices`.
    variables: the model's {'params', 'batch_stats'}, replicated over `devices`.
    source: the dataset (a DataSource, or what datasets.get_builder returns).
    devices: the local devices `p_eval_step` was pmapped over (default: all local devices).
  """
  local_batch = config.eval.batch_size // jax.process_count()
  data = pipeline.create_eval_dataset(
      source, config, split, local_batch=local_batch, process_index=jax.process_index(),
      process_count=jax.process_count(), max_examples=max_examples)
  logits, labels, masks, view_top1, ids, damaged = [], [], [], [], [], []
  for batch, host in pipeline.device_iterator(data.dataset, devices=devices):
    out = p_eval_step(variables, batch, **step_kwargs)
    logits.append(out['logits'])
    view_top1.append(out['view_top1'])
    labels.append(batch['label'])
    masks.append(batch['mask'])
    ids.append(host['tfds_id'])
    damaged.append(host['damaged'])
  if not logits:
    raise RuntimeError(f'Evaluation of split {split!r} produced no batches.')
  local = {
      'logits': _flatten(logits), 'labels': _flatten(labels), 'mask': _flatten(masks),
      'view_top1': _flatten(view_top1), 'damaged': np.concatenate(damaged)}
  if jax.process_count() > 1:
    local = {k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in
             multihost_utils.process_allgather(local).items()}
    tfds_ids = np.full(local['mask'].shape, '', dtype=object)
  else:
    tfds_ids = np.concatenate([np.asarray(i).astype(str) for i in ids])
  keep, skipped = local['mask'].astype(bool), local['damaged'].astype(bool)
  outputs = metrics.EvalOutputs(logits=local['logits'][keep], labels=local['labels'][keep],
                                view_top1=local['view_top1'][keep], tfds_ids=tfds_ids[keep],
                                skipped_ids=tuple(tfds_ids[skipped].tolist()))
  if outputs.skipped_ids:
    logging.warning('Evaluated %d of the %d videos of %r: %d damaged video(s) left out (named '
                    'above and in the report).', len(outputs.labels), data.num_examples, split,
                    len(outputs.skipped_ids))
  if len(outputs.labels) + len(outputs.skipped_ids) != data.num_examples:
    raise RuntimeError(f'Evaluated {len(outputs.labels)} videos of {split!r}, expected '
                       f'{data.num_examples}: the eval data was not covered exactly once.')
  return outputs


def _flatten(arrays) -> np.ndarray:
  """[num_batches] x [devices, per_device, ...] -> [num_batches * devices * per_device, ...]."""
  stacked = np.stack([np.asarray(jax.device_get(a)) for a in arrays])
  return stacked.reshape((-1,) + stacked.shape[3:])
