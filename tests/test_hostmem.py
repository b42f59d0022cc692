"""Host malloc: when the huge-page tunable would help, and what the log line says."""

import os
import subprocess
import sys

import pytest

from har_jax import hostmem

_CPU_ENV = {'JAX_PLATFORMS': 'cpu'}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def supported(monkeypatch):
  """Pretend to be a Linux host with glibc 2.36 and THP in madvise mode."""
  monkeypatch.setattr(hostmem.sys, 'platform', 'linux')
  monkeypatch.setattr(hostmem.platform, 'libc_ver', lambda: ('glibc', '2.36'))
  monkeypatch.setattr(hostmem, '_thp_mode', lambda: 'madvise')


def test_helps_on_a_cpu_host(supported, monkeypatch):
  assert hostmem.hugepage_decision(_CPU_ENV) == (
      True, 'glibc malloc with transparent huge pages (THP mode madvise)')
  monkeypatch.setattr(hostmem.os, 'environ', dict(_CPU_ENV))
  assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in hostmem.status()


@pytest.mark.parametrize('environ, reason', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'already sets'),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, 'an accelerator is present'),
    ({'JAX_PLATFORMS': 'tpu'}, 'an accelerator is present'),
])
def test_does_not_help(supported, environ, reason):
  helps, why = hostmem.hugepage_decision(environ)
  assert not helps
  assert reason in why


def test_accelerator_device_files_count_without_jax_platforms(supported, monkeypatch):
  monkeypatch.setattr(hostmem.glob, 'glob',
                      lambda pattern: ['/dev/nvidia0'] if 'nvidia' in pattern else [])
  assert not hostmem.hugepage_decision({})[0]
  monkeypatch.setattr(hostmem.glob, 'glob', lambda pattern: [])
  assert hostmem.hugepage_decision({})[0]


@pytest.mark.parametrize('libc, mode, reason', [
    (('glibc', '2.31'), 'madvise', 'glibc >= 2.35'),
    (('', ''), 'madvise', 'glibc >= 2.35'),
    (('glibc', '2.36'), 'never', 'huge pages are never'),
    (('glibc', '2.36'), None, 'huge pages are unavailable'),
])
def test_unsupported_systems(monkeypatch, libc, mode, reason):
  monkeypatch.setattr(hostmem.sys, 'platform', 'linux')
  monkeypatch.setattr(hostmem.platform, 'libc_ver', lambda: libc)
  monkeypatch.setattr(hostmem, '_thp_mode', lambda: mode)
  helps, why = hostmem.hugepage_decision(_CPU_ENV)
  assert not helps
  assert reason in why


@pytest.mark.slow
def test_main_never_re_executes_the_process():
  """main.py leaves the process and its environment as the user started it (debuggers,
  profilers and child processes see what they expect)."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(_CPU_ENV)
  code = ('import os, runpy, sys; pid = os.getpid(); sys.argv = ["main.py", "--helpfull"]\n'
          'try:\n  runpy.run_path("main.py", run_name="__main__")\n'
          'except SystemExit:\n  pass\n'
          'print("same", os.getpid() == pid, os.environ.get("GLIBC_TUNABLES"))')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True,
                       text=True, check=True, timeout=300).stdout
  assert out.strip().splitlines()[-1] == 'same True None'
