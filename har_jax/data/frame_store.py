"""Frame stores: video datasets whose every JPEG frame can be read on its own.

A TFRecord example holds all frames of a video (~180 for UCF101), so a 16-frame clip reads and
parses the whole video. In a frame store a clip reads exactly its frames, and any process can
read any clip: with several processes each reads only its own part of every global batch, while
the batch of step s stays a function of (seed, s) alone (see har_jax.data.pipeline).

On disk, one folder per store (`<data_dir>/<name>`, e.g. `data/ucf101_frames/s128`):

  frame_store.json    {'format': FORMAT, 'format_version', 'name', 'class_names', 'splits':
                      {split: number of videos}, 'num_videos', 'num_frames', 'num_bytes',
                      'frame_size': [height, width] shared by every frame, or null, 'settings':
                      how it was made, 'files': [frame file names]}
  videos.npz          one row per video: label int32, file_index int32 (into 'files'), first
                      int64 (its first frame in frames.npz), num_frames int32, height int32,
                      width int32, group int32 (-1: none), fps float32 (0: unknown), name str
  frames.npz          one row per frame: offset int64 (in its video's file), size int32, crc32
                      uint32 of its bytes
  split_<split>.npy   int64 rows (into videos.npz) of the videos of each split, in a fixed order
  frames-NNNNN-of-MMMMM.bin   the JPEG frames back to back; a video's frames are consecutive,
                      in frame order, in one file

Frames are read by offset from memory-mapped files, so the store must be on a path the OS can
open (a local disk or a network mount; mount a bucket with gcsfuse), and checked against their
CRC-32. Why not ArrayRecord: reading a 16-frame clip of ~2 KB frames cost ~300 us
of CPU through ArrayRecordReader.read and ~45 us by offset with the CRC check, on the 2-core dev
machine (benchmarks/RESULTS.md), against ~2 ms to decode the clip.

A store is written into `<folder>.incomplete-<id>` and renamed when complete, so an interrupted
write leaves nothing readable; a store it replaces stays readable until then (`replace_folder`).
"""

import io
import json
import mmap
import os
import shutil
import threading
import time
import uuid
import zlib
from typing import Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax import paths

FORMAT = 'har_jax.frame_store'
FORMAT_VERSION = 1
INFO_FILE = 'frame_store.json'
VIDEOS_FILE = 'videos.npz'
FRAMES_FILE = 'frames.npz'
MAX_FILE_BYTES = 1 << 30  # A new frames file starts once a file holds this many bytes.
_VIDEO_COLUMNS = ('label', 'file_index', 'first', 'num_frames', 'height', 'width', 'group', 'fps',
                  'name')
_VIDEO_DTYPES = dict(label=np.int32, file_index=np.int32, first=np.int64, num_frames=np.int32,
                     height=np.int32, width=np.int32, group=np.int32, fps=np.float32, name=str)
_FRAME_DTYPES = dict(offset=np.int64, size=np.int32, crc32=np.uint32)



def exists(path: str) -> bool:
  """True when `path` (a folder, or a folder URL) holds a frame store."""
  return (paths.path(path) / INFO_FILE).is_file()


# Frame stores are read through mmap: a bucket must be mounted (or the store copied) first.
URL_REMEDY = ('a frame store is read through mmap, which needs a file system. Mount the bucket with gcsfuse (gcsfuse --implicit-dirs <bucket> /mnt/<bucket>, '
              'then --config.dataset.data_dir=/mnt/<bucket>/<path>) or copy the store to a local '
              'disk (gcloud storage cp -r <url> <local data_dir>), and point data_dir there.')


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
    paths.require_local(path, 'The frame store', URL_REMEDY)
    self.path = os.path.abspath(os.path.expanduser(path))
    self._tmp = f'{self.path}.incomplete-{uuid.uuid4().hex[:8]}'
    os.makedirs(self._tmp)
    self._info = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'name': name,
                  'class_names': list(class_names), 'settings': settings}
    self._max_file_bytes = max_file_bytes
    self._videos = {c: [] for c in _VIDEO_COLUMNS}
    self._frames = {c: [] for c in _FRAME_DTYPES}
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

  def finish(self, replace: bool = False) -> 'FrameStore':
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
    videos = {c: np.asarray(v, _VIDEO_DTYPES[c]) for c, v in self._videos.items()}
    np.savez(os.path.join(self._tmp, VIDEOS_FILE), **videos)
    np.savez(os.path.join(self._tmp, FRAMES_FILE),
             **{c: np.asarray(v, _FRAME_DTYPES[c]) for c, v in self._frames.items()})
    for split, rows in self._splits.items():
      np.save(os.path.join(self._tmp, f'split_{split}.npy'), rows)
    sizes = {(int(h), int(w)) for h, w in zip(videos['height'], videos['width'])}
    self._info.update(
        splits={s: len(r) for s, r in self._splits.items()}, num_videos=len(videos['name']),
        num_frames=len(self._frames['size']), num_bytes=int(np.sum(self._frames['size'])),
        frame_size=list(sizes.pop()) if len(sizes) == 1 else None, files=files)
    with open(os.path.join(self._tmp, INFO_FILE), 'w') as f:
      json.dump(self._info, f, indent=1)
    if os.path.exists(self.path) and not replace:
      raise errors.UserError(f'{self.path} appeared while writing; the new store is left in '
                             f'{self._tmp}.')
    replace_folder(self._tmp, self.path)
    return FrameStore(self.path)

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


class FrameStore:
  """A prepared frame store, read-only. Opening reads the JSON and the video and frame tables."""

  def __init__(self, path: str):
    paths.require_local(path, 'The frame store', URL_REMEDY)
    self.path = os.path.abspath(os.path.expanduser(path))
    info_path = os.path.join(self.path, INFO_FILE)
    try:
      with open(info_path) as f:
        self.info = json.load(f)
    except FileNotFoundError:
      raise errors.UserError(f'No frame store in {self.path} (no {INFO_FILE}).') from None
    except (OSError, ValueError) as e:
      raise errors.UserError(f'{info_path} cannot be read ({e}); rebuild the store.') from None
    if (not isinstance(self.info, dict) or self.info.get('format') != FORMAT or
        self.info.get('format_version') != FORMAT_VERSION):
      raise errors.UserError(f'{info_path} is not a version-{FORMAT_VERSION} {FORMAT} file.')
    needed = self.info['files'] + [VIDEOS_FILE, FRAMES_FILE]
    needed += [f'split_{s}.npy' for s in self.info['splits']]
    missing = [f for f in needed if not os.path.isfile(os.path.join(self.path, f))]
    if missing:
      raise errors.UserError(f'Frame store {self.path} is incomplete: {missing[:3]} missing. '
                             'Restore the files or rebuild the store.')
    try:
      with np.load(os.path.join(self.path, VIDEOS_FILE)) as table:
        self.videos = {c: table[c] for c in _VIDEO_COLUMNS}
      with np.load(os.path.join(self.path, FRAMES_FILE)) as table:
        self.frames = {c: table[c] for c in _FRAME_DTYPES}
    except (OSError, ValueError, KeyError) as e:
      raise errors.UserError(f'The tables of frame store {self.path} cannot be read ({e}); '
                             'rebuild the store.') from None
    self._rows = {}

  @property
  def name(self) -> str:
    return self.info['name']

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.info['class_names'])

  @property
  def split_sizes(self) -> dict[str, int]:
    return dict(self.info['splits'])

  @property
  def frame_size(self) -> Optional[tuple[int, int]]:
    """(height, width) of every frame when they all share it, else None."""
    size = self.info.get('frame_size')
    return tuple(size) if size else None

  def split_rows(self, split: str) -> np.ndarray:
    """Rows of the videos of a split: a name ('train1') or a TFDS-style slice ('train1[:90%]',
    'test1[10:20]'), in the split's fixed order."""
    infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
             for name, n in self.split_sizes.items()}
    try:
      instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    except (ValueError, AssertionError, KeyError) as e:
      raise errors.UserError(f'Split {split!r} of frame store {self.name!r}: {e} (it has '
                             f'{sorted(self.split_sizes)}).') from None
    parts = []
    for instruction in instructions:
      rows = self._base_rows(instruction.splitname)
      parts.append(rows[instruction.from_:instruction.to])
    return np.concatenate(parts) if parts else np.zeros([0], np.int64)

  def _base_rows(self, split: str) -> np.ndarray:
    if split not in self._rows:
      self._rows[split] = np.load(os.path.join(self.path, f'split_{split}.npy'))
    return self._rows[split]

  def file_path(self, index: int) -> str:
    return os.path.join(self.path, self.info['files'][index])


class FrameReader:
  """Reads frames of a store by (video row, frame indices), as a tf op; counts what it reads.

  Each frames file is memory-mapped on first use and shared by the tf.data threads. A frame whose
  bytes fail their CRC-32 fails the read with InvalidArgumentError (an assertion, so no Python
  traceback is logged), which the pipeline treats like a frame that fails to decode. `records_read` and `bytes_read` count the frames this reader read.
  """

  def __init__(self, store: FrameStore):
    self.store = store
    self._maps = [None] * len(store.info['files'])
    self._lock = threading.Lock()
    self.records_read = 0
    self.bytes_read = 0

  def _map(self, index: int):
    if self._maps[index] is None:
      with self._lock:
        if self._maps[index] is None:
          with open(self.store.file_path(index), 'rb') as f:
            self._maps[index] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    return self._maps[index]

  def read_numpy(self, file_indices: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, bool]:
    """(bytes objects shaped like `frames` (int64 rows of frames.npz), whether every frame passed
    its CRC-32); `file_indices` (int32, the shape of `frames` without its last axis) says which
    frames file holds each row of frames. A damaged frame comes back as b''."""
    offsets, sizes, crcs = (self.store.frames[c][frames] for c in ('offset', 'size', 'crc32'))
    jpegs = np.empty(frames.shape, dtype=object)
    intact = True
    for index in np.ndindex(frames.shape):
      data = self._map(int(file_indices[index[:-1]]))
      offset, size = offsets[index], sizes[index]
      jpeg = data[offset:offset + size]
      if len(jpeg) != size or zlib.crc32(jpeg) != crcs[index]:
        intact, jpeg = False, b''
      jpegs[index] = jpeg
    self.records_read += frames.size
    self.bytes_read += int(sizes.sum())
    return jpegs, np.bool_(intact)

  def read(self, rows: tf.Tensor, frame_indices: tf.Tensor) -> tf.Tensor:
    """The JPEG frames `frame_indices` (`[..., n] int32`) of videos `rows` (`[...]` int64):
    `[..., n] tf.string`."""
    files = tf.gather(tf.constant(self.store.videos['file_index']), rows)
    firsts = tf.gather(tf.constant(self.store.videos['first']), rows)
    frames = firsts[..., None] + tf.cast(frame_indices, tf.int64)
    jpegs, intact = tf.numpy_function(self.read_numpy, [files, frames], [tf.string, tf.bool],
                                      stateful=False)
    check = tf.debugging.Assert(intact, [f'Frames of frame store {self.store.path} fail their '
                                         'CRC-32: the file changed after it was written. '
                                         'Rebuild the store.'])
    with tf.control_dependencies([check]):
      return tf.ensure_shape(tf.identity(jpegs), frame_indices.shape)


def convert(builder, path: str, *, name: str, splits: Optional[Sequence[str]] = None,
            progress_every_s: float = 10.0) -> FrameStore:
  """Copies a TFDS video dataset's JPEG frames, byte for byte, into a new frame store at `path`.

  Each TFDS split becomes a split of the same name, in the records' order. Uses the 'group',
  'name' and 'fps' features where the dataset has them (else group -1, the tfds_id, 0).
  """
  from har_jax.data import datasets  # pylint: disable=g-import-not-at-top  (datasets imports us)
  features = builder.info.features
  writer = Writer(path, name=name, class_names=features['label'].names,
                  settings={'converted_from': builder.info.full_name,
                            'frame_geometry': datasets.frame_geometry(builder)})
  try:
    last = time.monotonic()
    for split in splits or sorted(builder.info.splits.keys()):
      rows = []
      ds = builder.as_dataset(split=split, decoders=datasets.jpeg_decoders(builder),
                              read_config=tfds.ReadConfig(add_tfds_id=True))
      for example in ds.as_numpy_iterator():
        rows.append(writer.add_video(
            list(example['video']), label=int(example['label']),
            name=(example['name'] if 'name' in features else example['tfds_id']).decode(),
            group=int(example.get('group', -1)), fps=float(example.get('fps', 0.0))))
        if time.monotonic() - last > progress_every_s:
          last = time.monotonic()
          logging.info('%s: %d videos copied.', split, len(rows))
      writer.add_split(split, rows)
    return writer.finish()
  except BaseException:
    writer.abort()
    raise
