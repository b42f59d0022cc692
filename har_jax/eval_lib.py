"""Exact video-level evaluation: run the model over a split, gather per-video logits, metrics.

Every video of the split is seen exactly once across all processes: eval datasets are padded to the
same number of batches everywhere and padded rows carry mask 0. Metrics are computed on the host in
numpy from the gathered per-video logits, so they can be recomputed independently from a report.
"""

import dataclasses
from typing import Optional, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from har_jax.data import pipeline


@dataclasses.dataclass
class EvalOutputs:
  """Per-video results of one evaluation, unpadded, across all processes."""
  logits: np.ndarray  # [num_videos, num_classes] float32, mean over the views of each video.
  labels: np.ndarray  # [num_videos] int32.
  view_top1: np.ndarray  # [num_videos] float32, fraction of single views with a correct top-1.
  tfds_ids: np.ndarray  # [num_videos] str ('' when gathered from several processes).


def run_eval(p_eval_step, state, builder, config, split: str, *, max_examples: int = 0,
             devices: Optional[list] = None, **step_kwargs) -> EvalOutputs:
  """Runs a pmapped eval step over `split` and gathers the per-video outputs of all processes.

  Args:
    devices: the local devices `p_eval_step` was pmapped over (default: all local devices).
  """
  local_batch = config.eval.batch_size // jax.process_count()
  data = pipeline.create_eval_dataset(
      builder, config, split, local_batch=local_batch, process_index=jax.process_index(),
      process_count=jax.process_count(), max_examples=max_examples)
  logits, labels, masks, view_top1, ids = [], [], [], [], []
  for batch, host in pipeline.device_iterator(data.dataset, devices=devices):
    out = p_eval_step(state, batch, **step_kwargs)
    logits.append(out['logits'])
    view_top1.append(out['view_top1'])
    labels.append(batch['label'])
    masks.append(batch['mask'])
    ids.append(host['tfds_id'])
  if not logits:
    raise RuntimeError(f'Evaluation of split {split!r} produced no batches.')
  local = {
      'logits': _flatten(logits), 'labels': _flatten(labels), 'mask': _flatten(masks),
      'view_top1': _flatten(view_top1)}
  if jax.process_count() > 1:
    local = {k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in
             multihost_utils.process_allgather(local).items()}
    tfds_ids = np.full(local['mask'].shape, '', dtype=object)
  else:
    tfds_ids = np.concatenate([np.asarray(i).astype(str) for i in ids])
  keep = local['mask'].astype(bool)
  outputs = EvalOutputs(logits=local['logits'][keep], labels=local['labels'][keep],
                        view_top1=local['view_top1'][keep], tfds_ids=tfds_ids[keep])
  if len(outputs.labels) != data.num_examples:
    raise RuntimeError(f'Evaluated {len(outputs.labels)} videos of {split!r}, expected '
                       f'{data.num_examples}: the eval data was not covered exactly once.')
  return outputs


def _flatten(arrays) -> np.ndarray:
  """[num_batches] x [devices, per_device, ...] -> [num_batches * devices * per_device, ...]."""
  stacked = np.stack([np.asarray(jax.device_get(a)) for a in arrays])
  return stacked.reshape((-1,) + stacked.shape[3:])


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels]


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] int64 counts; rows are true classes, columns predictions."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def scalar_metrics(outputs: EvalOutputs, num_classes: int) -> dict:
  """Video-level top-1/top-5/loss/mean-class accuracy and clip-level (single view) top-1."""
  logits, labels = outputs.logits, outputs.labels
  topk = topk_predictions(logits, 5)
  top1 = topk[:, 0] == labels
  top5 = np.any(topk == labels[:, None], axis=-1)
  per_class = per_class_accuracy(labels, topk[:, 0], num_classes)
  return {
      'top1': float(top1.mean()),
      'top5': float(top5.mean()),
      'loss': float(softmax_cross_entropy(logits, labels).mean()),
      'mean_class_accuracy': float(np.nanmean(per_class)),
      'clip_top1': float(outputs.view_top1.mean()),
      'num_videos': float(len(labels)),
  }


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray,
                       num_classes: int) -> np.ndarray:
  """[num_classes] accuracy per true class; NaN for classes absent from the split."""
  matrix = confusion_matrix(labels, predictions, num_classes)
  totals = matrix.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)


def topk_predictions(logits: np.ndarray, k: int) -> np.ndarray:
  """[num_videos, min(k, num_classes)] class indices, best first (ties: lower index first)."""
  return np.argsort(-logits, axis=-1, kind='stable')[:, :min(k, logits.shape[-1])]


def detailed_metrics(outputs: EvalOutputs, num_classes: int) -> dict:
  """`scalar_metrics` plus per-class accuracy `[num_classes]` (NaN: class absent) and the
  confusion matrix `[num_classes, num_classes]` (rows true, columns predicted) as numpy arrays."""
  predictions = topk_predictions(outputs.logits, 1)[:, 0]
  metrics = scalar_metrics(outputs, num_classes)
  metrics['per_class_accuracy'] = per_class_accuracy(outputs.labels, predictions, num_classes)
  metrics['confusion_matrix'] = confusion_matrix(outputs.labels, predictions, num_classes)
  return metrics


def pair_accuracy(logits: np.ndarray, labels: np.ndarray,
                  pairs: Sequence[tuple[int, int]]) -> dict:
  """Accuracy of telling the two classes of each pair apart (chance 0.5).

  A video whose label is in a pair (a, b) counts as right when the logit of its own class is
  higher than the logit of the other class of the pair; all other classes are ignored.

  Returns:
    {'accuracy': over all videos of all pairs, 'per_pair': [accuracy of each pair] (NaN when a
     pair has no videos), 'num_videos': videos counted}.
  """
  right, per_pair = [], []
  for a, b in pairs:
    in_pair = (labels == a) | (labels == b)
    own = logits[in_pair, labels[in_pair]]
    partner = logits[in_pair, np.where(labels[in_pair] == a, b, a)]
    correct = own > partner
    right.append(correct)
    per_pair.append(float(correct.mean()) if correct.size else float('nan'))
  right = np.concatenate(right) if right else np.zeros([0], bool)
  return {'accuracy': float(right.mean()) if right.size else float('nan'),
          'per_pair': per_pair, 'num_videos': int(right.size)}
