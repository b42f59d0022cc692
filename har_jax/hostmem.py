"""Host memory for CPU runs: glibc malloc's large blocks on transparent huge pages, if asked.

XLA:CPU allocates each training step's temp buffer (about 1 GiB for a ResNet-18 step at 112x112)
with malloc from a worker thread; glibc serves it with a fresh mmap and unmaps it after the step,
so every step page-faults the whole buffer in again, 4 KiB at a time. glibc >= 2.35 can ask the
kernel for 2 MiB transparent huge pages for such blocks: start the process with

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python main.py ...

Figures in benchmarks/train_step.md. glibc reads tunables only when a process starts, so har_jax
cannot turn this on itself (it does not re-execute the user's process); `status()` says, for the
log, whether it is on and whether it would help. Only the standard library is imported here.
"""

import glob
import os
import platform
import sys
from typing import Mapping, Optional

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
  """(whether the huge-page tunable would help a run in `environ` on this host, the reason)."""
  if _tunable_set(environ):
    return False, 'GLIBC_TUNABLES already sets glibc.malloc.hugetlb'
  if sys.platform != 'linux' or not _glibc_at_least(2, 35):
    return False, 'needs Linux with glibc >= 2.35'
  mode = _thp_mode()
  if mode not in ('always', 'madvise'):
    return False, f'transparent huge pages are {mode or "unavailable"}'
  if _has_accelerator(environ):
    return False, 'an accelerator is present'
  return True, f'glibc malloc with transparent huge pages (THP mode {mode})'


def status() -> str:
  """One line for the log: the host malloc this process runs with, and a hint where the huge-page
  tunable would speed up CPU steps."""
  if _tunable_set(os.environ):
    return f'host malloc: GLIBC_TUNABLES={os.environ["GLIBC_TUNABLES"]}'
  helps, why = hugepage_decision(os.environ)
  if helps:
    return (f'host malloc: default; CPU training steps run faster started with '
            f'GLIBC_TUNABLES={TUNABLE} ({why}; docs/speed.md, "Training on a CPU")')
  return f'host malloc: default ({why})'
