"""Config fields read in more than one place: one dotted-path getter and one table of defaults.

  config_fields.get(config, 'model.conv_impl')  # the value, or DEFAULTS['model.conv_impl']

The configs under configs/ set every field. The defaults serve configs written before a field
existed (each checkpoint stores its run's config) and configs built by hand; they are the values
configs/default.py sets.
"""

from typing import Any

DEFAULTS: dict[str, Any] = {
    'keep_checkpoints': 3,
    'max_consecutive_nonfinite': 10,
    'skip_nonfinite_updates': False,
    'model.conv_impl': 'auto',
    'model.encoder_init': '',
    'model.freeze_encoder_steps': 0,
    'model.num_lstm_layers': 1,
    'model.preprocessing': 'imagenet',
    'model.remat': False,
}

_DEFAULT = object()


def get(config, dotted: str, default: Any = _DEFAULT) -> Any:
  """`config.a.b.c` for dotted 'a.b.c' (a ConfigDict or a plain dict, e.g. a saved config's
  JSON); where a part is missing, `default`, or DEFAULTS[dotted] (None if it has none)."""
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return DEFAULTS.get(dotted) if default is _DEFAULT else default
    node = node[part]
  return node


def get_or_none(config, dotted: str) -> Any:
  """The field at `dotted`, None where the config does not have it (no default)."""
  return get(config, dotted, None)


def model_field(model_config, name: str) -> Any:
  """Field `name` of config.model (given as `model_config`), defaulting as 'model.<name>'."""
  return get(model_config, name, DEFAULTS.get(f'model.{name}'))
