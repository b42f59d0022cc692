"""Host memory for CPU runs: back glibc malloc's large blocks with transparent huge pages.

XLA:CPU allocates each step's temp buffer (1.07 GiB for the issue-7 ResNet-18 step) with malloc
from a worker thread; glibc serves it with a fresh mmap and unmaps it after the step, so every
step page-faults the whole buffer in again, 4 KiB at a time (~295k faults, ~1 s of system CPU per
step on the project's 2-core VM). glibc >= 2.35 can ask the kernel for 2 MiB transparent huge
pages for such blocks (tunable `glibc.malloc.hugetlb=1`): the same buffer then costs ~600 faults.
Measured in benchmarks/train_step.md.

Tunables are read only when a process starts, so `reexec_with_hugepage_malloc()` re-executes the
interpreter (same pid, same arguments) with the tunable added to GLIBC_TUNABLES. It does so only
when it can help and cannot change an accelerator run:

- Linux with glibc >= 2.35 and transparent huge pages in mode `always` or `madvise`;
- no accelerator on the host (no /dev/nvidia*, /dev/accel*, /dev/vfio/*) or JAX_PLATFORMS=cpu;
- the tunable is not already set (so it runs at most once) and HAR_JAX_HUGEPAGES is not 0.

HAR_JAX_HUGEPAGES=0 turns it off; HAR_JAX_HUGEPAGES=1 forces it (e.g. a CPU-only run on a GPU
host). Only the standard library is imported here: it runs before JAX and TensorFlow load.
"""

import glob
import os
import platform
import sys
from typing import Mapping, Optional

ENV_SWITCH = 'HAR_JAX_HUGEPAGES'
TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
_ACCELERATOR_GLOBS = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')


def _glibc_at_least(major: int, minor: int) -> bool:
  lib, version = platform.libc_ver()
  if lib != 'glibc' or not version:
    return False
  try:
    return tuple(int(p) for p in version.split('.')[:2]) >= (major, minor)
  except ValueError:
    return False


def _thp_mode() -> Optional[str]:
  """The bracketed mode of /sys/kernel/mm/transparent_hugepage/enabled, or None."""
  try:
    with open(_THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def _has_accelerator(environ: Mapping[str, str]) -> bool:
  platforms = environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_GLOBS)


def _tunable_set(environ: Mapping[str, str]) -> bool:
  return TUNABLE.split('=')[0] in environ.get('GLIBC_TUNABLES', '')


def hugepage_decision(environ: Mapping[str, str]) -> tuple[bool, str]:
  """(whether to re-execute with the tunable, the reason) for this process and `environ`."""
  switch = environ.get(ENV_SWITCH, '').strip()
  if _tunable_set(environ):
    return False, 'GLIBC_TUNABLES already sets glibc.malloc.hugetlb'
  if switch == '0':
    return False, f'{ENV_SWITCH}=0'
  if switch not in ('', '1'):
    return False, f'{ENV_SWITCH}={switch!r} is not 0 or 1; leaving malloc as it is'
  if sys.platform != 'linux' or not _glibc_at_least(2, 35):
    return False, 'needs Linux with glibc >= 2.35'
  mode = _thp_mode()
  if mode not in ('always', 'madvise'):
    return False, f'transparent huge pages are {mode or "unavailable"}'
  if switch != '1' and _has_accelerator(environ):
    return False, 'an accelerator is present (set HAR_JAX_HUGEPAGES=1 to force)'
  return True, f'glibc malloc with transparent huge pages (THP mode {mode})'


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` whose GLIBC_TUNABLES also sets the huge-page tunable."""
  env = dict(environ)
  existing = env.get('GLIBC_TUNABLES', '')
  env['GLIBC_TUNABLES'] = f'{existing}:{TUNABLE}' if existing else TUNABLE
  return env


def reexec_with_hugepage_malloc() -> None:
  """Re-executes this process with the huge-page tunable when `hugepage_decision` says so.

  Call it first thing in a script's `__main__` block, before heavy imports. Returns (without
  re-executing) when the tunable is set already, does not apply, or the exec fails.
  """
  apply, _ = hugepage_decision(os.environ)
  if not apply:
    return
  argv = list(getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv])
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, with_tunable(os.environ))
  except OSError as e:  # Keep running without it rather than fail the job.
    print(f'har_jax: could not re-execute with {TUNABLE} ({e}); continuing without it.',
          file=sys.stderr)


def status() -> str:
  """One line for the log: whether this process runs with the tunable."""
  if _tunable_set(os.environ):
    return f'host malloc: GLIBC_TUNABLES={os.environ["GLIBC_TUNABLES"]}'
  return f'host malloc: default ({hugepage_decision(os.environ)[1]})'
