"""Command-line flags (issue 16.11): a bad override or config file is one line, not a traceback."""

import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from har_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(REPO, 'configs', 'synthetic.py')


def _parse(argv, monkeypatch, flag_values=None):
  """cli.parse_flags on fresh flags like main.py's; returns the exit code (None: no exit)."""
  argv = ['main.py'] + argv
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads the overrides from sys.argv.
  flag_values = flags.FlagValues() if flag_values is None else flag_values
  flags.DEFINE_string('workdir', None, 'Workdir.', flag_values=flag_values)
  config_flags.DEFINE_config_file('config', None, 'Config file.', flag_values=flag_values,
                                  lock_config=True)
  try:
    cli.parse_flags(argv, flag_values=flag_values)
  except SystemExit as e:
    return e.code
  return None


@pytest.mark.parametrize('override,expected', [
    ('--config.batch_sise=16', '--config.batch_sise: no such config field; did you mean '
                               '--config.batch_size?'),
    ('--config.model.lstm_siz=8', 'did you mean --config.model.lstm_size?'),
    ('--config.modle.lstm_size=8', 'did you mean --config.model.lstm_size?'),
    ('--config.batch_size=abc', "--config.batch_size=abc: invalid literal for int() with base "
                                "10: 'abc'"),
])
def test_a_bad_override_is_one_line_naming_the_closest_key(capsys, monkeypatch, override,
                                                          expected):
  assert _parse([f'--config={SYNTHETIC}', override], monkeypatch) not in (None, 0)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and expected in err[0], err


def test_a_missing_config_file_is_one_line_naming_the_closest_file(capsys, monkeypatch):
  missing = os.path.join(REPO, 'configs', 'synthetc.py')
  assert _parse([f'--config={missing}'], monkeypatch) not in (None, 0)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'synthetc.py' in err[0] and 'cannot load' in err[0], err
  assert 'Did you mean' in err[0] and 'synthetic.py' in err[0], err


def test_good_flags_parse_and_load_the_config(capsys, monkeypatch):
  assert _parse([f'--config={SYNTHETIC}', '--config.batch_size=16'], monkeypatch) is None
  assert capsys.readouterr().err == ''


@pytest.mark.slow
def test_main_prints_one_line_without_a_traceback(tmp_path):
  env = dict(os.environ)
  for args, expected in (
      (['--config=configs/synthetic.py', '--config.batch_sise=16'], '--config.batch_size?'),
      (['--config=configs/nope.py'], 'configs/nope.py'),
  ):
    run = subprocess.run([sys.executable, 'main.py', f'--workdir={tmp_path}', *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2, run.stderr[-3000:]
    assert 'Traceback' not in run.stderr and expected in run.stderr, run.stderr[-3000:]
    assert [l for l in run.stderr.splitlines() if l.startswith('error: ')], run.stderr[-3000:]


@pytest.mark.parametrize('name,overrides,expected', [
    ('default.py', [], (112, 128)),
    ('default.py', ['--config.image_size=64'], (64, 73)),
    ('default.py', ['--config.image_size=64', '--config.dataset.resize_size=128'], (64, 128)),
    ('default.py', ['--config.dataset.resize_size=128', '--config.image_size=64'], (64, 128)),
    ('default.py', ['--config.dataset.resize_size=0'], (112, 0)),
    ('ucf101_resnet50_imagenet.py', [], (224, 256)),
    ('ucf101_resnet50_imagenet.py', ['--config.image_size=112'], (112, 128)),
    ('ucf101_frames.py', ['--config.image_size=224'], (224, 256)),
    ('synthetic.py', [], (28, 32)),
])
def test_resize_follows_image_size_unless_set(monkeypatch, name, overrides, expected):
  """dataset.resize_size is image_size * 8 // 7 unless given, in whatever order the flags come."""
  flag_values = flags.FlagValues()
  path = os.path.join(REPO, 'configs', name)
  assert _parse([f'--config={path}', *overrides], monkeypatch, flag_values) is None
  config = flag_values.config
  assert (config.image_size, config.dataset.resize_size) == expected
  assert config.to_dict()['dataset']['resize_size'] == expected[1]  # What checkpoints store.


_COMMAND = '''
from absl import app
from absl import flags
from har_jax import cli
from har_jax import errors
flags.DEFINE_integer('count', 0, 'A number.')
def main(argv):
  {body}
cli.run(main)
'''


def test_run_turns_errors_into_one_line_and_the_documented_exit_codes(tmp_path):
  """cli.run, the edge of every command: 1 user error, 2 usage, 130 Ctrl-C, 0 after --help."""
  cases = {  # (flags, main's body): (exit code, the one line on stderr or None, stdout part)
      ((), "raise errors.UserError('no dataset at d; prepare it first.')"):
          (1, 'error: no dataset at d; prepare it first.', ''),
      ((), "raise app.UsageError('give one video after the flags.')"):
          (2, 'error: give one video after the flags.', ''),
      (('--count=x',), 'return 0'): (2, None, ''),
      ((), 'raise KeyboardInterrupt'): (130, 'interrupted: stopped by Ctrl-C.', ''),
      ((), 'return 3'): (3, None, ''),
      (('--count=4',), 'print(flags.FLAGS.count)'): (0, None, '4'),
      (('--help',), 'return 1'): (0, None, '--count: A number.'),
  }
  procs = {case: subprocess.Popen([sys.executable, '-c', _COMMAND.format(body=case[1]), *case[0]],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
           for case in cases}
  for case, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    code, line, printed = cases[case]
    assert proc.returncode == code, (case, err[-3000:])
    assert 'Traceback' not in err and printed in out, (case, out, err)
    if line is not None:
      assert err.splitlines() == [line], (case, err)
    elif code == 2:
      (only,) = err.splitlines()
      assert only.startswith('error: ') and 'count' in only, (case, err)
