r"""Converts a Keras Applications ImageNet backbone into a har_jax encoder checkpoint.

  # Online: Keras downloads the ImageNet weights (~95 MB for ResNet50, cached in ~/.keras).
  python scripts/convert_keras_encoder.py --arch=resnet50 --out=pretrained/resnet50_keras_imagenet

  # Offline: a weights file downloaded elsewhere, e.g. from
  # https://storage.googleapis.com/tensorflow/keras-applications/resnet/
  #   resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5  (with or without the top)
  python scripts/convert_keras_encoder.py --arch=resnet50 --out=pretrained/resnet50_keras_imagenet \
      --keras_weights=resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5

Then train with configs/ucf101_resnet50_imagenet.py (config.model.encoder_init = the --out path).
The checkpoint records the encoder, its kwargs and the preprocessing the weights expect ('caffe').
By default the script also runs random images through the Keras model and the converted encoder
and fails if their pooled features differ by more than --max_relative_error.
"""

import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from har_jax import cli
from har_jax import pretrained

FLAGS = flags.FLAGS

flags.DEFINE_enum('arch', 'resnet50', sorted(pretrained.KERAS_ARCHS), 'Keras Applications model.')
flags.DEFINE_string('out', None, 'Directory to write the encoder checkpoint to (must not exist).')
flags.DEFINE_string('keras_weights', None,
                    "A Keras weights file (.h5). Default: Keras' weights='imagenet' (online).")
flags.DEFINE_bool('check_parity', True, 'Compare Keras and har_jax features on random images.')
flags.DEFINE_integer('parity_image_size', 112, 'Height and width of the parity-check images.')
flags.DEFINE_float('max_relative_error', 1e-4,
                   'Parity tolerance: max |har_jax - keras| / max |keras| over pooled features.')


def parity_error(keras_model, variables: dict, meta: dict, *, image_size: int = 112,
                 num_images: int = 2, seed: int = 0) -> float:
  """Relative difference of the pooled features of both models on random preprocessed images.

  Images are uniform 0..255 pixels minus the 'caffe' means, i.e. what both models receive.
  """
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 255, (num_images, image_size, image_size, 3)).astype(np.float32)
  images -= np.asarray((103.939, 116.779, 123.68), np.float32)
  reference = np.asarray(keras_model(images, training=False))
  ours = pretrained.encoder_features(variables, meta, images)
  return pretrained.relative_error(ours, reference)


def convert(arch: str, out: str, keras_weights=None, *, check_parity: bool = True,
            parity_image_size: int = 112, max_relative_error: float = 1e-4) -> dict:
  """Converts `arch` (weights from `keras_weights`, else 'imagenet') and writes it to `out`.

  Returns:
    The checkpoint's meta, plus 'parity_relative_error' when checked.
  Raises:
    FileExistsError if `out` exists; RuntimeError if the parity check fails (nothing written).
  """
  if os.path.exists(out):
    raise FileExistsError(f'{out} exists; choose a new --out.')
  variables, meta, keras_model = pretrained.convert_keras(arch, keras_weights or 'imagenet')
  if keras_weights:
    meta['source'] = f'{meta["source"]} from {os.path.basename(keras_weights)}'
  if check_parity:
    error = parity_error(keras_model, variables, meta, image_size=parity_image_size)
    logging.info('Parity: max |har_jax - keras| / max |keras| = %.3g', error)
    if not error <= max_relative_error:
      raise RuntimeError(f'Converted {arch} differs from Keras by {error:.3g} (relative) > '
                         f'{max_relative_error:g}; not writing {out}.')
    meta['parity_relative_error'] = error
  pretrained.save_encoder(out, variables, meta)
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  meta = convert(FLAGS.arch, FLAGS.out, FLAGS.keras_weights, check_parity=FLAGS.check_parity,
                 parity_image_size=FLAGS.parity_image_size,
                 max_relative_error=FLAGS.max_relative_error)
  print(f'Wrote {FLAGS.out}: encoder {meta["encoder"]} {meta["encoder_kwargs"]}, '
        f'preprocessing {meta["preprocessing"]!r}, source {meta["source"]}.')


if __name__ == '__main__':
  flags.mark_flags_as_required(['out'])
  cli.run(main)
