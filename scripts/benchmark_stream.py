r"""Per-frame cost of streaming recognition (har_jax.streaming.Recogniser) on this machine.

  python scripts/benchmark_stream.py [--models=small_cnn,resnet18] [--frames=120] [--rounds=3] \
      [--conv_impls=auto,xla]

Models, each with random-init weights (speed does not depend on their values; the model
functions are timed directly through a Recogniser built on an in-memory LoadedModel, no
checkpoint is read):
  small_cnn: configs/synthetic.py: 64x64 source frames (the synthetic set's), squashed and decoded
    to 32x32 as in training, 28x28 centre crop, 8 frames at stride 2, LSTM 128, 10 classes.
  resnet18: configs/default.py: 320x240 source frames (UCF101's), squashed to 256x256 and decoded
    at 128x128 as the TFDS records are, 112x112 centre crop, 16 frames at stride 2, LSTM 512,
    101 classes.
Source frames are yuv420p av.VideoFrames, as a decoder hands them over (decoding itself runs on
the reader thread of scripts/stream.py and is not counted).

Printed per model (medians over --rounds rounds of --frames source frames, after a warm-up):
  preprocess_ms: one kept frame scaled, resized and centre-cropped (predict.scaled_rgb and
    predict.eval_views, as clip-mode prediction does);
  encoder_ms: one encoder pass on one frame; lstm_ms: the LSTM and head over the window;
  latency_ms: their sum, what a new kept frame adds before its probabilities are out;
  kept_per_s, source_per_s: frames pushed back to back (Recogniser.push): kept (encoded) frames
    per second, and source frames per second (the stride skips the others at no cost).
"""

import dataclasses
import functools
import os
import statistics
import time

from absl import app
from absl import flags
import av
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from configs import default
from configs import synthetic
from har_jax import cli
from har_jax import inference
from har_jax import models
from har_jax import streaming
from har_jax.data.prepare import synthetic_actions
from har_jax.models.cpu_kernels import conv as conv_lib

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['small_cnn', 'resnet18'], 'Which of small_cnn, resnet18 to time.')
flags.DEFINE_integer('frames', 120, 'Source frames pushed per round.', lower_bound=1)
flags.DEFINE_integer('rounds', 3, 'Rounds per model; figures are medians.', lower_bound=1)
flags.DEFINE_list('conv_impls', ['auto', 'xla'], 'Encoder convolutions to time each model with '
                  "(config.model.conv_impl; 'auto' is the configs' own: 'cpu' on a CPU).")


@dataclasses.dataclass(frozen=True)
class Setup:
  config_module: object
  num_classes: int
  geometry: dict  # The training frames' geometry (inference.Preprocessing.frame_geometry).
  source_size: tuple[int, int]  # (height, width) of the source frames.


SETUPS = {
    'small_cnn': Setup(synthetic, len(synthetic_actions.CLASS_NAMES),
                       {'resize': 'squash', 'size': [64, 64]}, (64, 64)),
    'resnet18': Setup(default, 101, {'resize': 'squash', 'size': [256, 256]}, (240, 320)),
}


def random_model(setup: Setup, conv_impl: str) -> inference.LoadedModel:
  """A LoadedModel of the setup's config with random-init weights (no checkpoint)."""
  config = setup.config_module.get_config()
  config.model.conv_impl = conv_impl
  model = models.create_model(config.model, setup.num_classes, dtype=config.dtype)
  clip = jnp.zeros((1, config.num_frames, config.image_size, config.image_size, 3), jnp.uint8)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), clip)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return inference.LoadedModel(
      workdir='', step=0, config=config,
      class_names=tuple(f'class_{i}' for i in range(setup.num_classes)), model=model,
      variables=jax.device_get(variables),
      preprocessing=inference.Preprocessing.from_config(config, setup.geometry))


def source_frames(setup: Setup, count: int) -> list:
  """`count` yuv420p av.VideoFrames of the setup's source size (moving synthetic actions)."""
  height, width = setup.source_size
  rng = np.random.default_rng(0)
  frames = []
  while len(frames) < count:
    video = synthetic_actions.render_video(rng, len(frames) % 5, False, 16, max(height, width))
    for rgb in video[:, :height, :width]:
      frames.append(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb),
                                               format='rgb24').reformat(format='yuv420p'))
  return frames[:count]


def time_stages(recogniser: streaming.Recogniser, frames: list) -> dict:
  """Median milliseconds per kept frame of each stage, called one after the other."""
  times = {'preprocess_ms': [], 'encoder_ms': [], 'lstm_ms': []}
  window = recogniser.window()
  for frame in frames[::recogniser.frame_stride]:
    start = time.perf_counter()
    view = recogniser.frame_view(frame)
    encoded = time.perf_counter()
    recogniser.encode(view)
    classified = time.perf_counter()
    recogniser.classify(window)
    end = time.perf_counter()
    times['preprocess_ms'].append(encoded - start)
    times['encoder_ms'].append(classified - encoded)
    times['lstm_ms'].append(end - classified)
  return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def time_pushes(recogniser: streaming.Recogniser, frames: list) -> dict:
  """Frames pushed back to back: kept and source frames per second."""
  encoded = recogniser.encoded
  start = time.perf_counter()
  for frame in frames:
    recogniser.push(frame)
  seconds = time.perf_counter() - start
  return {'kept_per_s': (recogniser.encoded - encoded) / seconds,
          'source_per_s': len(frames) / seconds}


def benchmark(name: str, frames_per_round: int, rounds: int, conv_impl: str) -> dict:
  setup = SETUPS[name]
  model = random_model(setup, conv_impl)
  recogniser = streaming.Recogniser(model)
  recogniser.warm_up()
  p = recogniser.preprocessing
  frames = source_frames(setup, max(frames_per_round, p.num_frames * p.frame_stride))
  for frame in frames[:p.num_frames * p.frame_stride]:  # Fill the window.
    recogniser.push(frame)
  results = []
  for _ in range(rounds):
    results.append({**time_stages(recogniser, frames), **time_pushes(recogniser, frames)})
  medians = {k: statistics.median(r[k] for r in results) for k in results[0]}
  medians['latency_ms'] = medians['preprocess_ms'] + medians['encoder_ms'] + medians['lstm_ms']
  height, width = setup.source_size
  medians['setting'] = (f'{width}x{height} -> {p.image_size}x{p.image_size}, {p.num_frames} '
                        f'frames at stride {p.frame_stride}, conv_impl={conv_impl} '
                        f'({conv_lib.resolve_conv_impl(conv_impl)})')
  return medians


def main(argv):
  del argv
  tf.config.set_visible_devices([], 'GPU')
  for flag, given, known in (('models', FLAGS.models, sorted(SETUPS)),
                             ('conv_impls', FLAGS.conv_impls, conv_lib.CONV_IMPLS)):
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise app.UsageError(f'--{flag}: unknown {unknown}; choose from {list(known)}.')
  print(f'device={jax.devices()[0].device_kind} cpus={os.cpu_count()} '
        f'load_average_before={os.getloadavg()[0]:.2f}', flush=True)
  for name in FLAGS.models:
    for conv_impl in FLAGS.conv_impls:
      r = benchmark(name, FLAGS.frames, FLAGS.rounds, conv_impl)
      print(f"{name} ({r['setting']}): preprocess_ms={r['preprocess_ms']:.2f} "
            f"encoder_ms={r['encoder_ms']:.2f} lstm_ms={r['lstm_ms']:.2f} "
            f"latency_ms={r['latency_ms']:.2f} kept_per_s={r['kept_per_s']:.1f} "
            f"source_per_s={r['source_per_s']:.1f}", flush=True)
  print(f'load_average_after={os.getloadavg()[0]:.2f}', flush=True)
  return 0


if __name__ == '__main__':
  cli.run(main)
