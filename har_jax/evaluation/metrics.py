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
  # tfds_ids of the videos left out because their frames failed to read or decode ('' when
  # gathered from several processes): they are in no metric.
  skipped_ids: tuple = ()


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] int64 counts; rows are true classes, columns predictions."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def most_confused(matrix: np.ndarray, k: int = 10) -> list[tuple[int, int, int]]:
  """The k largest off-diagonal counts of a confusion matrix as (true, predicted, count),
  largest first (ties: by true, then predicted class index)."""
  matrix = np.asarray(matrix)
  off = [(int(matrix[i, j]), i, j) for i, j in zip(*np.nonzero(matrix)) if i != j]
  off.sort(key=lambda c: (-c[0], c[1], c[2]))
  return [(i, j, count) for count, i, j in off[:k]]


def confusion_order(matrix: np.ndarray) -> list[int]:
  """The classes that occur (as a true or a predicted class), ordered so that classes confused
  with each other sit together.

  Chains are grown greedily from the most-confused pair: each chain appends the unplaced class
  most confused (both directions summed) with its last class, and a new chain starts from the
  most-confused pair left. Classes never confused follow, in index order.
  """
  matrix = np.asarray(matrix)
  occurs = np.nonzero(matrix.sum(0) + matrix.sum(1))[0].tolist()
  mutual = (matrix + matrix.T).astype(np.int64)
  np.fill_diagonal(mutual, 0)
  placed, order = set(), []
  for _, i, j in sorted(((-int(mutual[i, j]), i, j) for i in occurs for j in occurs
                         if i < j and mutual[i, j] > 0)):
    if i in placed or j in placed:
      continue
    chain = [i, j]
    placed.update(chain)
    while True:
      candidates = [(int(mutual[chain[-1], c]), -c) for c in occurs
                    if c not in placed and mutual[chain[-1], c] > 0]
      if not candidates:
        break
      chain.append(-max(candidates)[1])
      placed.add(chain[-1])
    order += chain
  return order + [c for c in occurs if c not in placed]


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
