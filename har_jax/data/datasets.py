"""Dataset resolution: config.dataset -> a prepared dataset (`open_source`), its splits and classes.

The table from dataset names to where their data lives is `get_builder`; `open_source` gives the
same dataset as a `sources.DataSource`, which is what the trainer, evaluation and validation use.
"""

import dataclasses
import difflib
import os
import re
from typing import Optional, Union

from absl import logging

import tensorflow_datasets as tfds

from har_jax import errors
from har_jax import paths
from har_jax.data import frame_store
from har_jax.data import sources
from har_jax.data import tfds_records

# The training path reads prepared datasets and never imports the preparation package
# (har_jax.data.prepare), except to generate the built-in synthetic set on first use.

SYNTHETIC_NAME = 'synthetic_actions'
VIDEO_FOLDER_NAME = tfds_records.VIDEO_FOLDER_NAME
VIDEO_FOLDER_VERSION = '1.0.0'
_VIDEO_FOLDER_NAME_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_-]*')
UCF101_FRAMES = 'ucf101_frames'  # Frame stores built by prepare_ucf101.py --short_side.
# Frame indexes of TFDS records: 'frame_index/<records name>', e.g.
# 'frame_index/ucf101/ucf101_1_256' (prepare_ucf101.py --frame_index), at <data_dir>/<that name>.
FRAME_INDEX = 'frame_index'
# Datasets whose videos carry UCF101 groups (people): 'group' records and metadata.json
# 'group_counts' (ucf101_meta, see prepare/ucf101.py), or a 'group' column (UCF101 frame stores).
GROUPED_DATASETS = ('ucf101_meta', UCF101_FRAMES)
UCF101_CONFIGS = ('ucf101_1_256', 'ucf101_1', 'ucf101_2', 'ucf101_3')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset.

  frame_geometry: how its frames were made from the source videos (see `frame_geometry`); saved
  with every checkpoint, so that prediction gives raw video the same geometry.
  """
  name: str
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  frame_geometry: dict = dataclasses.field(default_factory=lambda: {'resize': 'none'})

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _split_name_and_config(name: str) -> tuple[str, Optional[str]]:
  base, _, config_name = name.partition('/')
  return base, (config_name or None)


def indexed_records_name(name: str) -> Optional[str]:
  """The records a frame index name reads ('frame_index/ucf101/ucf101_1_256' ->
  'ucf101/ucf101_1_256'), or None for any other name."""
  base, records = _split_name_and_config(name)
  return records if base == FRAME_INDEX else None


def frame_index_name(records_name: str) -> str:
  """The name of the frame index of a records dataset ('ucf101/ucf101_1_256')."""
  return f'{FRAME_INDEX}/{records_name}'


Builder = Union[tfds.core.DatasetBuilder, frame_store.FrameStore]


def open_source(dataset_config, *, prepare: bool = True) -> sources.DataSource:
  """The prepared dataset named by `dataset_config.name`, as a DataSource (see `get_builder`)."""
  return source_of(get_builder(dataset_config, prepare=prepare))


def source_of(dataset) -> sources.DataSource:
  """A DataSource for what `get_builder` returns (a DataSource passes through): the one place
  that tells the two kinds of dataset apart."""
  if isinstance(dataset, sources.DataSource):
    return dataset
  if isinstance(dataset, frame_store.FrameStore):
    return frame_store.FrameStoreSource(dataset)
  return tfds_records.TfdsSource(dataset)


def get_builder(dataset_config, *, prepare: bool = True) -> Builder:
  """Returns the prepared dataset named by `dataset_config.name`: a TFDS builder, or a
  frame_store.FrameStore for frame stores (`open_source` wraps either in a DataSource).

  The built-in synthetic dataset is generated on first use (with prepare=False, its builder is
  returned unprepared: features and class names, no splits); any other dataset must already be
  prepared in `dataset_config.data_dir` (this function never downloads anything).
  """
  name = dataset_config.name
  data_dir = dataset_config.data_dir or None
  base, config_name = _split_name_and_config(name)
  store_path = str(paths.path(data_dir or _default_data_dir()) / name)
  if paths.is_url(store_path) and (base in (UCF101_FRAMES, FRAME_INDEX)
                                    or frame_store.exists(store_path)):
    paths.require_local(store_path, 'The frame store', frame_store.URL_REMEDY)
  if frame_store.exists(store_path):
    return frame_store.FrameStore(store_path)
  if base == FRAME_INDEX:
    records = _split_name_and_config(indexed_records_name(name) or '')
    shown_dir = data_dir or '<data_dir>'
    if records[0] in ('ucf101', 'ucf101_meta') and records[1] in UCF101_CONFIGS:
      remedy = ('Write it from the prepared records with: python scripts/prepare_ucf101.py '
                f'--frame_index --data_dir {shown_dir} --config {records[1]} '
                f'--variant {records[0]}')
    elif records[0] == VIDEO_FOLDER_NAME and records[1]:
      remedy = ('Write it by rerunning the command that prepared the records, with '
                '--frame_index: python scripts/prepare_video_folder.py --source <your folder> '
                f'--data_dir {shown_dir} --name {records[1]} <its other flags> --frame_index')
    else:
      remedy = ("Frame indexes are written for UCF101 records ('frame_index/ucf101/<config>', "
                "'frame_index/ucf101_meta/<config>') and video folders "
                "('frame_index/video_folder/<name>'); see docs/ucf101.md.")
    raise errors.UserError(f'Frame index {name!r} is not prepared in '
                           f'{data_dir or _default_data_dir()!r} (no {store_path}). {remedy}')
  if base == UCF101_FRAMES:
    raise errors.UserError(
        f'Frame store {name!r} is not prepared in {data_dir or _default_data_dir()!r} (no '
        f'{store_path}). Build it from your UCF101 copy with: python scripts/prepare_ucf101.py '
        f'--source <UCF101 folder or zips> --data_dir {data_dir or "<data_dir>"} '
        f'--short_side {config_name.lstrip("s") if config_name else "128"}')
  if base == SYNTHETIC_NAME:
    from har_jax.data.prepare import synthetic_actions  # pylint: disable=g-import-not-at-top
    _check_synthetic_config(name, config_name or 'default')
    if not prepare:
      return synthetic_actions.SyntheticActions(config=config_name or 'default',
                                                data_dir=data_dir or _default_data_dir())
    return synthetic_actions.prepare(data_dir or _default_data_dir(), config_name or 'default')
  if base in ('ucf101',) + GROUPED_DATASETS and config_name not in UCF101_CONFIGS:
    raise errors.UserError(
        f'Unknown UCF101 config {config_name!r} in config.dataset.name={name!r}; use '
        f"'{base}/<config>' with <config> one of {UCF101_CONFIGS}.")
  if base in GROUPED_DATASETS:
    return _prepared_grouped_builder(dataset_config, base, config_name)
  if base == VIDEO_FOLDER_NAME:
    return load_video_folder(data_dir or _default_data_dir(), config_name)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.UserError(_unknown_dataset_message(name)) from None
  except ValueError as e:  # Unknown builder config, e.g. 'ucf101/ucf101_9'.
    raise errors.UserError(f'Bad config.dataset.name {name!r}: {e}') from None
  if not builder.info.splits or not builder.info.splits.total_num_examples:
    hint = _prepare_hint(data_dir, config_name, base) if base == 'ucf101' else ''
    raise errors.UserError(
        f'Dataset {name!r} is not prepared in {builder.data_dir_root!r} '
        f'(config.dataset.data_dir={dataset_config.data_dir!r}).{hint}')
  return builder


def video_folder_dir(data_dir: str, name: str) -> str:
  """The folder of a prepared video folder dataset: <data_dir>/video_folder/<name>/<version>."""
  return os.path.join(os.path.expanduser(data_dir), VIDEO_FOLDER_NAME, name, VIDEO_FOLDER_VERSION)


def check_video_folder_name(name: Optional[str]) -> str:
  if not name or not _VIDEO_FOLDER_NAME_RE.fullmatch(name):
    raise errors.UserError(
        f'Dataset name {name!r} is not valid; use letters, digits, _ and -, starting with a '
        "letter or digit (it becomes config.dataset.name='video_folder/<name>').")
  return name


def load_video_folder(data_dir: str, name: Optional[str]) -> tfds.core.DatasetBuilder:
  """The prepared dataset `video_folder/<name>` in data_dir (needs no source folder).

  Raises:
    errors.UserError: the dataset is not prepared there, with the command that prepares it.
  """
  check_video_folder_name(name)
  path = video_folder_dir(data_dir, name)
  if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
    raise errors.UserError(
        f'Dataset video_folder/{name} is not prepared in {data_dir!r} (no {path}). Build it with: '
        f'python scripts/prepare_video_folder.py --source <folder of class folders> '
        f'--data_dir {data_dir} --name {name}')
  return tfds.builder_from_directory(path)


def _check_synthetic_config(name: str, config_name: str):
  from har_jax.data.prepare import synthetic_actions  # pylint: disable=g-import-not-at-top
  configs = sorted(synthetic_actions.SyntheticActions.builder_configs)
  if config_name not in configs:
    raise errors.UserError(f'Unknown synthetic_actions config {config_name!r} in '
                           f'config.dataset.name={name!r}; use one of {configs}.')


def _unknown_dataset_message(name: str) -> str:
  """What to use instead of an unknown dataset: the closest TFDS names and the project's own."""
  base, _ = _split_name_and_config(name)
  close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=4)
  closest = f' The closest TFDS names: {close}.' if close else ''
  return (f'Unknown dataset {name!r} in config.dataset.name.{closest} This project reads '
          f"{SYNTHETIC_NAME!r} (built in, generated on first use), 'ucf101/<config>' or "
          f"'ucf101_meta/<config>' with <config> one of {list(UCF101_CONFIGS)} "
          "(scripts/prepare_ucf101.py), the frame store 'ucf101_frames/s<short side>' "
          "(prepare_ucf101.py --short_side), 'video_folder/<name>' (your own videos, "
          'scripts/prepare_video_folder.py), or another prepared TFDS video dataset.')


def _prepare_hint(data_dir: Optional[str], config_name: str, variant: str) -> str:
  return (' Build the records from your UCF101 copy with: python scripts/prepare_ucf101.py '
          f'--source <UCF101 folder or zips> --data_dir {data_dir or "<data_dir>"} '
          f'--config {config_name} --variant {variant}.')


def _prepared_grouped_builder(dataset_config, base: str, config_name: str):
  """Reads records of our own builder variants (not registered in TFDS) from their files."""
  data_dir = dataset_config.data_dir or _default_data_dir()
  try:
    return tfds.builder_from_directory(_latest_version_dir(paths.path(data_dir) / base /
                                                           config_name))
  except FileNotFoundError:
    raise errors.UserError(
        f'Dataset {dataset_config.name!r} is not prepared in {data_dir!r} '
        f'(config.dataset.data_dir={dataset_config.data_dir!r}).'
        + _prepare_hint(data_dir, config_name, base)) from None


def _latest_version_dir(config_dir: paths.Path) -> str:
  """The newest complete version dir (one holding dataset_info.json) under a config dir."""
  versions = []
  for v in paths.list_names(config_dir):
    if (config_dir / v / 'dataset_info.json').is_file():
      versions.append(tuple(int(x) for x in v.split('.')) if re.fullmatch(r'[\d.]+', v) else ())
  if not versions:
    raise FileNotFoundError(config_dir)
  return str(config_dir / '.'.join(str(x) for x in max(versions)))


def _default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def get_info(dataset) -> DatasetInfo:
  """Class names, split sizes and frame geometry of a prepared dataset (builder, store or
  DataSource)."""
  source = source_of(dataset)
  return DatasetInfo(name=source.name, class_names=source.class_names,
                     split_sizes=source.split_sizes, frame_geometry=source.frame_geometry())


def frame_geometry(dataset) -> dict:
  """How a dataset's frames were made from the source videos (`DataSource.frame_geometry`)."""
  return source_of(dataset).frame_geometry()


def resolve_split(dataset_config, purpose: str) -> str:
  """The split string for 'train', 'val' (periodic evaluation) or a named split.

  With `dataset_config.val_split` = f in (0, 1), part of the train split is held out for 'val':
  - datasets with UCF101 groups (GROUPED_DATASETS): the last round(f * G) of the G train groups
    (people), as 'train|train_groups=f' / 'train|val_groups=f' (understood by this module and the
    pipeline, not by TFDS);
  - other datasets: the last f of the examples, 'train[:N%]' / 'train[N%:]' with N = 100 (1 - f),
    with a logged warning (the same person can then appear in both sets).
  Without val_split, 'val' is the eval split.
  """
  train, fraction = dataset_config.train_split, float(dataset_config.val_split or 0.0)
  if purpose not in ('train', 'val'):
    return purpose
  if fraction <= 0:
    return train if purpose == 'train' else dataset_config.eval_split
  if not 0 < fraction < 1:
    raise errors.UserError(f'config.dataset.val_split={fraction} must be a fraction in (0, 1).')
  base, _ = _split_name_and_config(indexed_records_name(dataset_config.name)
                                   or dataset_config.name)
  if base in GROUPED_DATASETS:
    return f'{train}|{purpose}_groups={fraction:g}'
  if (dataset_config.name, fraction) not in _WARNED_PLAIN_VAL_SPLIT:
    _WARNED_PLAIN_VAL_SPLIT.add((dataset_config.name, fraction))
    _warn_plain_val_split(dataset_config.name, fraction, train)
  return percent_split(train, fraction, purpose)


_WARNED_PLAIN_VAL_SPLIT = set()  # (dataset name, fraction): warned once per process.


def _warn_plain_val_split(name: str, fraction: float, train: str):
  logging.warning(
      'config.dataset.val_split=%g: %r has no UCF101 group information, so validation is a plain '
      '%d%% split of %r and the same person may appear in train and val. Use '
      "'ucf101_meta/<config>' (prepare_ucf101.py --variant ucf101_meta) for a split by group.",
      fraction, name, round(100 * fraction), train)


def percent_split(train: str, fraction: float, purpose: str) -> str:
  """'train[:N%]' ('train') or 'train[N%:]' ('val') with N = round(100 (1 - fraction))."""
  cut = round(100 * (1 - fraction))
  return f'{train}[:{cut}%]' if purpose == 'train' else f'{train}[{cut}%:]'


def num_examples(dataset, split: str) -> int:
  """Number of examples in a split string such as 'train[:90%]' or 'train|val_groups=0.1'."""
  return source_of(dataset).num_examples(split)


def static_frame_size(dataset) -> Optional[tuple[int, int]]:
  """(height, width) of every stored frame when the dataset declares one size, else None."""
  return source_of(dataset).static_frame_size()
