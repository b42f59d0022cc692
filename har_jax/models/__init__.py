"""Frame encoders and the LRCN video classifier."""

from typing import Any, Optional

import jax.numpy as jnp
import ml_collections

from har_jax import config_fields
from har_jax.models import encoders
from har_jax.models import lrcn
from har_jax.models.cpu_kernels.conv import CONV_IMPLS
from har_jax.models.cpu_kernels.conv import CpuConv
from har_jax.models.cpu_kernels.conv import resolve_conv_impl
from har_jax.models.encoders import ENCODERS
from har_jax.models.encoders import encoder_feature_dim
from har_jax.models.lrcn import LRCN

# Input normalisation presets; see LRCN for the formula and units.
PREPROCESSING: dict[str, dict[str, Any]] = {
    'imagenet': dict(input_mean=lrcn.IMAGENET_MEAN, input_std=lrcn.IMAGENET_STD,
                     channel_order='rgb', input_scale=1 / 255),
    # Keras applications' 'caffe' mode: BGR, mean subtracted in 0..255 units.
    'caffe': dict(input_mean=(103.939, 116.779, 123.68),
                  input_std=(1.0, 1.0, 1.0), channel_order='bgr',
                  input_scale=1.0),
}


def create_model(model_config: ml_collections.ConfigDict, num_classes: int,
                 *, dtype: Any = 'float32',
                 bn_axis_name: Optional[str] = None) -> LRCN:
  """Builds the LRCN that `model_config` describes.

  Args:
    model_config: fields encoder, lstm_size, dropout_rate, temporal_pooling;
      optional num_lstm_layers (1), remat (False), conv_impl ('auto', see
      conv.CONV_IMPLS), preprocessing ('imagenet' or 'caffe'; default
      'imagenet').
    num_classes: width of the logits.
    dtype: computation dtype of the encoder, e.g. 'float32' or 'bfloat16'.
    bn_axis_name: the pmap axis name for synchronous BatchNorm, or None.
  """
  encoders.get_encoder_cls(model_config.encoder)  # ValueError naming valid encoders.
  conv_impl = config_fields.model_field(model_config, 'conv_impl')
  resolve_conv_impl(conv_impl)  # ValueError naming valid implementations.
  preprocessing = config_fields.model_field(model_config, 'preprocessing')
  if preprocessing not in PREPROCESSING:
    raise ValueError(f'Unknown preprocessing {preprocessing!r}; valid: '
                     f'{sorted(PREPROCESSING)}')
  return LRCN(
      encoder=model_config.encoder,
      num_classes=num_classes,
      lstm_size=model_config.lstm_size,
      num_lstm_layers=config_fields.model_field(model_config, 'num_lstm_layers'),
      dropout_rate=model_config.dropout_rate,
      temporal_pooling=model_config.temporal_pooling,
      remat=config_fields.model_field(model_config, 'remat'),
      conv_impl=conv_impl,
      dtype=jnp.dtype(dtype),
      bn_axis_name=bn_axis_name,
      encoder_kwargs=tuple(sorted(dict(model_config.get('encoder_kwargs', None) or {}).items())),
      **PREPROCESSING[preprocessing])


__all__ = [
    'CONV_IMPLS', 'CpuConv', 'ENCODERS', 'LRCN', 'PREPROCESSING',
    'create_model', 'encoder_feature_dim', 'resolve_conv_impl',
]
