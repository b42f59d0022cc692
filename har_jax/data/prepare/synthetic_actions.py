"""Synthetic action-recognition videos as a TFDS dataset (`synthetic_actions`).

Ten classes in five time-reversal pairs. A video of the second class of a pair
is an identically distributed "forward" video of the pair played backwards, so
within a pair the multiset of frames has the same distribution for both classes
and only the temporal order tells them apart. A frame-averaging model can tell
the pairs apart but cannot beat chance inside a pair.

Each video shows one textured object (square, disc, triangle, cross, diamond
or bar; an orbiting one revolves around the frame centre and spins with its path)
on a random textured background (gradient, stripes or smooth noise), an
optional small distractor on a random walk, a random lighting gain and
per-frame Gaussian pixel noise. Frames are stored as JPEG, with the same
features as TFDS `ucf101`:

  {'video': Video([T, H, W, 3] uint8, jpeg), 'label': ClassLabel(10)}

Configs (rendering is deterministic given `seed`; example `i` of split `s` uses
`np.random.default_rng([seed, s, i])` and has label `i % 10`):

  default: 2400 train / 600 test videos, 16 frames of 64x64, 111 MB.
           Generation takes about 40 s of CPU time (9 ms per video to render
           and JPEG-encode, the rest TFDS): 39 s wall on the idle 2-core dev
           machine, 97 s while other jobs loaded it (load average 10).
  tiny:    40 train / 20 test videos, 8 frames of 32x32, for tests.

Usage:

  builder = synthetic_actions.prepare(data_dir, 'default')
  ds = builder.as_dataset(split='train')
"""

import dataclasses
import time

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from har_jax.data import synthetic_classes
from har_jax.data.prepare import common

CLASS_NAMES = synthetic_classes.CLASS_NAMES
REVERSAL_PAIRS = synthetic_classes.REVERSAL_PAIRS

_SHAPES = ('square', 'disc', 'triangle', 'cross', 'diamond', 'bar')


@dataclasses.dataclass
class SyntheticActionsConfig(tfds.core.BuilderConfig):
  """Size of the generated dataset.

  Attributes:
    num_train: number of training videos.
    num_test: number of test videos.
    num_frames: frames per video.
    resolution: frame height and width, pixels.
    seed: base seed of every per-example RNG.
  """
  num_train: int = 2400
  num_test: int = 600
  num_frames: int = 16
  resolution: int = 64
  seed: int = 0


def _bilinear_matrix(num_out: int, num_in: int) -> np.ndarray:
  """Returns [num_out, num_in] weights that linearly resample a 1-D signal."""
  pos = np.linspace(0.0, num_in - 1.0, num_out)
  lo = np.minimum(np.floor(pos).astype(int), num_in - 2)
  frac = pos - lo
  matrix = np.zeros((num_out, num_in), np.float32)
  matrix[np.arange(num_out), lo] = 1.0 - frac
  matrix[np.arange(num_out), lo + 1] = frac
  return matrix


def _smooth_noise(rng, resolution: int, cells: int) -> np.ndarray:
  """Returns [H, W] smooth noise in [0, 1], bilinear over a cells^2 grid."""
  grid = rng.random((cells, cells), dtype=np.float32)
  interp = _bilinear_matrix(resolution, cells)
  return interp @ grid @ interp.T


def _random_colour_pair(rng, min_distance: float):
  """Returns two RGB colours in [0, 1] at least min_distance apart."""
  first = rng.random(3, dtype=np.float32)
  for _ in range(20):
    second = rng.random(3, dtype=np.float32)
    if np.linalg.norm(first - second) >= min_distance:
      break
  return first, second


def _object_colours(rng, background_mean: np.ndarray):
  """Returns two RGB colours in [0, 1], the first far from background_mean."""
  for _ in range(20):
    first = rng.random(3, dtype=np.float32)
    if np.linalg.norm(first - background_mean) >= 0.5:
      break
  for _ in range(20):
    second = rng.random(3, dtype=np.float32)
    if np.linalg.norm(first - second) >= 0.4:
      break
  return first, second


def _background(rng, resolution: int) -> np.ndarray:
  """Returns a [H, W, 3] float32 textured background in [0, 1]."""
  y, x = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / resolution
  angle = rng.uniform(0.0, 2.0 * np.pi)
  along = x * np.cos(angle) + y * np.sin(angle)
  kind = rng.integers(3)
  if kind == 0:
    weight = (along - along.min()) / (along.max() - along.min())
  elif kind == 1:
    period = max(rng.uniform(0.1, 0.4), 5.0 / resolution)
    weight = 0.5 + 0.5 * np.sin(2.0 * np.pi * along / period + rng.uniform(0, 7))
  else:
    weight = _smooth_noise(rng, resolution, int(rng.integers(3, 9)))
  weight = weight * rng.uniform(0.2, 0.7)
  colour_a, colour_b = _random_colour_pair(rng, 0.3)
  return colour_a + (colour_b - colour_a) * weight[..., None]


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Returns a distance in object units that is <= 1 inside the shape."""
  if shape == 'square':
    return np.maximum(np.abs(u), np.abs(v)) * 1.15
  if shape == 'disc':
    return np.sqrt(u * u + v * v)
  if shape == 'bar':
    return np.maximum(np.abs(u), np.abs(v) / 0.45)
  if shape == 'diamond':
    return np.abs(u) + np.abs(v)
  if shape == 'cross':
    arm = 0.4
    return np.minimum(np.maximum(np.abs(u), np.abs(v) / arm),
                      np.maximum(np.abs(u) / arm, np.abs(v)))
  # Equilateral triangle with inradius 0.6, vertex pointing up.
  normals = np.array([[0.0, 1.0], [0.866, -0.5], [-0.866, -0.5]], np.float32)
  return np.max([n[0] * u + n[1] * v for n in normals], axis=0) / 0.6


def _object_texture(rng, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Returns a [T, h, w] texture weight in {0, 1} in object coordinates."""
  kind = rng.integers(3)
  if kind == 0:
    return (np.sin(2.0 * np.pi * u * rng.uniform(0.8, 2.0)) > 0).astype(np.float32)
  if kind == 1:
    return ((np.floor(u * 1.5 + 10) + np.floor(v * 1.5 + 10)) % 2).astype(np.float32)
  return (u > rng.uniform(-0.3, 0.3)).astype(np.float32)


def _forward_motion(rng, pair_index: int, num_frames: int, resolution: int):
  """Returns per-frame centre x, centre y, size, angle, gain; each [T] float32.

  Sizes, positions in pixels; angle in radians, increasing = clockwise on screen.
  """
  r = float(resolution)
  tau = np.linspace(0.0, 1.0, num_frames) ** rng.uniform(0.8, 1.25)
  size = np.full(num_frames, rng.uniform(0.14, 0.22) * r)
  angle = np.full(num_frames, rng.uniform(0.0, 2.0 * np.pi))
  gain = np.full(num_frames, rng.uniform(0.7, 1.05))
  drift = rng.uniform(-0.06, 0.06, size=2) * r
  if pair_index == 2:  # grow
    size = rng.uniform(0.08, 0.12) * r + tau * rng.uniform(0.16, 0.24) * r
  elif pair_index == 3:  # orbit clockwise around the frame centre, spinning along
    arc = tau * np.deg2rad(rng.uniform(150.0, 240.0))
    phase = rng.uniform(0.0, 2.0 * np.pi) + arc
    radius = rng.uniform(0.2, 0.27) * r
    size = np.full(num_frames, rng.uniform(0.12, 0.17) * r)
    angle = angle + arc
    return [np.asarray(a, np.float32) for a in (
        r / 2 + radius * np.cos(phase), r / 2 + radius * np.sin(phase), size, angle, gain)]
  elif pair_index == 4:  # brighten
    gain = rng.uniform(0.35, 0.55) + tau * rng.uniform(0.5, 0.75)
  margin = size.max() * 0.8
  if pair_index in (0, 1):  # move left / move up
    travel = rng.uniform(0.35, 0.6) * r
    start = rng.uniform(margin + travel, r - margin)
    along = start - tau * travel
    across = rng.uniform(margin, r - margin) + tau * drift[0]
    centre_x, centre_y = (along, across) if pair_index == 0 else (across, along)
  else:
    centre_x = rng.uniform(margin, r - margin) + tau * drift[0]
    centre_y = rng.uniform(margin, r - margin) + tau * drift[1]
  return [np.asarray(a, np.float32) for a in (centre_x, centre_y, size, angle, gain)]


def _box(centre: np.ndarray, extent, resolution: int) -> slice:
  """Returns the pixel slice covering centre +- extent in every frame."""
  lo = int(np.floor(np.min(centre - extent)))
  hi = int(np.ceil(np.max(centre + extent))) + 1
  return slice(min(max(lo, 0), resolution), min(max(hi, 0), resolution))


def render_video(rng: np.random.Generator, pair_index: int, reverse: bool,
                 num_frames: int, resolution: int) -> np.ndarray:
  """Renders one video of class `REVERSAL_PAIRS[pair_index][int(reverse)]`.

  A forward video of the pair is drawn from `rng`; `reverse` plays it backwards.

  Args:
    rng: source of all randomness of this video.
    pair_index: index into `REVERSAL_PAIRS`, 0..4.
    reverse: whether to reverse the frame order.
    num_frames: T, frames in the video.
    resolution: H = W, pixels.

  Returns:
    [T, H, W, 3] uint8 frames.
  """
  centre_x, centre_y, size, angle, gain = _forward_motion(
      rng, pair_index, num_frames, resolution)
  frames = np.repeat(_background(rng, resolution)[None], num_frames, axis=0)
  pixel = np.arange(resolution, dtype=np.float32) + 0.5

  extent = 1.3 * size + 1.0
  rows = _box(centre_y, extent, resolution)
  cols = _box(centre_x, extent, resolution)
  dx = pixel[None, None, cols] - centre_x[:, None, None]
  dy = pixel[None, rows, None] - centre_y[:, None, None]
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  scale = size[:, None, None]
  u = (dx * cos + dy * sin) / scale
  v = (dy * cos - dx * sin) / scale
  distance = _shape_distance(_SHAPES[rng.integers(len(_SHAPES))], u, v)
  alpha = np.clip((1.0 - distance) * scale + 0.5, 0.0, 1.0)[..., None]
  texture = _object_texture(rng, u, v)[..., None]
  texture = texture * rng.uniform(0.5, 0.9)
  colour_a, colour_b = _object_colours(rng, frames[0].mean(axis=(0, 1)))
  region = frames[:, rows, cols]
  region += alpha * (colour_a + (colour_b - colour_a) * texture - region)

  if rng.random() < 0.5:  # Distractor: a small disc on a random walk.
    steps = rng.normal(0.0, 0.015 * resolution, size=(num_frames, 2))
    path = rng.uniform(0.1, 0.9, size=2) * resolution + np.cumsum(steps, axis=0)
    path = path.astype(np.float32)
    radius = rng.uniform(0.04, 0.07) * resolution
    rows = _box(path[:, 1], radius + 1.0, resolution)
    cols = _box(path[:, 0], radius + 1.0, resolution)
    dist = np.hypot(pixel[None, None, cols] - path[:, 0, None, None],
                    pixel[None, rows, None] - path[:, 1, None, None])
    d_alpha = np.clip(radius - dist + 0.5, 0.0, 1.0)[..., None]
    region = frames[:, rows, cols]
    region += d_alpha * (rng.random(3, dtype=np.float32) - region)

  frames *= 255.0 * gain[:, None, None, None]
  noise_std = 255.0 * rng.uniform(0.01, 0.03)
  frames += noise_std * rng.standard_normal(frames.shape[:-1] + (1,), np.float32)
  frames += 0.5
  np.clip(frames, 0.0, 255.0, out=frames)
  video = frames.astype(np.uint8)
  return video[::-1].copy() if reverse else video


class SyntheticActions(tfds.core.GeneratorBasedBuilder):
  """Synthetic videos whose classes differ only in temporal order within pairs."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SyntheticActionsConfig(
          name='default', description='2400/600 videos of 16x64x64.',
          num_train=2400, num_test=600, num_frames=16, resolution=64, seed=0),
      SyntheticActionsConfig(
          name='tiny', description='40/20 videos of 8x32x32, for tests.',
          num_train=40, num_test=20, num_frames=8, resolution=32, seed=1),
  ]
  DEFAULT_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    res = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=(
            'Synthetic action videos: 10 classes in 5 time-reversal pairs '
            f'({", ".join(CLASS_NAMES)}). Within a pair only the temporal '
            'order of the frames differs.'),
        features=tfds.features.FeaturesDict({
            'video': tfds.features.Video(
                shape=(None, res, res, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('video', 'label'),
        homepage=None,
        citation=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
        'train': self._generate_examples(0, config.num_train),
        'test': self._generate_examples(1, config.num_test),
    }

  def _generate_examples(self, split_index: int, num_examples: int):
    config = self.builder_config
    for index in range(num_examples):
      label = index % len(CLASS_NAMES)
      rng = np.random.default_rng([config.seed, split_index, index])
      video = render_video(rng, label // 2, bool(label % 2),
                           config.num_frames, config.resolution)
      jpegs = [common.encode_jpeg(f, full_chroma=True) for f in video]
      yield index, {'video': jpegs, 'label': label}


def prepare(data_dir: str,
            config_name: str = 'default') -> tfds.core.DatasetBuilder:
  """Generates `synthetic_actions/<config_name>` under data_dir unless present.

  Args:
    data_dir: TFDS data directory.
    config_name: a name from `SyntheticActions.BUILDER_CONFIGS`.

  Returns:
    The prepared builder.
  """
  builder = SyntheticActions(config=config_name, data_dir=data_dir)
  if builder.is_prepared():
    logging.info('Reusing synthetic_actions/%s at %s.', config_name,
                 builder.data_dir)
    return builder
  config = builder.builder_config
  logging.info(
      'Generating synthetic_actions/%s (%d train + %d test videos of %dx%dx%d) '
      'into %s.', config_name, config.num_train, config.num_test,
      config.num_frames, config.resolution, config.resolution, builder.data_dir)
  start = time.perf_counter()
  builder.download_and_prepare()
  logging.info('Generated synthetic_actions/%s in %.1f s.', config_name,
               time.perf_counter() - start)
  return builder
