"""Evaluate saved checkpoints: multi-view video-level metrics, temporal-order diagnostic, reports.

  python main.py --mode=eval --config=<cfg> --workdir=<dir> [--checkpoint=latest|best|<step>|all]
      [--split=test]

For every selected checkpoint (loaded by har_jax.inference), every video of the split is evaluated
exactly once with `eval.num_clips x eval.num_crops` views whose logits are averaged (video level).
The same evaluation is repeated with the frames of every clip randomly permuted in time: the
accuracy lost measures how much the model relies on frame order. Results go to `<workdir>/eval/`
(see har_jax.evaluation.reports).
"""

import functools
import sys
from typing import Optional, Sequence

from absl import logging
import jax
import ml_collections

from har_jax import checkpoints
from har_jax import config_validation
from har_jax import errors
from har_jax import inference
from har_jax import models
from har_jax import parallel
from har_jax import paths
from har_jax import pretrained
from har_jax import steps
from har_jax.data import datasets
from har_jax.evaluation import metrics
from har_jax.evaluation import reports
from har_jax.evaluation import runner


def eval_steps(model, devices: Sequence) -> tuple:
  """(in-order, time-shuffled) eval steps pmapped over `devices`; compiled once, reused per
  checkpoint."""
  return tuple(jax.pmap(functools.partial(steps.eval_step, model=model, shuffle_time=shuffle),
                        axis_name='batch', devices=devices) for shuffle in (False, True))


def evaluate_variables(variables: dict, eval_fns: tuple, source, config, split: str, *,
                       devices: Sequence) -> tuple[metrics.EvalOutputs, metrics.EvalOutputs]:
  """Evaluates model variables on `split`, in order and with frames shuffled in time.

  Args:
    variables: {'params', 'batch_stats'}, unreplicated (host or single-device arrays).
    eval_fns: `eval_steps(model, devices)`.

  Returns:
    (outputs, shuffled): per-video EvalOutputs of the two evaluations, same videos, same order.
  """
  replicated = parallel.replicate(variables, list(devices))
  outputs, shuffled = (runner.run_eval(p_eval, replicated, source, config, split,
                                       devices=list(devices)) for p_eval in eval_fns)
  return outputs, shuffled


def _check_matches(loaded: inference.LoadedModel, config, info):
  """Raises when the checkpoint's model or classes differ from what `config` and the dataset say."""
  problems = checkpoints.config_mismatches(loaded.config.to_dict(), config, info.num_classes,
                                           loaded.num_classes)
  if problems:
    raise checkpoints.ConfigMismatchError(
        f'Checkpoint {loaded.step} in {loaded.workdir} was written with a different model/dataset '
        'config than --config:\n  ' + '\n  '.join(problems) +
        '\nEvaluate with the config the checkpoint was trained with.')
  if list(loaded.class_names) != list(info.class_names):
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(loaded.class_names, info.class_names))
            if a != b][:3]
    raise errors.UserError(
        f'Checkpoint {loaded.step} was trained with different class names than dataset '
        f'{info.name!r} has (first differences: {diff}); its predictions would be read as the '
        'wrong classes. Evaluate with the dataset the checkpoint was trained on.')


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'latest',
             split: Optional[str] = None, devices: Optional[list] = None,
             config_name: Optional[str] = None) -> list[dict]:
  """Evaluates the selected checkpoints of `workdir` on `split` and writes their reports.

  Args:
    config: the config the checkpoints were trained with (model/dataset fields must match).
    workdir: the training workdir (holding checkpoints/).
    checkpoint: 'latest', 'best', 'all' (every kept checkpoint, in step order) or a step.
    split: the split to evaluate; default config.dataset.eval_split.
    devices: local devices to evaluate on (default: all); any count works, whatever the count
      used for training.
    config_name: recorded in the report protocol (e.g. the --config path).

  Returns:
    The reports written, one per checkpoint, in step order; each has 'report_path'.
  """
  devices = devices or jax.local_devices()
  config_validation.validate(config, mode='eval', split=split,
                             num_devices=len(devices) * jax.process_count())
  config = pretrained.resolve_encoder_init(config)  # As training resolved it.
  split = split or config.dataset.eval_split
  source = datasets.open_source(config.dataset)
  info = datasets.get_info(source)
  manager = inference.open_checkpoints(workdir)
  writer, written = None, []
  try:
    selected = inference.resolve_steps(manager, checkpoint)
    logging.info('Evaluating checkpoint(s) %s of %s on %s (%d videos) with %d device(s).',
                 selected, manager.directory, split, source.num_examples(split),
                 len(devices))
    model = models.create_model(config.model, info.num_classes, dtype=config.dtype,
                                bn_axis_name='batch')
    eval_fns = eval_steps(model, devices)
    unreadable = []
    for step in selected:
      try:
        loaded = inference.load(workdir, step, manager=manager)
      except Exception as e:  # pylint: disable=broad-except
        if len(selected) == 1 or isinstance(e, checkpoints.ConfigMismatchError):
          raise
        # --checkpoint=all: one damaged checkpoint must not cost the reports of the others.
        reason = str(e).splitlines()[0][:300]
        logging.warning('Skipping checkpoint %d: %s', step, reason)
        unreadable.append((step, reason))
        continue
      _check_matches(loaded, config, info)
      outputs, shuffled = evaluate_variables(loaded.variables, eval_fns, source, config, split,
                                             devices=devices)
      report = reports.build_report(outputs, shuffled, info.class_names,
                                    reports.protocol(config, split, step, len(outputs.labels),
                                                     config_name=config_name))
      if jax.process_index() == 0:
        writer = writer or paths.metric_writer(paths.path(workdir) / reports.EVAL_DIR)
        path = reports.write_report(workdir, report, outputs, shuffled, writer)
        _log_report(report)
        print(f'report: {path}', flush=True)
        report['report_path'] = path
      written.append(report)
    if unreadable and not written:
      raise errors.UserError('None of the checkpoints could be read:\n  ' + '\n  '.join(
          f'step {step}: {reason}' for step, reason in unreadable))
    for step, reason in unreadable:
      print(f'warning: checkpoint {step} was not evaluated: {reason}', file=sys.stderr,
            flush=True)
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
