"""Writes frame stores (`har_jax.data.frame_store` describes the format): new ones, and copies of
TFDS records (`convert`).

    writer = Writer(path, name='ucf101_frames/s128', class_names=names, settings={...})
    row = writer.add_video(jpegs, label=3, name='v_ApplyEyeMakeup_g08_c01', group=8, fps=25.0)
    writer.add_split('train1', [row, ...])
    store = writer.finish()

A store is written into `<folder>.incomplete-<id>` and renamed when complete, so an interrupted
write leaves nothing readable; a store it replaces stays readable until then (`replace_folder`).
"""

import io
import json
import os
import shutil
import uuid
import zlib
from typing import Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax import paths
from har_jax.data import datasets
from har_jax.data import frame_store
from har_jax.data import tfds_records

MAX_FILE_BYTES = 1 << 30  # A new frames file starts once a file holds this many bytes.


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
  """(height, width) of a JPEG image, from its header."""
  width, height = Image.open(io.BytesIO(jpeg)).size
  return height, width


class Writer:
  """Writes a frame store: add videos, name the splits, then finish (or abort).

    writer = Writer(path, name='ucf101_frames/s128', class_names=names, settings={...})
    row = writer.add_video(jpegs, label=3, name='v_ApplyEyeMakeup_g08_c01', group=8, fps=25.0)
    writer.add_split('train1', [row, ...])
    store = writer.finish()
  """

  def __init__(self, path: str, *, name: str, class_names: Sequence[str], settings: dict,
               max_file_bytes: int = MAX_FILE_BYTES):
    paths.require_local(path, 'The frame store', frame_store.URL_REMEDY)
    self.path = os.path.abspath(os.path.expanduser(path))
    self._tmp = f'{self.path}.incomplete-{uuid.uuid4().hex[:8]}'
    os.makedirs(self._tmp)
    self._info = {'format': frame_store.FORMAT, 'format_version': frame_store.FORMAT_VERSION,
                  'name': name, 'class_names': list(class_names), 'settings': settings}
    self._max_file_bytes = max_file_bytes
    self._videos = {c: [] for c in frame_store.VIDEO_DTYPES}
    self._frames = {c: [] for c in frame_store.FRAME_DTYPES}
    self._splits = {}
    self._files, self._file, self._file_bytes = [], None, 0

  def _file_for(self, num_bytes: int):
    if self._file is None or (self._file_bytes and
                              self._file_bytes + num_bytes > self._max_file_bytes):
      if self._file is not None:
        self._file.close()
      self._files.append(f'frames-{len(self._files):05d}.bin')
      self._file = open(os.path.join(self._tmp, self._files[-1]), 'wb')
      self._file_bytes = 0
    return self._file

  def add_video(self, jpegs: Sequence[bytes], *, label: int, name: str, group: int = -1,
                fps: float = 0.0) -> int:
    """Appends one video's JPEG frames (in order); returns its row."""
    if not jpegs:
      raise errors.UserError(f'Video {name!r} has no frames.')
    if not 0 <= label < len(self._info['class_names']):
      raise errors.UserError(f'Video {name!r} has label {label}, outside the '
                             f'{len(self._info["class_names"])} classes.')
    file = self._file_for(sum(len(j) for j in jpegs))
    first = len(self._frames['offset'])
    for jpeg in jpegs:
      file.write(jpeg)
      self._frames['offset'].append(self._file_bytes)
      self._frames['size'].append(len(jpeg))
      self._frames['crc32'].append(zlib.crc32(jpeg))
      self._file_bytes += len(jpeg)
    height, width = jpeg_size(jpegs[0])
    row = dict(label=label, file_index=len(self._files) - 1, first=first,
               num_frames=len(jpegs), height=height, width=width, group=group, fps=fps, name=name)
    for column, value in row.items():
      self._videos[column].append(value)
    return len(self._videos['name']) - 1

  def add_split(self, split: str, rows: Sequence[int]):
    if not split.isidentifier():
      raise errors.UserError(f'Split name {split!r} must be letters, digits and _.')
    self._splits[split] = np.asarray(rows, np.int64)

  def finish(self, replace: bool = False) -> frame_store.FrameStore:
    """Closes the files and makes the store readable at `path`; a store already there is an
    error, or with `replace` is swapped out for the new one (deleted once the new one is in)."""
    if self._file is not None:
      self._file.close()
    if not self._splits:
      raise errors.UserError('A frame store needs at least one split (add_split).')
    count = len(self._files)
    files = [f'frames-{i:05d}-of-{count:05d}.bin' for i in range(count)]
    for old, new in zip(self._files, files):
      os.rename(os.path.join(self._tmp, old), os.path.join(self._tmp, new))
    videos = {c: np.asarray(v, frame_store.VIDEO_DTYPES[c]) for c, v in self._videos.items()}
    np.savez(os.path.join(self._tmp, frame_store.VIDEOS_FILE), **videos)
    np.savez(os.path.join(self._tmp, frame_store.FRAMES_FILE),
             **{c: np.asarray(v, frame_store.FRAME_DTYPES[c]) for c, v in self._frames.items()})
    for split, rows in self._splits.items():
      np.save(os.path.join(self._tmp, f'split_{split}.npy'), rows)
    sizes = {(int(h), int(w)) for h, w in zip(videos['height'], videos['width'])}
    self._info.update(
        splits={s: len(r) for s, r in self._splits.items()}, num_videos=len(videos['name']),
        num_frames=len(self._frames['size']), num_bytes=int(np.sum(self._frames['size'])),
        frame_size=list(sizes.pop()) if len(sizes) == 1 else None, files=files)
    with open(os.path.join(self._tmp, frame_store.INFO_FILE), 'w') as f:
      json.dump(self._info, f, indent=1)
    if os.path.exists(self.path) and not replace:
      raise errors.UserError(f'{self.path} appeared while writing; the new store is left in '
                             f'{self._tmp}.')
    replace_folder(self._tmp, self.path)
    return frame_store.FrameStore(self.path)

  def abort(self):
    if self._file is not None:
      self._file.close()
    shutil.rmtree(self._tmp, ignore_errors=True)


def replace_folder(new: str, path: str):
  """Renames the finished folder `new` to `path`. A folder already at `path` is first renamed to
  `<path>.replaced-<id>` and deleted only once `new` is in place (put back if that rename fails;
  `remove_incomplete` puts it back after a crash in between)."""
  path = os.path.abspath(path)
  paths.replace_folder(new, path, f'{path}.replaced-{uuid.uuid4().hex[:8]}')


def remove_incomplete(path: str) -> list[str]:
  """Deletes the `<path>.incomplete-*` folders an interrupted write left behind, and the
  `<path>.replaced-*` folders of an interrupted `replace_folder` (putting one back if `path` is
  missing)."""
  path = os.path.abspath(path)
  parent, base = os.path.split(path)
  if not os.path.isdir(parent):
    return []
  replaced = sorted(os.path.join(parent, d) for d in os.listdir(parent)
                    if d.startswith(base + '.replaced-'))
  if replaced and not os.path.lexists(path):
    logging.warning('Restoring %s from %s, left by an interrupted replacement.', path,
                    replaced[0])
    os.rename(replaced.pop(0), path)
  stale = [os.path.join(parent, d) for d in os.listdir(parent)
           if d.startswith(base + '.incomplete-')] + replaced
  for folder in stale:
    logging.warning('Removing %s, left by an interrupted earlier write.', folder)
    shutil.rmtree(folder, ignore_errors=True)
  return stale


def convert(builder, path: str, *, name: str, splits: Optional[Sequence[str]] = None,
            progress_every_s: float = 10.0) -> frame_store.FrameStore:
  """Copies a TFDS video dataset's JPEG frames, byte for byte, into a new frame store at `path`.

  Each TFDS split becomes a split of the same name, in the records' order. Uses the 'group',
  'name' and 'fps' features where the dataset has them (else group -1, the tfds_id, 0).
  """
  features = builder.info.features
  writer = Writer(path, name=name, class_names=features['label'].names,
                  settings={'converted_from': builder.info.full_name,
                            'frame_geometry': datasets.frame_geometry(builder)})
  try:
    for split in splits or sorted(builder.info.splits.keys()):
      rows = []
      ds = builder.as_dataset(split=split, decoders=tfds_records.jpeg_decoders(),
                              read_config=tfds.ReadConfig(add_tfds_id=True))
      for example in ds.as_numpy_iterator():
        rows.append(writer.add_video(
            list(example['video']), label=int(example['label']),
            name=(example['name'] if 'name' in features else example['tfds_id']).decode(),
            group=int(example.get('group', -1)), fps=float(example.get('fps', 0.0))))
        logging.log_every_n_seconds(logging.INFO, '%s: %d videos copied.', progress_every_s,
                                    split, len(rows))
      writer.add_split(split, rows)
    return writer.finish()
  except BaseException:
    writer.abort()
    raise
