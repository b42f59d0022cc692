"""Evaluation reports on disk: JSON files, per-video arrays and TensorBoard summaries.

Layout under `<workdir>/eval/`:
  <split>_step_<N>.json         every number of one evaluation, its protocol and the class names
  <split>_step_<N>_videos.npz   per-video logits and labels, to recompute any metric independently
  events.out.tfevents.*         TensorBoard scalars and the confusion-matrix image (run 'eval')
"""

import json
import math
import os
import re

# Figure + the Agg canvas directly: headless, and no global pyplot backend state is touched.
from matplotlib.backends import backend_agg
from matplotlib import figure as mpl_figure
import numpy as np

EVAL_DIR = 'eval'


def split_tag(split: str) -> str:
  """A file- and tag-safe form of a TFDS split string: 'test[:50%]' -> 'test_50pct'."""
  tag = re.sub(r'[^A-Za-z0-9_.-]+', '_', split.replace('%', 'pct')).strip('_')
  if not tag:
    raise ValueError(f'Split {split!r} has no usable characters for a file name.')
  return tag


def report_path(workdir: str, split: str, step: int) -> str:
  """`<workdir>/eval/<split>_step_<step>.json`."""
  return os.path.join(workdir, EVAL_DIR, f'{split_tag(split)}_step_{int(step)}.json')


def videos_path(report_file: str) -> str:
  """The per-video arrays beside a report: `<name>_videos.npz`."""
  return report_file[:-len('.json')] + '_videos.npz'


def to_json_value(value):
  """Numpy arrays/scalars -> plain Python; NaN and infinities -> None (JSON has no NaN)."""
  if isinstance(value, dict):
    return {str(k): to_json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_value(v) for v in value]
  if isinstance(value, np.ndarray):
    return to_json_value(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, report: dict) -> str:
  """Writes `report` atomically (temporary file + rename), so a reader never sees half a file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(to_json_value(report), f, indent=2, allow_nan=False)
    f.write('\n')
  os.replace(tmp, path)
  return path


def write_videos(path: str, **arrays: np.ndarray) -> str:
  """Writes named per-video arrays (e.g. logits [num_videos, num_classes]) as an .npz file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def confusion_matrix_image(matrix: np.ndarray, class_names, title: str = '') -> np.ndarray:
  """Renders a confusion matrix with labelled axes.

  Args:
    matrix: [num_classes, num_classes] counts; rows are true classes, columns predictions.
    class_names: num_classes names, used as tick labels on both axes.
    title: figure title.

  Returns:
    [height, width, 3] uint8 RGB image. Cell colour is the row-normalised fraction (recall);
    counts are printed in the cells when there are at most 25 classes.
  """
  matrix = np.asarray(matrix)
  n = len(class_names)
  if matrix.shape != (n, n):
    raise ValueError(f'Confusion matrix of shape {matrix.shape} does not match {n} class names.')
  rows = matrix.sum(axis=1, keepdims=True)
  fractions = matrix / np.maximum(rows, 1)
  inches = max(5.0, 0.18 * n + 3.0)
  fontsize = max(3.0, min(9.0, 420.0 / max(n, 1)))
  fig = mpl_figure.Figure(figsize=(inches, inches), dpi=100)
  canvas = backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(fractions, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
  ax.set_xticks(range(n))
  ax.set_yticks(range(n))
  ax.set_xticklabels(class_names, rotation=90, fontsize=fontsize)
  ax.set_yticklabels(class_names, fontsize=fontsize)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  if title:
    ax.set_title(title)
  if n <= 25:
    for i in range(n):
      for j in range(n):
        if matrix[i, j]:
          colour = 'white' if fractions[i, j] > 0.5 else 'black'
          ax.text(j, i, str(int(matrix[i, j])), ha='center', va='center', fontsize=fontsize,
                  color=colour)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  fig.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_summaries(writer, step: int, scalars: dict, images: dict):
  """Writes scalars {tag: float} and images {tag: [H, W, 3] uint8} at `step`, then flushes."""
  writer.write_scalars(int(step), {k: float(v) for k, v in scalars.items()
                                   if v is not None and math.isfinite(float(v))})
  if images:
    writer.write_images(int(step), {k: np.asarray(v)[None] for k, v in images.items()})
  writer.flush()
