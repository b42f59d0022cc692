"""Frame stores: video datasets whose every JPEG frame can be read on its own.

A TFRecord example holds all frames of a video (~180 for UCF101), so a 16-frame clip reads and
parses the whole video. In a frame store a clip reads exactly its frames, and any process can
read any clip: with several processes each reads only its own part of every global batch, while
the batch of step s stays a function of (seed, s) alone (see har_jax.data.pipeline).

On disk, one folder per store (`<data_dir>/<name>`, e.g. `data/ucf101_frames/s128`):

  frame_store.json    {'format': FORMAT, 'format_version', 'name', 'class_names', 'splits':
                      {split: number of videos}, 'num_videos', 'num_frames', 'num_bytes',
                      'frame_size': [height, width] shared by every frame, or null, 'settings':
                      how it was made, 'files': [frame file names], 'file_sizes': [their
                      sizes in bytes, checked on open; absent in stores written before]}
  videos.npz          one row per video: label int32, file_index int32 (into 'files'), first
                      int64 (its first frame in frames.npz), num_frames int32, height int32,
                      width int32, group int32 (-1: none), fps float32 (0: unknown), name str
  frames.npz          one row per frame: offset int64 (in its video's file), size int32, crc32
                      uint32 of its bytes
  split_<split>.npy   int64 rows (into videos.npz) of the videos of each split, in a fixed order
  frames-NNNNN-of-MMMMM.bin   the JPEG frames back to back; a video's frames are consecutive,
                      in frame order, in one file

A frame index (`frame_index/<records name>`, e.g. `frame_index/ucf101/ucf101_1_256`) is a frame
store without frames files: its 'files' are the TFDS record files of that dataset, named relative
to its folder, and its offsets point at each JPEG frame inside the serialized records
(`frame_store_writer.index_records`; settings 'indexes_records' names the records). Stock records
are then read like a frame store, a clip its own frames only, with nothing copied.

Frames are read by offset from memory-mapped files, so the store must be on a path the OS can
open (a local disk or a network mount; mount a bucket with gcsfuse), and checked against their
CRC-32. Why not ArrayRecord: reading a 16-frame clip of ~2 KB frames cost ~300 us
of CPU through ArrayRecordReader.read and ~45 us by offset with the CRC check, on the 2-core dev
machine (benchmarks/RESULTS.md), against ~2 ms to decode the clip.

A store is written into `<folder>.incomplete-<id>` and renamed when complete, so an interrupted
write leaves nothing readable; a store it replaces stays readable until then. Writing (and
converting TFDS records) is preparation: `har_jax.data.prepare.frame_store_writer`.
"""

import json
import mmap
import os
import threading
import zlib
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax import geometry
from har_jax import paths
from har_jax.data import sources

FORMAT = 'har_jax.frame_store'
FORMAT_VERSION = 1
INFO_FILE = 'frame_store.json'
VIDEOS_FILE = 'videos.npz'
FRAMES_FILE = 'frames.npz'
# The columns of videos.npz and frames.npz, in order, and their types.
VIDEO_DTYPES = dict(label=np.int32, file_index=np.int32, first=np.int64, num_frames=np.int32,
                    height=np.int32, width=np.int32, group=np.int32, fps=np.float32, name=str)
FRAME_DTYPES = dict(offset=np.int64, size=np.int32, crc32=np.uint32)



def exists(path: str) -> bool:
  """True when `path` (a folder, or a folder URL) holds a frame store."""
  return (paths.path(path) / INFO_FILE).is_file()


# Frame stores are read through mmap: a bucket must be mounted (or the store copied) first.
URL_REMEDY = ('a frame store is read through mmap, which needs a file system. Mount the bucket '
              'with gcsfuse (gcsfuse --implicit-dirs <bucket> /mnt/<bucket>, '
              'then --config.dataset.data_dir=/mnt/<bucket>/<path>) or copy the store to a local '
              'disk (gcloud storage cp -r <url> <local data_dir>), and point data_dir there.')


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
    missing = [f for f in needed if not os.path.isfile(self._path(f))]
    if missing:
      raise errors.UserError(f'Frame store {self.path} is incomplete: {missing[:3]} missing. '
                             f'Restore the files or {self.rebuild_hint}.')
    for i, size in enumerate(self.info.get('file_sizes') or []):
      found = os.path.getsize(self.file_path(i))
      if found != size:
        raise errors.UserError(
            f'{self.file_path(i)} is {found} bytes, {size} when frame store {self.path} was '
            f'written: it changed since. Restore it or {self.rebuild_hint}.')
    try:
      with np.load(os.path.join(self.path, VIDEOS_FILE)) as table:
        self.videos = {c: table[c] for c in VIDEO_DTYPES}
      with np.load(os.path.join(self.path, FRAMES_FILE)) as table:
        self.frames = {c: table[c] for c in FRAME_DTYPES}
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

  def _path(self, name: str) -> str:
    """A file the store names, relative to its folder (a frame index names record files outside
    it, as '../..')."""
    return os.path.normpath(os.path.join(self.path, name))

  def file_path(self, index: int) -> str:
    """The path of frames file `index`."""
    return self._path(self.info['files'][index])

  @property
  def indexed_records(self) -> Optional[str]:
    """The full name of the TFDS records a frame index reads ('ucf101/ucf101_1_256/2.0.0'), or
    None for a store that holds its frames."""
    return (self.info.get('settings') or {}).get('indexes_records')

  @property
  def rebuild_hint(self) -> str:
    if self.indexed_records:
      return (f'rebuild the index of {self.indexed_records}: rerun the command that prepared '
              'the records with --frame_index (docs/ucf101.md, docs/own_videos.md)')
    return 'rebuild the store'


class Reader:
  """Reads frames of a store by (video row, frame indices), as a tf op; counts what it reads.

  Each frames file is memory-mapped on first use and shared by the tf.data threads. A frame whose
  bytes fail their CRC-32 fails the read with InvalidArgumentError (an assertion, so no Python
  traceback is logged), which the pipeline treats like a frame that fails to decode.
  `records_read` and `bytes_read` count the frames this reader read.
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
    hint = self.store.rebuild_hint
    check = tf.debugging.Assert(intact, [f'Frames of frame store {self.store.path} fail their '
                                         'CRC-32: the file changed after it was written. '
                                         f'{hint[0].upper()}{hint[1:]}.'])
    with tf.control_dependencies([check]):
      return tf.ensure_shape(tf.identity(jpegs), frame_indices.shape)


class FrameStoreSource(sources.DataSource):
  """A frame store as a DataSource: a clip reads exactly its frames (see the module doc)."""

  def __init__(self, store: FrameStore):
    self.store = store
    self.reader = Reader(store)  # Counts the frames this process reads.

  @property
  def name(self) -> str:
    return self.store.name

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.store.class_names

  @property
  def split_sizes(self) -> dict[str, int]:
    return self.store.split_sizes

  def frame_geometry(self) -> dict:
    settings = self.store.info.get('settings', {})
    if 'frame_geometry' in settings:
      return dict(settings['frame_geometry'])
    return geometry.stored_short_side(settings)

  def static_frame_size(self) -> Optional[tuple[int, int]]:
    return self.store.frame_size

  def first_frame_size(self) -> tuple[int, int]:
    return int(self.store.videos['height'][0]), int(self.store.videos['width'][0])

  def group_counts(self, split: str) -> dict[int, int]:
    groups = self.store.videos['group'][self.store.split_rows(split)]
    if np.any(groups < 0):
      raise errors.UserError(f'Frame store {self.name!r} has no UCF101 groups in split '
                             f'{split!r}; validation holds out whole groups only on UCF101 stores.')
    values, counts = np.unique(groups, return_counts=True)
    return {int(g): int(n) for g, n in zip(values, counts)}

  def split_rows(self, split: str) -> np.ndarray:
    """Video rows of a split, group splits ('train1|val_groups=0.1') included."""
    group_split = sources.parse_group_split(split)
    if not group_split:
      return self.store.split_rows(split)
    rows = self.store.split_rows(group_split.base)
    return rows[np.isin(self.store.videos['group'][rows], self.split_groups(group_split))]

  def _plain_num_examples(self, split: str) -> int:
    return len(self.split_rows(split))

  def describe(self, split: str) -> str:
    del split
    if self.store.indexed_records:
      return (f'frame index of the TFDS records {self.store.indexed_records}, frames '
              f'{self.store.frame_size}')
    return f'frame store, frames {self.store.frame_size}'

  def train_clips(self, split: str, config, *, local_batch: int, process_index: int,
                  process_count: int, start_step: int) -> tf.data.Dataset:
    """This process's clips {'row', 'frames': [T] int32, 'label', 'tfds_id', 'seed'}, forever.

    Nothing is read here: `read_train_frames` reads a clip's frames.
    """
    rows = self.split_rows(split)
    num_videos = len(rows)
    if not num_videos:
      raise errors.UserError(f'Split {split!r} of {self.name!r} has no videos.')
    global_batch = local_batch * process_count
    table = {k: tf.constant(self.store.videos[k][rows]) for k in ('num_frames', 'label', 'name')}
    rows = tf.constant(rows)
    seed = tf.constant(config.seed, tf.int64)

    def clip(k):  # k: this process's k-th clip since step 0.
      g = k // local_batch * global_batch + process_index * local_batch + k % local_batch
      epoch, position = g // num_videos, g % num_videos
      video = tf.random.experimental.index_shuffle(position, tf.stack([seed, epoch]),
                                                   num_videos - 1)
      clip_seed = tf.random.experimental.stateless_fold_in(tf.stack([seed, 1]), g)
      return {'row': tf.gather(rows, video),
              'frames': sources.sample_train_frames(tf.gather(table['num_frames'], video),
                                                    clip_seed, config),
              'label': tf.gather(table['label'], video),
              'tfds_id': tf.gather(table['name'], video), 'seed': clip_seed}

    return tf.data.Dataset.range(start_step * local_batch, sources.FOREVER).map(clip)

  def read_train_frames(self, clips: dict) -> dict:
    jpegs = self.reader.read(clips['row'], clips['frames'])
    return {'jpegs': jpegs, 'read_records': tf.fill(tf.shape(clips['label']), tf.shape(jpegs)[-1]),
            'read_bytes': tf.reduce_sum(tf.cast(tf.strings.length(jpegs), tf.int64), axis=-1)}

  def eval_examples(self, split: str, config, *, process_index: int,
                    process_count: int) -> tf.data.Dataset:
    """{'row', 'num_frames', 'label', 'tfds_id'} of this process's videos i, i + P, ..."""
    del config  # Nothing is read until read_eval_frames.
    rows = self.split_rows(split)[process_index::process_count]
    videos = self.store.videos
    return tf.data.Dataset.from_tensor_slices({
        'row': rows, 'num_frames': videos['num_frames'][rows], 'label': videos['label'][rows],
        'tfds_id': videos['name'][rows]})

  def read_eval_frames(self, example: dict, config) -> tf.Tensor:
    return self.reader.read(example['row'], sources.eval_frames(example['num_frames'], config))
