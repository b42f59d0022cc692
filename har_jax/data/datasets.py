"""Dataset resolution: config.dataset -> a prepared TFDS builder, splits and class names."""

import dataclasses
import difflib
import os
import re
from typing import Optional

from absl import logging

import numpy as np
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax import paths
from har_jax.data import frame_store

# The dataset-preparation modules (synthetic_actions, video_folder with PyAV, the ucf101
# builders) are imported where a dataset of theirs is opened, not by the training path.

SYNTHETIC_NAME = 'synthetic_actions'
VIDEO_FOLDER_NAME = 'video_folder'  # Datasets of prepare_video_folder.py (video_folder.py).
# Datasets whose videos carry UCF101 groups (people): 'group' records and metadata.json
# 'group_counts' (ucf101_meta, see ucf101.py), or a 'group' column (frame stores of UCF101).
GROUPED_DATASETS = ('ucf101_meta', 'ucf101_frames')
UCF101_FRAMES = 'ucf101_frames'  # Frame stores built by prepare_ucf101.py --short_side.
UCF101_CONFIGS = ('ucf101_1_256', 'ucf101_1', 'ucf101_2', 'ucf101_3')
_GROUP_SPLIT_RE = re.compile(r'(?P<base>[^|]+)\|(?P<part>train|val)_groups=(?P<fraction>[0-9.]+)')


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


class JpegFrames(tfds.decode.SkipDecoding):
  """Keeps a video's JPEG frames encoded, as one `[num_frames] tf.string` tensor.

  tfds.decode.SkipDecoding does the same through a tf.map_fn over the frames of a Sequence
  feature, which costs ~4 ms per 180-frame video on a host core, most of a clip's decode budget;
  this returns the parsed tensor as it is.
  """

  def decode_batch_example(self, serialized_example):
    return serialized_example


def jpeg_decoders(builder) -> dict:
  """`decoders=` for builder.as_dataset: the video stays JPEG strings, the rest decodes."""
  del builder  # Every dataset har_jax reads names its frames 'video'.
  return {'video': JpegFrames()}


def _split_name_and_config(name: str) -> tuple[str, Optional[str]]:
  base, _, config_name = name.partition('/')
  return base, (config_name or None)


def get_builder(dataset_config, *, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder named by `dataset_config.name`.

  The built-in synthetic dataset is generated on first use (with prepare=False, its builder is
  returned unprepared: features and class names, no splits); any other dataset must already be
  prepared in `dataset_config.data_dir` (this function never downloads anything).
  """
  name = dataset_config.name
  data_dir = dataset_config.data_dir or None
  base, config_name = _split_name_and_config(name)
  store_path = str(paths.path(data_dir or _default_data_dir()) / name)
  if paths.is_url(store_path) and (base == UCF101_FRAMES or frame_store.exists(store_path)):
    paths.require_local(store_path, 'The frame store', frame_store.URL_REMEDY)
  if frame_store.exists(store_path):
    return frame_store.FrameStore(store_path)
  if base == UCF101_FRAMES:
    raise errors.UserError(
        f'Frame store {name!r} is not prepared in {data_dir or _default_data_dir()!r} (no '
        f'{store_path}). Build it from your UCF101 copy with: python scripts/prepare_ucf101.py '
        f'--source <UCF101 folder or zips> --data_dir {data_dir or "<data_dir>"} '
        f'--short_side {config_name.lstrip("s") if config_name else "128"}')
  if base == SYNTHETIC_NAME:
    from har_jax.data import synthetic_actions  # pylint: disable=g-import-not-at-top
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
    from har_jax.data import video_folder  # pylint: disable=g-import-not-at-top
    return video_folder.load(data_dir or _default_data_dir(), config_name)
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


def _check_synthetic_config(name: str, config_name: str):
  from har_jax.data import synthetic_actions  # pylint: disable=g-import-not-at-top
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


def get_info(builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  """Class names and split sizes of a prepared builder (or frame store)."""
  if isinstance(builder, frame_store.FrameStore):
    return DatasetInfo(name=builder.name, class_names=builder.class_names,
                       split_sizes=builder.split_sizes, frame_geometry=frame_geometry(builder))
  features = builder.info.features
  if 'label' not in features or 'video' not in features:
    raise errors.UserError(
        f'Dataset {builder.info.full_name!r} has features {list(features.keys())}; har_jax needs a '
        "'video' (tfds.features.Video of JPEG frames) and a 'label' (ClassLabel).")
  return DatasetInfo(
      name=builder.info.full_name,
      class_names=tuple(features['label'].names),
      split_sizes={k: v.num_examples for k, v in builder.info.splits.items()},
      frame_geometry=frame_geometry(builder))


def frame_geometry(builder) -> dict:
  """How a dataset's frames were made from the source videos, as a JSON-able dict:

    {'resize': 'squash', 'size': [h, w]}: every frame resized to h x w, its aspect ratio not kept
        (the stock TFDS ucf101_*_256 records squash UCF101's 320x240 to 256x256; datasets that
        declare one frame size);
    {'resize': 'short_side', 'size': s}: short side s pixels, aspect kept (frame stores written
        by prepare_ucf101.py --short_side, video_folder datasets);
    {'resize': 'none'}: the frames as decoded.
  """
  if isinstance(builder, frame_store.FrameStore):
    settings = builder.info.get('settings', {})
    if 'frame_geometry' in settings:
      return dict(settings['frame_geometry'])
    short_side = int(settings.get('short_side', 0) or 0)
    return {'resize': 'short_side', 'size': short_side} if short_side else {'resize': 'none'}
  if builder.info.name == VIDEO_FOLDER_NAME:
    short_side = int((builder.info.metadata or {}).get('settings', {}).get('short_side', 0) or 0)
    return {'resize': 'short_side', 'size': short_side} if short_side else {'resize': 'none'}
  size = static_frame_size(builder)
  return {'resize': 'squash', 'size': list(size)} if size else {'resize': 'none'}


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
  base, _ = _split_name_and_config(dataset_config.name)
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


@dataclasses.dataclass(frozen=True)
class GroupSplit:
  """A split by UCF101 group: the 'train' or 'val' part of `base` for a held-out fraction."""
  base: str
  part: str  # 'train' | 'val'
  fraction: float


def parse_group_split(split) -> Optional[GroupSplit]:
  """The GroupSplit a split string names, or None (also for TFDS split objects)."""
  match = _GROUP_SPLIT_RE.fullmatch(split) if isinstance(split, str) else None
  if not match:
    return None
  return GroupSplit(match['base'], match['part'], float(match['fraction']))


def _group_counts(builder, base: str) -> dict[int, int]:
  if isinstance(builder, frame_store.FrameStore):
    groups = builder.videos['group'][builder.split_rows(base)]
    if np.any(groups < 0):
      raise errors.UserError(f'Frame store {builder.name!r} has no UCF101 groups in split '
                             f'{base!r}; validation holds out whole groups only on UCF101 stores.')
    values, counts = np.unique(groups, return_counts=True)
    return {int(g): int(n) for g, n in zip(values, counts)}
  metadata = builder.info.metadata or {}
  counts = metadata.get('group_counts', {}).get(base)
  if not counts:
    raise errors.UserError(
        f'{builder.info.full_name!r} has no group counts for split {base!r} in its metadata.json; '
        'rebuild it with scripts/prepare_ucf101.py --variant ucf101_meta.')
  return {int(g): int(n) for g, n in counts.items()}


def split_groups(builder, group_split: GroupSplit) -> list[int]:
  """The sorted UCF101 group numbers in a GroupSplit (val: the last round(f * G) train groups)."""
  groups = sorted(_group_counts(builder, group_split.base))
  num_val = max(1, round(group_split.fraction * len(groups)))
  if num_val >= len(groups):
    raise errors.UserError(
        f'config.dataset.val_split={group_split.fraction:g} holds out {num_val} of the '
        f'{len(groups)} groups of {group_split.base!r}, leaving none to train on; use a smaller '
        'fraction.')
  return groups[-num_val:] if group_split.part == 'val' else groups[:-num_val]


def split_rows(store: frame_store.FrameStore, split: str) -> np.ndarray:
  """Video rows of a frame store split, group splits ('train1|val_groups=0.1') included."""
  group_split = parse_group_split(split)
  if not group_split:
    return store.split_rows(split)
  rows = store.split_rows(group_split.base)
  return rows[np.isin(store.videos['group'][rows], split_groups(store, group_split))]


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples in a split string such as 'train[:90%]' or 'train|val_groups=0.1'."""
  if isinstance(builder, frame_store.FrameStore):
    return len(split_rows(builder, split))
  group_split = parse_group_split(split)
  if group_split:
    counts = _group_counts(builder, group_split.base)
    return sum(counts[g] for g in split_groups(builder, group_split))
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):  # TFDS: ValueError('Unknown split ...') or a bad slice.
    raise errors.UserError(
        f'Split {split!r} does not exist in {builder.info.full_name!r}; it has '
        f'{sorted(builder.info.splits.keys())}.') from None


def process_shard_sizes(builder, split: str, process_count: int) -> list[int]:
  """Examples each process reads of `split` (they are disjoint and cover the split)."""
  # Frame stores and group splits: process i takes examples i, i + process_count, ...
  if parse_group_split(split) or isinstance(builder, frame_store.FrameStore):
    total = num_examples(builder, split)
    return [len(range(i, total, process_count)) for i in range(process_count)]
  return [num_examples(builder, tfds.split_for_jax_process(
      split, process_index=i, process_count=process_count)) for i in range(process_count)]


def static_frame_size(builder) -> Optional[tuple[int, int]]:
  """(height, width) of every stored frame when the dataset declares one size, else None."""
  if isinstance(builder, frame_store.FrameStore):
    return builder.frame_size
  shape = tuple(builder.info.features['video'].shape)
  if len(shape) == 4 and shape[1] and shape[2]:
    return int(shape[1]), int(shape[2])
  return None
