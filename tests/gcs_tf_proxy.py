"""Lets TensorFlow's own GCS client reach the test emulator (tests/gcs_emulator.py). Tests only.

Why: tf.data reads TFDS record files under gs:// with TensorFlow's C++ GCS client, which always
calls https://www.googleapis.com and https://storage.googleapis.com; unlike gcsfs and tensorstore,
no variable points it at an emulator. Its libcurl does honour HTTPS_PROXY, so this proxy, on
127.0.0.1, answers its `CONNECT <google host>:443`, ends TLS there with a throwaway self-signed
certificate (that curl trusts through CURL_CA_BUNDLE) and re-sends each request to the emulator's
plain-HTTP port on 127.0.0.1. It connects nowhere else: all traffic stays on 127.0.0.1, and the
Google host names are never even resolved.

Two fixes on the way (why it must end TLS rather than tunnel bytes):
  * TF sends `Transfer-Encoding: identity` with empty POST bodies (upload start, rewrite), which
    the emulator (Go's net/http) refuses with 501: the proxy sends a Content-Length instead;
  * the emulator's resumable-upload Location is an http:// URL, which curl would fetch without
    the proxy: the proxy rewrites it to https://www.googleapis.com/... .

  with GcsEmulator(root) as gcs, TfGcsProxy(gcs, tmp_path) as proxy:
    subprocess.run([...], env=gcs.env(**proxy.env()))
"""

import datetime
import http.client
import http.server
import os
import ssl
import threading
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
_HOP_BY_HOP = ('transfer-encoding', 'content-length', 'connection', 'proxy-connection',
               'keep-alive', 'expect')


def _write_certificate(folder) -> tuple[str, str]:
  """A self-signed certificate (and its key) for the Google storage hosts, valid for a day."""
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, GOOGLE_HOSTS[0])])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
                         critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
  cert_file, key_file = os.path.join(folder, 'tf_gcs_proxy.pem'), os.path.join(folder, 'key.pem')
  with open(cert_file, 'wb') as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key_file, 'wb') as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return cert_file, key_file


class _Forwarder(http.server.BaseHTTPRequestHandler):
  """Serves the requests that arrive inside one decrypted tunnel: each goes to the emulator."""
  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):
    pass

  def _body(self) -> bytes:
    if (self.headers.get('Transfer-Encoding') or '').lower() == 'chunked':
      body = b''
      while size := int(self.rfile.readline().split(b';')[0], 16):
        body += self.rfile.read(size)
        self.rfile.readline()
      while self.rfile.readline() not in (b'\r\n', b'\n', b''):  # Trailers.
        pass
      return body
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _forward(self):
    body = self._body()
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
    if body or self.command in ('POST', 'PUT', 'PATCH'):
      headers['Content-Length'] = str(len(body))
    self.server.requests.append(f'{self.command} {self.headers.get("Host")}{self.path}')
    upstream = http.client.HTTPConnection('127.0.0.1', self.server.emulator_port, timeout=60)
    try:
      upstream.request(self.command, self.path, body=body or None, headers=headers)
      response = upstream.getresponse()
      data = response.read()
    finally:
      upstream.close()
    self.send_response_only(response.status, response.reason)
    for k, v in response.getheaders():
      if k.lower() in _HOP_BY_HOP:
        continue
      if k.lower() == 'location' and v.startswith('http://'):
        v = urllib.parse.urlsplit(v)._replace(scheme='https', netloc=GOOGLE_HOSTS[0]).geturl()
      self.send_header(k, v)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class _Tunnels(http.server.BaseHTTPRequestHandler):
  """Answers `CONNECT <google host>:443` and serves the tunnel with _Forwarder; any other
  method gets 501 (BaseHTTPRequestHandler's answer to a method it has no do_ for)."""

  def log_message(self, *args):
    pass

  def do_CONNECT(self):  # pylint: disable=invalid-name
    if self.path.rsplit(':', 1)[0] not in GOOGLE_HOSTS:
      self.send_error(403, 'only the Google storage hosts')
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.close_connection = True
    try:
      tls = self.server.tls.wrap_socket(self.connection, server_side=True)
      _Forwarder(tls, self.client_address, self.server)
    except (OSError, ssl.SSLError):
      pass  # The client hung up.


class TfGcsProxy:
  """The proxy on 127.0.0.1 (a background thread) for a running tests.gcs_emulator.GcsEmulator."""

  def __init__(self, emulator, folder):
    self._cert, key = _write_certificate(folder)
    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Tunnels)
    self._server.daemon_threads = True
    self._server.emulator_port = emulator.port
    self._server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._server.tls.load_cert_chain(self._cert, key)
    self._server.requests = []  # 'GET www.googleapis.com/storage/v1/...' of each forwarded one.
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  @property
  def requests(self) -> list[str]:
    return self._server.requests

  def env(self) -> dict:
    """What a subprocess's environment needs (on top of GcsEmulator.env()) for TF's client.

    Every HTTP(S) client that honours the proxy variables goes through this proxy, except those
    addressed to 127.0.0.1 (gcsfs and tensorstore talk to the emulator directly).
    """
    return {'HTTPS_PROXY': self.url, 'https_proxy': self.url, 'HTTP_PROXY': self.url,
            'http_proxy': self.url, 'ALL_PROXY': self.url, 'all_proxy': self.url,
            'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
            'CURL_CA_BUNDLE': self._cert, 'NO_GCE_CHECK': 'true',
            'GCS_RETRY_CONFIG_MAX_RETRIES': '1'}

  def close(self):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
