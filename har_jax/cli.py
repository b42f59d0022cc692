"""The edge of every command: flag parsing, the one place errors become exit codes.

  def main(argv): ...              # May raise errors.UserError or app.UsageError.
  cli.run(main, define_flags)      # Console commands (har_jax/commands/) and scripts alike.

Exit codes, for every command (main.py, the console commands, scripts/*.py):

  0    done (also --help).
  1    error: the command could not do its job. `errors.UserError` (a config value, a dataset,
       checkpoint, video or path that is missing or unusable) is printed as one line
       `error: <what is wrong and what to do>`, without a traceback; what was saved is kept.
       A command that does part of the work reports the rest the same way (predict.py: no file
       could be read; stream.py: the source ended early).
  2    usage: the command line is wrong, found before anything runs: an unknown flag, a missing
       or malformed value, a misspelt config override (with the closest valid name), a config
       file that does not load, flags that do not combine, a wrong number of arguments
       (`app.UsageError`). One line `error: ...`.
  130  interrupted by Ctrl-C (128 + SIGINT): one line saying so, and what was kept. Training is
       the exception: Ctrl-C (or a preemption's SIGTERM) saves a checkpoint at the next step and
       exits 0, to be resumed; only a second Ctrl-C, or one before training starts, exits 130.

ml_collections' config flags raise from inside absl's flag parsing, before main() runs: a
misspelt override (`--config.batch_sise=16`) is a KeyError/AttributeError traceback, and a missing
config file only fails when the config is first read. `parse_flags` loads every config flag
while parsing and turns any failure into the one line of a usage error.
"""

import difflib
import functools
import glob
import importlib.util
import os
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from ml_collections.config_flags import config_flags

from har_jax import errors
from har_jax import paths

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended.


def run(main: Callable[[list[str]], Optional[int]],
        define_flags: Optional[Callable[[], None]] = None):
  """Runs `main(argv)` as this process's command, with the exit codes above; does not return.

  Args:
    main: takes the arguments left after the flags (program name first); returns the exit code
      (None: 0), or raises errors.UserError (exit 1) or app.UsageError (exit 2).
    define_flags: defines the command's flags (a module of har_jax/commands/ defines them only
      when it runs, so that any number of them can be imported together). `--help` then shows
      the docstring and flags of main's module, whether it was started as a console command or
      as a script.
  """
  if define_flags is not None:
    define_flags()
    _show_in_help(sys.modules[main.__module__])
  app.run(functools.partial(_main_with_exit_codes, main), flags_parser=parse_flags)


def _main_with_exit_codes(main, argv: list[str]) -> int:
  try:
    return main(argv) or EXIT_OK
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_ERROR
  except app.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print('interrupted: stopped by Ctrl-C.', file=sys.stderr)
    return EXIT_INTERRUPTED


def _show_in_help(module):
  """Makes absl's --help (which prints __main__'s docstring and key flags) describe `module`."""
  main_module = sys.modules['__main__']
  if module is main_module:
    return
  main_module.__doc__ = module.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def silence_closed_pipe(file):
  """After a BrokenPipeError on `file` (a reader such as `head` has exited): points it at
  /dev/null, so that Python's flush at exit does not fail again."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, file.fileno())
  os.close(devnull)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` into `flag_values` (an absl `flags_parser`); exits with one line on an error
  (exit code 2), and with 0 after --help.

  Returns:
    The remaining arguments, program name first (what absl passes to main).
  """
  try:
    remaining = flag_values(list(argv))
    for name in _config_flag_names(flag_values):
      _check_loaded(flag_values[name].value)
  except SystemExit:  # absl's --help, --helpfull...: the help is printed; absl would exit 1.
    sys.exit(EXIT_OK)
  except BrokenPipeError:  # The help was piped into `head`, which has exited.
    silence_closed_pipe(sys.stdout)
    sys.exit(EXIT_OK)
  except Exception as e:  # pylint: disable=broad-except
    print(f'error: {describe_error(e, argv, flag_values)}', file=sys.stderr)
    sys.exit(EXIT_USAGE)
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
