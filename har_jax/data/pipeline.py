"""Datasets -> tf.data batches of uint8 clips, sharded per host, prefetched to devices.

Two kinds of dataset, one pipeline:
- TFDS records (stock `ucf101`, `synthetic_actions`, `video_folder`, `ucf101_meta`): one record
  per video holding all its JPEG frames. A clip reads and parses its video's record, then gathers
  its frames.
- Frame stores (`har_jax.data.frame_store`): one record per frame. A clip reads only its frames.
Each is a `sources.DataSource` (`tfds_records.TfdsSource`, `frame_store.FrameStoreSource`), which
samples the clips and reads their frames; the functions here take either, or what
`datasets.get_builder` returns.

Stages: read -> sample frame indices -> gather (or read) those JPEGs -> decode them, downscaled
in the JPEG decoder where dataset.resize_size allows -> crop/flip -> batch. Nothing else of a
video is decoded. See `har_jax.data.stages` for the stage functions.

Training crops: where the dataset declares one frame size (`DataSource.static_frame_size`: the stock
256x256 records, the synthetic set, frame stores whose frames share a size), the host draws each
clip's random-resized-crop window and flip and ships the decoded frames with them; the train step
crops, resizes and flips on the accelerator (`har_jax.augment`), where it costs next to nothing.
Otherwise the host crops and resizes each clip (`stages.crop_and_resize`).

Train batches: {'video': [local_batch, T, H, W, 3] uint8, 'label': [local_batch] int32,
                'crop': [local_batch, 4] float32 (y, x, h, w), 'flip': [local_batch] bool,
                host only: 'tfds_id', 'num_skipped' [local_batch] int64, and 'read_records'
                [local_batch] int32 / 'read_bytes' [local_batch] int64, the records and JPEG
                bytes this process read for the clip (a frame store: its T frames; TFDS records:
                its video, plus, with deterministic_data, the other processes' videos it read and
                dropped before it)}, with H x W the decoded frame size; without a static frame
               size, H = W = image_size and no 'crop' / 'flip'.
Eval batches:  {'video': [local_batch, V, T, S, S, 3] uint8, 'label', 'mask': [local_batch] int32,
                'tfds_id': [local_batch] string}, with V = eval.num_clips * eval.num_crops views per
video. Eval datasets are padded (mask 0) to the same number of batches on every process and read
each example of the split exactly once across processes. 'tfds_id' names the example (a frame
store's video name).

Training order:
- Frame stores: the global example g of step s (g in [s * B, (s + 1) * B), B the global batch)
  is video `perm_e(g mod N)` of the split's N videos, perm_e a seeded permutation of epoch
  e = g // N; process p reads only its slice [s * B + p * b, s * B + (p + 1) * b) of each step.
  The data of step s is a function of (seed, s) alone, on any topology, and each process reads
  1/P of every epoch's records. `config.deterministic_data` also keeps tf.data's element order.
- TFDS records, config.deterministic_data (exact resume, any topology): every process reads the
  whole split in one seeded order and keeps its slice of each global batch (it parses P times
  the records it decodes: use a frame store on many hosts).
- TFDS records, the default: each process reads its own shard, every example once per epoch in
  a fresh order; a resumed run gets a fresh shuffle. The next epoch is opened, read and shuffled
  while the current one drains (tfds_records.NEXT_EPOCH_READ_AHEAD clips ahead), so a small split
  does not stall at every epoch boundary.
Clips are sampled before the shuffle buffer, so it holds num_frames JPEGs per clip, not videos.

Bad data: an example whose sampled frames fail to read or decode (corrupt or truncated JPEG, a
damaged frame-store record) is skipped in training and counted: 'num_skipped' is this process's
cumulative number of skipped examples up to and including the batch (a bad video counts each
time it is drawn), and each skip prints one line naming the example's tfds_id to stderr. In
evaluation it is left out too: its row carries mask 0 and 'damaged' 1 (host only), so that the
report counts and names it (har_jax.evaluation.runner).
"""

import collections
import dataclasses
import functools
import math
import sys
import threading
from typing import Callable, Iterator, Optional

import jax
import numpy as np
import tensorflow as tf

from har_jax import errors
from har_jax import geometry
from har_jax import parallel
from har_jax.data import datasets
from har_jax.data import sources
from har_jax.data import stages
from har_jax.data import tfds_records

HOST_ONLY_KEYS = ('tfds_id', 'num_skipped', 'read_records', 'read_bytes', 'damaged')
MAX_SKIP_FRACTION = 0.5
MIN_EXAMPLES_BEFORE_SKIP_CHECK = 64


def preprocess_train(clips: dict, config, source: sources.DataSource) -> dict:
  """A group of K sampled clips -> their decoded frames (plus the device crops, see the module
  doc) and labels.

  With a static frame size the K * T frames decode in one tf.map_fn, straight into the group's
  `[K, T, H, W, 3]` tensor (one copy of the pixels, not one per clip and one per group).

  Args:
    clips: batched `[K]` clips of `source.train_clips`: 'label', 'tfds_id', 'seed' [K, 2] int64
      and what `source.read_train_frames` reads their frames from.
    source: the dataset; its static frame size (None when it varies) picks the crop path.

  Returns:
    {'video': [K, T, H, W, 3] uint8, 'label', 'crop': [K, 4] float32, 'flip': [K] bool} when
    the frame size is known (H x W: `geometry.decoded_size`); else {'video': [K, T, S, S, 3] uint8,
    'label'}; both with the host-only 'tfds_id', 'read_records' and 'read_bytes' `[K]`.
  """
  t, s = config.num_frames, config.image_size
  frame_size = source.static_frame_size()
  read = source.read_train_frames(clips)
  jpegs = read['jpegs']
  out = {'label': clips['label'], 'tfds_id': clips['tfds_id'],
         'read_records': read['read_records'], 'read_bytes': read['read_bytes']}
  seeds = clips['seed']
  if frame_size is None:

    def host_crop(args):
      clip_jpegs, seed = args
      frames = stages.decode_frames(clip_jpegs, config.dataset.resize_size)
      window, flip = _crop_and_flip(tf.shape(frames)[1:3], seed, config)
      return stages.flip_if(stages.crop_and_resize(frames, window, s), flip)

    video = tf.map_fn(host_crop, (jpegs, seeds), parallel_iterations=1,
                      fn_output_signature=tf.TensorSpec([t, s, s, 3], tf.uint8))
    return dict(out, video=video)
  height, width = geometry.decoded_size(frame_size, config.dataset.resize_size)
  frames = stages.decode_frames(tf.reshape(jpegs, [-1]), config.dataset.resize_size, frame_size)
  windows, flips = tf.map_fn(
      lambda seed: _crop_and_flip(tf.constant([height, width]), seed, config), seeds,
      fn_output_signature=(tf.TensorSpec([4], tf.int32), tf.TensorSpec([], tf.bool)))
  return dict(out, video=tf.reshape(frames, [-1, t, height, width, 3]),
              crop=tf.cast(windows, tf.float32), flip=flips)


def _crop_and_flip(frame_shape: tf.Tensor, seed: tf.Tensor, config) -> tuple[tf.Tensor, tf.Tensor]:
  """One clip's random-resized-crop window `[4] int32` (y, x, h, w) and flip decision."""
  seeds = sources.clip_seeds(seed)
  window = stages.random_crop_window(frame_shape, config.image_size, config.augment.min_area,
                                     config.augment.max_aspect_ratio, seeds[1])
  return window, tf.logical_and(stages.random_flip(seeds[2]), bool(config.augment.flip))


def _eval_views(jpegs: tf.Tensor, config, frame_size: Optional[tuple[int, int]]) -> tf.Tensor:
  frames = stages.decode_frames(jpegs, config.dataset.resize_size, frame_size)
  return stages.eval_views(frames, config.eval.num_clips, config.num_frames, config.image_size,
                           config.eval.num_crops)


def preprocess_eval(example, config, frame_size: Optional[tuple[int, int]] = None,
                    source: Optional[sources.DataSource] = None) -> dict:
  """One encoded example -> all its views: {'video': [V, T, S, S, 3] uint8, 'label', 'mask'}.

  Args:
    example: an example of `source.eval_examples`, or without a source {'video': [N] JPEG
      strings of the whole video}; with 'label' and 'tfds_id'.
    frame_size: without a source, the stored (height, width) of every frame, or None when it
      varies (a source says it itself).
  """
  if source is not None:
    frame_size = source.static_frame_size()
    jpegs = source.read_eval_frames(example, config)
  else:
    jpegs = tfds_records.eval_jpegs(example['video'], config)
  return {'video': _eval_views(jpegs, config, frame_size),
          'label': tf.cast(example['label'], tf.int32), 'mask': tf.constant(1, tf.int32),
          'tfds_id': example['tfds_id']}


_REPORTED_DAMAGED = set()
_REPORTED_LOCK = threading.Lock()


def _report_damaged(what: str, tfds_id: bytes) -> np.bool_:
  """Prints one line the first time an example is found damaged in this process (a damaged
  training video is drawn again every epoch: it is counted each time, named once)."""
  name = tfds_id.decode('utf-8', 'replace')
  with _REPORTED_LOCK:
    first = (what, name) not in _REPORTED_DAMAGED
    _REPORTED_DAMAGED.add((what, name))
  if first:
    print(f'Skipping damaged {what} {name}: a sampled frame failed to read or decode '
          '(named once; every skip is counted).', file=sys.stderr, flush=True)
  return np.bool_(first)


def _zeros_like_spec(spec) -> dict:
  return {k: tf.zeros(v.shape, v.dtype) if v.dtype != tf.string else tf.fill(v.shape, '')
          for k, v in spec.items()}


def guarded(examples: tf.data.Dataset, preprocess: Callable[[dict], dict], *, group_size: int,
            num_parallel_calls: int, deterministic: bool,
            what: str = 'training example') -> tf.data.Dataset:
  """Preprocesses examples in groups, so that a failure affects the failing example only.

  A group of `group_size` examples is preprocessed in one call, inside a one-element dataset with
  ignore_errors: clean data pays for one small dataset per group, and the group comes out as one
  batch (no per-example stages or copies). When an example of the group fails, the group is
  preprocessed again example by example (as groups of one), each in its own one-element dataset:
  a failed example becomes a zero element with 'valid' False and its tfds_id, named once per
  process in one line on stderr (`what` says what it is). Errors upstream of `preprocess` (a
  damaged record file) are not caught.

  Args:
    examples: dicts of fixed-size tensors, with a 'tfds_id'.
    preprocess: a group of examples, batched `[n, ...]` -> a dict of fixed-size tensors, each
      `[n, ...]`.

  Returns:
    Groups: the outputs of `preprocess`, `[n, ...]` (n = group_size, less for the last group),
    with 'valid' `[n] bool`.
  """

  def checked(batch):
    out = preprocess(batch)
    return dict(out, valid=tf.fill(tf.shape(batch['tfds_id']), True))

  output_spec = examples.batch(1, drop_remainder=True).map(preprocess).element_spec

  def one(example):
    element = tf.data.Dataset.from_tensors(example).batch(1)

    def fallback(_):
      check = tf.numpy_function(functools.partial(_report_damaged, what), [example['tfds_id']],
                                tf.bool, stateful=True)
      with tf.control_dependencies([check]):
        out = dict(_zeros_like_spec(output_spec), valid=tf.constant([False]))
        if 'tfds_id' in out:
          out['tfds_id'] = tf.reshape(example['tfds_id'], [1])
        return out

    return element.map(checked).ignore_errors().concatenate(element.map(fallback)).take(1)

  def group(batch):
    element = tf.data.Dataset.from_tensors(batch)
    fast = element.map(checked).ignore_errors()
    slow = element.unbatch().flat_map(one).unbatch().batch(group_size)
    return fast.concatenate(slow).take(1)

  return examples.batch(group_size).interleave(
      group, cycle_length=num_parallel_calls, block_length=1,
      num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def per_example(preprocess: Callable[[dict], dict], output_spec) -> Callable[[dict], dict]:
  """Lifts a one-example function to a group function (a tf.map_fn over the group)."""
  return lambda batch: tf.map_fn(preprocess, batch, fn_output_signature=output_spec,
                                 parallel_iterations=1)


def _drop_invalid_and_count(groups: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Groups from `guarded` -> batches of `batch_size` valid examples, with 'num_skipped'.

  'num_skipped' `[batch_size] int64`: the number of examples dropped so far, up to the end of
  each example's group. A group without failures passes as it is; after a drop, later batches
  are re-sliced across groups. Fails when more than MAX_SKIP_FRACTION of at least
  MIN_EXAMPLES_BEFORE_SKIP_CHECK examples were skipped: that is a config or data problem, not a
  few corrupt frames.
  """

  def step(state, group):
    skipped, seen = state
    valid = group.pop('valid')
    seen += tf.size(valid, out_type=tf.int64)
    skipped += tf.size(valid, out_type=tf.int64) - tf.math.count_nonzero(valid)
    check = tf.debugging.Assert(
        tf.logical_or(seen < MIN_EXAMPLES_BEFORE_SKIP_CHECK, tf.cast(skipped, tf.float32)
                      <= MAX_SKIP_FRACTION * tf.cast(seen, tf.float32)),
        ['Skipped', skipped, 'of', seen, 'training examples: their frames fail to decode or '
         'preprocess. Check config.dataset (name, resize_size, image_size) and the records; '
         'evaluating the split names the first bad example.'])
    with tf.control_dependencies([check]):
      kept = tf.cond(tf.reduce_all(valid), lambda: group,
                     lambda: {k: tf.boolean_mask(v, valid) for k, v in group.items()})
    kept['num_skipped'] = tf.fill(tf.shape(kept['label']), skipped)
    return (skipped, seen), kept

  groups = groups.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), step)
  return groups.rebatch(batch_size, drop_remainder=True)


def create_train_dataset(dataset, config, *, local_batch: int, process_index: int = 0,
                         process_count: int = 1, start_step: int = 0) -> tf.data.Dataset:
  """An infinite dataset of training batches for this process (bad examples skipped, counted).

  `dataset`: a DataSource, or what `datasets.get_builder` returns. The order of the clips is
  described in the module docstring. `start_step` resumes there: a frame store starts at that
  step's examples; TFDS records with config.deterministic_data skip the clips of earlier steps
  without decoding them.
  """
  source = datasets.source_of(dataset)
  split = datasets.resolve_split(config.dataset, 'train')
  clips = source.train_clips(split, config, local_batch=local_batch, process_index=process_index,
                             process_count=process_count, start_step=start_step)
  preprocess = functools.partial(preprocess_train, config=config, source=source)
  groups = guarded(clips, preprocess, group_size=local_batch,
                   num_parallel_calls=sources.num_parallel_calls(config.dataset),
                   deterministic=bool(config.deterministic_data))
  return _drop_invalid_and_count(groups, local_batch).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class EvalData:
  """An eval dataset and how many batches every process must run."""
  dataset: tf.data.Dataset
  num_batches: int
  num_examples: int  # Real (unpadded) examples across all processes.


def create_eval_dataset(dataset, config, split: str, *, local_batch: int, process_index: int = 0,
                        process_count: int = 1, max_examples: int = 0) -> EvalData:
  """A finite, padded dataset covering every example of `split` exactly once across processes.

  `dataset`: a DataSource, or what `datasets.get_builder` returns. A corrupt example (its frames
  fail to read or decode) gets mask 0 and 'damaged' 1.
  """
  source = datasets.source_of(dataset)
  shard_sizes = source.process_shard_sizes(split, process_count)
  if max_examples:
    per_process_cap = math.ceil(max_examples / process_count)
    shard_sizes = [min(n, per_process_cap) for n in shard_sizes]
  per_process = max(shard_sizes)
  num_batches = max(1, math.ceil(per_process / local_batch))
  ds = source.eval_examples(split, config, process_index=process_index,
                            process_count=process_count)
  ds = ds.take(shard_sizes[process_index])
  preprocess = functools.partial(preprocess_eval, config=config, source=source)
  preprocess = per_example(preprocess, ds.map(preprocess).element_spec)
  ds = guarded(ds, preprocess, group_size=local_batch,
               num_parallel_calls=sources.num_parallel_calls(config.dataset), deterministic=True,
               what=f'video of split {split!r}')
  ds = ds.unbatch().map(_mask_damaged)
  ds = ds.concatenate(_padding(ds.element_spec).repeat()).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return EvalData(dataset=ds, num_batches=num_batches, num_examples=sum(shard_sizes))


def _mask_damaged(element: dict) -> dict:
  """'valid' -> mask 0 and 'damaged' 1 for an example whose frames failed to read or decode."""
  valid = element.pop('valid')
  element['mask'] = element['mask'] * tf.cast(valid, tf.int32)
  element['damaged'] = 1 - tf.cast(valid, tf.int32)
  return element


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
      raise errors.UserError(
          f'A record file of the dataset is truncated or corrupt ({detail}). Restore the file, or '
          "rebuild the records: delete the dataset's version folder and rerun "
          'scripts/prepare_ucf101.py.') from e
    yield batch
