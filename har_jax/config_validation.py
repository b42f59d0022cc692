"""Config validation: every impossible value is reported at once, before any compute.

  config_validation.validate(config)  # errors.UserError listing each bad field and why.

Checks field types and ranges, names (encoder, optimizer, pooling, dataset...), the global batch
against the device count, and the crop size against the frames stored in the dataset. Values that
are possible but probably a mistake (a crop far smaller than the resized frames) are logged as
warnings (`find_warnings`) and do not stop the run.
"""

import math
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from har_jax import config_fields
from har_jax import errors
from har_jax import models
from har_jax import optim
from har_jax import paths
from har_jax.data import datasets
from har_jax.data import stages
from har_jax.models import lrcn
from har_jax.models.cpu_kernels import conv

DTYPES = ('float32', 'bfloat16', 'float16')
_POSITIVE_INTS = ('num_frames', 'frame_stride', 'image_size', 'batch_size', 'num_train_steps',
                  'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                  'keep_checkpoints', 'eval.batch_size', 'eval.num_clips', 'eval.num_crops',
                  'max_consecutive_nonfinite')
_NON_NEGATIVE_INTS = ('warmup_steps', 'dataset.resize_size', 'eval.num_periodic_videos',
                      'model.num_lstm_layers')
# Below this image_size / (short side the crops are taken from), evaluation's centre crop sees a
# small middle part of the frame; the configs use 7/8 (image_size * 8 // 7 = dataset.resize_size).
MIN_CROP_FRACTION = 0.6


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _range_problems(config) -> list[str]:
  """Counts that must be positive integers, rates and fractions that must lie in a range."""
  problems = []
  for name in _POSITIVE_INTS:
    value = config_fields.get_or_none(config, name)
    if value is not None and (not _is_int(value) or value <= 0):
      problems.append(f'{name}={value!r}: must be a positive integer.')
  for name in _NON_NEGATIVE_INTS:
    value = config_fields.get_or_none(config, name)
    if value is not None and (not _is_int(value) or value < 0):
      problems.append(f'{name}={value!r}: must be an integer >= 0.')
  num_crops = config_fields.get_or_none(config, 'eval.num_crops')
  if _is_int(num_crops) and num_crops > 0 and num_crops not in stages.EVAL_NUM_CROPS:
    problems.append(f'eval.num_crops={num_crops!r}: must be 1 (the centre crop) or 3 (three '
                    'crops along the long side of each frame).')
  # (name, low, high, low_inclusive, high_inclusive)
  intervals = (('learning_rate', 0.0, math.inf, False, False),
               ('weight_decay', 0.0, math.inf, True, False),
               ('momentum', 0.0, 1.0, True, False),
               ('grad_clip_norm', 0.0, math.inf, True, False),
               ('label_smoothing', 0.0, 1.0, True, False),
               ('model.dropout_rate', 0.0, 1.0, True, False),
               ('augment.min_area', 0.0, 1.0, False, True),
               ('augment.max_aspect_ratio', 1.0, math.inf, True, False),
               ('dataset.val_split', 0.0, 1.0, True, False))
  for name, low, high, low_in, high_in in intervals:
    value = config_fields.get_or_none(config, name)
    if value is None or (value == '' and name == 'dataset.val_split'):
      continue
    ok = _is_number(value) and math.isfinite(value) and (
        (value >= low if low_in else value > low) and (value <= high if high_in else value < high))
    if not ok:
      lo, hi = ('[' if low_in else '('), (']' if high_in else ')')
      problems.append(f'{name}={value!r}: must be a finite number in {lo}{low}, {high}{hi}.')
  return problems


def _choice_problems(config) -> list[str]:
  """Names that must be one of a known set."""
  choices = (('model.encoder', tuple(sorted(models.ENCODERS))),
             ('optimizer', optim.OPTIMIZERS),
             ('model.temporal_pooling', lrcn.TEMPORAL_POOLINGS),
             ('model.preprocessing', tuple(sorted(models.PREPROCESSING))),
             ('dtype', DTYPES),
             ('dataset.short_video', stages.SHORT_VIDEO_MODES),
             ('model.conv_impl', conv.CONV_IMPLS))
  old_names = {'model.conv_impl': tuple(conv.CONV_IMPL_ALIASES)}  # Still read, not listed.
  problems = []
  for name, valid in choices:
    value = config_fields.get_or_none(config, name)
    if value is not None and value not in valid + old_names.get(name, ()):
      problems.append(f'{name}={value!r}: unknown; use one of {list(valid)}.')
  encoder_init = config_fields.get_or_none(config, 'model.encoder_init')
  if encoder_init and not paths.path(encoder_init).is_dir():
    problems.append(f'model.encoder_init={encoder_init!r}: no encoder checkpoint there (no such '
                    'folder). Make one with scripts/convert_weights.py (PyTorch weights) or '
                    'scripts/convert_keras_encoder.py, or fix the path.')
  return problems


def _device_problems(config, num_devices: int, mode: str) -> list[str]:
  problems = []
  names = ('batch_size', 'eval.batch_size') if mode == 'train' else ('eval.batch_size',)
  for name in names:
    value = config_fields.get_or_none(config, name)
    if _is_int(value) and value > 0 and value % num_devices:
      suggestion = max(num_devices, value - value % num_devices)
      problems.append(
          f'{name}={value}: must be a multiple of the global device count {num_devices} '
          f'({jax.process_count()} processes x {jax.local_device_count()} local devices); '
          f'try {suggestion}.')
  return problems


def stored_frame_size(dataset) -> tuple[int, int]:
  """(height, width) in pixels of the frames stored in a video dataset (a DataSource, or what
  datasets.get_builder returns).

  Read from the dataset's features (a frame store's table); where they leave it open, from the
  first video.
  """
  source = datasets.source_of(dataset)
  return source.static_frame_size() or source.first_frame_size()


def _crop_problems(config, frame_size: tuple[int, int]) -> list[str]:
  image_size = config_fields.get_or_none(config, 'image_size')
  resize_size = config_fields.get_or_none(config, 'dataset.resize_size')
  if not (_is_int(image_size) and _is_int(resize_size)) or image_size <= 0 or resize_size < 0:
    return []  # Already reported as a range problem.
  short_side = resize_size if resize_size > 0 else min(frame_size)
  if image_size <= short_side:
    return []
  if resize_size > 0:
    return [f'image_size={image_size}: larger than the frames after resizing '
            f'(dataset.resize_size={resize_size}); use image_size <= {resize_size} or raise '
            'dataset.resize_size.']
  return [f'image_size={image_size}: larger than the stored frames '
          f'({frame_size[0]}x{frame_size[1]} in {config.dataset.name!r}); use image_size <= '
          f'{short_side}.']


def find_warnings(config: ml_collections.ConfigDict,
                  frame_size: Optional[tuple[int, int]] = None) -> list[str]:
  """Settings that run but probably are not what was meant, one line each naming the fields.

  Today one check: image_size far below the short side the crops are taken from
  (dataset.resize_size, or with resize_size 0 the stored short side `min(frame_size)`, skipped when
  frame_size is None). Evaluation then centre-crops a small middle part of each frame, and with
  random-resized crops (augment.min_area < 1) it also sees objects at a larger scale than training
  did, whose crops cover most of the frame and are shrunk to image_size.

  Args:
    config: the run's config.
    frame_size: (height, width) of the stored frames in pixels, if known.
  """
  image_size = config_fields.get_or_none(config, 'image_size')
  resize_size = config_fields.get_or_none(config, 'dataset.resize_size')
  if not (_is_int(image_size) and _is_int(resize_size)) or image_size <= 0 or resize_size < 0:
    return []
  if resize_size > 0:
    short_side, source = resize_size, f'dataset.resize_size={resize_size}'
  elif frame_size:
    short_side = min(frame_size)
    source = f'the stored short side {short_side} (dataset.resize_size=0)'
  else:
    return []
  fraction = image_size / short_side
  if fraction >= MIN_CROP_FRACTION or image_size > short_side:  # Larger: a problem, not a warning.
    return []
  min_area = config_fields.get_or_none(config, 'augment.min_area')
  if _is_number(min_area) and min_area < 1:
    scale = (f'training shrinks random crops of {min_area:.0%}-100% of the frame area to '
             f'{image_size} px, so evaluation sees objects about {math.sqrt(min_area) / fraction:.1f}'
             f'-{1 / fraction:.1f}x as large as training did; ')
  else:
    scale = ''
  suggestion = image_size * 8 // 7
  return [f'image_size={image_size} is {fraction:.0%} of {source}: evaluation centre-crops only '
          f'the middle {fraction:.0%} of the short side; {scale}set dataset.resize_size to about '
          f'{suggestion} (image_size * 8 // 7, what the configs use when resize_size is not '
          'overridden), or raise image_size.']


def _dataset_problems(config) -> tuple[list[str], Optional[Any]]:
  """Opens config.dataset without preparing anything: the built-in synthetic set, when not yet
  generated, comes back unprepared (its frame size is known; it has no splits yet)."""
  try:
    source = datasets.open_source(config.dataset, prepare=False)
    if source.is_prepared:
      datasets.get_info(source)
  except errors.UserError as e:
    name = config_fields.get_or_none(config, 'dataset.name')
    return [f'dataset.name={name!r}: {e}'], None
  return [], source


def _split_problem(builder, field: str, split: str) -> list[str]:
  """[why] when `split` (the value of `field`) does not exist or holds no examples, else []."""
  try:
    size = datasets.num_examples(builder, split)
  except errors.UserError as e:
    return [f'{field}={split!r}: {e}']
  return [] if size else [f'{field}={split!r}: holds no examples.']


def _val_split_problems(config, builder) -> list[str]:
  """An empty validation or training part of dataset.train_split under dataset.val_split."""
  fraction = config_fields.get_or_none(config, 'dataset.val_split') or 0.0
  train = config.dataset.train_split
  if not _is_number(fraction) or not 0 < fraction < 1:
    return []  # No hold-out, or already reported as a range problem.
  try:
    splits = {p: datasets.resolve_split(config.dataset, p) for p in ('train', 'val')}
    sizes = {p: datasets.num_examples(builder, s) for p, s in splits.items()}
  except errors.UserError as e:
    return [f'dataset.val_split={fraction!r}: {e}']
  total = datasets.num_examples(builder, train)
  if not sizes['train']:
    return [f'dataset.val_split={fraction!r}: holding out this fraction of the {total} examples '
            f'of {train!r} leaves no training examples; use a smaller fraction.']
  if sizes['val']:
    return []
  smallest = next(f / 100 for f in range(1, 100)
                  if datasets.num_examples(builder, datasets.percent_split(train, f / 100, 'val')))
  return [f'dataset.val_split={fraction!r}: the validation split {splits["val"]!r} of the {total} '
          f'examples of {train!r} is empty, and periodic evaluation would fail on it; use '
          f'dataset.val_split={smallest:g} or more, or 0 to evaluate on dataset.eval_split.']


def _split_problems(config, builder, mode: str, split: Optional[str]) -> list[str]:
  """Splits named by the config (or --split in eval mode) that do not exist or are empty."""
  if mode == 'eval':
    field = '--split' if split else 'dataset.eval_split'
    return _split_problem(builder, field, split or config.dataset.eval_split)
  problems = []
  for field in ('dataset.train_split', 'dataset.eval_split'):
    problems += _split_problem(builder, field, config_fields.get_or_none(config, field))
  return problems or _val_split_problems(config, builder)


def find_problems(config: ml_collections.ConfigDict, *, num_devices: Optional[int] = None,
                  mode: str = 'train', check_dataset: bool = True,
                  split: Optional[str] = None) -> list[str]:
  """Every problem of `config`, one line each naming the field (empty if it is fine).

  Args:
    num_devices: the global device count batches must divide (default: jax.device_count()).
    mode: 'train' checks the train and eval batches; 'eval' only the eval batch.
    check_dataset: resolve config.dataset (nothing is prepared or generated here; the split checks
      of a built-in synthetic set not yet generated wait until it is), check that the splits exist
      and hold examples (train, eval and validation in 'train' mode; `split` or the eval split in
      'eval' mode), and the crop against the stored frames.
    split: 'eval' mode: the split to evaluate (--split), default dataset.eval_split.
  """
  return _problems_and_frame_size(config, num_devices=num_devices, mode=mode,
                                  check_dataset=check_dataset, split=split)[0]


def _problems_and_frame_size(config, *, num_devices: Optional[int] = None, mode: str = 'train',
                             check_dataset: bool = True, split: Optional[str] = None
                             ) -> tuple[list[str], Optional[tuple[int, int]]]:
  """find_problems, and the stored frame size where the dataset was opened (else None)."""
  problems = _range_problems(config) + _choice_problems(config)
  problems += _device_problems(config, num_devices or jax.device_count(), mode)
  frame_size = None
  if check_dataset:
    dataset_problems, source = _dataset_problems(config)
    problems += dataset_problems
    if source is not None:
      if source.is_prepared:  # The synthetic set is generated where the pipeline is built.
        problems += _split_problems(config, source, mode, split)
      frame_size = stored_frame_size(source)
      problems += _crop_problems(config, frame_size)
  return problems, frame_size


def validate(config: ml_collections.ConfigDict, **kwargs) -> None:
  """Raises errors.UserError listing every bad field of `config`; see find_problems for kwargs.

  Logs each of find_warnings(config) as an absl warning first (they do not stop the run).
  """
  problems, frame_size = _problems_and_frame_size(config, **kwargs)
  for warning in find_warnings(config, frame_size):
    logging.warning('Config: %s', warning)
  _raise_if_any(problems)


def validate_splits(config: ml_collections.ConfigDict, builder) -> None:
  """The split checks of validate(), for a dataset that only now exists (the built-in synthetic
  set is generated by the run itself, after validate() ran): before the first step, not after."""
  _raise_if_any(_split_problems(config, builder, 'train', None))


def _raise_if_any(problems: list[str]):
  if problems:
    raise errors.UserError(f'The config has {len(problems)} invalid value(s):\n  ' +
                           '\n  '.join(problems) +
                           '\nFix them in the config file or with --config.<field>=<value>.')
