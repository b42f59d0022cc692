r"""Host input-pipeline throughput: har_jax's training pipeline vs naive TFDS vs the decode floor.

  python scripts/benchmark_input.py --config=configs/default.py --data_dir=/tmp/bench_tfds \
      --seconds=20

Prints one line per pipeline with clips/s and host CPU cost (process CPU seconds per clip, in
ms/clip/core), and last `ratio_vs_naive=<x>`:

  pipeline      har_jax.data.pipeline.create_train_dataset (the training input, as train.py runs it)
  naive_tfds    tfds with full decoding of every frame, then sample, resize, random crop, flip
  decode_floor  read + decode only the num_frames JPEGs of one clip at full size, batch; no
                augmentation, no resize (what any pipeline that decodes full frames must pay)

Each runs alone for --seconds after a warm-up of --warmup_batches batches, with the config's
batch size, so the numbers compare directly. Use a record set with enough videos that the shuffle
buffer and file interleave behave as in training.
"""

import os
import resource
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax.data import datasets
from har_jax.data import pipeline
from har_jax.data import stages

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # For configs/.
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config file.', lock_config=True)
flags.DEFINE_string('data_dir', None, 'TFDS data_dir (overrides config.dataset.data_dir).')
flags.DEFINE_float('seconds', 20.0, 'Seconds measured per pipeline.')
flags.DEFINE_integer('warmup_batches', 3, 'Batches consumed before timing starts.')
flags.DEFINE_integer('naive_shuffle_buffer', 4, 'Shuffle buffer (decoded videos) of naive_tfds.')
flags.DEFINE_list('pipelines', ['pipeline', 'naive_tfds', 'decode_floor'],
                  'Which to run (also: pipeline_deterministic).')


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(ds: tf.data.Dataset, seconds: float, warmup_batches: int) -> dict:
  """Iterates `ds` (batches with a 'video' key) for `seconds`; returns clips/s and ms/clip/core."""
  iterator = iter(ds)
  for _ in range(warmup_batches):
    next(iterator)
  clips, cpu0, t0 = 0, _cpu_seconds(), time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    clips += int(next(iterator)['video'].shape[0])
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  return {'clips_per_s': clips / wall, 'ms_per_clip_core': 1e3 * cpu / max(clips, 1),
          'cpu_cores_busy': cpu / wall, 'clips': clips}


def naive_dataset(builder, config, batch: int) -> tf.data.Dataset:
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
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def decode_floor_dataset(builder, config, batch: int) -> tf.data.Dataset:
  """Read records and decode num_frames consecutive-at-stride JPEGs per clip at full size."""
  split = datasets.resolve_split(config.dataset, 'train')
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          read_config=tfds.ReadConfig(try_autocache=False),
                          decoders={'video': tfds.decode.SkipDecoding()})
  ds = ds.repeat()

  def decode(example):
    jpegs = example['video']
    indices = stages.sample_eval_indices(tf.shape(jpegs)[0], config.num_frames,
                                         config.frame_stride, 1, config.dataset.short_video)[0]
    frames = tf.map_fn(lambda j: tf.io.decode_jpeg(j, channels=3), tf.gather(jpegs, indices),
                       fn_output_signature=tf.uint8)
    return {'video': frames, 'label': example['label']}

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.data_dir:
    config.dataset.data_dir = FLAGS.data_dir
  builder = datasets.get_builder(config.dataset)
  batch = config.batch_size
  print(f'dataset={config.dataset.name} data_dir={config.dataset.data_dir} batch={batch} '
        f'frames={config.num_frames}x{config.image_size}^2 stride={config.frame_stride} '
        f'resize_size={config.dataset.resize_size} seconds={FLAGS.seconds}', flush=True)
  makers = {
      'pipeline': lambda: pipeline.create_train_dataset(builder, config, local_batch=batch),
      'naive_tfds': lambda: naive_dataset(builder, config, batch),
      'decode_floor': lambda: decode_floor_dataset(builder, config, batch),
  }
  results = {}
  for name in FLAGS.pipelines:
    if name == 'pipeline_deterministic':
      with config.unlocked():
        config.deterministic_data = True
      ds = makers['pipeline']()
      with config.unlocked():
        config.deterministic_data = False
    elif name in makers:
      ds = makers[name]()
    else:
      raise app.UsageError(f'Unknown pipeline {name!r}; choose from {sorted(makers)} or '
                           'pipeline_deterministic.')
    results[name] = measure(ds, FLAGS.seconds, FLAGS.warmup_batches)
    r = results[name]
    print(f'{name}: {r["clips_per_s"]:.1f} clips/s, {r["ms_per_clip_core"]:.2f} ms/clip/core '
          f'(host CPU), {r["cpu_cores_busy"]:.2f} cores busy, {r["clips"]} clips', flush=True)
  rate = {name: r['clips_per_s'] for name, r in results.items()}
  if 'pipeline' in rate and 'decode_floor' in rate:
    print(f'ratio_vs_floor={rate["pipeline"] / rate["decode_floor"]:.2f}')
  if 'pipeline' in rate and 'naive_tfds' in rate:
    print(f'ratio_vs_naive={rate["pipeline"] / rate["naive_tfds"]:.2f}')


if __name__ == '__main__':
  app.run(main)
