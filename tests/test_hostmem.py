"""Host malloc tuning: when main.py re-executes itself with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from har_jax import hostmem

_CPU_ENV = {'JAX_PLATFORMS': 'cpu'}


@pytest.fixture
def supported(monkeypatch):
  """Pretend to be a Linux host with glibc 2.36 and THP in madvise mode."""
  monkeypatch.setattr(hostmem.sys, 'platform', 'linux')
  monkeypatch.setattr(hostmem.platform, 'libc_ver', lambda: ('glibc', '2.36'))
  monkeypatch.setattr(hostmem, '_thp_mode', lambda: 'madvise')


def test_applies_on_a_cpu_host(supported):
  assert hostmem.hugepage_decision(_CPU_ENV) == (
      True, 'glibc malloc with transparent huge pages (THP mode madvise)')


@pytest.mark.parametrize('environ, reason', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'already sets'),
    ({**_CPU_ENV, 'HAR_JAX_HUGEPAGES': '0'}, 'HAR_JAX_HUGEPAGES=0'),
    ({**_CPU_ENV, 'HAR_JAX_HUGEPAGES': 'yes'}, "'yes' is not 0 or 1"),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, 'an accelerator is present'),
    ({'JAX_PLATFORMS': 'tpu'}, 'an accelerator is present'),
])
def test_does_not_apply(supported, environ, reason):
  apply, why = hostmem.hugepage_decision(environ)
  assert not apply
  assert reason in why


def test_force_on_an_accelerator_host(supported):
  assert hostmem.hugepage_decision({'JAX_PLATFORMS': 'cuda', 'HAR_JAX_HUGEPAGES': '1'})[0]


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
  apply, why = hostmem.hugepage_decision(_CPU_ENV)
  assert not apply
  assert reason in why


def test_with_tunable_keeps_other_tunables():
  assert hostmem.with_tunable({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  env = hostmem.with_tunable({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'X': 'y'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'X': 'y'}


def test_reexec_keeps_pid_and_arguments():
  """A real re-execution on this machine, when the machine supports it (else nothing happens)."""
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'HAR_JAX_HUGEPAGES')}
  env.update(_CPU_ENV)
  expected, _ = hostmem.hugepage_decision(env)
  code = ('import os, sys; print("start", os.getpid(), flush=True); '
          'from har_jax import hostmem; hostmem.reexec_with_hugepage_malloc(); '
          'print("end", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:]); '
          'print(hostmem.status())')
  out = subprocess.run([sys.executable, '-c', code, 'arg1', '--flag=2'], env=env, check=True,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))).stdout.split('\n')
  starts = [line.split()[1] for line in out if line.startswith('start')]
  end = next(line.split(' ', 3) for line in out if line.startswith('end'))
  assert len(starts) == (2 if expected else 1)
  assert set(starts) == {end[1]}  # exec keeps the pid.
  assert end[2] == ('glibc.malloc.hugetlb=1' if expected else 'None')
  assert end[3] == "['arg1', '--flag=2']"
  assert out[-2].startswith('host malloc: ' + ('GLIBC_TUNABLES=' if expected else 'default ('))
