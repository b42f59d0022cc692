"""Writes frame stores (`har_jax.data.frame_store` describes the format): new ones, copies of
TFDS records (`convert`), and frame indexes of TFDS records (`index_records`).

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
from har_jax.data import datasets
from har_jax.data import frame_store
from har_jax.data import tfds_records
from har_jax.data.prepare import common

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
    self._external = []  # Files of a frame index: paths relative to `path`, not written here.

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
    if self._external:
      raise ValueError('A frame index (add_external_file) holds no frames of its own.')
    file = self._file_for(sum(len(j) for j in jpegs))
    offsets = []
    for jpeg in jpegs:
      file.write(jpeg)
      offsets.append(self._file_bytes)
      self._file_bytes += len(jpeg)
    return self._add_row(len(self._files) - 1, offsets, [len(j) for j in jpegs],
                         [zlib.crc32(j) for j in jpegs], jpeg_size(jpegs[0]), label=label,
                         name=name, group=group, fps=fps)

  def add_external_file(self, file_path: str) -> int:
    """Names a file that holds frames of this store but stays where it is (a frame index: a TFDS
    record file); returns its file index for `add_indexed_video`. Stored relative to the store's
    folder, so that the data_dir holding both can move."""
    if self._files:
      raise ValueError('A frame store that holds its frames cannot also index other files.')
    self._external.append(os.path.relpath(os.path.abspath(file_path), self.path))
    return len(self._external) - 1

  def add_indexed_video(self, file_index: int, offsets: Sequence[int], sizes: Sequence[int],
                        crcs: Sequence[int], frame_size: tuple[int, int], *, label: int,
                        name: str, group: int = -1, fps: float = 0.0) -> int:
    """Appends a video whose JPEG frames (in order) lie in external file `file_index` at
    `offsets`, `sizes` bytes long, with CRC-32s `crcs`; returns its row."""
    if not offsets:
      raise errors.UserError(f'Video {name!r} has no frames.')
    return self._add_row(file_index, offsets, sizes, crcs, frame_size, label=label, name=name,
                         group=group, fps=fps)

  def _add_row(self, file_index: int, offsets, sizes, crcs, frame_size: tuple[int, int], *,
               label: int, name: str, group: int, fps: float) -> int:
    if not 0 <= label < len(self._info['class_names']):
      raise errors.UserError(f'Video {name!r} has label {label}, outside the '
                             f'{len(self._info["class_names"])} classes.')
    first = len(self._frames['offset'])
    self._frames['offset'].extend(offsets)
    self._frames['size'].extend(sizes)
    self._frames['crc32'].extend(crcs)
    height, width = frame_size
    row = dict(label=label, file_index=file_index, first=first, num_frames=len(offsets),
               height=height, width=width, group=group, fps=fps, name=name)
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
    file_sizes = [os.path.getsize(os.path.join(self._tmp, f)) for f in files]
    if self._external:
      files = self._external
      file_sizes = [os.path.getsize(os.path.normpath(os.path.join(self.path, f))) for f in files]
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
        frame_size=list(sizes.pop()) if len(sizes) == 1 else None, files=files,
        file_sizes=file_sizes)
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


def _video_fields(example: dict, features) -> dict:
  """add_video's keyword arguments for a decoded example: the 'group', 'name' and 'fps' features
  where the dataset has them (else group -1, the tfds_id, 0)."""
  name = example['name'] if 'name' in features else example['tfds_id']
  return dict(label=int(example['label']), name=name.decode(),
              group=int(example.get('group', -1)), fps=float(example.get('fps', 0.0)))


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
        rows.append(writer.add_video(list(example['video']), **_video_fields(example, features)))
        logging.log_every_n_seconds(logging.INFO, '%s: %d videos copied.', progress_every_s,
                                    split, len(rows))
      writer.add_split(split, rows)
    return writer.finish()
  except BaseException:
    writer.abort()
    raise


def prepare_index(builder, data_dir: str, records_name: str, *,
                  progress_every_s: float = 10.0) -> common.PrepareResult:
  """Writes the frame index `frame_index/<records_name>` of prepared records into data_dir
  (`index_records`), or reuses the one there when it still matches the records (their full name
  and file sizes); a stale one is replaced once the new one is complete."""
  name = datasets.frame_index_name(records_name)
  path = os.path.join(os.path.expanduser(data_dir), name)
  if frame_store.exists(path):
    try:
      store = frame_store.FrameStore(path)
      if store.indexed_records == builder.info.full_name:
        logging.info('%s is already prepared in %s; nothing to do.', name, path)
        return common.PrepareResult(name, path, store.split_sizes, reused=True)
    except errors.UserError as e:
      logging.warning('Rebuilding %s: %s', name, e)
  remove_incomplete(path)
  logging.info('Indexing the frames of %s (%d videos) into %s; the records stay as they are.',
               builder.info.full_name, builder.info.splits.total_num_examples, path)
  store = index_records(builder, path, name=name, progress_every_s=progress_every_s)
  return common.PrepareResult(name, path, store.split_sizes, reused=False)


# TFRecord framing: each record is [length: 8 bytes][CRC of the length: 4][data][CRC of data: 4].
_RECORD_HEADER_BYTES = 12
_RECORD_FRAMING_BYTES = 16


def _varint(data: bytes, pos: int) -> tuple[int, int]:
  """A protobuf varint at data[pos:]: (value, position after it)."""
  value = shift = 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7


def _fields(data: bytes, start: int, end: int):
  """Yields (field number, wire type, value) of the protobuf message in data[start:end]: the
  value of a length-delimited field (wire type 2) is its (start, end), of others an int (unused)."""
  pos = start
  while pos < end:
    tag, pos = _varint(data, pos)
    number, wire_type = tag >> 3, tag & 7
    if wire_type == 0:
      value, pos = _varint(data, pos)
    elif wire_type == 1:
      value, pos = None, pos + 8
    elif wire_type == 2:
      length, pos = _varint(data, pos)
      value, pos = (pos, pos + length), pos + length
    elif wire_type == 5:
      value, pos = None, pos + 4
    else:
      raise ValueError(f'wire type {wire_type} at byte {pos}')
    yield number, wire_type, value
  if pos != end:
    raise ValueError(f'a field runs past its message (byte {pos} of {end})')


def bytes_feature_spans(example: bytes, key: str) -> list[tuple[int, int]]:
  """(offset, size) in a serialized tf.train.Example of each value of its bytes_list feature
  `key`, in order ([] when it has no such feature). Reads the protobuf wire format:
  Example.features (1) -> Features.feature (1, map entries: key 1, value 2) -> Feature.bytes_list
  (1) -> BytesList.value (1)."""
  spans = []
  for number, wire_type, features in _fields(example, 0, len(example)):
    if number != 1 or wire_type != 2:
      continue
    for number, wire_type, entry in _fields(example, *features):
      if number != 1 or wire_type != 2:
        continue
      entry_key, feature = None, None
      for number, wire_type, value in _fields(example, *entry):
        if wire_type == 2 and number == 1:
          entry_key = example[value[0]:value[1]]
        elif wire_type == 2 and number == 2:
          feature = value
      if entry_key != key.encode() or feature is None:
        continue
      for number, wire_type, bytes_list in _fields(example, *feature):
        if number == 1 and wire_type == 2:
          spans.extend((value[0], value[1] - value[0]) for number, wire_type, value
                       in _fields(example, *bytes_list) if number == 1 and wire_type == 2)
  return spans


def _proto_example(serialized: bytes, tfds_id: str) -> tuple[dict, list]:
  """A serialized tf.train.Example -> (its scalar features as _video_fields reads them, with
  'tfds_id'; the values of its 'video' feature)."""
  example = {'tfds_id': tfds_id.encode()}
  video = []
  for key, feature in tf.train.Example.FromString(serialized).features.feature.items():
    kind = feature.WhichOneof('kind')
    values = getattr(feature, kind).value if kind else []
    if key == 'video':
      video = list(values)
    elif len(values) == 1:
      example[key] = values[0]
  return example, video


def index_records(builder, path: str, *, name: str,
                  progress_every_s: float = 10.0) -> frame_store.FrameStore:
  """Writes a frame index of a TFDS video dataset at `path`: a frame store whose frames stay in
  the dataset's record files, found by offset. Nothing is copied; the index is ~16 bytes per
  frame.

  Every record is read once through tf.data, which checks its CRC-32C. The byte span of each
  JPEG frame inside the record is found in the protobuf wire format and checked against the
  parsed example, and its CRC-32 is stored, as a frame store stores it, so a frame read later
  by offset is checked on its own. Each TFDS split becomes a split of the same name, in the
  records' order; videos are named by their 'name' feature where the dataset has one, else by
  the tfds_id TFDS gives them ('<file>__<index>'). The records must stay where they are: the
  store names them relative to `path`, with their sizes, and refuses to open when one changed.
  """
  paths.require_local(builder.data_dir, 'The records to index', frame_store.URL_REMEDY)
  file_format = getattr(builder.info.file_format, 'value', builder.info.file_format)
  if file_format != 'tfrecord':
    raise errors.UserError(f'{builder.info.full_name} is stored as {file_format}; a frame index '
                           'reads TFRecord files (TFDS\'s default file_format).')
  if os.path.lexists(path) and not frame_store.exists(path):
    raise errors.UserError(f'{path} exists but holds no frame index (no {frame_store.INFO_FILE}); '
                           'move it away or delete it, then rerun.')
  features = builder.info.features
  writer = Writer(path, name=name, class_names=features['label'].names,
                  settings={'indexes_records': builder.info.full_name,
                            'frame_geometry': datasets.frame_geometry(builder)})
  done, start = 0, time.monotonic()
  total = builder.info.splits.total_num_examples
  try:
    for split in sorted(builder.info.splits.keys()):
      rows = []
      for file_path in builder.info.splits[split].filepaths:
        file_index = writer.add_external_file(os.fspath(file_path))
        file_name, offset = os.path.basename(os.fspath(file_path)), 0
        records = tf.data.TFRecordDataset(os.fspath(file_path)).as_numpy_iterator()
        for index, record in enumerate(_checked_records(records, file_path)):
          tfds_id = f'{file_name}__{index}'
          example, video = _proto_example(record, tfds_id)
          spans = bytes_feature_spans(record, 'video')
          if not video or [record[a:a + n] for a, n in spans] != video:
            raise errors.UserError(f'Record {tfds_id} of {builder.info.full_name} has no '
                                   "'video' frames where its features say; it cannot be indexed.")
          base = offset + _RECORD_HEADER_BYTES
          rows.append(writer.add_indexed_video(
              file_index, [base + a for a, _ in spans], [n for _, n in spans],
              [zlib.crc32(jpeg) for jpeg in video], jpeg_size(video[0]),
              **_video_fields(example, features)))
          offset += len(record) + _RECORD_FRAMING_BYTES
          done += 1
          elapsed = time.monotonic() - start
          logging.log_every_n_seconds(logging.INFO, 'Indexed %d/%d videos (%.0f videos/s).',
                                      progress_every_s, done, total, done / max(elapsed, 1e-9))
        if offset != os.path.getsize(file_path):
          raise errors.UserError(f'{file_path} holds {os.path.getsize(file_path)} bytes, but its '
                                 f'records end at byte {offset}; it is not a plain TFRecord file.')
      writer.add_split(split, rows)
    logging.info('Indexed %d videos of %s in %.0f s.', done, builder.info.full_name,
                 time.monotonic() - start)
    return writer.finish(replace=frame_store.exists(path))
  except BaseException:
    writer.abort()
    raise


def _checked_records(records, file_path):
  """The records of one file; a record that fails its CRC, or a file that cannot be read, is an
  error naming the file."""
  try:
    yield from records
  except tf.errors.DataLossError as e:
    raise errors.UserError(
        f'{file_path} is truncated or corrupt ({" ".join(e.message.split())[:200]}). Restore '
        'the file from a copy, or rebuild the records (the command that prepared them); '
        'nothing was indexed.') from None
  except tf.errors.OpError as e:
    raise errors.UserError(f'{file_path} cannot be read ({" ".join(e.message.split())[:200]}); '
                           'nothing was indexed.') from None
