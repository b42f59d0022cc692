"""TFDS records as a `sources.DataSource`: one record per video holding all its JPEG frames.

A clip reads and parses its video's record, then gathers its frames (the video stays JPEG
strings: `JpegFrames`). Stock `ucf101`, `synthetic_actions`, `video_folder` and `ucf101_meta`
are read this way.
"""

from typing import Optional

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow.python.util import deprecation  # pylint: disable=g-direct-tensorflow-import

from har_jax import errors
from har_jax import geometry
from har_jax.data import sources
from har_jax.data import stages

# TFDS record files open at once, records taken from each in blocks of RECORDS_PER_FILE_BLOCK
# (TFDS writes UCF101's train split 1 at 256x256 in ~64 files); tf.data tunes how many of them are
# read in parallel. Fixed numbers, not the host's core count: with deterministic_data the record
# order depends on them (and not on the parallelism).
FILES_READ_AT_ONCE = 16
RECORDS_PER_FILE_BLOCK = 16
# Clips of the next epoch read ahead while the current epoch drains (besides its shuffle buffer).
NEXT_EPOCH_READ_AHEAD = 64
VIDEO_FOLDER_NAME = 'video_folder'  # Datasets of prepare_video_folder.py (prepare/video_folder.py).


class JpegFrames(tfds.decode.SkipDecoding):
  """Keeps a video's JPEG frames encoded, as one `[num_frames] tf.string` tensor.

  tfds.decode.SkipDecoding does the same through a tf.map_fn over the frames of a Sequence
  feature, which costs ~4 ms per 180-frame video on a host core, most of a clip's decode budget;
  this returns the parsed tensor as it is.
  """

  def decode_batch_example(self, serialized_example):
    return serialized_example


def jpeg_decoders() -> dict:
  """`decoders=` for builder.as_dataset: the video stays JPEG strings, the rest decodes."""
  return {'video': JpegFrames()}


def read_examples(builder, split: str, config, *, process_index: int, process_count: int,
                  shuffle: bool, deterministic: bool) -> tf.data.Dataset:
  """Reads this process's share of a TFDS split, with the video left as JPEG strings.

  The split's record files are read FILES_READ_AT_ONCE at a time, in parallel (a split in one
  file is one stream). Plain splits are divided with tfds.split_for_jax_process. Group splits
  ('train|val_groups=f') are filtered by the 'group' feature: training filters this process's
  share of the base split; evaluation filters the whole base split in file order and keeps every
  process_count-th example, so that every process knows its exact count
  (DataSource.process_shard_sizes).
  """
  group_split = sources.parse_group_split(split)
  read_split = group_split.base if group_split else split
  if not (group_split and not shuffle):
    read_split = tfds.split_for_jax_process(
        read_split, process_index=process_index, process_count=process_count)
  read_config = tfds.ReadConfig(
      try_autocache=False,
      add_tfds_id=True,
      shuffle_seed=config.seed if shuffle else None,
      interleave_cycle_length=FILES_READ_AT_ONCE,
      interleave_block_length=RECORDS_PER_FILE_BLOCK,
      num_parallel_calls_for_interleave_files=tf.data.AUTOTUNE,
      options=sources.tf_data_options(config.dataset, deterministic))
  ds = builder.as_dataset(split=read_split, shuffle_files=shuffle, read_config=read_config,
                          decoders=jpeg_decoders())
  if group_split:
    groups = tf.constant(TfdsSource(builder).split_groups(group_split), tf.int32)
    ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(tf.cast(ex['group'], tf.int32), groups)))
    if not shuffle:
      ds = ds.shard(process_count, process_index)
  return ds


class TfdsSource(sources.DataSource):
  """A prepared TFDS video dataset: features 'video' (JPEG frames) and 'label' (ClassLabel)."""

  def __init__(self, builder: tfds.core.DatasetBuilder):
    self.builder = builder

  @property
  def name(self) -> str:
    return self.builder.info.full_name

  @property
  def class_names(self) -> tuple[str, ...]:
    features = self.builder.info.features
    if 'label' not in features or 'video' not in features:
      raise errors.UserError(
          f'Dataset {self.name!r} has features {list(features.keys())}; har_jax needs a '
          "'video' (tfds.features.Video of JPEG frames) and a 'label' (ClassLabel).")
    return tuple(features['label'].names)

  @property
  def split_sizes(self) -> dict[str, int]:
    return {k: v.num_examples for k, v in self.builder.info.splits.items()}

  @property
  def is_prepared(self) -> bool:
    return self.builder.is_prepared()

  @property
  def tfds_builder(self) -> tfds.core.DatasetBuilder:
    return self.builder

  def frame_geometry(self) -> dict:
    if self.builder.info.name == VIDEO_FOLDER_NAME:
      settings = (self.builder.info.metadata or {}).get('settings', {})
      return geometry.stored_short_side(settings)
    size = self.static_frame_size()
    return {'resize': 'squash', 'size': list(size)} if size else {'resize': 'none'}

  def static_frame_size(self) -> Optional[tuple[int, int]]:
    shape = tuple(self.builder.info.features['video'].shape)
    if len(shape) == 4 and shape[1] and shape[2]:
      return int(shape[1]), int(shape[2])
    return None

  def first_frame_size(self) -> tuple[int, int]:
    split = sorted(self.builder.info.splits.keys())[0]
    for example in self.builder.as_dataset(split=split, decoders=jpeg_decoders()).take(1):
      height, width = tf.io.extract_jpeg_shape(example['video'][0])[:2].numpy()  # One header.
      return int(height), int(width)
    raise errors.UserError(f'Dataset {self.name!r} has no records to read.')

  def group_counts(self, split: str) -> dict[int, int]:
    metadata = self.builder.info.metadata or {}
    counts = metadata.get('group_counts', {}).get(split)
    if not counts:
      raise errors.UserError(
          f'{self.name!r} has no group counts for split {split!r} in its metadata.json; '
          'rebuild it with scripts/prepare_ucf101.py --variant ucf101_meta.')
    return {int(g): int(n) for g, n in counts.items()}

  def _plain_num_examples(self, split: str) -> int:
    try:
      return self.builder.info.splits[split].num_examples
    except (KeyError, ValueError):  # TFDS: ValueError('Unknown split ...') or a bad slice.
      raise errors.UserError(
          f'Split {split!r} does not exist in {self.name!r}; it has '
          f'{sorted(self.builder.info.splits.keys())}.') from None

  def _plain_shard_sizes(self, split: str, process_count: int) -> list[int]:
    return [self._plain_num_examples(tfds.split_for_jax_process(
        split, process_index=i, process_count=process_count)) for i in range(process_count)]

  def describe(self, split: str) -> str:
    group_split = sources.parse_group_split(split)
    base = (group_split.base if group_split else split).split('[')[0]
    files = self.builder.info.splits[base].num_shards
    return (f'TFDS records, frames {self.static_frame_size()}, train split in {files} '
            f'file(s)')

  def input_bound_advice(self) -> str:
    whole = 'These TFDS records make every clip read, checksum and parse its whole video'
    if self.builder.name in ('ucf101', 'ucf101_meta'):
      records = f'{self.builder.name}/{self.builder.info.config_name}'
      return (f'{whole}; their frame index reads only the clip\'s frames from the same files, '
              'at about the decode cost (`har-prepare-ucf101 --frame_index --data_dir '
              f'{self.builder.data_dir_root} --config {self.builder.info.config_name} --variant '
              f'{self.builder.name}` writes it, then --config.dataset.name=frame_index/{records}; '
              'docs/ucf101.md).')
    if self.builder.name == VIDEO_FOLDER_NAME:
      records = f'{VIDEO_FOLDER_NAME}/{self.builder.info.config_name}'
      return (f'{whole}; their frame index reads only the clip\'s frames (rerun '
              'har-prepare-videos with --frame_index, then '
              f'--config.dataset.name=frame_index/{records}; docs/own_videos.md), and storing '
              'fewer frames (--fps) or smaller ones (--short_side) cuts the host\'s cost per clip.')
    return super().input_bound_advice()

  def train_clips(self, split: str, config, *, local_batch: int, process_index: int,
                  process_count: int, start_step: int) -> tf.data.Dataset:
    """Sampled clips {'jpegs': [T] string, 'label', 'tfds_id', 'seed', 'read_records',
    'read_bytes'}, forever.

    Epoch e reads the records (whole split, or this process's shard), samples one clip of each
    with seed (s, e, r) -- r the record's position in the epoch -- and shuffles the clips with a
    buffer of config.dataset.shuffle_buffer.
    """
    deterministic = bool(config.deterministic_data)
    if deterministic:
      if process_count > 1:
        logging.warning(
            'config.deterministic_data on TFDS records: each of the %d processes reads and '
            'parses every record of %r and keeps 1/%d. A frame store or a frame index of the '
            'records reads only its share (see docs/speed.md, "Input speed").', process_count,
            split, process_count)
      examples = read_examples(self.builder, split, config, process_index=0, process_count=1,
                               shuffle=True, deterministic=True)
      base_seed = tf.constant([config.seed, 0], tf.int64)
    else:
      examples = read_examples(self.builder, split, config, process_index=process_index,
                               process_count=process_count, shuffle=True, deterministic=False)
      base_seed = tf.constant([hash((config.seed, process_index, start_step)) % (2**31),
                               process_index], tf.int64)
    examples = examples.map(lambda ex: {'video': ex['video'],
                                        'label': tf.cast(ex['label'], tf.int32),
                                        'tfds_id': ex['tfds_id']})
    if config.dataset.cache:
      examples = examples.cache()

    def sample(seed, ex):
      frames = sources.sample_train_frames(tf.shape(ex['video'])[0], seed, config)
      return {'jpegs': stages.gather_frames(ex['video'], frames), 'label': ex['label'],
              'tfds_id': ex['tfds_id'], 'seed': seed, 'read_records': tf.constant(1, tf.int32),
              'read_bytes': tf.reduce_sum(tf.cast(tf.strings.length(ex['video']), tf.int64))}

    def epoch(e):
      epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, e)
      clips = examples.enumerate().map(
          lambda r, ex: sample(tf.random.experimental.stateless_fold_in(epoch_seed, r), ex),
          num_parallel_calls=sources.num_parallel_calls(config.dataset),
          deterministic=deterministic)
      return clips.shuffle(config.dataset.shuffle_buffer, seed=epoch_seed[0])

    epochs = tf.data.Dataset.range(sources.FOREVER)
    if deterministic:
      # One epoch after another, each started when the last one ends: TFDS's per-iteration file
      # shuffle stays a function of the seed (an epoch read ahead would race for its seed).
      clips = epochs.flat_map(epoch)
    else:
      # One epoch after another (block_length: more clips than any epoch has, so each epoch ends
      # before the next one's first clip), with epoch e + 1 opened, read, sampled and shuffled by
      # its own thread while e drains, so that a new epoch's shuffle buffer does not stall the
      # pipeline at every epoch boundary. tf.data.Dataset.interleave would buffer up to
      # block_length clips of the next epoch; this form bounds it to NEXT_EPOCH_READ_AHEAD.
      # (Deprecated since TF 2.0 in favour of Dataset.interleave, which cannot bound this; TF is
      # pinned in pyproject.toml. The warning is silenced: it would print in every run.)
      with deprecation.silence():
        clips = epochs.apply(tf.data.experimental.parallel_interleave(
            epoch, cycle_length=2, block_length=sources.FOREVER, sloppy=False,
            buffer_output_elements=NEXT_EPOCH_READ_AHEAD, prefetch_input_elements=1))
    if deterministic:
      global_batch = local_batch * process_count
      clips = clips.skip(start_step * global_batch).enumerate()

      def keep_own(read, indexed):
        """Charges the records this process read and dropped before its clip to that clip."""
        i, clip = indexed
        records = read[0] + clip['read_records']
        num_bytes = read[1] + clip['read_bytes']
        mine = tf.equal((i % global_batch) // local_batch, process_index)
        carried = (tf.where(mine, 0, records),
                   tf.where(mine, tf.constant(0, tf.int64), num_bytes))
        return carried, dict(clip, read_records=records, read_bytes=num_bytes, mine=mine)

      clips = clips.scan((tf.constant(0, tf.int32), tf.constant(0, tf.int64)), keep_own)
      clips = clips.filter(lambda clip: clip['mine'])
      clips = clips.map(lambda clip: {k: v for k, v in clip.items() if k != 'mine'})
    return clips

  def read_train_frames(self, clips: dict) -> dict:
    return {k: clips[k] for k in ('jpegs', 'read_records', 'read_bytes')}

  def eval_examples(self, split: str, config, *, process_index: int,
                    process_count: int) -> tf.data.Dataset:
    """{'jpegs': the frames of the evaluation clips only, 'label', 'tfds_id'}: the rest of each
    video is dropped as its record is read."""
    ds = read_examples(self.builder, split, config, process_index=process_index,
                       process_count=process_count, shuffle=False, deterministic=True)
    return ds.map(lambda ex: {'jpegs': eval_jpegs(ex['video'], config), 'label': ex['label'],
                              'tfds_id': ex['tfds_id']})

  def read_eval_frames(self, example: dict, config) -> tf.Tensor:
    del config  # The frames were gathered in eval_examples.
    return example['jpegs']


def eval_jpegs(video: tf.Tensor, config) -> tf.Tensor:
  """The JPEG frames of a video's evaluation clips, `[num_clips * num_frames] tf.string`."""
  return stages.gather_frames(video, sources.eval_frames(tf.shape(video)[0], config))
