"""UCF101 TFDS records built offline from a local UCF101 copy (no downloads).

Two builders, both with the stock TFDS `ucf101` configs (ucf101_1_256, ucf101_1/2/3):

- `LocalUcf101` (name `ucf101`): byte-for-byte the stock TFDS features, so records it writes are
  read by the stock reader (`tfds.builder('ucf101/ucf101_1_256', data_dir=...)`).
- `Ucf101Meta` (name `ucf101_meta`): the stock features plus per-video metadata:
  'name' (e.g. 'v_ApplyEyeMakeup_g08_c01'), 'group' (8), 'clip' (1), 'num_frames', 'fps'.
  Its metadata.json holds the number of videos per (split, group), so the trainer can hold out
  whole groups (people) for validation without reading the records. Read it with
  `config.dataset.name = 'ucf101_meta/ucf101_1_256'`.

And a compact, random-access layout: `prepare_frames` writes a frame store
(har_jax.data.frame_store) `ucf101_frames/s<short_side>` holding every video once, its frames
scaled so the short side is `short_side` pixels with the aspect kept (171x128 for UCF101's
320x240 at 128), extracted by ffmpeg with the stock builder's JPEG settings, and the official
split lists of all three splits ('train1', 'test1', ... 'test3').

The source is what users have: the extracted official `UCF-101/<Class>/*.avi` (from UCF101.rar)
or the flat `UCF101/*.avi` (from the TFDS zip), plus `ucfTrainTestlist/`; or the zip files
themselves (`UCF101_videos.zip`, `UCF101TrainTestSplits-RecognitionTask.zip`), read in place.
"""

import io
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from typing import Optional, Union

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.video import ucf101 as tfds_ucf101

from har_jax import errors
from har_jax.data import datasets
from har_jax.data import frame_store
from har_jax.data.prepare import common
from har_jax.data.prepare import frame_store_writer

CONFIG_NAMES = tuple(c.name for c in tfds_ucf101.Ucf101.BUILDER_CONFIGS)
FRAMES_NAME = datasets.UCF101_FRAMES
SPLIT_NUMBERS = (1, 2, 3)
LIST_DIR = 'ucfTrainTestlist'
GROUP_COUNTS_KEY = 'group_counts'
_NAME_RE = re.compile(r'v_(?P<cls>\w+?)_g(?P<group>\d+)_c(?P<clip>\d+)')
_QUIRK = ('HandStandPushups', 'HandstandPushups')




def check_ffmpeg() -> str:
  """Returns the path of ffmpeg, or raises errors.UserError with install advice."""
  path = shutil.which('ffmpeg')
  if not path:
    raise errors.UserError(
        'ffmpeg was not found on PATH; TFDS needs it to extract the video frames. Install it: '
        "'sudo apt-get install -y ffmpeg' (Debian/Ubuntu), 'brew install ffmpeg' (macOS) or "
        "'conda install -c conda-forge ffmpeg', then rerun.")
  return path


def parse_video_name(name: str) -> dict:
  """'v_ApplyEyeMakeup_g08_c01[.avi]' -> {'name', 'group': 8, 'clip': 1}."""
  stem = os.path.splitext(os.path.basename(name))[0]
  match = _NAME_RE.fullmatch(stem)
  if not match:
    raise errors.UserError(f'Video name {name!r} does not follow the UCF101 v_<Class>_gNN_cNN '
                           'pattern.')
  return {'name': stem, 'group': int(match['group']), 'clip': int(match['clip'])}


def _video_key(file_name: str) -> str:
  """Matching key of a video file name: both HandstandPushups spellings map to one key."""
  return os.path.basename(file_name).replace(*_QUIRK)


_LIST_REMEDY = 'Replace it with the one from UCF101TrainTestSplits-RecognitionTask.zip.'


def unreadable_video_message(file_name: str, source_description: str, error: Exception) -> str:
  """One line: the video that cannot be read, why (the last line of ffmpeg's or PyAV's message),
  and what to do."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return (f'Video {file_name} of {source_description} cannot be read '
          f'({lines[-1] if lines else type(error).__name__}). Replace the file, or remove it and '
          'pass --allow_missing.')


class UcfSource:
  """A local UCF101 copy: split lists and videos, from folders or zip files.

  Args:
    paths: folders and/or zip files. A folder may hold `ucfTrainTestlist/` and `UCF-101/` (or
      `UCF101/`), or the two zip files, or be one of those folders itself.
  """

  def __init__(self, paths: Union[str, list[str]]):
    paths = [paths] if isinstance(paths, str) else list(paths)
    self._lists: dict[str, str] = {}  # list file name -> text
    self._videos: dict[str, tuple[Optional[zipfile.ZipFile], str]] = {}  # key -> (zip, path)
    for path in paths:
      self._add(os.path.expanduser(path))
    self.description = ', '.join(paths)
    if not self._lists:
      raise errors.UserError(
          f'No UCF101 split lists ({LIST_DIR}/trainlist01.txt ...) found in {self.description}. '
          'Pass the folder holding the extracted UCF101 and ucfTrainTestlist folders, or the zip '
          'files UCF101_videos.zip and UCF101TrainTestSplits-RecognitionTask.zip.')
    if not self._videos:
      raise errors.UserError(
          f'No UCF101 .avi videos found in {self.description}. Expected UCF-101/<Class>/*.avi '
          '(extracted from UCF101.rar, e.g. `unrar x UCF101.rar`), UCF101/*.avi or '
          'UCF101_videos.zip.')

  def _add(self, path: str):
    if not os.path.exists(path):
      raise errors.UserError(f'UCF101 source {path!r} does not exist.')
    if os.path.isfile(path):
      if path.lower().endswith('.rar'):
        raise errors.UserError(f'{path!r} is a rar archive; extract it first (`unrar x {path}`) '
                               'and pass the extracted folder.')
      if not zipfile.is_zipfile(path):
        raise errors.UserError(f'{path!r} is neither a folder nor a zip file.')
      self._add_zip(zipfile.ZipFile(path))
      return
    for root, _, files in os.walk(path, followlinks=True):
      for f in files:
        full = os.path.join(root, f)
        if os.path.basename(root) == LIST_DIR and f.endswith('.txt'):
          self._lists[f] = common.read_split_list(full, pathlib.Path(full).read_bytes,
                                                   _LIST_REMEDY)
        elif f.lower().endswith('.avi'):
          self._videos[_video_key(f)] = (None, full)
        elif f.lower().endswith('.zip') and zipfile.is_zipfile(full):
          self._add_zip(zipfile.ZipFile(full))

  def _add_zip(self, archive: zipfile.ZipFile):
    for info in archive.infolist():
      name = info.filename
      if name.endswith('.txt') and os.path.basename(os.path.dirname(name)) == LIST_DIR:
        self._lists[os.path.basename(name)] = common.read_split_list(
            f'{name} in {archive.filename}', lambda name=name: archive.read(name), _LIST_REMEDY)
      elif name.lower().endswith('.avi'):
        self._videos[_video_key(name)] = (archive, name)

  def class_names(self) -> list[str]:
    """Class names in classInd.txt order."""
    text = self._lists.get('classInd.txt', '')
    return [line.split()[1] for line in text.splitlines() if line.strip()]

  def entries(self, list_name: str) -> list[tuple[str, str]]:
    """(class name, video file name) of every line of a split list, e.g. 'trainlist01.txt'."""
    if list_name not in self._lists:
      raise errors.UserError(f'Split list {LIST_DIR}/{list_name} missing from {self.description}; '
                             f'found {sorted(self._lists)}.')
    out = []
    for line in self._lists[list_name].splitlines():
      if line.strip():
        class_dir, file_name = os.path.split(line.split()[0])
        out.append((class_dir, file_name))
    return out

  def has_video(self, file_name: str) -> bool:
    return _video_key(file_name) in self._videos

  def video(self, file_name: str) -> Union[str, bytes]:
    """A path of the video, or its bytes when it lives in a zip."""
    archive, path = self._videos[_video_key(file_name)]
    return path if archive is None else archive.read(path)


def _list_names(split_number: int) -> dict[str, str]:
  return {'train': f'trainlist{split_number:02d}.txt', 'test': f'testlist{split_number:02d}.txt'}


class LocalUcf101(tfds_ucf101.Ucf101, skip_registration=True):
  """Stock TFDS `ucf101` (same name, configs, features), generated from a `UcfSource`."""

  name = 'ucf101'

  def __init__(self, *, source: Optional[UcfSource] = None, allow_missing: bool = False,
               **kwargs):
    self._source = source
    self._allow_missing = allow_missing
    self.current_video = None  # The file of the example being generated and encoded.
    super().__init__(**kwargs)

  def _available_entries(self, split: str) -> list[tuple[str, str]]:
    list_name = _list_names(self.builder_config.split_number)[split]
    entries = self._source.entries(list_name)
    missing = [f for _, f in entries if not self._source.has_video(f)]
    if missing:
      message = (f'{len(missing)} of {len(entries)} videos listed in {LIST_DIR}/{list_name} are '
                 f'missing from {self._source.description}, e.g. {missing[:3]}.')
      if not self._allow_missing:
        raise errors.UserError(message + ' Fix the copy, or pass --allow_missing to build '
                               'without them.')
      logging.warning('%s Building without them (--allow_missing).', message)
    return [(c, f) for c, f in entries if self._source.has_video(f)]

  def _split_generators(self, dl_manager):
    del dl_manager  # Never downloads: everything comes from the local source.
    if self._source is None:
      raise errors.UserError('LocalUcf101 needs source=UcfSource(...) to generate records.')
    return {split: self._generate_examples(entries=self._available_entries(split))
            for split in ('train', 'test')}

  def _example(self, class_name: str, file_name: str) -> dict:
    return {'video': self._source.video(file_name), 'label': class_name}

  def _generate_examples(self, entries):  # pytype: disable=signature-mismatch
    for class_name, file_name in sorted(entries):
      self.current_video = file_name  # TFDS encodes (ffmpeg decodes) each example as it comes.
      # The stock key: the file name with the zip's HandstandPushups spelling.
      yield _video_key(file_name), self._example(class_name, file_name)
    self.current_video = None


def _probe(video: Union[str, bytes]) -> tuple[int, float]:
  """(number of frames, frames per second) of a video file, decoded with PyAV."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(io.BytesIO(video) if isinstance(video, bytes) else video) as container:
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    num_frames = sum(1 for _ in container.decode(stream))
  return num_frames, fps


class Ucf101Meta(LocalUcf101, skip_registration=True):
  """`ucf101` plus 'name', 'group', 'clip', 'num_frames' (source video) and 'fps' features."""

  name = 'ucf101_meta'

  def _info(self):
    stock = super()._info()
    features = dict(stock.features)
    features.update({
        'name': tfds.features.Text(),
        'group': tfds.features.Scalar(np.int32),
        'clip': tfds.features.Scalar(np.int32),
        'num_frames': tfds.features.Scalar(np.int32),
        'fps': tfds.features.Scalar(np.float32),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=stock.description + ' With video name, group, clip, frame '
        'count and fps.', features=tfds.features.FeaturesDict(features),
        homepage=stock.homepage, citation=stock.citation, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    generators = super()._split_generators(dl_manager)
    counts = {}
    for split in generators:
      per_group = {}
      for _, f in self._available_entries(split):
        group = parse_video_name(f)['group']
        per_group[str(group)] = per_group.get(str(group), 0) + 1
      counts[split] = dict(sorted(per_group.items(), key=lambda kv: int(kv[0])))
    self.info.metadata[GROUP_COUNTS_KEY] = counts
    return generators

  def _example(self, class_name: str, file_name: str) -> dict:
    example = super()._example(class_name, file_name)
    num_frames, fps = _probe(example['video'])
    example.update(parse_video_name(file_name))
    example.update({'num_frames': num_frames, 'fps': fps})
    return example


BUILDERS = {'ucf101': LocalUcf101, 'ucf101_meta': Ucf101Meta}


def prepare(source: Union[str, list[str]], data_dir: str, config: str = 'ucf101_1_256', *,
            variant: str = 'ucf101', allow_missing: bool = False,
            num_shards: Optional[int] = None) -> common.PrepareResult:
  """Builds TFDS UCF101 records from a local copy into `data_dir` (idempotent, interrupt-safe).

  `num_shards`: record files per split (default: TFDS's choice by size, 64 MiB to 1 GiB each; one
  file for a split under 128 MiB, such as a small generated set).

  TFDS writes into a sibling `incomplete.*` dir and renames it only once every split is written,
  so an interrupted run never leaves a readable partial dataset; rerunning starts that config over.
  """
  if config not in CONFIG_NAMES:
    raise errors.UserError(f'Unknown UCF101 config {config!r}; use one of {CONFIG_NAMES}.')
  if variant not in BUILDERS:
    raise errors.UserError(f'Unknown variant {variant!r}; use one of {sorted(BUILDERS)}.')
  data_dir = os.path.expanduser(data_dir)
  probe = BUILDERS[variant](config=config, data_dir=data_dir)
  if probe.is_prepared():
    logging.info('%s is already prepared in %s; nothing to do.', probe.info.full_name,
                 probe.data_dir)
    return common.PrepareResult(f'{variant}/{config}', probe.data_dir, _sizes(probe), reused=True)
  check_ffmpeg()
  ucf_source = UcfSource(source)
  builder = BUILDERS[variant](config=config, data_dir=data_dir, source=ucf_source,
                              allow_missing=allow_missing)
  common.remove_stale_incomplete_dirs(builder)
  logging.info('Building %s from %s into %s (ffmpeg extracts every frame; the full UCF101 takes '
               'hours on one machine).', builder.info.full_name, ucf_source.description,
               builder.data_dir)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False,
                                                     num_shards=num_shards or None))
  except (ValueError, OSError) as e:  # ffmpeg (TFDS's Video feature) or PyAV (_probe) failed.
    if builder.current_video is None:
      raise
    raise errors.UserError(unreadable_video_message(builder.current_video, ucf_source.description,
                                                    e)) from None
  return common.PrepareResult(f'{variant}/{config}', builder.data_dir, _sizes(builder),
                              reused=False)


def prepare_frame_index(data_dir: str, config: str = 'ucf101_1_256', *, variant: str = 'ucf101',
                        progress_every_s: float = 10.0) -> common.PrepareResult:
  """Writes the frame index `frame_index/<variant>/<config>` of prepared UCF101 records
  (`frame_store_writer.index_records`: no frame is copied), or reuses the one there when it
  still matches the records; a stale one (records rebuilt since) is replaced."""
  if config not in CONFIG_NAMES:
    raise errors.UserError(f'Unknown UCF101 config {config!r}; use one of {CONFIG_NAMES}.')
  records = f'{variant}/{config}'
  data_dir = os.path.expanduser(data_dir)
  builder = BUILDERS[variant](config=config, data_dir=data_dir)
  if not builder.is_prepared():
    raise errors.UserError(f'{records} is not prepared in {data_dir}, so there is nothing to '
                           'index: build the records first (add --source <UCF101 folder or zips>).')
  return frame_store_writer.prepare_index(builder, data_dir, records,
                                          progress_every_s=progress_every_s)


def _sizes(builder) -> dict:
  return {k: v.num_examples for k, v in builder.info.splits.items()}


def frames_name(short_side: int) -> str:
  """The config.dataset.name of the frame store prepare_frames writes, e.g. 'ucf101_frames/s128'."""
  return f'{FRAMES_NAME}/s{short_side}'


def extract_frames(video: Union[str, bytes], short_side: int) -> list[bytes]:
  """Every frame of a video file as JPEG, short side `short_side` pixels, aspect kept.

  The same ffmpeg call as the stock TFDS builder (`ffmpeg -i <video> -vf scale=... %010d.jpeg`,
  ffmpeg's default JPEG settings), with a scale that keeps the aspect ratio (the other side is
  rounded to the nearest pixel).
  """
  ffmpeg = check_ffmpeg()
  scale = (f"scale='if(gte(iw,ih),-1,{short_side})':'if(gte(iw,ih),{short_side},-1)'")
  with tempfile.TemporaryDirectory() as tmp:
    path = video
    if isinstance(video, bytes):
      path = os.path.join(tmp, 'video.avi')
      with open(path, 'wb') as f:
        f.write(video)
    result = subprocess.run(
        [ffmpeg, '-nostdin', '-loglevel', 'error', '-i', path, '-vf', scale,
         os.path.join(tmp, '%010d.jpeg')], capture_output=True, check=False)
    names = sorted(f for f in os.listdir(tmp) if f.endswith('.jpeg'))
    if result.returncode or not names:
      detail = result.stderr.decode(errors='replace').strip().splitlines()
      raise ValueError(f'ffmpeg extracted no frames ({detail[-1] if detail else "no output"})')
    frames = []
    for name in names:
      with open(os.path.join(tmp, name), 'rb') as f:
        frames.append(f.read())
    return frames


def _video_fps(video: Union[str, bytes]) -> float:
  """Frames per second a video file declares (0 when it does not); decodes nothing."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(io.BytesIO(video) if isinstance(video, bytes) else video) as container:
    stream = container.streams.video[0]
    return float(stream.average_rate or stream.guessed_rate or 0)


def _split_entries(source: UcfSource, allow_missing: bool) -> dict[str, list[tuple[str, str]]]:
  """{'train1': [(class, file)], 'test1': ..., 'test3': ...}, without videos the copy lacks."""
  splits = {}
  for number in SPLIT_NUMBERS:
    for split, list_name in _list_names(number).items():
      entries = source.entries(list_name)
      missing = [f for _, f in entries if not source.has_video(f)]
      if missing:
        message = (f'{len(missing)} of {len(entries)} videos listed in {LIST_DIR}/{list_name} '
                   f'are missing from {source.description}, e.g. {missing[:3]}.')
        if not allow_missing:
          raise errors.UserError(message + ' Fix the copy, or pass --allow_missing to build '
                                 'without them.')
        logging.warning('%s Building without them (--allow_missing).', message)
      splits[f'{split}{number}'] = [(c, f) for c, f in entries if source.has_video(f)]
  return splits


def _frames_settings(source: Union[str, list[str]], short_side: int) -> dict:
  """What a frame store of prepare_frames is made from (saved with it, compared on reuse)."""
  paths = [source] if isinstance(source, str) else list(source)
  return {'source': _normalised_source(', '.join(paths)), 'short_side': short_side,
          'frames': 'ffmpeg, the stock TFDS ucf101 JPEG settings, short side scaled, aspect kept'}


def _normalised_source(description: str) -> str:
  """'a, ~/b' -> '/cwd/a, /home/me/b' (stores written before sources were saved absolute hold
  the paths as given: read them relative to the current folder)."""
  return ', '.join(os.path.abspath(os.path.expanduser(p.strip())) for p in description.split(','))


def _settings_difference(recorded: dict, wanted: dict) -> str:
  """'' when a store made with `recorded` settings is the one `wanted`, else what differs."""
  recorded = dict(recorded or {})
  if 'source' in recorded:
    recorded['source'] = _normalised_source(str(recorded['source']))
  differ = [key for key in ('source', 'short_side') if recorded.get(key) != wanted[key]]
  return '; '.join(f'{key} {recorded.get(key)!r}, not {wanted[key]!r}' for key in differ)


def prepare_frames(source: Union[str, list[str]], data_dir: str, short_side: int = 128, *,
                   allow_missing: bool = False, num_workers: int = 4,
                   progress_every_s: float = 10.0, overwrite: bool = False) -> common.PrepareResult:
  """Writes the frame store `ucf101_frames/s<short_side>` into data_dir (idempotent).

  Every video named by the split lists is extracted once (ffmpeg, num_workers at a time) and
  stored with its label, name, UCF101 group and fps; splits 'train1', 'test1' ... 'test3' list
  the videos of the official splits. The store is written into a `.incomplete-*` folder and
  renamed when complete: an interrupted run leaves nothing readable, and a rerun starts over.
  The store records its source: a store from the same source is reused; one from another source
  is an error unless `overwrite`, which checks the new source first and replaces the old store
  only once the new one is complete.
  """
  if short_side <= 0:
    raise errors.UserError(f'short_side={short_side} must be a positive number of pixels.')
  name = frames_name(short_side)
  path = os.path.join(os.path.expanduser(data_dir), FRAMES_NAME, f's{short_side}')
  settings = _frames_settings(source, short_side)
  exists = frame_store.exists(path)
  if exists and not overwrite:
    store = frame_store.FrameStore(path)
    difference = _settings_difference(store.info.get('settings'), settings)
    if not difference:
      logging.info('%s is already prepared in %s; nothing to do.', name, path)
      return common.PrepareResult(name, path, store.split_sizes, reused=True)
    raise errors.UserError(
        f'{name} in {path} was made with other settings ({difference}); pass --overwrite to '
        'rebuild it from this source, or choose another --data_dir.')
  check_ffmpeg()
  ucf_source = UcfSource(source)
  splits = _split_entries(ucf_source, allow_missing)
  videos = sorted({_video_key(f): (c, f) for entries in splits.values()
                   for c, f in entries}.values(), key=lambda cf: _video_key(cf[1]))
  class_names = LocalUcf101(config='ucf101_1').info.features['label'].names
  unknown = sorted({c for c, _ in videos} - set(class_names))
  if unknown:
    raise errors.UserError(f'The split lists of {ucf_source.description} name classes that UCF101 '
                           f'does not have: {unknown[:5]}.')
  frame_store_writer.remove_incomplete(path)
  writer = frame_store_writer.Writer(path, name=name, class_names=class_names, settings=settings)
  logging.info('Extracting the frames of %d videos from %s into %s (short side %d px%s).',
               len(videos), ucf_source.description, path, short_side,
               '; the store there is replaced once this one is complete' if exists else '')
  try:
    rows = _write_videos(writer, ucf_source, videos, class_names, short_side, num_workers,
                         progress_every_s)
    for split, entries in splits.items():
      writer.add_split(split, [rows[_video_key(f)] for _, f in entries])
    store = writer.finish(replace=exists)
  except BaseException:
    writer.abort()
    raise
  return common.PrepareResult(name, path, store.split_sizes, reused=False)


def _write_videos(writer: frame_store_writer.Writer, source: UcfSource, videos, class_names,
                  short_side: int, num_workers: int, progress_every_s: float) -> dict[str, int]:
  """Extracts and writes every video in order; returns {video key: row}."""

  def extract(file_name):
    video = source.video(file_name)
    try:
      return extract_frames(video, short_side), _video_fps(video)
    except (ValueError, OSError) as e:
      raise errors.UserError(unreadable_video_message(file_name, source.description, e)) from None

  rows, start = {}, time.monotonic()

  def log_progress(every_s: float):
    done, elapsed = len(rows), time.monotonic() - start
    logging.log_every_n_seconds(
        logging.INFO, '%d/%d videos written (%.1f videos/s, %.0f s left).', every_s, done,
        len(videos), done / elapsed, (len(videos) - done) * elapsed / done)

  for (class_name, file_name), (jpegs, fps) in common.ordered_thread_map(
      lambda item: extract(item[1]), videos, num_workers):
    info = parse_video_name(file_name)
    rows[_video_key(file_name)] = writer.add_video(
        jpegs, label=class_names.index(class_name), name=info['name'], group=info['group'],
        fps=fps)
    log_progress(progress_every_s)
  if rows:
    log_progress(0.0)  # The last line, whatever the time since the one before.
  return rows
