"""The console commands (pyproject.toml [project.scripts], har_jax/commands/) and the scripts that
run them: installed from this checkout, each prints its --help, and no file edits sys.path."""

import ast
import glob
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

from packaging.utils import canonicalize_name
import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
  COMMANDS = tomllib.load(f)['project']['scripts']
# main.py and the scripts that are a console command too.
WRAPPERS = ['main.py'] + [f'scripts/{name}.py' for name in (
    'predict', 'stream', 'export', 'prepare_ucf101', 'prepare_video_folder', 'run_splits')]


def _module(target: str):
  """The module of an entry point 'package.module:function'."""
  return importlib.import_module(target.split(':')[0])


def _flag_names(module) -> list[str]:
  """The flags a command module defines (its define_flags source)."""
  with open(module.__file__) as f:
    return re.findall(r"DEFINE_\w+\(\s*'(\w+)'", f.read())


def test_every_command_module_is_a_console_command():
  assert {name for name in COMMANDS if name.startswith('har-')} == set(COMMANDS)
  modules = sorted(os.path.basename(path)[:-3] for path in
                   glob.glob(os.path.join(REPO, 'har_jax', 'commands', '[!_]*.py')))
  assert sorted(target.split(':')[0].rsplit('.', 1)[1] for target in COMMANDS.values()) == modules
  for target in COMMANDS.values():
    module = _module(target)
    assert callable(getattr(module, target.split(':')[1])), target
    assert _flag_names(module), target


def test_console_commands_are_installed_from_this_pyproject():
  """CI installs the checkout (scripts/setup.sh); elsewhere, rerun it after [project.scripts]
  changes."""
  installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group='console_scripts')
               if canonicalize_name(ep.dist.name) == 'har-jax'}
  assert installed == COMMANDS, 'reinstall: bash scripts/setup.sh'


def test_main_and_scripts_only_run_their_command():
  """Each wrapper imports one command module and calls its run() (the console entry point)."""
  targets = set(COMMANDS.values())
  for path in WRAPPERS:
    with open(os.path.join(REPO, path)) as f:
      tree = ast.parse(f.read())
    (statement,) = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert statement.module == 'har_jax.commands', path
    (name,) = [alias.name for alias in statement.names]
    assert f'har_jax.commands.{name}:run' in targets, path
    main_block = tree.body[-1]
    assert isinstance(main_block, ast.If) and '__main__' in ast.unparse(main_block.test), path
    assert ast.unparse(main_block.body[0]) == f'{name}.run()', path


def test_no_sys_path_edits():
  """The package is installed (and tests get the checkout from pytest's pythonpath)."""
  edits = re.compile(r'sys\.path\s*(\.insert|\.append|\.extend|\[|\+=)')
  found = []
  for pattern in ('*.py', 'har_jax/**/*.py', 'scripts/*.py', 'benchmarks/*.py',
                  'notebooks/*.ipynb', 'configs/*.py'):
    for path in glob.glob(os.path.join(REPO, pattern), recursive=True):
      with open(path) as f:
        found += [f'{path}:{i + 1}' for i, line in enumerate(f) if edits.search(line)]
  assert not found


@pytest.mark.slow  # ~35 s of CPU: every process imports TensorFlow and JAX.
def test_every_command_prints_its_help(tmp_path):
  """`<command> --help` exits 0 and shows the command's docstring and flags, from a folder that
  is not the checkout; so does a script. All run at once (each imports TensorFlow and JAX)."""
  bin_dir = os.path.dirname(sys.executable)
  runs = {}
  for name in COMMANDS:
    executable = os.path.join(bin_dir, name)
    assert os.path.exists(executable), f'{executable} is not installed: bash scripts/setup.sh'
    runs[name] = [executable, '--help']
  runs['scripts/predict.py'] = [sys.executable, os.path.join(REPO, 'scripts', 'predict.py'),
                                '--help']
  procs = {name: subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, command in runs.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    module = _module(COMMANDS.get(name, 'har_jax.commands.predict:run'))
    assert proc.returncode == 0, (name, err[-3000:])
    assert out.splitlines()[0] == module.__doc__.splitlines()[0], (name, out[:300])
    for flag in _flag_names(module):
      assert re.search(rf'^  --(\[no\])?{flag}:', out, re.MULTILINE), (name, flag, out)
