r"""Host input-pipeline cost per clip: har_jax's training pipeline vs the JPEG decode floor.

  python scripts/benchmark_input.py --config=configs/default.py --data_dir=/tmp/bench/tfds \
      --datasets=ucf101/ucf101_1_256:train,ucf101_frames/s128:train1 --rounds=5 --seconds=10

For every dataset (name:train_split, optionally @data_dir; default: the config's), in the same
process:

  pipeline    har_jax.data.pipeline.create_train_dataset, exactly as train.py runs it: read,
              sample, decode, describe (or do) the crop, guard against bad frames, batch
  floor       the same JPEG decodes alone: the frames of clips sampled by the pipeline, held in
              memory and decoded by the pipeline's decode function at the pipeline's scale, with
              the same parallelism, one scalar out per clip (no batching)
  naive_tfds  (--naive, on the first dataset if it is TFDS records) TFDS decodes every frame,
              then sample, resize, random crop, flip: the textbook tf.data video pipeline

Host CPU is the process's CPU time (all threads) per clip, in ms per clip per core; clips/s is
wall-clock throughput on all cores. Measurements alternate: each round runs every pipeline for
--seconds (after --warmup_seconds untimed), so load drifts on a shared machine hit all alike;
each figure is the median over rounds, and each ratio the median of the ratios within a round
(the two measured seconds apart), with their range. `bytes_read_per_clip` is what the
pipeline read for the clips it delivered: the JPEG bytes of the whole video (TFDS records) or of
the clip's frames (frame store).

Prints one line per measurement, then per dataset (first dataset last):
  <dataset>: ms_per_clip_core=... clips_per_s=... clips_per_s_per_core=... bytes_read_per_clip=...
      host_cores_per_1000_clips_per_s=... floor_ms_per_clip_core=... ratio_to_floor=...
  vs_first_floor=<ms_per_clip_core / the first dataset's floor>  (datasets after the first)
  ms_per_clip_core=<pipeline> floor_ms_per_clip_core=<floor> ratio_to_floor=<x>
  ratio_vs_naive=<x>  (pipeline / naive_tfds clips/s; with --naive, the default)
"""

import os
import resource
import statistics
import time

from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import cli
from har_jax.data import datasets
from har_jax.data import pipeline
from har_jax.data import stages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config file.', lock_config=True)
flags.DEFINE_string('data_dir', None, 'TFDS data_dir (overrides config.dataset.data_dir).')
flags.DEFINE_list('datasets', [], 'name[:train_split][@data_dir] of each dataset (default: the '
                  'config\'s; data_dir: --data_dir).')
flags.DEFINE_integer('rounds', 3, 'Alternating rounds; the summary is the median.')
flags.DEFINE_float('seconds', 10.0, 'Seconds measured per pipeline per round.')
flags.DEFINE_float('warmup_seconds', 3.0, 'Untimed seconds before each measurement (a fresh '
                   'iterator fills its buffers).')
flags.DEFINE_integer('floor_clips', 256, 'Clips held in memory for the floor.')
flags.DEFINE_bool('naive', True, 'Also measure naive_tfds once, on the first dataset if it is '
                  'TFDS records (slow: decodes every frame).')
flags.DEFINE_integer('naive_shuffle_buffer', 4, 'Shuffle buffer (decoded videos) of naive_tfds.')


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(iterator, seconds: float, warmup_seconds: float) -> dict:
  """Runs `iterator` (batches with 'label') untimed, then timed; clips/s, ms/clip/core, reads."""
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < warmup_seconds:
    next(iterator)
  clips, read_bytes, cpu0, t0 = 0, 0, _cpu_seconds(), time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    batch = next(iterator)
    clips += int(batch['label'].shape[0])
    read_bytes += int(np.sum(batch.get('read_bytes', 0)))
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  return {'clips_per_s': clips / wall, 'ms_per_clip_core': 1e3 * cpu / max(clips, 1),
          'cpu_cores_busy': cpu / wall, 'clips': clips, 'read_bytes': read_bytes}


def median(rounds: list[dict], field: str) -> float:
  return statistics.median(r[field] for r in rounds)


def median_ratio(rounds: list[dict], reference: list[dict]) -> tuple[float, float, float]:
  """(median, min, max) over rounds of ms/clip/core of `rounds` over that of `reference` in
  the same round."""
  ratios = [r['ms_per_clip_core'] / f['ms_per_clip_core'] for r, f in zip(rounds, reference)]
  return statistics.median(ratios), min(ratios), max(ratios)


def floor_dataset(source, config, num_clips: int) -> tf.data.Dataset:
  """The pipeline's own decode of `num_clips` of its clips, from memory, one scalar per clip."""
  split = datasets.resolve_split(config.dataset, 'train')
  clips = source.train_clips(split, config, local_batch=1, process_index=0, process_count=1,
                             start_step=0)
  clips = clips.map(lambda clip: {'jpegs': source.read_train_frames(clip)['jpegs']})
  jpegs = np.stack([c['jpegs'] for c in clips.take(num_clips).as_numpy_iterator()])
  frame_size = source.static_frame_size()

  def decode(clip_jpegs):
    frames = stages.decode_frames(clip_jpegs, config.dataset.resize_size, frame_size)
    return {'label': frames[-1, 0, 0, 0]}  # Depends on the pixels: nothing is optimised away.

  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat()
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


def naive_dataset(builder, config) -> tf.data.Dataset:
  """The textbook tf.data video pipeline: TFDS decodes every frame, then sample/crop/flip."""
  split = datasets.resolve_split(config.dataset, 'train')
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          read_config=tfds.ReadConfig(try_autocache=False))
  # Decoded videos are ~35 MB each (180 x 256 x 256 x 3): a big shuffle buffer would need tens of
  # GB, so the naive pipeline shuffles files and a small buffer.
  ds = ds.repeat().shuffle(FLAGS.naive_shuffle_buffer)

  def clip(example):
    video = example['video']
    indices = stages.sample_train_indices(
        tf.shape(video)[0], config.num_frames, config.frame_stride, config.dataset.short_video,
        tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64))
    frames = tf.gather(video, indices)
    size = config.dataset.resize_size or tf.shape(frames)[1]
    frames = tf.cast(tf.image.resize(frames, [size, size]), tf.uint8)
    frames = tf.image.random_crop(frames, [config.num_frames, config.image_size,
                                           config.image_size, 3])
    frames = tf.cond(tf.random.uniform([]) < 0.5, lambda: tf.reverse(frames, [2]),
                     lambda: frames)
    return {'video': frames, 'label': example['label']}

  ds = ds.map(clip, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(config.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _dataset_config(config, spec: str):
  spec, _, data_dir = spec.partition('@')
  name, _, split = spec.partition(':')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.dataset.name = name
    config.dataset.train_split = split or config.dataset.train_split
    config.dataset.data_dir = data_dir or config.dataset.data_dir
  return config


def _layout(source, config) -> str:
  return source.describe(datasets.resolve_split(config.dataset, 'train'))


def main(argv):
  del argv
  base = FLAGS.config
  if FLAGS.data_dir:
    base.dataset.data_dir = FLAGS.data_dir
  specs = FLAGS.datasets or [f'{base.dataset.name}:{base.dataset.train_split}']
  print(f'data_dir={base.dataset.data_dir} batch={base.batch_size} '
        f'frames={base.num_frames}x{base.image_size}^2 stride={base.frame_stride} '
        f'resize_size={base.dataset.resize_size} rounds={FLAGS.rounds} seconds={FLAGS.seconds} '
        f'cpus={os.cpu_count()} load_average_before={os.getloadavg()}', flush=True)
  runs = {}  # (dataset, kind) -> tf.data.Dataset
  for spec in specs:
    config = _dataset_config(base, spec)
    source = datasets.open_source(config.dataset)
    print(f'{spec}: {_layout(source, config)}', flush=True)
    runs[spec, 'pipeline'] = pipeline.create_train_dataset(source, config,
                                                           local_batch=config.batch_size)
    runs[spec, 'floor'] = floor_dataset(source, config, FLAGS.floor_clips)
  results = {key: [] for key in runs}
  for r in range(FLAGS.rounds):
    for key, ds in runs.items():
      # A fresh iterator per measurement: an idle one keeps threads and buffers that would
      # compete with the one being measured.
      iterator = ds.as_numpy_iterator()
      result = measure(iterator, FLAGS.seconds, FLAGS.warmup_seconds)
      del iterator
      results[key].append(result)
      print(f'round {r + 1} {key[0]} {key[1]}: {result["clips_per_s"]:.1f} clips/s, '
            f'{result["ms_per_clip_core"]:.2f} ms/clip/core, {result["cpu_cores_busy"]:.2f} '
            f'cores busy', flush=True)
  naive = None
  config = _dataset_config(base, specs[0])
  first = datasets.open_source(config.dataset).tfds_builder  # None for a frame store.
  if FLAGS.naive and first is not None:
    naive = measure(naive_dataset(first, config).as_numpy_iterator(), FLAGS.seconds,
                    FLAGS.warmup_seconds)
    print(f'naive_tfds {specs[0]}: {naive["clips_per_s"]:.1f} clips/s, '
          f'{naive["ms_per_clip_core"]:.2f} ms/clip/core', flush=True)
  print(f'load_average_after={os.getloadavg()}', flush=True)

  first_floor = results[specs[0], 'floor']
  for spec in specs[1:] + specs[:1]:
    pipe, floor = results[spec, 'pipeline'], results[spec, 'floor']
    ms = median(pipe, 'ms_per_clip_core')
    read = sum(r['read_bytes'] for r in pipe) / max(sum(r['clips'] for r in pipe), 1)
    ratio, low, high = median_ratio(pipe, floor)
    print(f'{spec}: ms_per_clip_core={ms:.2f} clips_per_s={median(pipe, "clips_per_s"):.1f} '
          f'clips_per_s_per_core={1e3 / ms:.1f} '
          f'bytes_read_per_clip={read:.0f} '
          f'host_cores_per_1000_clips_per_s={ms:.2f} '
          f'floor_ms_per_clip_core={median(floor, "ms_per_clip_core"):.2f} '
          f'ratio_to_floor={ratio:.2f} (rounds {low:.2f}-{high:.2f})', flush=True)
    if spec != specs[0]:
      ratio, low, high = median_ratio(pipe, first_floor)
      print(f'vs_first_floor={ratio:.2f} (rounds {low:.2f}-{high:.2f}; {spec} pipeline / '
            f'{specs[0]} floor)')
  pipe = results[specs[0], 'pipeline']
  print(f'ms_per_clip_core={median(pipe, "ms_per_clip_core"):.2f} '
        f'floor_ms_per_clip_core={median(first_floor, "ms_per_clip_core"):.2f} '
        f'ratio_to_floor={median_ratio(pipe, first_floor)[0]:.2f}')
  if naive:
    print(f'ratio_vs_naive={median(pipe, "clips_per_s") / naive["clips_per_s"]:.2f}')


if __name__ == '__main__':
  cli.run(main)
