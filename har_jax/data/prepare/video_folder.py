"""Your own videos as a TFDS dataset (`video_folder/<name>`): a folder of clips sorted by class.

Source layouts (class names are the sorted class folder names, saved with the dataset):

  <root>/<class>/**/<file>.{avi,mp4,mkv,webm,mov}           split by `test_fraction`
  <root>/train/<class>/**/<file>, <root>/test/<class>/**/<file>   split by folder

or the first layout with UCF101-format split lists (`train_list` / `test_list`: lines
'<class>/<file> [label]', paths relative to <root>; a file listed in neither is left out).
The `test_fraction` split is stratified and deterministic: within each class, videos are ordered
by a hash of their path relative to <root>, and the first round(n * test_fraction) (at least one,
and never all) go to test.

Each real file counts once: directory links below a class folder are not followed (a link back up
the tree would loop, one elsewhere in the class folder would count its videos twice, one outside
would give foreign videos this label); each is reported. File links are kept, but the same file
in two classes or splits is an error. A class folder name with a line break or leading/trailing
whitespace is refused (the label file stores one stripped name per line).

Videos are decoded with PyAV (no ffmpeg binary), turned upright, resized so the short side is
`short_side` pixels (aspect kept; 0 keeps the size), optionally subsampled to `fps` frames per
second, and stored as JPEG frames, the feature layout the pipeline reads:

  {'video': Video([T, H, W, 3] uint8, jpeg; H, W vary per video), 'label': ClassLabel,
   'name': Text (path relative to <root>), 'num_frames': int32 (T), 'fps': float32 (of the
   stored frames; 0 when the file does not say)}

Unreadable files (nothing decodes) are skipped with a warning naming each, and listed in the
dataset's metadata.json ('skipped'). Each user dataset is its own BuilderConfig, created when it
is prepared and read back from its folder without the source:

  prepare(VideoFolderConfig(name='lab', source='~/clips'), data_dir)  # Or the prepare script:
  #   python scripts/prepare_video_folder.py --source ~/clips --data_dir <data_dir> --name lab
  builder = load(data_dir, 'lab')   # <data_dir>/video_folder/lab/1.0.0
"""

import collections
import dataclasses
import hashlib
import os
import pathlib
import shutil
import time
import uuid
from typing import Iterator, Optional

from absl import logging
import av
import numpy as np
import tensorflow_datasets as tfds

from har_jax import errors
from har_jax import geometry
from har_jax.data import datasets
from har_jax.data import tfds_records
from har_jax.data.prepare import common
from har_jax.data.prepare import frame_store_writer
from har_jax.video import video_files

NAME = tfds_records.VIDEO_FOLDER_NAME
DATASET_VERSION = datasets.VIDEO_FOLDER_VERSION
VIDEO_EXTENSIONS = ('.avi', '.mp4', '.mkv', '.webm', '.mov')
SPLIT_DIRS = ('train', 'test')
_PROGRESS_EVERY_S = 10.0



@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  """One user dataset. `name` is the dataset name in 'video_folder/<name>'.

  Attributes:
    source: the root folder of the videos.
    short_side: stored short side of every frame, pixels (0: keep the decoded size).
    fps: stored frames per second (0: every decoded frame; never more than the source has).
    test_fraction: fraction of each class put in test, when the layout and lists do not say.
    train_list: optional UCF101-format list of training videos, relative to `source`.
    test_list: optional UCF101-format list of test videos, relative to `source`.
    split_seed: salt of the hash that orders videos for the `test_fraction` split.
    num_workers: videos decoded in parallel (threads).
  """
  source: str = ''
  short_side: int = 128
  fps: float = 0.0
  test_fraction: float = 0.2
  train_list: str = ''
  test_list: str = ''
  split_seed: int = 0
  num_workers: int = 2

  def settings(self) -> dict:
    """The options that determine the records (compared when a prepared dataset is reused)."""
    return {'source': os.path.abspath(self.source), 'short_side': self.short_side,
            'fps': self.fps, 'test_fraction': self.test_fraction, 'train_list': self.train_list,
            'test_list': self.test_list, 'split_seed': self.split_seed}


@dataclasses.dataclass(frozen=True)
class VideoFile:
  path: str  # Absolute path.
  name: str  # Path relative to the source root, '/'-separated.
  label: str  # Class name.


@dataclasses.dataclass(frozen=True)
class Plan:
  """What goes where: class names and the videos of each split, before any decoding."""
  class_names: tuple[str, ...]
  splits: dict  # split name -> [VideoFile], sorted by name.
  layout: str  # 'folders' (train/ and test/), 'lists' or 'fraction'.
  skipped_links: tuple = ()  # (relative name, reason) of each directory link not followed.


@dataclasses.dataclass
class DecodedVideo:
  jpegs: list  # [T] JPEG bytes, frames [H, W, 3] with min(H, W) = short_side.
  fps: float  # Frames per second of the stored frames (0: unknown).


def _is_video(file_name: str) -> bool:
  return file_name.lower().endswith(VIDEO_EXTENSIONS) and not file_name.startswith('.')


def _subdirs(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder)
                if not d.startswith('.') and os.path.isdir(os.path.join(folder, d)))


def _inside(path: str, folder: str) -> bool:
  """True when real path `path` is `folder` or below it."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_reason(link: str, class_root: str) -> str:
  """Why a directory link below a class folder is not followed (its real target decides)."""
  target = os.path.realpath(link)
  if _inside(os.path.realpath(os.path.dirname(link)), target):
    return f'leads back up the tree to {target} (a loop)'
  if _inside(target, class_root):
    return f'leads to {target}, which is scanned anyway'
  return f'leads outside its class folder, to {target}'


def _class_videos(root: str, class_dir: str, prefix: str,
                  skipped_links: list) -> list[VideoFile]:
  """Every video file under root/class_dir (recursively), sorted by relative name.

  Directory links below the class folder are not followed (each is appended to `skipped_links`
  as (relative name, reason)): one leading inside the class folder would count its videos twice
  or loop, one leading outside would label foreign videos with this class. File links are kept.
  """
  out, class_root = [], os.path.realpath(os.path.join(root, class_dir))

  def unreadable(error: OSError):
    logging.warning('Cannot list folder %s (%s); its videos are left out.', error.filename,
                    error.strerror)

  for folder, dirs, files in os.walk(os.path.join(root, class_dir), onerror=unreadable):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for d in sorted(dirs):
      if os.path.islink(os.path.join(folder, d)):
        rel = os.path.relpath(os.path.join(folder, d), root).replace(os.sep, '/')
        skipped_links.append((prefix + rel, _link_reason(os.path.join(folder, d), class_root)))
    for f in files:
      if _is_video(f):
        rel = os.path.relpath(os.path.join(folder, f), root).replace(os.sep, '/')
        out.append(VideoFile(os.path.join(folder, f), prefix + rel, class_dir))
  if not out:
    raise errors.UserError(
        f'Class folder {os.path.join(root, class_dir)!r} holds no video files '
        f'({", ".join(VIDEO_EXTENSIONS)}). Add videos or remove the folder.')
  return sorted(out, key=lambda v: v.name)


def _check_class_name(root: str, class_dir: str):
  """Refuses a folder name that TFDS's ClassLabel file (one stripped name per line) would alter."""
  if '\n' in class_dir or '\r' in class_dir or class_dir != class_dir.strip():
    raise errors.UserError(
        f'Class folder {class_dir!r} in {root!r} has a line break or leading/trailing whitespace '
        'in its name; the dataset stores one class name per line, so every later label would '
        'shift. Please rename the folder.')


def _check_case_clash(root: str, classes: list[str]):
  """Refuses class folders whose names differ only in case (`Walk`, `walk`): two labels for what
  is likely one action, and one folder once copied to a case-insensitive disk."""
  by_folded = collections.defaultdict(list)
  for c in classes:
    by_folded[c.casefold()].append(c)
  clashes = [sorted(names) for names in by_folded.values() if len(names) > 1]
  if clashes:
    named = '; '.join(' and '.join(repr(n) for n in names) for names in sorted(clashes))
    raise errors.UserError(
        f'Class folders {named} in {root!r} differ only in case; they would be separate classes. '
        'Merge them into one folder, or rename one if they really are different actions.')


def _scan_classes(root: str, skipped_links: list,
                  prefix: str = '') -> dict[str, list[VideoFile]]:
  """{class name: videos} of a <root>/<class>/... folder, checked for >= 2 classes.

  A class folder that is a link back up to `root` or above it is skipped and reported in
  `skipped_links` (it would scan every class again); other linked class folders are used.
  """
  classes = []
  for c in _subdirs(root):
    if os.path.islink(os.path.join(root, c)) and _inside(os.path.realpath(root),
                                                          os.path.realpath(os.path.join(root, c))):
      skipped_links.append((prefix + c, _link_reason(os.path.join(root, c), root)))
    else:
      classes.append(c)
  layouts = (f'<root>/<class>/<video>{{{",".join(VIDEO_EXTENSIONS)}}} or '
             '<root>/train/<class>/... and <root>/test/<class>/...')
  if not classes:
    raise errors.UserError(f'No class folders in {root!r}; expected {layouts}.')
  if len(classes) == 1:
    raise errors.UserError(
        f'{root!r} has one class folder ({classes[0]!r}); a classifier needs at least two '
        f'classes. Expected {layouts}.')
  for c in classes:
    _check_class_name(root, c)
  _check_case_clash(root, classes)
  loose = [f for f in os.listdir(root) if _is_video(f)]
  if loose:
    logging.warning('Ignoring %d video files directly in %s (not in a class folder), e.g. %s.',
                    len(loose), root, sorted(loose)[:3])
  return {c: _class_videos(root, c, prefix, skipped_links) for c in classes}


def _unique_files(per_split: dict) -> dict:
  """{split: {class: [VideoFile]}} with each real file once (file links can alias a file).

  A file reached under two names of one class and split is kept under the first name, with a
  warning. The same file in two classes or two splits has no right label or split: an error.
  """
  by_real = collections.defaultdict(list)
  for split, by_class in per_split.items():
    for videos in by_class.values():
      for v in videos:
        by_real[os.path.realpath(v.path)].append((split, v))
  drop = set()
  for real, uses in by_real.items():
    if len(uses) < 2:
      continue
    names = sorted(v.name for _, v in uses)
    if len({(split, v.label) for split, v in uses}) > 1:
      raise errors.UserError(
          f'The same file ({real}) is in more than one class or split, as {names}; it cannot '
          'have one label and one split. Remove all but one of these names.')
    logging.warning('Counting the same file once: %s are one file (%s); using %s.',
                    names, real, names[0])
    drop.update(names[1:])
  return {split: {c: [v for v in videos if v.name not in drop] for c, videos in by_class.items()}
          for split, by_class in per_split.items()}


def _report_links(skipped_links: list):
  for name, reason in skipped_links:
    logging.warning('Not following directory link %s: it %s.', name, reason)


def _read_list(path: str, root: str) -> set[str]:
  """Relative video names of a UCF101-format split list ('<class>/<file> [label]' lines)."""
  if not os.path.isfile(path):
    raise errors.UserError(f'Split list {path!r} does not exist.')
  text = common.read_split_list(
      repr(path), pathlib.Path(path).read_bytes,
      'Save it as UTF-8 text (e.g. `iconv -f latin1 -t utf-8 old.txt > new.txt`).')
  names = {line.split()[0].replace('\\', '/') for line in text.splitlines() if line.strip()}
  bad = sorted(n for n in names if '/' not in n)
  if bad:
    raise errors.UserError(f'Split list {path!r} has lines without a class folder, e.g. '
                           f'{bad[:3]}; each line must be <class>/<file> relative to {root!r}.')
  return names


def _fraction_split(videos: list[VideoFile], fraction: float, seed: int) -> dict:
  """{'train': [...], 'test': [...]} of one class, deterministic given names and seed."""
  def key(v):
    return hashlib.sha1(f'{seed}:{v.name}'.encode()).hexdigest()
  ordered = sorted(videos, key=key)
  num_test = min(max(round(len(ordered) * fraction), 1), len(ordered) - 1)
  if len(ordered) < 2:
    logging.warning('Class %r has one video (%s); it goes to train only.', videos[0].label,
                    videos[0].name)
    num_test = 0
  return {'train': ordered[num_test:], 'test': ordered[:num_test]}


def plan_splits(config: VideoFolderConfig, readable=None) -> Plan:
  """Finds the class names and the videos of each split (no decoding).

  Args:
    config: the dataset config (source, test_fraction, lists, split_seed).
    readable: optional predicate on VideoFile; files failing it are left out before splitting.

  Raises:
    errors.UserError: a missing or empty source, a single class, a class without (readable)
      videos, or inconsistent split options.
  """
  root = os.path.abspath(os.path.expanduser(config.source))
  if not os.path.isdir(root):
    raise errors.UserError(f'Source folder {config.source!r} does not exist or is not a folder; '
                           'pass the folder holding one sub-folder of videos per class.')
  if not 0.0 < config.test_fraction < 1.0:
    raise errors.UserError(f'test_fraction={config.test_fraction} must be in (0, 1).')
  top = set(_subdirs(root))
  links = []  # (relative name, reason) of the directory links not followed.
  has_lists = bool(config.train_list or config.test_list)
  if top & set(SPLIT_DIRS):
    if not set(SPLIT_DIRS) <= top:
      raise errors.UserError(
          f'{root!r} has {sorted(top & set(SPLIT_DIRS))} but not both train/ and test/ folders. '
          'Use <root>/train/<class>/... with <root>/test/<class>/..., or one folder per class.')
    if has_lists:
      raise errors.UserError(f'{root!r} is split into train/ and test/ folders already; do not '
                             'also pass split lists.')
    if top - set(SPLIT_DIRS):
      logging.warning('Ignoring folders %s next to train/ and test/ in %s.',
                      sorted(top - set(SPLIT_DIRS)), root)
    per_split = _unique_files({s: _scan_classes(os.path.join(root, s), links, prefix=s + '/')
                               for s in SPLIT_DIRS})
    _report_links(links)
    extra = sorted(set(per_split['test']) - set(per_split['train']))
    if extra:
      raise errors.UserError(f'Test classes {extra} have no folder in {root}/train/; every test '
                             'class needs training videos.')
    class_names = tuple(sorted(per_split['train']))
    return _checked(Plan(class_names, _filter(per_split, readable), 'folders', tuple(links)),
                    root)
  scanned = _unique_files({'all': _scan_classes(root, links)})['all']
  _report_links(links)
  class_names = tuple(sorted(scanned))
  by_class = _filter({'all': scanned}, readable)['all']
  if has_lists:
    splits = _list_splits(config, root, by_class)
    return _checked(Plan(class_names, splits, 'lists', tuple(links)), root)
  splits = {'train': [], 'test': []}
  for c in class_names:
    videos = [v for v in by_class if v.label == c]
    if videos:
      for split, part in _fraction_split(videos, config.test_fraction, config.split_seed).items():
        splits[split].extend(part)
  return _checked(Plan(class_names, splits, 'fraction', tuple(links)), root)


def _filter(per_split: dict, readable) -> dict:
  """{split: {class: [VideoFile]}} -> {split: [readable VideoFile]} sorted by name."""
  out = {}
  for split, by_class in per_split.items():
    videos = [v for c in sorted(by_class) for v in by_class[c]]
    out[split] = sorted((v for v in videos if readable is None or readable(v)),
                        key=lambda v: v.name)
  return out


def _list_splits(config: VideoFolderConfig, root: str, videos: list[VideoFile]) -> dict:
  listed = {s: _read_list(p, root) for s, p in (('train', config.train_list),
                                                 ('test', config.test_list)) if p}
  both = set.intersection(*listed.values()) if len(listed) == 2 else set()
  if both:
    raise errors.UserError(f'{len(both)} videos are in both split lists, e.g. {sorted(both)[:3]}.')
  present = {v.name for v in videos}
  for split, names in listed.items():
    missing = sorted(names - present)
    if missing:
      logging.warning('%d videos in the %s list are missing or unreadable in %s, e.g. %s.',
                      len(missing), split, root, missing[:3])
  splits = {s: [v for v in videos if v.name in names] for s, names in listed.items()}
  if len(listed) == 1:  # The videos not in the one list form the other split.
    [(only, names)] = listed.items()
    splits['test' if only == 'train' else 'train'] = [v for v in videos if v.name not in names]
  unlisted = len(videos) - sum(len(s) for s in splits.values())
  if unlisted:
    logging.info('%d videos are in neither split list; they are left out.', unlisted)
  return splits


def _checked(plan: Plan, root: str) -> Plan:
  """Raises errors.UserError unless every class has training videos and test is not empty."""
  counts = collections.Counter(v.label for v in plan.splits['train'])
  empty = [c for c in plan.class_names if not counts[c]]
  if empty:
    raise errors.UserError(
        f'Classes {empty} in {root!r} have no readable training videos (see the warnings above '
        'for the files that failed); add videos or remove those class folders.')
  if not plan.splits['test']:
    raise errors.UserError(f'The test split of {root!r} is empty; add test videos.')
  return plan


def decode_video(path: str, short_side: int = 128, fps: float = 0.0,
                 max_frames: Optional[int] = None) -> DecodedVideo:
  """Decodes a video file with PyAV into JPEG frames.

  Args:
    path: the video file.
    short_side: short side of the stored frames, pixels (0: keep the decoded size).
    fps: keep at most this many frames per second (0: keep every frame).
    max_frames: stop after this many kept frames (None: all).

  Returns:
    The JPEG frames and their rate.

  Raises:
    av.error.FFmpegError, video_files.VideoError, ValueError: the file cannot be read (a
      VideoError: not a plain video file) or holds no decodable frame.
  """
  jpegs = []
  with video_files.open_video(path) as container:
    if not container.streams.video:
      raise ValueError('no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    source_fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    keep_all = fps <= 0 or (source_fps and fps >= source_fps)
    period, tolerance = (1.0 / fps if fps > 0 else 0.0), 0.5 / (source_fps or fps or 1.0)
    next_time, first_time = 0.0, None
    for index, frame in enumerate(container.decode(stream)):
      if not keep_all:
        when = frame.time if frame.time is not None else index / (source_fps or fps)
        first_time = when if first_time is None else first_time
        if when - first_time + tolerance < next_time:
          continue
        while next_time <= when - first_time + tolerance:
          next_time += period
      height, width = geometry.short_side_size(frame.height, frame.width, short_side)
      shrink = width * height < frame.width * frame.height
      image = frame.reformat(width=width, height=height, format='rgb24',
                             interpolation='AREA' if shrink else 'BILINEAR').to_ndarray()
      jpegs.append(common.encode_jpeg(video_files.upright(image, getattr(frame, 'rotation', 0))))
      if max_frames and len(jpegs) >= max_frames:
        break
  if not jpegs:
    raise ValueError('no frame could be decoded')
  return DecodedVideo(jpegs, source_fps if keep_all else float(fps))


_DECODE_ERRORS = (av.error.FFmpegError, video_files.VideoError, ValueError, OSError, IndexError)


def _reason(error: Exception) -> str:
  """One line saying why a file failed, without repeating its path."""
  text = getattr(error, 'strerror', None) or str(error) or 'unknown error'
  return f'{type(error).__name__}: {text.splitlines()[0]}'


def check_readable(path: str) -> Optional[str]:
  """None if the first frame of the file decodes, else why not (one line)."""
  try:
    decode_video(path, short_side=16, max_frames=1)
  except _DECODE_ERRORS as e:
    return _reason(e)
  return None


class VideoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of one user dataset; construct with `config=VideoFolderConfig(name=...)`."""

  name = NAME
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: 'Initial release.'}

  def __init__(self, *, config: VideoFolderConfig, **kwargs):
    self.skipped: list[tuple[str, str]] = []  # (name, reason) of every unreadable file.
    self._plan: Optional[Plan] = None
    self._checked = 0
    super().__init__(config=config, **kwargs)

  @property
  def plan(self) -> Plan:
    """The splits of the readable videos; checks every file's first frame on first use."""
    if self._plan is None:
      self._plan = plan_splits(self.builder_config, readable=self._readable)
    return self._plan

  def _readable(self, video: VideoFile) -> bool:
    reason = check_readable(video.path)
    if reason:
      logging.warning('Skipping unreadable video %s: %s', video.path, reason)
      self.skipped.append((video.name, reason))
    self._checked += 1
    logging.log_every_n_seconds(logging.INFO, 'Checked %d video files, %d unreadable.',
                                _PROGRESS_EVERY_S, self._checked, len(self.skipped))
    return reason is None

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Videos from {config.source}, one folder per class (har_jax video_folder).',
        features=tfds.features.FeaturesDict({
            'video': tfds.features.Video(shape=(None, None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=self.plan.class_names),
            'name': tfds.features.Text(),
            'num_frames': tfds.features.Scalar(np.int32),
            'fps': tfds.features.Scalar(np.float32),
        }),
        supervised_keys=('video', 'label'),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    plan = self.plan
    self.info.metadata['settings'] = self.builder_config.settings()
    self.info.metadata['layout'] = plan.layout
    self.info.metadata['skipped'] = self.skipped  # Grows while generating; saved at the end.
    self.info.metadata['skipped_links'] = [list(link) for link in plan.skipped_links]
    logging.info('%d classes; %s videos; %d unreadable so far.', len(plan.class_names),
                 {s: len(v) for s, v in plan.splits.items()}, len(self.skipped))
    return {split: self._generate_examples(split, videos) for split, videos in plan.splits.items()}

  def _decoded(self, videos: list[VideoFile]) -> Iterator[tuple[VideoFile, object]]:
    """(video, DecodedVideo or the exception) in order, decoding up to num_workers at once."""
    config = self.builder_config

    def decode(video):
      try:
        return decode_video(video.path, config.short_side, config.fps)
      except _DECODE_ERRORS as e:
        return e

    return common.ordered_thread_map(decode, videos, config.num_workers)

  def _generate_examples(self, split: str, videos: list):  # pytype: disable=signature-mismatch
    written = 0
    for index, (video, decoded) in enumerate(self._decoded(videos), start=1):
      if isinstance(decoded, Exception):
        reason = _reason(decoded)
        logging.warning('Skipping unreadable video %s: %s', video.path, reason)
        self.skipped.append((video.name, reason))
        continue
      written += 1
      yield video.name, {'video': decoded.jpegs, 'label': video.label, 'name': video.name,
                         'num_frames': len(decoded.jpegs), 'fps': decoded.fps}
      logging.log_every_n_seconds(logging.INFO, '%s: %d/%d videos decoded, %d written.',
                                  0 if index == len(videos) else _PROGRESS_EVERY_S, split, index,
                                  len(videos), written)


# Reading a prepared dataset is the data layer's (har_jax.data.datasets); the same functions here.
dataset_dir = datasets.video_folder_dir
check_name = datasets.check_video_folder_name
load = datasets.load_video_folder


def prepare(config: VideoFolderConfig, data_dir: str, *,
            overwrite: bool = False) -> common.PrepareResult:
  """Builds `video_folder/<config.name>` into data_dir; reruns reuse or finish it.

  TFDS writes into a sibling `incomplete.*` folder and renames it when every split is written, so
  an interrupted run leaves nothing readable; a rerun removes the leftover and starts over. A
  finished dataset with the same settings is reused; different settings need overwrite=True,
  which checks the source first and builds the new dataset beside the old one (in
  `<version folder>.incomplete-<id>`): the old one is replaced only once the new one is complete.
  """
  check_name(config.name)
  path = dataset_dir(data_dir, config.name)
  replacing = os.path.isfile(os.path.join(path, 'dataset_info.json'))
  if replacing:
    existing = tfds.builder_from_directory(path)
    metadata = existing.info.metadata or {}
    if not overwrite and metadata.get('settings') == config.settings():
      logging.info('video_folder/%s is already prepared in %s; nothing to do.', config.name, path)
      return _result(existing, path, [tuple(s) for s in metadata.get('skipped', [])], True)
    if not overwrite:
      raise errors.UserError(
          f'video_folder/{config.name} in {path} was prepared with other settings '
          f'{metadata.get("settings")}; pass --overwrite to rebuild it, or choose another --name.')
  frame_store_writer.remove_incomplete(path)
  staging = f'{path}.incomplete-{uuid.uuid4().hex[:8]}' if replacing else None
  try:
    builder = VideoFolder(config=config, data_dir=staging or os.path.expanduser(data_dir))
    common.remove_stale_incomplete_dirs(builder)
    start = time.perf_counter()
    logging.info('Checking and building video_folder/%s from %s into %s.', config.name,
                 config.source, path)
    _ = builder.plan  # Checks the folder and every file's first frame before writing anything.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    if staging:
      logging.info('Replacing %s with the rebuilt dataset (overwrite).', path)
      frame_store_writer.replace_folder(os.fspath(builder.data_path), path)
  finally:
    if staging:
      shutil.rmtree(staging, ignore_errors=True)
  if builder.skipped:
    logging.warning('Skipped %d unreadable video file(s): %s', len(builder.skipped),
                    ', '.join(n for n, _ in builder.skipped))
  logging.info('Built video_folder/%s in %.1f s.', config.name, time.perf_counter() - start)
  return _result(load(data_dir, config.name), path, list(builder.skipped), False)


def _result(builder, path: str, skipped: list, reused: bool) -> common.PrepareResult:
  links = (builder.info.metadata or {}).get('skipped_links', [])
  return common.PrepareResult(
      name=f'{NAME}/{builder.info.config_name}', data_dir=path,
      class_names=tuple(builder.info.features['label'].names),
      split_sizes={k: v.num_examples for k, v in builder.info.splits.items()},
      skipped=skipped, reused=reused, skipped_links=[tuple(link) for link in links])
