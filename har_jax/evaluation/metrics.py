"""Evaluation metrics from per-video logits and labels, on the host, so that any number of a
report can be recomputed from its per-video arrays."""

import dataclasses
from typing import Sequence

import numpy as np
import optax


@dataclasses.dataclass
class EvalOutputs:
  """Per-video results of one evaluation, unpadded, across all processes."""
  logits: np.ndarray  # [num_videos, num_classes] float32, mean over the views of each video.
  labels: np.ndarray  # [num_videos] int32.
  view_top1: np.ndarray  # [num_videos] float32, fraction of single views with a correct top-1.
  tfds_ids: np.ndarray  # [num_videos] str ('' when gathered from several processes).


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
      'loss': float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))),
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
