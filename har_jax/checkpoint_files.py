"""What lies in `<workdir>/checkpoints`, read before orbax sees it, and how reading it failed.

Orbax treats every folder with a step-like name as a checkpoint: its constructor parses each step's
metrics file (one damaged file stops it), and its retention deletes any such folder. Here:

  inventory(directory)  # Inventory(own steps, own steps with damaged metrics, foreign entries)
  OwnStepsFormat(...)   # The step NameFormat orbax is given: it lists our own, intact steps only.

A step folder is this project's own when it holds both items that har_jax writes ('state' and
'meta'); anything else (a user's `5/model.pt`, a file named `30`) is foreign and never touched.
"""

import dataclasses
import errno
import json
import os
import re
import shutil
from typing import Iterator, Optional

import jax
import orbax.checkpoint as ocp

from har_jax import paths

ITEMS = ('state', 'meta')
METRICS_FILE = 'metrics/metrics'
_TMP_MARK = '.orbax-checkpoint-tmp'  # Orbax's own uncommitted saves (it cleans them up).
_ORBAX_ENTRIES = ('metadata',)  # Orbax's root metadata folder.
# TensorStore/absl status codes that mean "could not reach the bytes", not "the bytes are bad".
_IO_STATUS = ('PERMISSION_DENIED', 'UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED',
              'ABORTED', 'CANCELLED', 'UNAUTHENTICATED')
# OS errors that mean a file of a committed checkpoint is missing: the checkpoint is damaged.
_DAMAGE_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


@dataclasses.dataclass(frozen=True)
class Inventory:
  """The entries of a checkpoints folder, by kind."""
  own: tuple[int, ...]  # Steps written by har_jax, metrics intact.
  damaged_metrics: dict  # {step: reason} of our own steps whose metrics file cannot be read.
  foreign: tuple[str, ...]  # Names of entries that are not har_jax checkpoints.


def is_own_checkpoint(path: paths.PathLike) -> bool:
  """True for a committed har_jax checkpoint folder (it holds the 'state' and 'meta' items)."""
  path = paths.path(path)
  return (re.fullmatch(r'0|[1-9]\d*', path.name) is not None and
          all((path / item).is_dir() for item in ITEMS))


def metrics_problem(path: paths.PathLike, best_metric: str) -> Optional[str]:
  """Why the metrics file of checkpoint folder `path` is unusable, or None (also when absent)."""
  metrics_path = paths.path(path) / METRICS_FILE
  if not metrics_path.exists():
    return None
  try:
    metrics = json.loads(metrics_path.read_text(encoding='utf-8'))
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError.
    return f'its metrics file {metrics_path} is not valid JSON ({e})'
  if not isinstance(metrics, dict) or not isinstance(metrics.get(best_metric), (int, float)):
    return f'its metrics file {metrics_path} has no number {best_metric!r}'
  return None


def inventory(directory: paths.PathLike, best_metric: str) -> Inventory:
  """Sorts the entries of `directory` (which may not exist) into own, damaged and foreign."""
  own, damaged, foreign = [], {}, []
  directory = paths.path(directory)
  for name in paths.list_names(directory):
    path = directory / name
    if _TMP_MARK in name or name in _ORBAX_ENTRIES:
      continue
    if not is_own_checkpoint(path):
      foreign.append(name)
      continue
    problem = metrics_problem(path, best_metric)
    if problem:
      damaged[int(name)] = problem
    else:
      own.append(int(name))
  return Inventory(tuple(sorted(own)), damaged, tuple(foreign))


class OwnStepsFormat(ocp.step.NameFormat):
  """Orbax's standard step names ('<step>'), listing only own steps not in `hidden`.

  Orbax finds, reads metrics of, restores and deletes steps through this format only, so foreign
  entries and hidden (damaged) steps are invisible to it.
  """

  def __init__(self, hidden=()):
    self._standard = ocp.step.standard_name_format()
    self.hidden = set(hidden)

  def _visible(self, metadata) -> bool:
    return metadata.step not in self.hidden and is_own_checkpoint(str(metadata.path))

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_all(self, base_path) -> Iterator[ocp.step.Metadata]:
    return (m for m in self._standard.find_all(base_path) if self._visible(m))

  def find_step(self, base_path, step: int) -> ocp.step.Metadata:
    metadata = self._standard.find_step(base_path, step)
    if not self._visible(metadata):
      raise ValueError(f'No har_jax checkpoint for step {step} under {base_path}.')
    return metadata


def write_problem(folder: paths.PathLike) -> Optional[str]:
  """None if a file can be created and removed in `folder`, else why not (one line)."""
  probe = paths.path(folder) / f'.har_jax_write_probe_{os.getpid()}_{jax.process_index()}'
  try:
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    return f'{type(e).__name__}: {e.strerror or e}'
  return None


def space_problem(folder: paths.PathLike, needed_bytes: int) -> Optional[str]:
  """Why `needed_bytes` will not fit on the disk of local `folder` (None if they fit, or for a
  URL). A save that runs out of space mid-way fails in tensorstore's threads with dozens of
  tracebacks and leaves a partial folder; checking first avoids both in the common case."""
  if paths.is_url(folder):
    return None
  free = shutil.disk_usage(os.fspath(paths.path(folder))).free
  if free >= needed_bytes:
    return None
  return (f'the disk is full: a checkpoint needs about {needed_bytes / 2**20:.1f} MiB, '
          f'{free / 2**20:.1f} MiB are free')


def lexists(path: paths.PathLike) -> bool:
  """True when `path` exists (a dangling local link counts)."""
  path = paths.path(path)
  return path.exists() or (not paths.is_url(path) and os.path.islink(path))


def is_io_error(error: BaseException) -> bool:
  """True when reading failed for want of access (permissions, a flaky disk or network), rather
  than because the checkpoint's bytes are missing or bad."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno not in _DAMAGE_ERRNOS:
      return True
    if any(code in str(error) for code in _IO_STATUS):
      return True
    error = error.__cause__ or error.__context__
  return False


def layout_differences(saved_tree, state_dict, limit: int = 5) -> list[str]:
  """Leaf paths (and shapes) that differ between a checkpoint's tree metadata and a state dict."""
  def shapes(tree):
    return {jax.tree_util.keystr(path): tuple(getattr(leaf, 'shape', None) or ())
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  saved, wanted = shapes(saved_tree), shapes(state_dict)
  out = [f'{p}: only in the checkpoint' for p in sorted(saved.keys() - wanted.keys())]
  out += [f'{p}: not in the checkpoint' for p in sorted(wanted.keys() - saved.keys())]
  out += [f'{p}: shape {saved[p]} in the checkpoint, {wanted[p]} here'
          for p in sorted(saved.keys() & wanted.keys()) if saved[p] != wanted[p]]
  return out[:limit] + ([f'... and {len(out) - limit} more'] if len(out) > limit else [])
