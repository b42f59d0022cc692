"""Command-line flag parsing for main.py and the scripts: a bad flag is one line, not a traceback.

  app.run(main, flags_parser=cli.parse_flags)

ml_collections' config flags raise from inside absl's flag parsing, before main() runs: a
misspelt override (`--config.batch_sise=16`) is a KeyError/AttributeError traceback, and a missing
config file only fails when the config is first read. `parse_flags` loads every config flag
while parsing and turns any failure into `error: <what is wrong and the closest valid name>` on
stderr, exit code 1.
"""

import difflib
import glob
import importlib.util
import os
import re
import sys
from typing import Optional, Sequence

from absl import flags
from ml_collections.config_flags import config_flags

from har_jax import paths


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` into `flag_values` (an absl `flags_parser`); exits with one line on an error.

  Returns:
    The remaining arguments, program name first (what absl passes to main).
  """
  try:
    remaining = flag_values(list(argv))
    for name in _config_flag_names(flag_values):
      _check_loaded(flag_values[name].value)
  except Exception as e:  # pylint: disable=broad-except
    print(f'error: {describe_error(e, argv, flag_values)}', file=sys.stderr)
    sys.exit(1)
  paths.configure_storage()
  return remaining


def _check_loaded(config):
  """Raises the loading error of a config file (ml_collections defers it to the first read)."""
  if config is not None:
    config.get('')


def _config_flag_names(flag_values: flags.FlagValues) -> list[str]:
  return [name for name in flag_values if config_flags.is_config_flag(flag_values[name])]


def describe_error(error: Exception, argv: Sequence[str], flag_values: flags.FlagValues) -> str:
  """One line saying which flag is wrong and what to pass instead."""
  for name in _config_flag_names(flag_values):
    path = _flag_argument(argv, name)
    if path is None:
      continue
    config = _load(path)
    if isinstance(config, Exception):
      return (f'--{name}={path}: cannot load the config file ({_first_line(config)}). '
              f'{_closest_file(path)}Pass a Python module that defines get_config().')
    for key in _override_keys(argv, name):
      if key not in _field_names(config):
        close = difflib.get_close_matches(key, _field_names(config), n=1, cutoff=0.5)
        hint = f'did you mean --{name}.{close[0]}?' if close else f'see the fields in {path}.'
        return f'--{name}.{key}: no such config field; {hint}'
  return _first_line(error)


def _first_line(error: Exception) -> str:
  text = str(error.args[0] if isinstance(error, KeyError) and error.args else error).strip()
  text = text or type(error).__name__
  return text.splitlines()[0]


def _flag_argument(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of the last `--name=value` / `--name value` in argv."""
  value = None
  for i, arg in enumerate(argv):
    match = re.fullmatch(rf'--?{re.escape(name)}(=(.*))?', arg)
    if match:
      value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _override_keys(argv: Sequence[str], name: str) -> list[str]:
  """'a.b' for every `--name.a.b[=value]` in argv."""
  keys = []
  for arg in argv:
    match = re.match(rf'--?(?:no)?{re.escape(name)}\.([^=]+)', arg)
    if match:
      keys.append(match.group(1))
  return keys


def _load(path: str):
  """get_config() of a config file `file.py[:argument]` (no overrides), or what loading raised."""
  file_path, _, argument = path.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('har_jax_cli_config', file_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([argument] if argument else []))
  except Exception as e:  # pylint: disable=broad-except
    return e


def _field_names(config, prefix: str = '') -> list[str]:
  """Every field of a ConfigDict as a dotted name, nested ConfigDicts included."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if hasattr(value, 'items'):
      names += _field_names(value, f'{prefix}{key}.')
  return names


def _closest_file(path: str) -> str:
  folder = os.path.dirname(path.split(':', 1)[0]) or '.'
  candidates = sorted(glob.glob(os.path.join(folder, '*.py')))
  close = difflib.get_close_matches(path.split(':', 1)[0], candidates, n=1, cutoff=0.6)
  return f'Did you mean {close[0]}? ' if close else ''
