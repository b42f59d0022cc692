"""The interface between a prepared dataset and the input pipeline: `DataSource`.

Two implementations, one per way a dataset is stored: `tfds_records.TfdsSource` (TFDS records,
one per video) and `frame_store.FrameStoreSource` (one record per frame). `datasets.open_source` picks
one by dataset name; nothing outside the data layer asks which kind it has.

Split strings: a TFDS split ('train', 'train[:90%]', 'test1[10:20]'), or a split by UCF101 group,
'<base>|train_groups=<f>' / '<base>|val_groups=<f>' (see `datasets.resolve_split`).
"""

import abc
import dataclasses
import os
import re
from typing import Optional

import tensorflow as tf

from har_jax import errors
from har_jax.data import stages

FOREVER = 2**62  # The length of an endless dataset.
_GROUP_SPLIT_RE = re.compile(r'(?P<base>[^|]+)\|(?P<part>train|val)_groups=(?P<fraction>[0-9.]+)')


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


def tf_data_options(dataset_config, deterministic: bool) -> tf.data.Options:
  """The tf.data options of every dataset the pipeline builds (threads from config.dataset)."""
  options = tf.data.Options()
  options.deterministic = deterministic
  options.threading.private_threadpool_size = dataset_config.threadpool_size or os.cpu_count()
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  return options


def num_parallel_calls(dataset_config) -> int:
  """config.dataset.num_parallel_calls, tf.data.AUTOTUNE when unset or negative."""
  n = dataset_config.num_parallel_calls
  return tf.data.AUTOTUNE if n is None or n < 0 else n


def clip_seeds(seed: tf.Tensor) -> tf.Tensor:
  """`[3, 2]` stateless seeds of one training clip: frame indices, crop window, flip."""
  return tf.random.experimental.stateless_split(seed, 3)


def sample_train_frames(num_available: tf.Tensor, seed: tf.Tensor, config) -> tf.Tensor:
  """`[num_frames] int32` frame indices of the training clip with this `[2]` seed."""
  return stages.sample_train_indices(num_available, config.num_frames, config.frame_stride,
                                     config.dataset.short_video, clip_seeds(seed)[0])


def eval_frames(num_available: tf.Tensor, config) -> tf.Tensor:
  """`[num_clips * num_frames] int32` frame indices of a video's evaluation clips, clip-major."""
  indices = stages.sample_eval_indices(num_available, config.num_frames, config.frame_stride,
                                       config.eval.num_clips, config.dataset.short_video)
  return tf.reshape(indices, [-1])


class DataSource(abc.ABC):
  """A prepared video dataset, as the input pipeline, the trainer and validation see it.

  Training reads `train_clips` (cheap: frame indices sampled, nothing decoded) and turns groups of
  them into JPEG frames with `read_train_frames` inside the pipeline's guarded preprocessing, so
  that a damaged frame fails its own example only. Evaluation does the same with
  `eval_examples` and `read_eval_frames`.
  """

  @property
  @abc.abstractmethod
  def name(self) -> str:
    """The dataset's full name, e.g. 'ucf101/ucf101_1_256/2.0.0' or 'ucf101_frames/s128'."""

  @property
  @abc.abstractmethod
  def class_names(self) -> tuple[str, ...]:
    """The names of the labels, in label order."""

  @property
  @abc.abstractmethod
  def split_sizes(self) -> dict[str, int]:
    """{split: number of videos} of the stored splits (empty until prepared)."""

  @property
  def is_prepared(self) -> bool:
    """False only for the built-in synthetic set before it is generated (no splits yet)."""
    return True

  @property
  def tfds_builder(self):
    """The TFDS builder of a records dataset (for tools that read records raw), else None."""
    return None

  @abc.abstractmethod
  def frame_geometry(self) -> dict:
    """How the frames were made from the source videos, as a JSON-able dict:

      {'resize': 'squash', 'size': [h, w]}: every frame resized to h x w, its aspect ratio not
          kept (the stock TFDS ucf101_*_256 records squash UCF101's 320x240 to 256x256; datasets
          that declare one frame size);
      {'resize': 'short_side', 'size': s}: short side s pixels, aspect kept (frame stores written
          by prepare_ucf101.py --short_side, video_folder datasets);
      {'resize': 'none'}: the frames as decoded.
    """

  @abc.abstractmethod
  def static_frame_size(self) -> Optional[tuple[int, int]]:
    """(height, width) of every stored frame when the dataset declares one size, else None."""

  @abc.abstractmethod
  def first_frame_size(self) -> tuple[int, int]:
    """(height, width) of the frames of the first video (reads it where nothing else says)."""

  @abc.abstractmethod
  def group_counts(self, split: str) -> dict[int, int]:
    """{UCF101 group: number of videos} of a stored split; errors.UserError without groups."""

  @abc.abstractmethod
  def _plain_num_examples(self, split: str) -> int:
    """Number of videos of a TFDS split string ('train', 'train[:90%]')."""

  def _plain_shard_sizes(self, split: str, process_count: int) -> list[int]:
    """Videos each process reads of a plain split: process i takes videos i, i + process_count,
    ... (a source that shards otherwise says so)."""
    total = self.num_examples(split)
    return [len(range(i, total, process_count)) for i in range(process_count)]

  @abc.abstractmethod
  def train_clips(self, split: str, config, *, local_batch: int, process_index: int,
                  process_count: int, start_step: int) -> tf.data.Dataset:
    """This process's sampled training clips, forever, in the order the pipeline documents.

    Each clip: {'label': int32, 'tfds_id': string, 'seed': [2] int64 (its crop and flip), and
    what `read_train_frames` needs}.
    """

  @abc.abstractmethod
  def read_train_frames(self, clips: dict) -> dict:
    """Batched clips `[K]` -> {'jpegs': [K, T] string, 'read_records': [K] int32,
    'read_bytes': [K] int64}: their JPEG frames, and the records and bytes read for them."""

  @abc.abstractmethod
  def eval_examples(self, split: str, config, *, process_index: int,
                    process_count: int) -> tf.data.Dataset:
    """This process's share of `split`, each video once, in a fixed order: {'label', 'tfds_id',
    and what `read_eval_frames` needs}."""

  @abc.abstractmethod
  def read_eval_frames(self, example: dict, config) -> tf.Tensor:
    """One eval example -> the JPEG frames of its evaluation clips, `[num_clips * T] string`."""

  def split_groups(self, group_split: GroupSplit) -> list[int]:
    """The sorted UCF101 groups in a GroupSplit (val: the last round(f * G) train groups)."""
    groups = sorted(self.group_counts(group_split.base))
    num_val = max(1, round(group_split.fraction * len(groups)))
    if num_val >= len(groups):
      raise errors.UserError(
          f'config.dataset.val_split={group_split.fraction:g} holds out {num_val} of the '
          f'{len(groups)} groups of {group_split.base!r}, leaving none to train on; use a smaller '
          'fraction.')
    return groups[-num_val:] if group_split.part == 'val' else groups[:-num_val]

  def num_examples(self, split: str) -> int:
    """Number of videos in a split string such as 'train[:90%]' or 'train|val_groups=0.1'."""
    group_split = parse_group_split(split)
    if group_split:
      counts = self.group_counts(group_split.base)
      return sum(counts[g] for g in self.split_groups(group_split))
    return self._plain_num_examples(split)

  def process_shard_sizes(self, split: str, process_count: int) -> list[int]:
    """Videos each process reads of `split` (they are disjoint and cover the split)."""
    if parse_group_split(split):  # Process i takes examples i, i + process_count, ...
      return DataSource._plain_shard_sizes(self, split, process_count)
    return self._plain_shard_sizes(split, process_count)

  def input_bound_advice(self) -> str:
    """One sentence for the log when training waits for this source's input: what to change."""
    return ('The host decodes the JPEG frames on config.dataset.threadpool_size threads (default: '
            'every core); frames stored smaller decode faster, and config.dataset.resize_size '
            'below the stored size lets the JPEG decoder downscale.')

  @abc.abstractmethod
  def describe(self, split: str) -> str:
    """One line on how the dataset is stored, for benchmark and log output."""
