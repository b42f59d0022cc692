"""What the dataset builders share: their result, reading split lists, a bounded ordered thread map,
JPEG encoding and the cleanup of interrupted TFDS builds."""

import collections
import concurrent.futures
import dataclasses
import io
import os
import shutil
import zipfile
from typing import Callable, Iterable, Iterator, TypeVar

from absl import logging
import numpy as np
from PIL import Image

from har_jax import errors

JPEG_QUALITY = 90  # Of the frames har_jax encodes itself (video folders, the synthetic set).
# What the prepare commands print when Ctrl-C stops them (har_jax/commands/prepare_*.py).
INTERRUPTED = ('interrupted: nothing half-written is readable (the partial folder is removed when '
               'you rerun the same command); the datasets already prepared are kept.')

Item = TypeVar('Item')
Result = TypeVar('Result')


@dataclasses.dataclass(frozen=True)
class PrepareResult:
  """What a prepare function built (or found already built).

  Attributes:
    name: the config.dataset.name to train with, e.g. 'ucf101/ucf101_1_256'.
    data_dir: the folder holding the dataset (a TFDS version folder, or a frame store).
    split_sizes: {split: number of videos}.
    reused: True when an identical dataset was already prepared.
    class_names: the class names, where the builder reports them.
    skipped: [(relative name, reason)] of the unreadable source files left out.
    skipped_links: [(relative name, reason)] of the directory links not followed.
  """
  name: str
  data_dir: str
  split_sizes: dict
  reused: bool
  class_names: tuple[str, ...] = ()
  skipped: list = dataclasses.field(default_factory=list)
  skipped_links: list = dataclasses.field(default_factory=list)


def read_split_list(where: str, read: Callable[[], bytes], remedy: str) -> str:
  """The text of a split list, `read()` giving its bytes.

  Raises:
    errors.UserError: naming `where`, why (not UTF-8: the byte and its offset; or the read
      error) and `remedy`, when it cannot be read or is not UTF-8 text.
  """
  try:
    return read().decode('utf-8')
  except UnicodeDecodeError as e:
    reason = f'it is not UTF-8 text: byte {e.start} is {e.object[e.start:e.start + 1]!r}'
  except (OSError, zipfile.BadZipFile) as e:
    reason = f'{type(e).__name__}: {getattr(e, "strerror", None) or e}'
  raise errors.UserError(f'Split list {where} cannot be read ({reason}). {remedy}')


def ordered_thread_map(fn: Callable[[Item], Result], items: Iterable[Item],
                       num_workers: int) -> Iterator[tuple[Item, Result]]:
  """Yields (item, fn(item)) in the order of `items`, running fn on `num_workers` threads.

  At most 2 * num_workers items are in flight, so memory stays bounded however many items there
  are. An exception of fn is raised when its item's turn comes (the threads then finish the items
  in flight).
  """
  workers = max(1, num_workers)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append((item, pool.submit(fn, item)))
      if len(pending) > 2 * workers:
        first, future = pending.popleft()
        yield first, future.result()
    while pending:
      first, future = pending.popleft()
      yield first, future.result()


def encode_jpeg(image: np.ndarray, *, full_chroma: bool = False) -> bytes:
  """`[H, W, 3] uint8` -> JPEG bytes at JPEG_QUALITY; chroma subsampled 4:2:0 (PIL's default), or
  4:4:4 with full_chroma."""
  buffer = io.BytesIO()
  options = {'subsampling': 0} if full_chroma else {}
  Image.fromarray(image).save(buffer, format='JPEG', quality=JPEG_QUALITY, **options)
  return buffer.getvalue()


def remove_stale_incomplete_dirs(builder) -> list[str]:
  """Deletes `incomplete.*` dirs that an interrupted earlier run left next to the version dir."""
  parent = os.path.dirname(os.fspath(builder.data_path).rstrip('/'))
  if not os.path.isdir(parent):
    return []
  stale = [os.path.join(parent, d) for d in os.listdir(parent)
           if d.startswith('incomplete.') and d.endswith('_' + str(builder.version))]
  for d in stale:
    logging.warning('Removing %s, left by an interrupted earlier run.', d)
    shutil.rmtree(d, ignore_errors=True)
  return stale
