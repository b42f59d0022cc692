"""The one path layer: every file har_jax reads or writes in a workdir or data_dir goes through here.

A workdir or data_dir is a local folder or an object-store URL (`gs://bucket/run`). Both are
`etils.epath.Path`s, the path type Orbax and TFDS use, so a URL is never mangled by `os.path`:

  run = paths.path('gs://bucket/run')      # a local path is made absolute; a URL is kept as is
  paths.write_text(run / 'config.json', text)   # disk: temp file + rename; bucket: one object
  paths.move_tree(run / 'checkpoints' / '7', run / 'checkpoints_corrupt' / '7-1765000000')

On a local disk, writes are atomic (a temporary file in the same folder, then `os.replace`), so a
reader never sees half a file. On an object store an object appears whole when its upload ends
(there is no rename: a "move" is copy, then delete). TensorBoard events are written to a local
staging folder and uploaded whole (`metric_writer`), which is what TensorFlow's own GCS writer does
on every flush.

`configure_storage()` runs once at the start of each command (cli.parse_flags): gs:// paths go
through gcsfs (epath's fsspec backend, `EPATH_USE_TF=false`) rather than TensorFlow's GCS client,
because gcsfs, like Google's own clients, can be pointed at an emulator with
`STORAGE_EMULATOR_HOST`; the other clients' variables are derived from that one. TensorFlow's GCS
client cannot be pointed at an emulator: it is used only by tf.data to read TFDS record files
(tests/test_bucket_records.py covers that path through a test-only proxy, tests/gcs_tf_proxy.py).
"""

import contextlib
import os
import shutil
import tempfile
import time
from typing import Optional, Union

from etils import epath

from har_jax import errors

Path = epath.Path
PathLike = Union[str, os.PathLike]

EMULATOR_VARIABLE = 'STORAGE_EMULATOR_HOST'
# Credentials mean nothing to an emulator; the clients' probes of the GCE metadata server are
# pointed at a closed loopback port so that they fail at once and send nothing off the machine.
_NO_METADATA_SERVER = '127.0.0.1:1'


def is_url(p: PathLike) -> bool:
  """True for `scheme://...` (gs://, s3://, ...), False for a local path."""
  scheme, sep, _ = os.fspath(p).partition('://')
  return bool(sep) and scheme.isalnum() and len(scheme) > 1


def path(p: PathLike) -> Path:
  """`p` as an epath.Path: a local path expanded (~) and made absolute, a URL unchanged."""
  if isinstance(p, Path) and is_url(p):
    return p
  text = os.fspath(p)
  return Path(text) if is_url(text) else Path(os.path.abspath(os.path.expanduser(text)))


def configure_storage(environ=None) -> Optional[str]:
  """Chooses the clients of gs:// paths for this process; returns the emulator URL, if any.

  Sets EPATH_USE_TF=false unless the user set it (gcsfs for gs://). With STORAGE_EMULATOR_HOST
  set, also derives what the other clients read: TENSORSTORE_GCS_HTTP_URL (Orbax's array
  storage), anonymous gcsfs credentials, gcsfs without its gRPC bucket-type probe (an emulator
  has no such service), and no GCE metadata probes. Variables the user set are kept.
  """
  env = os.environ if environ is None else environ
  env.setdefault('EPATH_USE_TF', 'false')
  emulator = env.get(EMULATOR_VARIABLE)
  if not emulator:
    return None
  if '://' not in emulator:
    emulator = f'http://{emulator}'
  derived = {
      'TENSORSTORE_GCS_HTTP_URL': emulator,
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'FSSPEC_GS_TOKEN': 'anon',
      'NO_GCE_CHECK': 'true',
      'GCE_METADATA_HOST': _NO_METADATA_SERVER,
      'GCE_METADATA_ROOT': _NO_METADATA_SERVER,
      'GCE_METADATA_IP': _NO_METADATA_SERVER,
  }
  for name, value in derived.items():
    env.setdefault(name, value)
  return emulator


def write_bytes(target: PathLike, data: bytes) -> Path:
  """Writes `data` to `target` whole: atomically on a disk, as one object on a bucket."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_url(target):
    target.write_bytes(data)
    return target
  fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f'.{target.name}.',
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.fspath(target))
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  return target


def write_text(target: PathLike, text: str) -> Path:
  """write_bytes of `text` in UTF-8."""
  return write_bytes(target, text.encode('utf-8'))


def read_text(source: PathLike) -> str:
  return path(source).read_text(encoding='utf-8')


def move_tree(source: PathLike, destination: PathLike):
  """Moves a folder: a rename on a disk; copy, then delete, on an object store."""
  source, destination = path(source), path(destination)
  destination.parent.mkdir(parents=True, exist_ok=True)
  if not is_url(source) and not is_url(destination):
    os.rename(os.fspath(source), os.fspath(destination))
    return
  for root, _, files in source.walk():
    relative = os.fspath(root)[len(os.fspath(source)):].lstrip('/')
    for name in sorted(files):
      target = destination / relative / name if relative else destination / name
      (root / name).copy(target, overwrite=True)
  source.rmtree()


def replace_folder(new: str, target: str, aside: str):
  """Renames the finished local folder `new` to `target`. A folder already at `target` is first
  renamed to `aside` and deleted only once `new` is in place (put back if that rename fails), so
  what the user has stays until its replacement exists."""
  if not os.path.lexists(target):
    os.rename(new, target)
    return
  os.rename(target, aside)
  try:
    os.rename(new, target)
  except BaseException:
    os.rename(aside, target)
    raise
  shutil.rmtree(aside, ignore_errors=True)


def require_local(p: PathLike, what: str, remedy: str):
  """Raises errors.UserError when `p` is a URL: `what` needs a POSIX file system."""
  if is_url(p):
    raise errors.UserError(f'{what} is in object storage ({os.fspath(p)}): {remedy}')


class _MirroredSummaries:
  """A clu MetricWriter that writes TensorBoard events to a local staging folder and uploads the
  event files whole to `target` on flush, on close, and at most every `every_s` seconds."""

  def __init__(self, target: Path, every_s: float = 60.0):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (TF is slow to import)
    self._staging = tempfile.mkdtemp(prefix='har_jax_events_')
    self._writer = metric_writers.SummaryWriter(self._staging)
    self._target, self._every_s = target, every_s
    self._uploaded, self._last = {}, time.monotonic()

  def __getattr__(self, name):
    method = getattr(self._writer, name)
    if not name.startswith('write_'):
      return method

    def write(*args, **kwargs):
      result = method(*args, **kwargs)
      if time.monotonic() - self._last > self._every_s:
        self.flush()
      return result
    return write

  def _upload(self):
    for name in sorted(os.listdir(self._staging)):
      local = os.path.join(self._staging, name)
      size = os.path.getsize(local)
      if self._uploaded.get(name) != size:
        with open(local, 'rb') as f:
          write_bytes(self._target / name, f.read())
        self._uploaded[name] = size
    self._last = time.monotonic()

  def flush(self):
    self._writer.flush()
    self._upload()

  def close(self):
    self._writer.close()
    self._upload()
    shutil.rmtree(self._staging, ignore_errors=True)


def metric_writer(logdir: PathLike, *, just_logging: bool = False):
  """clu's default writer (log lines + TensorBoard events in `logdir`, asynchronous); on an
  object store, the events go through this path layer (see _MirroredSummaries)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  if just_logging or not is_url(logdir):
    return metric_writers.create_default_writer(
        None if just_logging else os.fspath(path(logdir)), just_logging=just_logging)
  return metric_writers.AsyncMultiWriter([metric_writers.LoggingWriter(),
                                         _MirroredSummaries(path(logdir))])


def list_names(folder: PathLike) -> list[str]:
  """Sorted names of the entries of `folder` ([] when it does not exist)."""
  folder = path(folder)
  return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


