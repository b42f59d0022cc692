"""Dataset resolution: config.dataset -> a prepared TFDS builder, splits and class names."""

import dataclasses
import os
from typing import Optional

from absl import logging
import tensorflow_datasets as tfds

from har_jax.data import synthetic_actions  # Defines (and so registers) the TFDS builder.

SYNTHETIC_NAME = 'synthetic_actions'


class DatasetError(ValueError):
  """A dataset that is missing, unprepared or misconfigured, with what to do about it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset."""
  name: str
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _split_name_and_config(name: str) -> tuple[str, Optional[str]]:
  base, _, config_name = name.partition('/')
  return base, (config_name or None)


def get_builder(dataset_config) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder named by `dataset_config.name`.

  The built-in synthetic dataset is generated on first use; any other dataset must already be
  prepared in `dataset_config.data_dir` (this function never downloads anything).
  """
  name = dataset_config.name
  data_dir = dataset_config.data_dir or None
  base, config_name = _split_name_and_config(name)
  if base == SYNTHETIC_NAME:
    return synthetic_actions.prepare(data_dir or _default_data_dir(), config_name or 'default')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(
        f'Unknown dataset {name!r} in config.dataset.name. Use {SYNTHETIC_NAME!r}, '
        f"'ucf101/<config>' (ucf101_1_256, ucf101_1, ucf101_2, ucf101_3) or another TFDS video "
        f'dataset. ({e})') from None
  except ValueError as e:  # Unknown builder config, e.g. 'ucf101/ucf101_9'.
    raise DatasetError(f'Bad config.dataset.name {name!r}: {e}') from None
  if not builder.info.splits or not builder.info.splits.total_num_examples:
    hint = ''
    if base == 'ucf101':
      hint = (' Build the records from your UCF101 copy with: python scripts/prepare_ucf101.py '
              f'--source <UCF101 folder or zips> --data_dir {data_dir or "<data_dir>"} '
              f'--config {config_name or "ucf101_1_256"}.')
    raise DatasetError(
        f'Dataset {name!r} is not prepared in {builder.data_dir_root!r} '
        f'(config.dataset.data_dir={dataset_config.data_dir!r}).{hint}')
  return builder


def _default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def get_info(builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  """Class names and split sizes of a prepared builder."""
  features = builder.info.features
  if 'label' not in features or 'video' not in features:
    raise DatasetError(
        f'Dataset {builder.info.full_name!r} has features {list(features.keys())}; har_jax needs a '
        "'video' (tfds.features.Video of JPEG frames) and a 'label' (ClassLabel).")
  return DatasetInfo(
      name=builder.info.full_name,
      class_names=tuple(features['label'].names),
      split_sizes={k: v.num_examples for k, v in builder.info.splits.items()})


def resolve_split(dataset_config, purpose: str) -> str:
  """The TFDS split string for 'train', 'val' (periodic evaluation) or a named split.

  With `dataset_config.val_split` = f in (0, 1), the last f of the train split is held out: 'train'
  reads `train[:N%]`, 'val' reads `train[N%:]` where N = 100 * (1 - f). Otherwise 'val' is the eval
  split.
  """
  train, fraction = dataset_config.train_split, float(dataset_config.val_split or 0.0)
  if purpose == 'train':
    if fraction > 0:
      return f'{train}[:{round(100 * (1 - fraction))}%]'
    return train
  if purpose == 'val':
    if fraction > 0:
      return f'{train}[{round(100 * (1 - fraction))}%:]'
    return dataset_config.eval_split
  return purpose


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples in a split string such as 'train[:90%]'."""
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    raise DatasetError(
        f'Split {split!r} does not exist in {builder.info.full_name!r}; it has '
        f'{sorted(builder.info.splits.keys())}.') from None
