"""Evaluate saved checkpoints: multi-view video-level metrics, temporal-order diagnostic, reports.

  python main.py --mode=eval --config=<cfg> --workdir=<dir> [--checkpoint=latest|best|<step>|all]
      [--split=test]

For every selected checkpoint, every video of the split is evaluated exactly once with
`eval.num_clips x eval.num_crops` views whose logits are averaged (video level). The same evaluation
is repeated with the frames of every clip randomly permuted in time: the accuracy lost measures how
much the model relies on frame order. Results go to `<workdir>/eval/` (see `har_jax.reports`).
"""

import datetime
import functools
import os
from typing import Optional, Sequence

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from har_jax import checkpoints
from har_jax import config_validation
from har_jax import eval_lib
from har_jax import optim
from har_jax import parallel
from har_jax import reports
from har_jax import train
from har_jax.data import datasets
from har_jax.data import synthetic_actions

CHECKPOINT_CHOICES = ('latest', 'best', 'all')
SCALAR_KEYS = ('top1', 'top5', 'mean_class_accuracy', 'clip_top1', 'loss')


class EvaluationError(ValueError):
  """An evaluation request that cannot be served (bad workdir, step, split...), with what to do."""


def resolve_steps(manager: checkpoints.CheckpointManager, checkpoint: str) -> list[int]:
  """Checkpoint steps named by 'latest', 'best', 'all' or a step number, in step order.

  'best' falls back to 'latest' (with a warning) when no checkpoint was saved with metrics.
  """
  steps = manager.all_steps()
  where = manager.directory
  if not steps:
    raise EvaluationError(f'No checkpoints in {where}. Train first, or fix --workdir.')
  spec = str(checkpoint).strip().lower()
  if spec == 'all':
    return steps
  if spec == 'latest':
    return [steps[-1]]
  if spec == 'best':
    best = manager.best_step()
    if best is None:
      logging.warning('No checkpoint in %s was saved with metrics; using the latest, %d.',
                      where, steps[-1])
      return [steps[-1]]
    return [best]
  try:
    step = int(spec)
  except ValueError:
    raise EvaluationError(
        f'--checkpoint={checkpoint!r} is not one of {CHECKPOINT_CHOICES} or a step number.'
    ) from None
  if step not in steps:
    raise EvaluationError(f'No checkpoint at step {step} in {where}; kept steps are {steps}.')
  return [step]


def restore_template(config, num_classes: int):
  """An unreplicated TrainState shaped like the checkpoints of `config`, to restore into.

  The step is int32, as in the states that training saves.
  """
  state = train.create_train_state(jax.random.PRNGKey(config.seed), config, num_classes,
                                   optim.create_learning_rate_fn(config))
  return state.replace(step=np.asarray(state.step, np.int32))


def open_checkpoints(workdir: str, config, info) -> checkpoints.CheckpointManager:
  """A read-only manager for `<workdir>/checkpoints`, with a clear error for a wrong workdir."""
  if not workdir or not os.path.isdir(workdir):
    raise EvaluationError(f'--workdir {workdir!r} is not a directory. Point it at the workdir of '
                          'a training run (the folder holding checkpoints/).')
  try:
    return checkpoints.CheckpointManager(workdir, config, info, read_only=True)
  except checkpoints.CheckpointError as e:
    raise EvaluationError(str(e)) from None


def reversal_pairs(class_names: Sequence[str]) -> Optional[list[tuple[int, int]]]:
  """Pairs of classes that differ only in temporal order, when the class list is known to have them
  (the built-in synthetic set); None otherwise."""
  if tuple(class_names) == tuple(synthetic_actions.CLASS_NAMES):
    return list(synthetic_actions.REVERSAL_PAIRS)
  return None


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


def build_report(outputs: eval_lib.EvalOutputs, shuffled: eval_lib.EvalOutputs,
                 class_names: Sequence[str], proto: dict) -> dict:
  """Every number of one evaluation (plain values; NaN where a class has no videos)."""
  class_names = list(class_names)
  n = len(class_names)
  if len(shuffled.labels) != len(outputs.labels) or np.any(shuffled.labels != outputs.labels):
    raise ValueError('The time-shuffled evaluation did not see the same videos in the same order.')
  full = eval_lib.detailed_metrics(outputs, n)
  mixed = eval_lib.scalar_metrics(shuffled, n)
  temporal = {
      'shuffled': {k: mixed[k] for k in SCALAR_KEYS},
      'top1_drop': full['top1'] - mixed['top1'],
      'clip_top1_drop': full['clip_top1'] - mixed['clip_top1'],
  }
  pairs = reversal_pairs(class_names)
  if pairs:
    ordered = eval_lib.pair_accuracy(outputs.logits, outputs.labels, pairs)
    unordered = eval_lib.pair_accuracy(shuffled.logits, shuffled.labels, pairs)
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
      'per_class_accuracy': dict(zip(class_names, full['per_class_accuracy'].tolist())),
      'confusion_matrix': {'rows': 'true class', 'columns': 'predicted class',
                           'counts': full['confusion_matrix'].tolist()},
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


def write_report(workdir: str, report: dict, outputs: eval_lib.EvalOutputs,
                 shuffled: eval_lib.EvalOutputs, writer=None) -> str:
  """Writes the JSON report, the per-video arrays and (with a writer) TensorBoard summaries."""
  path = reports.report_path(workdir, report['split'], report['checkpoint_step'])
  videos = reports.videos_path(path)
  report = dict(report, per_video_file=os.path.basename(videos),
                written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
  reports.write_videos(videos, logits=outputs.logits, labels=outputs.labels,
                       view_top1=outputs.view_top1, tfds_ids=outputs.tfds_ids.astype(str),
                       shuffled_logits=shuffled.logits, shuffled_view_top1=shuffled.view_top1)
  reports.write_json(path, report)
  if writer is not None:
    tag = reports.split_tag(report['split'])
    title = f"{report['split']} step {report['checkpoint_step']}: top-1 " \
            f"{report['metrics']['top1']:.3f}"
    image = reports.confusion_matrix_image(
        np.asarray(report['confusion_matrix']['counts']), report['class_names'], title)
    reports.write_summaries(writer, report['checkpoint_step'], summary_scalars(report, tag),
                            {f'{tag}/confusion_matrix': image})
  return path


def eval_steps(model, devices: Sequence) -> tuple:
  """(in-order, time-shuffled) eval steps pmapped over `devices`; compiled once, reused per
  checkpoint."""
  return tuple(jax.pmap(functools.partial(train.eval_step, model=model, shuffle_time=shuffle),
                        axis_name='batch', devices=devices) for shuffle in (False, True))


def evaluate_state(state, eval_fns: tuple, builder, config, split: str, *,
                   devices: Sequence) -> tuple[eval_lib.EvalOutputs, eval_lib.EvalOutputs]:
  """Evaluates an unreplicated state on `split`, in order and with frames shuffled in time.

  Args:
    state: an unreplicated TrainState (host or single-device arrays).
    eval_fns: `eval_steps(model, devices)`.

  Returns:
    (outputs, shuffled): per-video EvalOutputs of the two evaluations, same videos, same order.
  """
  replicated = parallel.replicate(state, list(devices))
  outputs, shuffled = (eval_lib.run_eval(p_eval, replicated, builder, config, split,
                                         devices=list(devices)) for p_eval in eval_fns)
  return outputs, shuffled


def _check_class_names(meta: dict, info, step: int):
  saved = list(meta.get('class_names') or [])
  if saved and saved != list(info.class_names):
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(saved, info.class_names)) if a != b][:3]
    raise EvaluationError(
        f'Checkpoint {step} was trained with different class names than dataset {info.name!r} '
        f'has (first differences: {diff}); its predictions would be read as the wrong classes. '
        'Evaluate with the dataset the checkpoint was trained on.')


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'latest',
             split: Optional[str] = None, devices: Optional[list] = None,
             config_name: Optional[str] = None) -> list[dict]:
  """Evaluates the selected checkpoints of `workdir` on `split` and writes their reports.

  Args:
    config: the config the checkpoints were trained with (model/dataset fields must match).
    workdir: the training workdir (holding checkpoints/).
    checkpoint: 'latest', 'best', 'all' (every kept checkpoint, in step order) or a step.
    split: TFDS split to evaluate; default config.dataset.eval_split.
    devices: local devices to evaluate on (default: all); any count works, whatever the count
      used for training.
    config_name: recorded in the report protocol (e.g. the --config path).

  Returns:
    The reports written, one per checkpoint, in step order; each has 'report_path'.
  """
  devices = devices or jax.local_devices()
  config_validation.validate(config, mode='eval', split=split,
                             num_devices=len(devices) * jax.process_count())
  split = split or config.dataset.eval_split
  builder = datasets.get_builder(config.dataset)
  info = datasets.get_info(builder)
  manager = open_checkpoints(workdir, config, info)
  steps = resolve_steps(manager, checkpoint)
  logging.info('Evaluating checkpoint(s) %s of %s on %s (%d videos) with %d device(s).', steps,
               manager.directory, split, datasets.num_examples(builder, split), len(devices))
  template = restore_template(config, info.num_classes)
  eval_fns = eval_steps(train.build_model(config, info.num_classes, bn_axis_name='batch'),
                        devices)
  writer, written = None, []
  try:
    for step in steps:
      try:
        state = manager.restore(step, template)
      except checkpoints.CheckpointError as e:
        raise EvaluationError(str(e)) from None
      _check_class_names(manager.read_meta(step), info, step)
      outputs, shuffled = evaluate_state(state, eval_fns, builder, config, split,
                                         devices=devices)
      report = build_report(outputs, shuffled, info.class_names,
                            protocol(config, split, step, len(outputs.labels),
                                     config_name=config_name))
      if jax.process_index() == 0:
        writer = writer or metric_writers.create_default_writer(
            os.path.join(workdir, reports.EVAL_DIR))
        path = write_report(workdir, report, outputs, shuffled, writer)
        _log_report(report)
        print(f'report: {path}', flush=True)
        report['report_path'] = path
      written.append(report)
  finally:
    if writer is not None:
      writer.close()
    manager.close()
  return written


def _log_report(report: dict):
  m, t = report['metrics'], report['temporal_order']
  logging.info('Step %d on %s (%d videos, %d views each): top-1 %.4f, top-5 %.4f, mean class '
               '%.4f, clip-level top-1 %.4f; frames shuffled in time: top-1 %.4f (drop %.4f).',
               report['checkpoint_step'], report['split'], m['num_videos'],
               report['protocol']['views_per_video'], m['top1'], m['top5'],
               m['mean_class_accuracy'], m['clip_top1'], t['shuffled']['top1'], t['top1_drop'])
  if 'reversal_pairs' in t:
    logging.info('Within reversal pairs (chance 0.5): %.4f in order, %.4f shuffled.',
                 t['reversal_pairs']['accuracy'], t['reversal_pairs']['shuffled_accuracy'])
