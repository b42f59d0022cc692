"""TFDS records -> tf.data batches of uint8 clips, sharded per host, prefetched to devices.

Stages: read (JPEG strings, nothing decoded) -> sample frame indices -> gather + decode only those
frames -> crop/flip -> batch. See `har_jax.data.stages` for the stage functions.

Train batches: {'video': [local_batch, T, S, S, 3] uint8, 'label': [local_batch] int32,
                'num_skipped': [local_batch] int64 (host only)}.
Eval batches:  {'video': [local_batch, V, T, S, S, 3] uint8, 'label', 'mask': [local_batch] int32,
                'tfds_id': [local_batch] string}, with V = eval.num_clips * eval.num_crops views per
video. Eval datasets are padded (mask 0) to the same number of batches on every process and read
each example of the split exactly once across processes.

Bad data: an example whose sampled frames fail to decode (corrupt or truncated JPEG, a video with no
frames) is skipped in training and counted: 'num_skipped' is this process's cumulative number of
skipped examples up to and including the batch (a bad video counts each time it is drawn), and each
skip prints the example's tfds_id to stderr. In evaluation it raises tf.errors.InvalidArgumentError
naming the example's tfds_id, because skipping would change the protocol.
"""

import collections
import dataclasses
import math
import os
import sys
from typing import Callable, Iterator, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import parallel
from har_jax.data import datasets
from har_jax.data import stages

HOST_ONLY_KEYS = ('tfds_id', 'num_skipped')
BAD_EXAMPLE_MESSAGE = 'Corrupt example (a sampled frame failed to decode or preprocess). tfds_id:'
MAX_SKIP_FRACTION = 0.5
MIN_EXAMPLES_BEFORE_SKIP_CHECK = 64


def _options(dataset_config, deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.threading.private_threadpool_size = dataset_config.threadpool_size or os.cpu_count()
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  return options


def _num_parallel_calls(dataset_config) -> int:
  n = dataset_config.num_parallel_calls
  return tf.data.AUTOTUNE if n is None or n < 0 else n


def read_examples(builder, split: str, config, *, process_index: int, process_count: int,
          shuffle: bool, deterministic: bool) -> tf.data.Dataset:
  """Reads this process's share of a split, with the video left as JPEG strings.

  Plain splits are divided with tfds.split_for_jax_process. Group splits ('train|val_groups=f')
  are filtered by the 'group' feature: training filters this process's share of the base split;
  evaluation filters the whole base split in file order and keeps every process_count-th example,
  so that every process knows its exact count (datasets.process_shard_sizes).
  """
  group_split = datasets.parse_group_split(split)
  read_split = group_split.base if group_split else split
  if not (group_split and not shuffle):
    read_split = tfds.split_for_jax_process(
        read_split, process_index=process_index, process_count=process_count)
  read_config = tfds.ReadConfig(
      try_autocache=False,
      add_tfds_id=True,
      shuffle_seed=config.seed if shuffle else None,
      options=_options(config.dataset, deterministic))
  ds = builder.as_dataset(
      split=read_split, shuffle_files=shuffle, read_config=read_config,
      decoders={'video': tfds.decode.SkipDecoding()})
  if group_split:
    groups = tf.constant(datasets.split_groups(builder, group_split), tf.int32)
    ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(tf.cast(ex['group'], tf.int32), groups)))
    if not shuffle:
      ds = ds.shard(process_count, process_index)
  return ds


def preprocess_train(example, seed, config) -> dict:
  """One encoded example -> {'video': [T, S, S, 3] uint8, 'label': int32}."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  jpegs = example['video']
  indices = stages.sample_train_indices(
      tf.shape(jpegs)[0], config.num_frames, config.frame_stride, config.dataset.short_video,
      seeds[0])
  frames = stages.decode_frames(stages.gather_frames(jpegs, indices), config.dataset.resize_size)
  window = stages.random_crop_window(
      tf.shape(frames)[1:3], config.image_size, config.augment.min_area,
      config.augment.max_aspect_ratio, seeds[1])
  frames = stages.crop_and_resize(frames, window, config.image_size)
  if config.augment.flip:
    frames = stages.maybe_flip(frames, seeds[2])
  frames = tf.ensure_shape(frames, [config.num_frames, config.image_size, config.image_size, 3])
  return {'video': frames, 'label': tf.cast(example['label'], tf.int32)}


def preprocess_eval(example, config) -> dict:
  """One encoded example -> all its views: {'video': [V, T, S, S, 3] uint8, 'label', 'mask'}."""
  num_clips, num_crops = config.eval.num_clips, config.eval.num_crops
  t, s = config.num_frames, config.image_size
  jpegs = example['video']
  indices = stages.sample_eval_indices(
      tf.shape(jpegs)[0], t, config.frame_stride, num_clips, config.dataset.short_video)
  frames = stages.decode_frames(
      stages.gather_frames(jpegs, tf.reshape(indices, [-1])), config.dataset.resize_size)
  video = stages.eval_views(frames, num_clips, t, s, num_crops)
  return {'video': video, 'label': tf.cast(example['label'], tf.int32),
          'mask': tf.constant(1, tf.int32), 'tfds_id': example['tfds_id']}


def _zeros_like_spec(spec) -> dict:
  return {k: tf.zeros(v.shape, v.dtype) if v.dtype != tf.string else tf.constant('')
          for k, v in spec.items()}


def guarded(inputs: tf.data.Dataset, preprocess: Callable[..., dict], on_error: str, *,
            num_parallel_calls: int, deterministic: bool) -> tf.data.Dataset:
  """Applies `preprocess` to every element, catching decode errors per example.

  Each element is mapped inside its own one-element dataset with ignore_errors, so a failure
  affects that example only. on_error='mark': a failed example becomes a zero element with
  'valid' False (a tfds_id is printed to stderr); every element gets a bool 'valid'.
  on_error='raise': raises InvalidArgumentError with BAD_EXAMPLE_MESSAGE and the tfds_id.

  Args:
    inputs: elements that are tuples of preprocess args whose first is the example dict (with
      'tfds_id').
  """
  output_spec = inputs.map(lambda *args: preprocess(*args)).element_spec

  def one(*args):
    tfds_id = args[0]['tfds_id']
    element = tf.data.Dataset.from_tensors(args)
    good = element.map(lambda *a: dict(preprocess(*a), valid=tf.constant(True))).ignore_errors()

    def fallback(*_):
      if on_error == 'raise':
        check = tf.debugging.Assert(False, [BAD_EXAMPLE_MESSAGE, tfds_id])
      else:
        check = tf.print('Skipping training example', tfds_id, '(a sampled frame failed to '
                         'decode); counted in num_skipped.', output_stream=sys.stderr)
      with tf.control_dependencies([check]):
        return dict(_zeros_like_spec(output_spec), valid=tf.constant(False))

    return good.concatenate(element.map(fallback)).take(1)

  return inputs.interleave(one, cycle_length=num_parallel_calls, block_length=1,
                           num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def _count_and_drop_invalid(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Drops elements with 'valid' False; adds 'num_skipped', the cumulative number dropped.

  Fails when more than MAX_SKIP_FRACTION of at least MIN_EXAMPLES_BEFORE_SKIP_CHECK examples were
  skipped: that is a config or data problem, not a few corrupt frames.
  """

  def step(state, element):
    skipped, seen = state
    skipped += tf.cast(tf.logical_not(element['valid']), tf.int64)
    seen += 1
    check = tf.debugging.Assert(
        tf.logical_or(seen < MIN_EXAMPLES_BEFORE_SKIP_CHECK, tf.cast(skipped, tf.float32)
                      <= MAX_SKIP_FRACTION * tf.cast(seen, tf.float32)),
        ['Skipped', skipped, 'of', seen, 'training examples: their frames fail to decode or '
         'preprocess. Check config.dataset (name, resize_size, image_size) and the records; '
         'evaluating the split names the first bad example.'])
    with tf.control_dependencies([check]):
      return (skipped, seen), dict(element, num_skipped=tf.identity(skipped))

  ds = ds.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), step)
  ds = ds.filter(lambda element: element['valid'])
  return ds.map(lambda element: {k: v for k, v in element.items() if k != 'valid'})


def create_train_dataset(builder, config, *, local_batch: int, process_index: int = 0,
                         process_count: int = 1, start_step: int = 0) -> tf.data.Dataset:
  """An infinite dataset of training batches for this process (bad examples skipped, counted).

  With config.deterministic_data, every process reads the whole split in one seeded order and keeps
  its slice of each global batch (decoding only that slice), and per-example augmentation seeds come
  from the global example index. The global batch of step s is then a function of (seed, s) alone:
  the same on 1 host x 4 devices as on 2 hosts x 2 devices, and after a resume on any topology.
  `start_step` skips the records of earlier steps without decoding them.

  Otherwise (the fast default) each process reads its own disjoint shard in a non-deterministic
  order, and a resumed run (start_step > 0) gets a fresh shuffle.
  """
  split = datasets.resolve_split(config.dataset, 'train')
  deterministic = bool(config.deterministic_data)
  global_batch = local_batch * process_count
  if deterministic:
    ds = read_examples(builder, split, config, process_index=0, process_count=1, shuffle=True,
                       deterministic=True)
    shuffle_seed = config.seed
  else:
    ds = read_examples(builder, split, config, process_index=process_index,
                       process_count=process_count, shuffle=True, deterministic=False)
    shuffle_seed = hash((config.seed, process_index, start_step)) % (2**31)
  ds = ds.map(lambda ex: {'video': ex['video'], 'label': ex['label'], 'tfds_id': ex['tfds_id']})
  if config.dataset.cache:
    ds = ds.cache()
  # Shuffle, then repeat: a new order every epoch, and every example once per epoch.
  ds = ds.shuffle(config.dataset.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  ds = ds.enumerate()
  if deterministic:
    ds = ds.skip(start_step * global_batch)
    ds = ds.filter(lambda i, _: (i % global_batch) // local_batch == process_index)
    base_seed = tf.constant([config.seed, 0], tf.int64)
  else:
    base_seed = tf.constant([shuffle_seed, process_index], tf.int64)
  ds = ds.map(lambda i, ex: (ex, tf.random.experimental.stateless_fold_in(base_seed, i)))
  ds = guarded(ds, lambda ex, seed: preprocess_train(ex, seed, config), 'mark',
               num_parallel_calls=_num_parallel_calls(config.dataset),
               deterministic=deterministic)
  ds = _count_and_drop_invalid(ds)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class EvalData:
  """An eval dataset and how many batches every process must run."""
  dataset: tf.data.Dataset
  num_batches: int
  num_examples: int  # Real (unpadded) examples across all processes.


def create_eval_dataset(builder, config, split: str, *, local_batch: int, process_index: int = 0,
                        process_count: int = 1, max_examples: int = 0) -> EvalData:
  """A finite, padded dataset covering every example of `split` exactly once across processes.

  A corrupt example raises tf.errors.InvalidArgumentError naming its tfds_id when iterated.
  """
  shard_sizes = datasets.process_shard_sizes(builder, split, process_count)
  if max_examples:
    per_process_cap = math.ceil(max_examples / process_count)
    shard_sizes = [min(n, per_process_cap) for n in shard_sizes]
  per_process = max(shard_sizes)
  num_batches = max(1, math.ceil(per_process / local_batch))
  ds = read_examples(builder, split, config, process_index=process_index,
                     process_count=process_count, shuffle=False, deterministic=True)
  ds = ds.take(shard_sizes[process_index])
  ds = ds.map(lambda ex: ({'video': ex['video'], 'label': ex['label'],
                           'tfds_id': ex['tfds_id']},))
  ds = guarded(ds, lambda ex: preprocess_eval(ex, config), 'raise',
               num_parallel_calls=_num_parallel_calls(config.dataset), deterministic=True)
  ds = ds.map(lambda element: {k: v for k, v in element.items() if k != 'valid'})
  ds = ds.concatenate(_padding(ds.element_spec).repeat()).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return EvalData(dataset=ds, num_batches=num_batches, num_examples=sum(shard_sizes))


def _padding(element_spec) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensors(_zeros_like_spec(element_spec))


def shard(batch: dict, num_devices: int) -> dict:
  """Reshapes `[local_batch, ...]` arrays to `[num_devices, local_batch // num_devices, ...]`."""
  return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def device_iterator(dataset: tf.data.Dataset, *, size: int = 2,
                    devices: Optional[list] = None) -> Iterator[tuple[dict, dict]]:
  """Yields (device_batch, host_batch): device arrays sharded over the local devices.

  `size` batches are kept in flight on the devices, so the host prepares the next batch while the
  current step runs. Host-only keys (strings) stay in host_batch.
  """
  devices = devices or jax.local_devices()
  sharding = parallel.local_device_sharding(devices)
  queue = collections.deque()

  def put(batch):
    host = {k: batch.pop(k) for k in HOST_ONLY_KEYS if k in batch}
    return jax.device_put(shard(batch, len(devices)), sharding), host

  for batch in _numpy_batches(dataset):
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict]:
  """dataset.as_numpy_iterator(), with a clear error for a damaged record file.

  A truncated TFRecord file cannot be skipped: tf.data's ignore_errors retries the same offset
  forever. So it is an error in training and evaluation alike.
  """
  iterator = dataset.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.DataLossError as e:
      detail = ' '.join(e.message.split())[:400]
      raise datasets.DatasetError(
          f'A record file of the dataset is truncated or corrupt ({detail}). Restore the file, or '
          "rebuild the records: delete the dataset's version folder and rerun "
          'scripts/prepare_ucf101.py.') from e
    yield batch
