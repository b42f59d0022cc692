"""One training run per workdir: an exclusive lock file, `<workdir>/.har_jax.lock`.

  with workdir_lock.hold(workdir):   # errors.UserError naming the holder if another run has it
    ...train...

The file holds {"host", "pid", "started", "heartbeat"} (JSON). Training takes it (process 0 of a
multi-process run, before anything is written to the workdir) and removes it on exit. A lock is
stale, and taken over with a warning, when its process is gone: on the same host, when that PID
no longer runs; on another host (a preempted pod worker comes back as a new machine), when its
heartbeat, rewritten every HEARTBEAT_S seconds, is older than STALE_AFTER_S. Readers (eval,
predict, stream, export) take no lock.

On a local disk the lock is created atomically (O_CREAT | O_EXCL). On object storage there is no
atomic create-if-absent through the path layer: the file is written, then read back, and the run
whose record is there wins; two runs started within about a second of each other can both pass.
"""

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from typing import Iterator, Optional

from absl import logging

from har_jax import errors
from har_jax import paths

LOCK_FILE = '.har_jax.lock'
HEARTBEAT_S = 60.0
STALE_AFTER_S = 300.0


def _record() -> dict:
  now = time.time()
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'heartbeat': now,
          'started': datetime.datetime.fromtimestamp(now).isoformat(timespec='seconds')}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def stale_reason(holder: dict, now: Optional[float] = None) -> Optional[str]:
  """Why the run recorded in `holder` is gone, or None while it may still run."""
  now = time.time() if now is None else now
  if holder.get('host') == socket.gethostname():
    pid = holder.get('pid')
    if not isinstance(pid, int) or not _pid_alive(pid):
      return f'its process {pid} on this host is gone'
    return None
  age = now - float(holder.get('heartbeat') or 0)
  if age > STALE_AFTER_S:
    return f'its heartbeat is {age:.0f} s old'
  return None


def _read(lock: paths.Path) -> Optional[dict]:
  try:
    holder = json.loads(lock.read_text())
  except FileNotFoundError:
    return None
  except ValueError:
    return {}  # Half-written or damaged: treated as stale below (no host, no pid).
  return holder if isinstance(holder, dict) else {}


def _refusal(workdir: str, holder: dict) -> str:
  return (f'Another training run holds {workdir}: PID {holder.get("pid")} on host '
          f'{holder.get("host")!r}, started {holder.get("started")}. Wait for it to end, stop it, '
          'or pass another --workdir (if that run is gone, delete '
          f'{paths.path(workdir) / LOCK_FILE}).')


def _create_local(lock: paths.Path, record: dict) -> bool:
  """Creates the lock file atomically; False when it exists."""
  try:
    fd = os.open(os.fspath(lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    json.dump(record, f)
  return True


def acquire(workdir: paths.PathLike) -> dict:
  """Takes the lock of `workdir` (created if needed); returns this run's record."""
  lock = paths.path(workdir) / LOCK_FILE
  lock.parent.mkdir(parents=True, exist_ok=True)
  record = _record()
  for _ in range(3):
    if paths.is_url(lock):
      holder = _read(lock)
      if holder is None:
        paths.write_text(lock, json.dumps(record))
        if _read(lock) == record:
          return record
        continue
    elif _create_local(lock, record):
      return record
    else:
      holder = _read(lock)
      if holder is None:
        continue
    reason = stale_reason(holder)
    if reason is None:
      raise errors.UserError(_refusal(str(paths.path(workdir)), holder))
    logging.warning('Taking over the lock of %s from PID %s on %r: %s.', workdir,
                    holder.get('pid'), holder.get('host'), reason)
    lock.unlink(missing_ok=True)
  raise errors.UserError(f'Could not take the lock {lock}: other runs keep taking it.')


def release(workdir: paths.PathLike, record: dict):
  """Removes the lock if it is still this run's."""
  lock = paths.path(workdir) / LOCK_FILE
  holder = _read(lock)
  if holder and holder.get('pid') == record['pid'] and holder.get('host') == record['host']:
    lock.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(workdir: paths.PathLike, heartbeat_s: float = HEARTBEAT_S) -> Iterator[dict]:
  """Holds the lock of `workdir` for the block, rewriting its heartbeat every `heartbeat_s`."""
  record = acquire(workdir)
  stop = threading.Event()

  def beat():
    while not stop.wait(heartbeat_s):
      with contextlib.suppress(Exception):  # A missed heartbeat only ages the lock.
        record['heartbeat'] = time.time()
        paths.write_text(paths.path(workdir) / LOCK_FILE, json.dumps(record))

  thread = threading.Thread(target=beat, name='har_jax_lock_heartbeat', daemon=True)
  thread.start()
  try:
    yield record
  finally:
    stop.set()
    thread.join(timeout=10)
    with contextlib.suppress(Exception):
      release(workdir, record)
