"""What an evaluation reports: every number with its protocol, and how it is written to disk.

Layout under `<workdir>/eval/`:
  <split>_step_<N>.json         every number of one evaluation, its protocol and the class names
  <split>_step_<N>_videos.npz   per-video logits and labels, to recompute any metric independently
  events.out.tfevents.*         TensorBoard scalars, the confusion-matrix image and the
                                most-confused pairs as text (run 'eval')
"""

import datetime
import io
import json
import math
import re
from typing import Optional, Sequence

# Figure + the Agg canvas directly: headless, and no global pyplot backend state is touched.
from matplotlib.backends import backend_agg
from matplotlib import figure as mpl_figure
import numpy as np

from har_jax import paths
from har_jax.data import synthetic_classes
from har_jax.evaluation import metrics

EVAL_DIR = 'eval'
SCALAR_KEYS = ('top1', 'top5', 'mean_class_accuracy', 'clip_top1', 'loss')


def split_tag(split: str) -> str:
  """A file- and tag-safe form of a TFDS split string: 'test[:50%]' -> 'test_50pct'."""
  tag = re.sub(r'[^A-Za-z0-9_.-]+', '_', split.replace('%', 'pct')).strip('_')
  if not tag:
    raise ValueError(f'Split {split!r} has no usable characters for a file name.')
  return tag


def report_path(workdir: paths.PathLike, split: str, step: int) -> str:
  """`<workdir>/eval/<split>_step_<step>.json` (workdir may be a URL)."""
  return str(paths.path(workdir) / EVAL_DIR / f'{split_tag(split)}_step_{int(step)}.json')


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


def write_json(path: paths.PathLike, report: dict) -> str:
  """Writes `report` whole (paths.write_text), so a reader never sees half a file."""
  paths.write_text(path, json.dumps(to_json_value(report), indent=2, allow_nan=False) + '\n')
  return str(path)


def write_videos(path: paths.PathLike, **arrays: np.ndarray) -> str:
  """Writes named per-video arrays (e.g. logits [num_videos, num_classes]) as an .npz file."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  paths.write_bytes(path, buffer.getvalue())
  return str(path)


def confusion_matrix_image(matrix: np.ndarray, class_names, title: str = '',
                           max_pairs: int = 10) -> np.ndarray:
  """Renders a confusion matrix a person can read, with the most-confused pairs beside it.

  Only the classes that occur (as a true or a predicted class) are drawn, ordered so that
  classes confused with each other sit together (metrics.confusion_order); beside the grid, the
  `max_pairs` most-confused pairs (count, true -> predicted).

  Args:
    matrix: [num_classes, num_classes] counts; rows are true classes, columns predictions.
    class_names: num_classes names, used as tick labels on both axes.
    title: figure title.

  Returns:
    [height, width, 3] uint8 RGB image. Cell colour is the row-normalised fraction (recall);
    counts are printed in the cells when at most 25 classes are drawn.
  """
  matrix = np.asarray(matrix)
  if matrix.shape != (len(class_names), len(class_names)):
    raise ValueError(f'Confusion matrix of shape {matrix.shape} does not match '
                     f'{len(class_names)} class names.')
  order = metrics.confusion_order(matrix) or list(range(len(class_names)))
  shown = matrix[np.ix_(order, order)]
  names = [class_names[i] for i in order]
  n = len(order)
  fractions = shown / np.maximum(matrix[order].sum(axis=1, keepdims=True), 1)
  pairs = metrics.most_confused(matrix, max_pairs)
  lines = ['most confused', 'count  true -> predicted', '']
  lines += [f'{c:5d}  {class_names[t]} -> {class_names[p]}' for t, p, c in pairs]
  side_inches = min(12.0, 1.0 + 0.075 * max(len(line) for line in lines)) if pairs else 0.0
  inches = max(5.0, 0.18 * n + 3.0)
  fontsize = max(3.0, min(9.0, 420.0 / max(n, 1)))
  label_inches = 0.07 * max(len(str(name)) for name in names)  # Rotated tick labels below.
  fig = mpl_figure.Figure(figsize=(inches + side_inches, inches + label_inches), dpi=100)
  canvas = backend_agg.FigureCanvasAgg(fig)
  grid = fig.add_gridspec(1, 2, width_ratios=(inches, side_inches)) if pairs else None
  ax = fig.add_subplot(grid[0, 0] if pairs else 111)
  im = ax.imshow(fractions, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
  ax.set_xticks(range(n))
  ax.set_yticks(range(n))
  ax.set_xticklabels(names, rotation=90, fontsize=fontsize)
  ax.set_yticklabels(names, fontsize=fontsize)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  if title:
    ax.set_title(title + (f' ({n} of {len(class_names)} classes occur)'
                          if n < len(class_names) else ''))
  if n <= 25:
    for i in range(n):
      for j in range(n):
        if shown[i, j]:
          colour = 'white' if fractions[i, j] > 0.5 else 'black'
          ax.text(j, i, str(int(shown[i, j])), ha='center', va='center', fontsize=fontsize,
                  color=colour)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  if pairs:
    side = fig.add_subplot(grid[0, 1])
    side.axis('off')
    side.text(0.0, 1.0, '\n'.join(lines), va='top', ha='left', fontsize=8, family='monospace',
              transform=side.transAxes)
  fig.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def most_confused_pairs(matrix: np.ndarray, class_names, k: int = 10) -> list[dict]:
  """[{'true', 'predicted', 'count'}] of the k largest off-diagonal counts, largest first."""
  return [{'true': class_names[t], 'predicted': class_names[p], 'count': c}
          for t, p, c in metrics.most_confused(matrix, k)]


def most_confused_markdown(pairs: list[dict]) -> str:
  """A Markdown table of most_confused_pairs, for TensorBoard's text dashboard."""
  if not pairs:
    return 'No confusions: every video was classified as its true class.'
  rows = ['| true | predicted | count |', '|---|---|---:|']
  rows += [f"| {p['true']} | {p['predicted']} | {p['count']} |" for p in pairs]
  return '\n'.join(rows)


def write_summaries(writer, step: int, scalars: dict, images: dict):
  """Writes scalars {tag: float} and images {tag: [H, W, 3] uint8} at `step`, then flushes."""
  writer.write_scalars(int(step), {k: float(v) for k, v in scalars.items()
                                   if v is not None and math.isfinite(float(v))})
  if images:
    writer.write_images(int(step), {k: np.asarray(v)[None] for k, v in images.items()})
  writer.flush()


def protocol(config, split: str, step: int, num_videos: int, *,
             config_name: Optional[str] = None) -> dict:
  """How the numbers of a report were computed."""
  return {
      'config': config_name,
      'dataset': config.dataset.name,
      'split': split,
      'checkpoint_step': int(step),
      'num_videos': int(num_videos),
      'num_frames': config.num_frames,
      'frame_stride': config.frame_stride,
      'image_size': config.image_size,
      'resize_size': config.dataset.resize_size,
      'short_video': config.dataset.short_video,
      'num_clips': config.eval.num_clips,
      'num_crops': config.eval.num_crops,
      'views_per_video': config.eval.num_clips * config.eval.num_crops,
      'video_level': 'logits averaged over all views of a video; every video counted once',
      'clip_level': 'each single view (clip x crop) scored on its own, averaged over views',
      'temporal_order': 'same views with the frames of every clip randomly permuted in time',
  }


def reversal_pairs(class_names: Sequence[str]) -> Optional[list[tuple[int, int]]]:
  """Pairs of classes that differ only in temporal order, when the class list is known to have them
  (the built-in synthetic set); None otherwise."""
  if tuple(class_names) == synthetic_classes.CLASS_NAMES:
    return list(synthetic_classes.REVERSAL_PAIRS)
  return None


def build_report(outputs: metrics.EvalOutputs, shuffled: metrics.EvalOutputs,
                 class_names: Sequence[str], proto: dict) -> dict:
  """Every number of one evaluation (plain values; NaN where a class has no videos)."""
  class_names = list(class_names)
  n = len(class_names)
  if len(shuffled.labels) != len(outputs.labels) or np.any(shuffled.labels != outputs.labels):
    raise ValueError('The time-shuffled evaluation did not see the same videos in the same order.')
  full = metrics.detailed_metrics(outputs, n)
  mixed = metrics.scalar_metrics(shuffled, n)
  temporal = {
      'shuffled': {k: mixed[k] for k in SCALAR_KEYS},
      'top1_drop': full['top1'] - mixed['top1'],
      'clip_top1_drop': full['clip_top1'] - mixed['clip_top1'],
  }
  pairs = reversal_pairs(class_names)
  if pairs:
    ordered = metrics.pair_accuracy(outputs.logits, outputs.labels, pairs)
    unordered = metrics.pair_accuracy(shuffled.logits, shuffled.labels, pairs)
    temporal['reversal_pairs'] = {
        'pairs': [[class_names[a], class_names[b]] for a, b in pairs],
        'chance': 0.5,
        'accuracy': ordered['accuracy'],
        'shuffled_accuracy': unordered['accuracy'],
        'per_pair': ordered['per_pair'],
        'shuffled_per_pair': unordered['per_pair'],
        'num_videos': ordered['num_videos'],
    }
  return {
      'checkpoint_step': proto['checkpoint_step'],
      'split': proto['split'],
      'metrics': {k: full[k] for k in SCALAR_KEYS + ('num_videos',)},
      # Videos left out because their frames failed to read or decode (in no metric).
      'skipped_videos': {'count': len(outputs.skipped_ids), 'tfds_ids': list(outputs.skipped_ids)},
      'per_class_accuracy': dict(zip(class_names, full['per_class_accuracy'].tolist())),
      'confusion_matrix': {'rows': 'true class', 'columns': 'predicted class',
                           'counts': full['confusion_matrix'].tolist()},
      'most_confused': most_confused_pairs(full['confusion_matrix'], class_names),
      'temporal_order': temporal,
      'protocol': proto,
      'class_names': class_names,
  }


def summary_scalars(report: dict, prefix: str) -> dict:
  """The TensorBoard scalars of a report, tagged `<prefix>/<name>`."""
  scalars = {f'{prefix}/{k}': report['metrics'][k] for k in SCALAR_KEYS}
  temporal = report['temporal_order']
  scalars.update({f'{prefix}/shuffled_time/{k}': v for k, v in temporal['shuffled'].items()})
  scalars[f'{prefix}/temporal_order_top1_drop'] = temporal['top1_drop']
  if 'reversal_pairs' in temporal:
    scalars[f'{prefix}/reversal_pair_accuracy'] = temporal['reversal_pairs']['accuracy']
    scalars[f'{prefix}/shuffled_time/reversal_pair_accuracy'] = (
        temporal['reversal_pairs']['shuffled_accuracy'])
  return scalars


def write_report(workdir: str, report: dict, outputs: metrics.EvalOutputs,
                 shuffled: metrics.EvalOutputs, writer=None) -> str:
  """Writes the JSON report, the per-video arrays and (with a writer) TensorBoard summaries."""
  path = report_path(workdir, report['split'], report['checkpoint_step'])
  videos = videos_path(path)
  report = dict(report, per_video_file=paths.path(videos).name,
                written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
  write_videos(videos, logits=outputs.logits, labels=outputs.labels,
               view_top1=outputs.view_top1, tfds_ids=outputs.tfds_ids.astype(str),
               shuffled_logits=shuffled.logits, shuffled_view_top1=shuffled.view_top1)
  write_json(path, report)
  if writer is not None:
    tag = split_tag(report['split'])
    title = f"{report['split']} step {report['checkpoint_step']}: top-1 " \
            f"{report['metrics']['top1']:.3f}"
    image = confusion_matrix_image(
        np.asarray(report['confusion_matrix']['counts']), report['class_names'], title)
    write_summaries(writer, report['checkpoint_step'], summary_scalars(report, tag),
                    {f'{tag}/confusion_matrix': image})
    writer.write_texts(report['checkpoint_step'], {
        f'{tag}/most_confused': most_confused_markdown(report['most_confused'])})
    writer.flush()
  return path
