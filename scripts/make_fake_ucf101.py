r"""Writes a fake UCF101 copy in the official layout, for tests and input-pipeline benchmarks.

The output looks like what a user gets from the official UCF101.rar plus the recognition split zip:

  <out>/UCF-101/<Class>/v_<Class>_gGG_cCC.avi     320x240 MPEG-4 AVI, 25 fps, written with PyAV
  <out>/ucfTrainTestlist/classInd.txt              '1 ApplyEyeMakeup' ... all 101 classes (CRLF)
  <out>/ucfTrainTestlist/trainlist0{1,2,3}.txt     '<Class>/v_<Class>_g08_c01.avi <label>'
  <out>/ucfTrainTestlist/testlist0{1,2,3}.txt      '<Class>/v_<Class>_g01_c01.avi'

including the official name quirk: class `HandstandPushups` keeps its videos in `HandstandPushups/`
but names them `v_HandStandPushups_*`, and the split lists use that spelling too. Groups follow the
official test groups (split 1: g01-g07, split 2: g08-g14, split 3: g15-g21; the rest train).

With --zips it also writes the two zip files of the TFDS download (`UCF101_videos.zip`, flat
`UCF101/v_*.avi` with the `HandstandPushups` spelling; `UCF101TrainTestSplits-RecognitionTask.zip`).

Two kinds of motion (--motion):

  pan (default): a textured scene under a slow camera pan with a moving, deforming blob (the
    "actor") whose trajectory depends on the class, plus sensor noise, so JPEG sizes and decode
    costs resemble real footage. For input-pipeline tests and benchmarks.
  reversal: a set that only temporal order separates, for accuracy runs. Classes come in
    time-reversal pairs of the built-in synthetic set's mirror-symmetric motions (move up/down,
    grow/shrink, brighten/darken; har_jax/data/prepare/synthetic_actions.py): the k-th class of
    --classes is pair k // 2, played backwards when k is odd, so the frames of the two classes of a
    pair are identically distributed and a model that averages frame features cannot beat chance
    within a pair: at most 50% top-1 with 6 classes (less, where the pairs' frames look alike too).
    Mirror-symmetric, so the UCF101 configs' horizontal flips keep the labels true. At most 6
    classes; each video is rendered square (height x height) and stretched to the width.

  python scripts/make_fake_ucf101.py --out /tmp/fake_ucf101 --classes 2 --groups 1,2,8,9,10 \
      --clips 2 --frames 180
  python scripts/make_fake_ucf101.py --out /tmp/fake_reversal --motion reversal --classes 6 \
      --groups 1-25 --clips 2 --frames 48
"""

import argparse
import os
import zipfile

import av
import numpy as np

OFFICIAL_TEST_GROUPS = {1: range(1, 8), 2: range(8, 15), 3: range(15, 22)}
QUIRK_CLASS, QUIRK_FILE_NAME = 'HandstandPushups', 'HandStandPushups'
DEFAULT_CLASSES = ('ApplyEyeMakeup', QUIRK_CLASS)
FPS = 25
MOTIONS = ('pan', 'reversal')
# synthetic_actions pair indices whose two classes stay apart under a horizontal flip.
MIRROR_SYMMETRIC_PAIRS = (1, 2, 4)  # move up/down, grow/shrink, brighten/darken.
MAX_REVERSAL_CLASSES = 2 * len(MIRROR_SYMMETRIC_PAIRS)


def ucf101_class_names() -> list[str]:
  """The 101 official class names, in classInd.txt order (from the TFDS label file)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = tfds.core.tfds_path('video/ucf101_labels.txt')
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def file_stem(class_name: str, group: int, clip: int) -> str:
  """'v_<Class>_gGG_cCC' with the official HandStandPushups spelling."""
  name = QUIRK_FILE_NAME if class_name == QUIRK_CLASS else class_name
  return f'v_{name}_g{group:02d}_c{clip:02d}'


def _texture(rng, height: int, width: int) -> np.ndarray:
  """[height, width, 3] float32 in [0, 1]: smooth colour noise plus stripes, like a busy scene."""
  cells = rng.random((height // 16 + 2, width // 16 + 2, 3), dtype=np.float32)
  smooth = np.repeat(np.repeat(cells, 16, axis=0), 16, axis=1)[:height, :width]
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  stripes = 0.5 + 0.5 * np.sin((x * rng.uniform(0.05, 0.3) + y * rng.uniform(0.0, 0.2)))
  detail = rng.random((height, width, 1), dtype=np.float32)
  return 0.55 * smooth + 0.3 * stripes[..., None] + 0.15 * detail


def render_video(class_index: int, seed: int, num_frames: int, width: int = 320,
                 height: int = 240) -> np.ndarray:
  """Renders one clip.

  Returns:
    `[num_frames, height, width, 3] uint8` frames.
  """
  rng = np.random.default_rng(seed)
  pan = 48
  scene = _texture(rng, height + pan, width + pan)
  colour = rng.random(3, dtype=np.float32)
  freq = 0.02 + 0.015 * (class_index % 7)
  phase = rng.uniform(0, 2 * np.pi)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  frames = np.empty((num_frames, height, width, 3), np.uint8)
  for t in range(num_frames):
    oy = int(pan / 2 + pan / 2 * np.sin(0.01 * t + phase))
    ox = int(pan * t / max(num_frames - 1, 1))
    frame = scene[oy:oy + height, ox:ox + width].copy()
    cy = height * (0.5 + 0.3 * np.sin(freq * t * (1 + class_index % 3) + phase))
    cx = width * (0.5 + 0.35 * np.cos(freq * t + phase))
    ry, rx = 30 + 10 * np.sin(0.2 * t), 18 + 6 * np.cos(0.15 * t)
    blob = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0
    frame[blob] = colour
    frame += rng.normal(0, 0.02, (height, width, 1)).astype(np.float32)
    frames[t] = np.clip(frame * 255, 0, 255).astype(np.uint8)
  return frames


def render_reversal_video(position: int, seed: int, num_frames: int, width: int = 320,
                          height: int = 240) -> np.ndarray:
  """Renders one clip of the `position`-th class of a reversal set (see the module docstring).

  Returns:
    `[num_frames, height, width, 3] uint8` frames: a synthetic_actions video of pair
    `MIRROR_SYMMETRIC_PAIRS[position // 2]` (reversed for odd `position`), rendered at
    height x height and stretched to the width (nearest neighbour).
  """
  from har_jax.data.prepare import synthetic_actions  # pylint: disable=g-import-not-at-top
  if not 0 <= position < MAX_REVERSAL_CLASSES:
    raise ValueError(f'A reversal set has at most {MAX_REVERSAL_CLASSES} classes; got class '
                     f'position {position}.')
  square = synthetic_actions.render_video(
      np.random.default_rng(seed), MIRROR_SYMMETRIC_PAIRS[position // 2], bool(position % 2),
      num_frames, height)
  return square[:, :, (np.arange(width) * height) // width]


def write_avi(path: str, frames: np.ndarray, fps: int = FPS):
  """Writes `[T, H, W, 3] uint8` frames as an MPEG-4 (XviD-like) AVI with PyAV."""
  with av.open(path, mode='w', format='avi') as container:
    stream = container.add_stream('mpeg4', rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = 'yuv420p'
    stream.bit_rate = 600_000
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _write_lines(path: str, lines: list[str]):
  with open(path, 'w', newline='') as f:
    f.write(''.join(line + '\r\n' for line in lines))


def make_fake_ucf101(out: str, *, classes=DEFAULT_CLASSES, groups=(1, 2, 8, 9), clips: int = 2,
                     frames: int = 180, width: int = 320, height: int = 240,
                     frames_by_video=None, zips: bool = False, motion: str = 'pan') -> dict:
  """Writes the fake copy and returns {'videos': [relative paths], 'class_names': [...]}.

  Args:
    out: output folder (created).
    classes: names of UCF101 classes to fill (others appear in classInd.txt only).
    groups: group numbers (1..25) to write; official split lists decide train/test membership.
    clips: clips per group and class.
    frames: frames per video.
    frames_by_video: optional {file_stem: num_frames} overrides (e.g. very short videos).
    zips: also write UCF101_videos.zip and UCF101TrainTestSplits-RecognitionTask.zip into `out`.
    motion: 'pan' or 'reversal' (see the module docstring).
  """
  names = ucf101_class_names()
  unknown = [c for c in classes if c not in names]
  if unknown:
    raise ValueError(f'Unknown UCF101 class names {unknown}; use names from classInd.txt, e.g. '
                     f'{names[:3]}.')
  if motion not in MOTIONS:
    raise ValueError(f'Unknown motion {motion!r}; use one of {MOTIONS}.')
  if motion == 'reversal' and len(classes) > MAX_REVERSAL_CLASSES:
    raise ValueError(f'--motion reversal makes at most {MAX_REVERSAL_CLASSES} classes (3 '
                     f'mirror-symmetric time-reversal pairs); got {len(classes)}.')
  bad_groups = [g for g in groups if not 1 <= g <= 25]
  if bad_groups:
    raise ValueError(f'UCF101 groups are 1..25, got {bad_groups}.')
  video_root, list_dir = os.path.join(out, 'UCF-101'), os.path.join(out, 'ucfTrainTestlist')
  os.makedirs(list_dir, exist_ok=True)
  _write_lines(os.path.join(list_dir, 'classInd.txt'),
               [f'{i + 1} {n}' for i, n in enumerate(names)])
  entries = []
  for position, class_name in enumerate(classes):
    os.makedirs(os.path.join(video_root, class_name), exist_ok=True)
    for group in groups:
      for clip in range(1, clips + 1):
        stem = file_stem(class_name, group, clip)
        rel = f'{class_name}/{stem}.avi'
        n = (frames_by_video or {}).get(stem, frames)
        seed = names.index(class_name) * 10_000 + group * 100 + clip
        if motion == 'reversal':
          video = render_reversal_video(position, seed, n, width, height)
        else:
          video = render_video(names.index(class_name), seed, n, width, height)
        write_avi(os.path.join(video_root, rel), video)
        entries.append((rel, group, names.index(class_name) + 1))
  for split, test_groups in OFFICIAL_TEST_GROUPS.items():
    _write_lines(os.path.join(list_dir, f'trainlist{split:02d}.txt'),
                 [f'{rel} {label}' for rel, g, label in entries if g not in test_groups])
    _write_lines(os.path.join(list_dir, f'testlist{split:02d}.txt'),
                 [rel for rel, g, _ in entries if g in test_groups])
  if zips:
    _write_zips(out, entries)
  return {'videos': [rel for rel, _, _ in entries], 'class_names': list(classes)}


def _write_zips(out: str, entries):
  """The two zips TFDS downloads: flat UCF101/ videos (HandstandPushups spelling) + split lists."""
  with zipfile.ZipFile(os.path.join(out, 'UCF101_videos.zip'), 'w', zipfile.ZIP_STORED) as z:
    for rel, _, _ in entries:
      flat = os.path.basename(rel).replace(QUIRK_FILE_NAME, QUIRK_CLASS)
      z.write(os.path.join(out, 'UCF-101', rel), f'UCF101/{flat}')
  zip_path = os.path.join(out, 'UCF101TrainTestSplits-RecognitionTask.zip')
  with zipfile.ZipFile(zip_path, 'w', zipfile.ZIP_DEFLATED) as z:
    for name in sorted(os.listdir(os.path.join(out, 'ucfTrainTestlist'))):
      z.write(os.path.join(out, 'ucfTrainTestlist', name), f'ucfTrainTestlist/{name}')


def parse_groups(text: str) -> list[int]:
  """'1,2,8-10' -> [1, 2, 8, 9, 10]."""
  groups = []
  for part in text.split(','):
    low, _, high = part.strip().partition('-')
    groups += list(range(int(low), int(high or low) + 1))
  return groups


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='Output folder.')
  parser.add_argument('--classes', default='2',
                      help='A number N (the first N-1 classes plus HandstandPushups) or a comma '
                           'separated list of UCF101 class names.')
  parser.add_argument('--groups', default='1,2,8,9',
                      help='Comma-separated group numbers 1..25, or ranges such as 1-25.')
  parser.add_argument('--clips', type=int, default=2, help='Clips per class and group.')
  parser.add_argument('--frames', default='180',
                      help='Frames per video (25 fps): N, or a range LO-HI drawn per video '
                           '(seeded, so the same command writes the same copy).')
  parser.add_argument('--width', type=int, default=320)
  parser.add_argument('--height', type=int, default=240)
  parser.add_argument('--zips', action='store_true', help='Also write the two TFDS zip files.')
  parser.add_argument('--motion', default='pan', choices=MOTIONS,
                      help="'pan': class-dependent trajectories over a panning scene (pipeline "
                           "tests, benchmarks); 'reversal': classes that only temporal order "
                           'separates (accuracy runs; at most 6 classes).')
  args = parser.parse_args()
  if args.classes.isdigit():
    n = int(args.classes)
    classes = [c for c in ucf101_class_names() if c != QUIRK_CLASS][:max(n - 1, 0)]
    classes += [QUIRK_CLASS] if n > 0 else []
  else:
    classes = [c.strip() for c in args.classes.split(',') if c.strip()]
  groups = parse_groups(args.groups)
  low, _, high = args.frames.partition('-')
  frames, frames_by_video = int(low), None
  if high:
    rng = np.random.default_rng(0)
    frames_by_video = {file_stem(c, g, k): int(rng.integers(int(low), int(high) + 1))
                       for c in classes for g in groups for k in range(1, args.clips + 1)}
  result = make_fake_ucf101(args.out, classes=classes, groups=groups, clips=args.clips,
                            frames=frames, width=args.width, height=args.height,
                            frames_by_video=frames_by_video, zips=args.zips,
                            motion=args.motion)
  print(f'Wrote {len(result["videos"])} videos of {len(classes)} classes to {args.out}')


if __name__ == '__main__':
  main()
