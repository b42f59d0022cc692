"""TFDS records -> tf.data batches of uint8 clips, sharded per host, prefetched to devices.

Stages: read (JPEG strings, nothing decoded) -> sample frame indices -> gather + decode only those
frames -> crop/flip -> batch. See `har_jax.data.stages` for the stage functions.

Train batches: {'video': [local_batch, T, S, S, 3] uint8, 'label': [local_batch] int32}.
Eval batches:  {'video': [local_batch, V, T, S, S, 3] uint8, 'label', 'mask': [local_batch] int32,
                'tfds_id': [local_batch] string}, with V = eval.num_clips * eval.num_crops views per
video. Eval datasets are padded (mask 0) to the same number of batches on every process and read each
example of the split exactly once across processes.
"""

import collections
import dataclasses
import math
from typing import Iterator, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax.data import datasets
from har_jax.data import stages

HOST_ONLY_KEYS = ('tfds_id',)


def _options(dataset_config, deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.threading.private_threadpool_size = dataset_config.threadpool_size or 0
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  return options


def _num_parallel_calls(dataset_config) -> int:
  n = dataset_config.num_parallel_calls
  return tf.data.AUTOTUNE if n is None or n < 0 else n


def _read(builder, split: str, config, *, process_index: int, process_count: int,
          shuffle: bool, deterministic: bool) -> tf.data.Dataset:
  """Reads this process's share of a split, with the video left as JPEG strings."""
  host_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)
  read_config = tfds.ReadConfig(
      try_autocache=False,
      add_tfds_id=True,
      shuffle_seed=config.seed if shuffle else None,
      options=_options(config.dataset, deterministic))
  return builder.as_dataset(
      split=host_split, shuffle_files=shuffle, read_config=read_config,
      decoders={'video': tfds.decode.SkipDecoding()})


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
  windows = stages.eval_crop_windows(tf.shape(frames)[1:3], s, num_crops)
  clips = tf.reshape(frames, tf.concat([[num_clips, t], tf.shape(frames)[1:]], axis=0))
  views = []
  for c in range(num_clips):
    for k in range(num_crops):
      views.append(stages.crop_and_resize(clips[c], windows[k], s))
  video = tf.ensure_shape(tf.stack(views), [num_clips * num_crops, t, s, s, 3])
  return {'video': video, 'label': tf.cast(example['label'], tf.int32),
          'mask': tf.constant(1, tf.int32), 'tfds_id': example['tfds_id']}


def create_train_dataset(builder, config, *, local_batch: int, process_index: int = 0,
                         process_count: int = 1) -> tf.data.Dataset:
  """An infinite dataset of training batches for this process."""
  split = datasets.resolve_split(config.dataset, 'train')
  deterministic = bool(config.deterministic_data)
  ds = _read(builder, split, config, process_index=process_index, process_count=process_count,
             shuffle=True, deterministic=deterministic)
  ds = ds.map(lambda ex: {'video': ex['video'], 'label': ex['label']})
  if config.dataset.cache:
    ds = ds.cache()
  ds = ds.repeat()
  ds = ds.shuffle(config.dataset.shuffle_buffer, seed=config.seed + process_index)
  base_seed = tf.constant([config.seed, process_index], tf.int64)
  ds = ds.enumerate()
  ds = ds.map(
      lambda i, ex: preprocess_train(
          ex, tf.random.experimental.stateless_fold_in(base_seed, i), config),
      num_parallel_calls=_num_parallel_calls(config.dataset), deterministic=deterministic)
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
  """A finite, padded dataset covering every example of `split` exactly once across processes."""
  shard_sizes = [
      datasets.num_examples(builder, tfds.split_for_jax_process(
          split, process_index=i, process_count=process_count))
      for i in range(process_count)]
  if max_examples:
    per_process_cap = math.ceil(max_examples / process_count)
    shard_sizes = [min(n, per_process_cap) for n in shard_sizes]
  per_process = max(shard_sizes)
  num_batches = max(1, math.ceil(per_process / local_batch))
  ds = _read(builder, split, config, process_index=process_index, process_count=process_count,
             shuffle=False, deterministic=True)
  ds = ds.take(shard_sizes[process_index])
  ds = ds.map(lambda ex: preprocess_eval(ex, config),
              num_parallel_calls=_num_parallel_calls(config.dataset), deterministic=True)
  ds = ds.concatenate(_padding(ds.element_spec).repeat()).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return EvalData(dataset=ds, num_batches=num_batches, num_examples=sum(shard_sizes))


def _padding(element_spec) -> tf.data.Dataset:
  zeros = {k: tf.zeros(spec.shape, spec.dtype) if spec.dtype != tf.string else tf.constant('')
           for k, spec in element_spec.items()}
  return tf.data.Dataset.from_tensors(zeros)


def shard(batch: dict, num_devices: int) -> dict:
  """Reshapes `[local_batch, ...]` arrays to `[num_devices, local_batch // num_devices, ...]`."""
  return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def local_device_sharding(devices: Optional[list] = None) -> jax.sharding.NamedSharding:
  """Sharding of a `[num_local_devices, ...]` array over the local devices, one row each (pmap)."""
  devices = devices or jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))


def device_iterator(dataset: tf.data.Dataset, *, size: int = 2,
                    devices: Optional[list] = None) -> Iterator[tuple[dict, dict]]:
  """Yields (device_batch, host_batch): device arrays sharded over the local devices.

  `size` batches are kept in flight on the devices, so the host prepares the next batch while the
  current step runs. Host-only keys (strings) stay in host_batch.
  """
  devices = devices or jax.local_devices()
  sharding = local_device_sharding(devices)
  queue = collections.deque()

  def put(batch):
    host = {k: batch.pop(k) for k in HOST_ONLY_KEYS if k in batch}
    return jax.device_put(shard(batch, len(devices)), sharding), host

  for batch in dataset.as_numpy_iterator():
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def as_numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict]:
  """Numpy batches, for tests and host-side tools."""
  for batch in dataset.as_numpy_iterator():
    yield {k: np.asarray(v) for k, v in batch.items()}
