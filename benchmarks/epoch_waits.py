r"""Waits between the clips of the TFDS-record read stages (read, parse, sample, shuffle; no decode).

  git show 43c72c2:har_jax/data/pipeline.py > /tmp/one_reader_pipeline.py  # One reader, reverted.
  python benchmarks/epoch_waits.py /tmp/rec/one 'train[:12]' /tmp/one_reader_pipeline.py

Times 40 epochs of `TfdsSource.train_clips` (`_tfds_train_clips` in an older pipeline.py;
configs/default.py) after 3 untimed ones, for this
checkout's pipeline and, if given, another pipeline.py, alternating, two rounds. Prints clips/s,
ms per epoch, the mean of the 40 longest waits (one per epoch when the reads stall at each epoch)
and the median wait: a pipeline that stalls once per epoch shows one long wait per epoch.
"""

import functools
import importlib.util
import os
import sys
import time

import numpy as np

from configs import default
from har_jax.data import datasets
from har_jax.data import tfds_records

EPOCHS, WARMUP_EPOCHS, ROUNDS = 40, 3, 2


def _module(path: str):
  spec = importlib.util.spec_from_file_location('other_pipeline', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(data_dir: str, split: str, other: str = ''):
  config = default.get_config()
  config.dataset.data_dir, config.dataset.train_split = data_dir, split
  builder = datasets.get_builder(config.dataset)
  per_epoch = datasets.num_examples(builder, split)
  train_clips = [('this checkout', tfds_records.TfdsSource(builder).train_clips)]
  if other:  # Its pipeline.py, from before the clips moved to TfdsSource.
    train_clips.append((other, functools.partial(
        _module(other)._tfds_train_clips, builder)))  # pylint: disable=protected-access
  for _ in range(ROUNDS):
    for name, clips_fn in train_clips:
      clips = clips_fn(split, config, local_batch=32, process_index=0, process_count=1,
                       start_step=0)
      iterator = clips.map(lambda clip: clip['label']).as_numpy_iterator()
      for _ in range(WARMUP_EPOCHS * per_epoch):
        next(iterator)
      times = [time.perf_counter()]
      for _ in range(EPOCHS * per_epoch):
        next(iterator)
        times.append(time.perf_counter())
      waits, wall = 1e3 * np.diff(times), times[-1] - times[0]
      print(f'{name} {split} ({per_epoch} per epoch): {EPOCHS * per_epoch / wall:.0f} clips/s, '
            f'{1e3 * wall / EPOCHS:.1f} ms per epoch, longest waits '
            f'{np.sort(waits)[-EPOCHS:].mean():.2f} ms, median wait {np.median(waits):.3f} ms, '
            f'load {os.getloadavg()[0]:.1f}', flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
