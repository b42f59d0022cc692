"""The UCF101 protocol: train and test on the three official splits, next to a frame-average
baseline, and report video top-1 per split and mean ± std over the splits.

  summary = splits.run(config, workdir_root, splits=(1, 2, 3), dataset='frames')

Two models, trained on identical pipelines (dataset, splits, augmentation, optimizer, steps, seed):

  lrcn      the config as given.
  baseline  the same config with model.num_lstm_layers=0 and model.temporal_pooling='mean': the
            linear head applied to each frame's features and averaged over time, which equals the
            head of the mean frame feature. It cannot see frame order; the gap to lrcn is what the
            recurrence adds.

Two sources of the splits (`dataset`):

  'stock'   TFDS records `<variant>/ucf101_<k>` (full-size frames; variant 'ucf101', or
            'ucf101_meta' when config.dataset.name uses it), splits 'train' and 'test'.
  'frames'  the frame store named by config.dataset.name (a 'ucf101_frames/s<N>' name, else
            'ucf101_frames/s128'), which holds all three splits as 'train<k>' and 'test<k>'.

Layout of `workdir_root`:

  <model>/split<k>/                   the run's workdir (checkpoints, TensorBoard, config.json);
                                      an interrupted run resumes from its checkpoints
  <model>/split<k>/split_result.json  written when the run finished: its final test metrics and
                                      config; a rerun reads it instead of training again
  splits.json, splits.md              the table, rewritten after every finished run
"""

import datetime
import json
import math
from typing import Optional, Sequence

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import numpy as np

from har_jax import config_validation
from har_jax import errors
from har_jax import paths
from har_jax import train
from har_jax.data import datasets
from har_jax.evaluation import reports

SPLITS = (1, 2, 3)
DATASETS = ('stock', 'frames')
MODELS = ('lrcn', 'baseline')
MODEL_NAMES = {'lrcn': 'LRCN (the config)', 'baseline': 'frame-average baseline'}
DEFAULT_FRAME_STORE = f'{datasets.UCF101_FRAMES}/s128'
RESULT_FILE = 'split_result.json'
# Fields that may differ between a finished run and a rerun without changing its result.
_IGNORED_FIELDS = ('dataset.data_dir',)


def infer_dataset(config: ml_collections.ConfigDict) -> str:
  """'frames' when config.dataset.name is a frame store ('ucf101_frames/...'), else 'stock'."""
  return 'frames' if config.dataset.name.startswith(f'{datasets.UCF101_FRAMES}/') else 'stock'


def split_config(config: ml_collections.ConfigDict, split: int, dataset: str,
                 model: str = 'lrcn') -> ml_collections.ConfigDict:
  """A copy of `config` that trains `model` on official split `split` (1-3) of `dataset`."""
  if split not in SPLITS:
    raise errors.UserError(f'UCF101 has splits {list(SPLITS)}; got {split}.')
  if dataset not in DATASETS:
    raise errors.UserError(f'Unknown dataset kind {dataset!r}; use one of {list(DATASETS)}.')
  if model not in MODELS:
    raise errors.UserError(f'Unknown model {model!r}; use one of {list(MODELS)}.')
  out = config.copy_and_resolve_references()
  name = config.dataset.name
  if dataset == 'frames':
    out.dataset.name = name if infer_dataset(config) == 'frames' else DEFAULT_FRAME_STORE
    out.dataset.train_split, out.dataset.eval_split = f'train{split}', f'test{split}'
  else:
    records = datasets.indexed_records_name(name) or name
    variant = 'ucf101_meta' if records.startswith('ucf101_meta/') else 'ucf101'
    out.dataset.name = f'{variant}/ucf101_{split}'
    if records != name:  # A frame index of the records: the same of this split's records.
      out.dataset.name = datasets.frame_index_name(out.dataset.name)
    out.dataset.train_split, out.dataset.eval_split = 'train', 'test'
  if model == 'baseline':
    out.model.num_lstm_layers = 0
    out.model.temporal_pooling = 'mean'
  return out


def check(config: ml_collections.ConfigDict, splits: Sequence[int], dataset: str) -> None:
  """Raises errors.UserError naming every split whose data or config is unusable, before any
  training: missing records (with the command that builds them), missing or empty splits, bad
  fields. (The baseline differs from the LRCN only in valid model fields.)"""
  problems, missing = [], []
  for split in splits:
    split_cfg = split_config(config, split, dataset)
    try:
      datasets.open_source(split_cfg.dataset, prepare=False)
    except errors.UserError:
      missing.append(split_cfg.dataset.name)
    problems += [f'split {split}: {p}' for p in config_validation.find_problems(split_cfg)]
  if not problems:
    return
  message = 'Cannot run the splits:\n  ' + '\n  '.join(problems)
  data_dir = config.dataset.data_dir or '<data_dir>'
  if missing and dataset == 'stock':
    records = [datasets.indexed_records_name(name) or name for name in missing]
    configs = ','.join(name.split('/')[1] for name in records)
    variant = records[0].split('/')[0]
    if records[0] != missing[0]:
      message += ('\nWrite the missing frame indexes with: python scripts/prepare_ucf101.py '
                  f'--frame_index --data_dir {data_dir} --config {configs} --variant {variant} '
                  '(add --source <UCF101 folder or zips> where the records are not built either)')
    else:
      message += ('\nBuild the missing records with: python scripts/prepare_ucf101.py --source '
                  f'<UCF101 folder or zips> --data_dir {data_dir} --config {configs} --variant '
                  f'{variant}')
  elif missing:
    message += ('\nBuild the frame store (all three splits) with: python '
                'scripts/prepare_ucf101.py --source <UCF101 folder or zips> --data_dir '
                f'{data_dir} --short_side {missing[0].split("/s")[-1]}')
  raise errors.UserError(message)


def _flat(config) -> dict:
  as_dict = config.to_dict() if hasattr(config, 'to_dict') else config
  return traverse_util.flatten_dict(json.loads(json.dumps(reports.to_json_value(as_dict))),
                                    sep='.')


def read_result(workdir: str, config: ml_collections.ConfigDict) -> Optional[dict]:
  """The finished run's result in `workdir`, None when there is none.

  Raises:
    errors.UserError: the run finished with a different config (a rerun would mix two recipes in
      one table).
  """
  path = paths.path(workdir) / RESULT_FILE
  if not path.exists():
    return None
  result = json.loads(paths.read_text(path))
  before, now = _flat(result['config']), _flat(config)
  changed = sorted(k for k in set(before) | set(now)
                   if k not in _IGNORED_FIELDS and before.get(k) != now.get(k))
  if changed:
    details = ', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in changed[:8])
    raise errors.UserError(
        f'{path} holds a run finished with another config ({details}). Use a new --workdir_root, '
        'or delete that file to train this split again (the run resumes from its checkpoints '
        'where the config allows).')
  return result


def run_split(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict]:
  """Trains and tests one run, or reads its result if it finished earlier.

  Returns:
    {'metrics': final test metrics, 'config': ..., ...} as written to `<workdir>/split_result.json`;
    None when training was preempted (rerun to resume).
  """
  result = read_result(workdir, config)
  if result is not None:
    logging.info('%s finished earlier (top-1 %.4f); reusing its result.', workdir,
                 result['metrics']['top1'])
    return result
  metrics = train.train_and_evaluate(config, workdir)
  if not metrics:
    return None
  result = {'dataset': config.dataset.name, 'train_split': config.dataset.train_split,
            'eval_split': config.dataset.eval_split, 'metrics': metrics,
            'finished': datetime.datetime.now().isoformat(timespec='seconds'),
            'config': config.to_dict()}
  if jax.process_index() == 0:
    reports.write_json(paths.path(workdir) / RESULT_FILE, result)
  return result


def mean_and_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
  """(mean, sample standard deviation with ddof=1) of `values`; std None below two values, both
  None for none."""
  if not values:
    return None, None
  mean = float(np.mean(values))
  return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def summarize(top1: dict, splits: Sequence[int], num_videos: Optional[dict] = None) -> dict:
  """The table as data.

  Args:
    top1: {model: {split: video top-1 in [0, 1]}} of the finished runs (a model may lack splits).
    splits: the splits of the table, in order.
    num_videos: {split: test videos}, if known.

  Returns:
    {'splits', 'num_videos', 'rows': [{'model', 'name', 'top1': {split: value or None}, 'mean',
    'std', 'complete'}]}. 'mean' and 'std' are over the splits present (sample std, ddof=1);
    'complete' says whether every split is. With both models, a third row 'difference' holds
    lrcn - baseline on the splits both have.
  """
  rows = []
  for model in [m for m in MODELS if m in top1]:
    values = {s: top1[model].get(s) for s in splits}
    rows.append(_row(model, MODEL_NAMES[model], values))
  if all(m in top1 for m in MODELS):
    values = {s: (top1['lrcn'][s] - top1['baseline'][s]
                  if s in top1['lrcn'] and s in top1['baseline'] else None) for s in splits}
    rows.append(_row('difference', 'LRCN - baseline', values))
  return {'splits': list(splits), 'num_videos': dict(num_videos or {}), 'rows': rows}


def _row(model: str, name: str, values: dict) -> dict:
  present = [v for v in values.values() if v is not None]
  mean, std = mean_and_std(present)
  return {'model': model, 'name': name, 'top1': values, 'mean': mean, 'std': std,
          'complete': len(present) == len(values)}


def _percent(value: Optional[float], signed: bool = False) -> str:
  if value is None or not math.isfinite(value):
    return '—'
  return f'{100 * value:+.1f}' if signed else f'{100 * value:.1f}'


def markdown_table(summary: dict) -> str:
  """The table in Markdown: video top-1 (%) per split, then mean ± std; '—' where missing."""
  splits = summary['splits']
  videos = summary.get('num_videos') or {}
  header = ['model'] + [f'split {s}' + (f' ({videos[s]} videos)' if s in videos else '')
                        for s in splits] + ['mean ± std']
  lines = ['| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * (len(splits) + 1)]
  for row in summary['rows']:
    signed = row['model'] == 'difference'
    cells = [_percent(row['top1'][s], signed) for s in splits]
    mean = _percent(row['mean'], signed)
    if row['std'] is not None:
      mean += f' ± {_percent(row["std"])}'
    if not row['complete'] and row['mean'] is not None:
      mean += ' (partial)'
    lines.append('| ' + ' | '.join([row['name']] + cells + [mean]) + ' |')
  return '\n'.join(lines) + '\n'


def write_table(workdir_root: str, summary: dict, meta: dict) -> tuple[str, str]:
  """Writes `<root>/splits.json` (summary + meta) and `<root>/splits.md`; returns their paths."""
  json_path = reports.write_json(paths.path(workdir_root) / 'splits.json',
                                 dict(meta, **summary))
  lines = ['# UCF101 three-split protocol: video top-1 (%)', '']
  lines += [f'- {k}: {v}' for k, v in meta.items()]
  lines += ['- std: sample standard deviation over the splits (n - 1)', '',
            markdown_table(summary)]
  md_path = str(paths.path(workdir_root) / 'splits.md')
  paths.write_text(md_path, '\n'.join(lines))
  return json_path, md_path


def run(config: ml_collections.ConfigDict, workdir_root: str, *, splits: Sequence[int] = SPLITS,
        dataset: Optional[str] = None, baseline: bool = True,
        meta: Optional[dict] = None) -> dict:
  """Trains and tests every (split, model) not finished yet, then writes the table.

  Split by split, the LRCN run then the baseline run, each in `<workdir_root>/<model>/split<k>`.
  The table is rewritten after every finished run, so an interrupted protocol leaves a partial
  one; rerunning skips the finished runs and resumes the interrupted one.

  Args:
    config: the recipe (overrides applied); its dataset fields are replaced per split.
    workdir_root: folder for every run's workdir and the table.
    splits: official splits to run, from 1, 2, 3.
    dataset: 'stock' or 'frames' (see the module docstring); None -> infer_dataset(config).
    baseline: also train and test the frame-average baseline.
    meta: extra {key: value} lines for the table's header (e.g. the command).

  Returns:
    summarize()'s dict plus 'preempted' (True when a run was interrupted before it finished) and
    'paths' (the table files).
  """
  dataset = dataset or infer_dataset(config)
  splits = list(splits)
  if not splits or len(set(splits)) != len(splits):
    raise errors.UserError(f'--splits must name distinct splits from {list(SPLITS)}; got {splits}.')
  models = list(MODELS if baseline else MODELS[:1])
  check(config, splits, dataset)
  meta = dict(meta or {})
  meta.setdefault('dataset', f'{dataset}: ' + ', '.join(
      sorted({split_config(config, s, dataset).dataset.name for s in splits})))
  meta.setdefault('data_dir', config.dataset.data_dir or '(TFDS default)')
  meta.setdefault('num_train_steps', config.num_train_steps)
  top1, num_videos, finished = {m: {} for m in models}, {}, []
  preempted, table_files = False, ()
  for split in splits:
    for model in models:
      workdir = str(paths.path(workdir_root) / model / f'split{split}')
      result = run_split(split_config(config, split, dataset, model), workdir)
      if result is None:
        preempted = True
        break
      top1[model][split] = float(result['metrics']['top1'])
      num_videos[split] = int(result['metrics']['num_videos'])
      finished.append(result['finished'])
      summary = summarize(top1, splits, num_videos)
      if jax.process_index() == 0:
        table_files = write_table(workdir_root, summary, dict(meta, last_run_finished=max(finished)))
    if preempted:
      break
  summary = summarize(top1, splits, num_videos)
  return dict(summary, preempted=preempted, paths=list(table_files))
