"""What an exported model computes, in JAX: raw decoded frames in, class probabilities out.

  signatures = serving.signatures(inference.load(workdir))
  outputs = signatures['serving_default'].fn(variables, video)  # {'probabilities', 'logits'}

Each function takes the model variables first and one array second, works for any batch size and
frame size (they stay symbolic in `jax.export` and jax2tf), and uses the XLA convolutions, so what
is exported runs the same on CPU, GPU and TPU (the CPU kernels are a training-speed feature with
the same parameters). The encoder computes in float32 whatever dtype the run trained in.

Preprocessing follows evaluation, for one clip already sampled at the checkpoint's stride: the
frame geometry of the training frames (stock UCF101 records squash every frame to 256x256), the
short side resized to dataset.resize_size, one centre crop of image_size pixels; the model
normalises the uint8 pixels itself. Resizes are bilinear with half-pixel centres, antialiased
where evaluation antialiases them (`stages.resize_bilinear`), and rounded to uint8 in between as
evaluation rounds. Two steps of the training data are not reproduced bit for bit: the JPEG
decoder's DCT downscaling (a power of two) and FFmpeg's area filter, which `har_jax.predict`
uses to scale video frames. A squash resizes to the decoded size in one antialiased step; the other
geometries resize once, straight from the given frame to the crop (evaluation's short-side resize
and centre crop, whatever the frame size, without the power-of-two step before it).
"""

import dataclasses
import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections

from har_jax import geometry
from har_jax import inference
from har_jax import models
from har_jax.data import stages


@dataclasses.dataclass(frozen=True)
class Signature:
  """One exported function: `fn(variables, inputs) -> {output name: array}`.

  input_shape holds ints (fixed) and dimension names (any size >= 1, symbolic when exported);
  outputs maps each output name to its (shape, dtype) in the same terms.
  """
  name: str
  fn: Callable[[dict, jax.Array], dict]
  input_name: str
  input_shape: tuple
  input_dtype: str
  outputs: dict
  description: str

  def symbolic_shape(self) -> str:
    """The input shape as jax.export and jax2tf spell it, e.g. 'batch, 16, height, width, 3'."""
    return ', '.join(str(d) for d in self.input_shape)

  def to_json(self) -> dict:
    return {'inputs': {self.input_name: {'shape': list(self.input_shape),
                                         'dtype': self.input_dtype}},
            'outputs': {k: {'shape': list(shape), 'dtype': dtype}
                        for k, (shape, dtype) in self.outputs.items()},
            'description': self.description}


def xla_model(loaded: inference.LoadedModel) -> models.LRCN:
  """The checkpoint's model with XLA convolutions and float32 computation, without remat (a
  backward-pass setting); the same parameters."""
  model_config = ml_collections.ConfigDict(loaded.config.model.to_dict())
  model_config.conv_impl = 'xla'
  model_config.remat = False
  return models.create_model(model_config, loaded.num_classes, dtype='float32')


def _short_side_target(preprocessing: inference.Preprocessing) -> Optional[int]:
  """The short side, in pixels, that frames are resized to before the crop (None: as given)."""
  if preprocessing.resize_size > 0:
    return preprocessing.resize_size
  if preprocessing.frame_geometry.get('resize') == 'short_side':
    return int(preprocessing.frame_geometry['size'])  # Training used the frames as stored.
  return None


def _resample(frames: jax.Array, size: tuple[int, int], window: jax.Array,
              antialias: Union[bool, jax.Array]) -> jax.Array:
  """Bilinear resize of the `window` (y, x, h, w; float32 pixels) of `[n, H, W, 3]` frames to
  `[n, size[0], size[1], 3]` uint8 (rounded half to even, like evaluation).

  antialias: widen the triangle filter with the downscale factor; a traced bool picks one of the
  two resizes at run time.
  """
  scale = jnp.stack([size[0] / window[2], size[1] / window[3]])
  translation = -window[:2] * scale
  pixels = frames.astype(jnp.float32)

  def resize(with_antialias: bool) -> jax.Array:
    return jax.image.scale_and_translate(
        pixels, (frames.shape[0], size[0], size[1], frames.shape[3]), (1, 2), scale, translation,
        method='linear', antialias=with_antialias)

  if isinstance(antialias, bool):
    out = resize(antialias)
  else:
    out = jax.lax.cond(antialias, lambda: resize(True), lambda: resize(False))
  return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def _centre_view(frames: jax.Array, short_side: Optional[int], crop_size: int) -> jax.Array:
  """Evaluation's view of `[n, H, W, 3]` frames: the short side resized to `short_side` (long side
  in proportion, float32 and rounded as `stages.resize_short_side` computes them), then the centre
  crop_size x crop_size crop (`stages.eval_crop_windows`), resized to crop_size if the frame is
  smaller; one resample from the given frames. -> `[n, crop_size, crop_size, 3]` uint8.

  Evaluation resizes twice when short_side < crop_size (config validation refuses that); only
  frames given smaller than the crop and no short_side are resized up, in one step, as there."""
  height = jnp.asarray(frames.shape[1], jnp.float32)
  width = jnp.asarray(frames.shape[2], jnp.float32)
  if short_side is None:
    new_height, new_width = height, width
  else:
    scale = jnp.float32(short_side) / jnp.minimum(height, width)
    new_height = jnp.maximum(jnp.float32(short_side), jnp.round(height * scale))
    new_width = jnp.maximum(jnp.float32(short_side), jnp.round(width * scale))
  shrink = jnp.maximum(height / new_height, width / new_width)
  crop_height = jnp.minimum(jnp.float32(crop_size), new_height)
  crop_width = jnp.minimum(jnp.float32(crop_size), new_width)
  top = jnp.floor((new_height - crop_height) / 2)
  left = jnp.floor((new_width - crop_width) / 2)
  to_source = jnp.stack([height / new_height, width / new_width] * 2)
  window = jnp.stack([top, left, crop_height, crop_width]) * to_source
  return _resample(frames, (crop_size, crop_size), window,
                   antialias=shrink > stages.ANTIALIAS_ABOVE)


def preprocess_frames(frames: jax.Array, preprocessing: inference.Preprocessing) -> jax.Array:
  """`[n, H, W, 3]` uint8 decoded frames of any size -> `[n, S, S, 3]` uint8 model input
  (S = image_size): the checkpoint's frame geometry, short-side resize and centre crop."""
  if preprocessing.frame_geometry.get('resize') == 'squash':
    # The training frame this frame would have become, at the size its decoder gave.
    size = geometry.squash_size(preprocessing.frame_geometry, preprocessing.resize_size)
    whole = jnp.stack([0.0, 0.0, jnp.asarray(frames.shape[1], jnp.float32),
                       jnp.asarray(frames.shape[2], jnp.float32)])
    frames = _resample(frames, size, whole, antialias=True)
  return _centre_view(frames, _short_side_target(preprocessing), preprocessing.image_size)


def _probabilities(logits: jax.Array) -> dict:
  return {'probabilities': jax.nn.softmax(logits, axis=-1), 'logits': logits}


def classify_clips(variables: dict, video: jax.Array, *, model: models.LRCN,
                   preprocessing: inference.Preprocessing) -> dict:
  """`[batch, T, H, W, 3]` uint8 clips (T = num_frames, sampled at frame_stride) ->
  {'probabilities', 'logits'}: `[batch, num_classes]` float32."""
  batch, time = video.shape[:2]
  views = preprocess_frames(video.reshape((batch * time,) + video.shape[2:]), preprocessing)
  logits = model.apply(variables, views.reshape((batch, time) + views.shape[1:]), train=False)
  return _probabilities(logits)


def encode_frames(variables: dict, frames: jax.Array, *, model: models.LRCN,
                  preprocessing: inference.Preprocessing) -> dict:
  """`[n, H, W, 3]` uint8 frames -> {'features': `[n, D]` float32}, each frame preprocessed and
  encoded on its own (the per-frame half of `classify_clips`)."""
  views = preprocess_frames(frames, preprocessing)
  return {'features': model.apply(variables, views, train=False,
                                  method=models.LRCN.encode_frames)}


def classify_features(variables: dict, features: jax.Array, *, model: models.LRCN) -> dict:
  """`[batch, T, D]` float32 frame features (any T) -> {'probabilities', 'logits'}:
  `[batch, num_classes]` float32; the recurrent half of `classify_clips` (LSTM from a zero state,
  head, temporal pooling)."""
  return _probabilities(model.apply(variables, features, train=False,
                                    method=models.LRCN.classify))


def feature_dim(model: models.LRCN, variables: dict, image_size: int) -> int:
  """D, the width of the encoder's features (shapes only; nothing is computed)."""
  frames = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  out = jax.eval_shape(functools.partial(model.apply, train=False,
                                         method=models.LRCN.encode_frames), variables, frames)
  return int(out.shape[-1])


def signatures(loaded: inference.LoadedModel) -> dict[str, Signature]:
  """The exported functions of a loaded checkpoint, by signature name: serving_default (clips),
  encode_frames and classify_features (the two halves, for streaming)."""
  model = xla_model(loaded)
  p = loaded.preprocessing
  num_classes = loaded.num_classes
  dim = feature_dim(model, loaded.variables, p.image_size)
  scores = {'probabilities': (('batch', num_classes), 'float32'),
            'logits': (('batch', num_classes), 'float32')}
  return {
      'serving_default': Signature(
          'serving_default', functools.partial(classify_clips, model=model, preprocessing=p),
          'frames', ('batch', p.num_frames, 'height', 'width', 3), 'uint8', scores,
          f'Clips of {p.num_frames} decoded RGB frames sampled every {p.frame_stride} frames, '
          'any frame size -> class probabilities and logits.'),
      'encode_frames': Signature(
          'encode_frames', functools.partial(encode_frames, model=model, preprocessing=p),
          'frames', ('frames', 'height', 'width', 3), 'uint8',
          {'features': (('frames', dim), 'float32')},
          'Decoded RGB frames, any size, each preprocessed as serving_default does -> features.'),
      'classify_features': Signature(
          'classify_features', functools.partial(classify_features, model=model),
          'features', ('batch', 'time', dim), 'float32', scores,
          'A window of encode_frames features per clip, oldest first -> probabilities and '
          'logits (serving_default = encode_frames then classify_features over its frames).'),
  }
