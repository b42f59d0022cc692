r"""Exported artifacts that say what they are and refuse damage: provenance, manifest.json, the
verifier and the loader of model.jax.

  artifacts.verify('exports/synthetic')            # UserError naming a missing or damaged file
  serve = artifacts.load_jax('exports/synthetic')  # verified, then jax.export.deserialize

`manifest.json`, at the export root, is written last (inside the staging folder, so it is moved
into place with the rest). It holds the provenance that model.json also holds, plus:
  files   {"<path relative to the manifest, '/'-separated>": "<SHA-256 hex>"} of every file
          written (saved_model/..., model.jax, model.json)
  sha256  the SHA-256 of the manifest's own canonical JSON without this key
          (json.dumps(manifest, sort_keys=True) in UTF-8), so the manifest is checked too.
A verifier needs only hashlib and json: docs/export.md shows one.
"""

import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess
from typing import Optional

import jax

from har_jax import errors
from har_jax import paths

SAVED_MODEL_DIR = 'saved_model'
JAX_FILE = 'model.jax'
METADATA_FILE = 'model.json'
MANIFEST_FILE = 'manifest.json'
_BLOCK = 1 << 20


def config_sha256(config) -> str:
  """SHA-256 hex of a config's canonical JSON (sorted keys, no spaces); a ConfigDict or a dict."""
  as_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  text = json.dumps(as_dict, sort_keys=True, separators=(',', ':'), default=str)
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def provenance(loaded, exported: Optional[jax.export.Exported]) -> dict:
  """What made the artifacts: har_jax, the libraries, jax.export's serialization version and
  platforms (None without model.jax), the checkpoint's config digest, class names and source.

  Args:
    loaded: the inference.LoadedModel that was exported.
    exported: the jax.export.Exported written to model.jax, or None when it was not written.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only the exporter needs it)
  return {
      'har_jax': {'version': _har_jax_version(), 'commit': _git_commit()},
      'versions': {'jax': jax.__version__, 'jaxlib': _jaxlib_version(),
                   'tensorflow': tf.__version__},
      'jax_export': None if exported is None else {
          'serialization_version': exported.calling_convention_version,
          'platforms': list(exported.platforms)},
      'config_sha256': config_sha256(loaded.config),
      'class_names': list(loaded.class_names),
      'source': {'workdir': str(paths.path(loaded.workdir)), 'step': loaded.step},
      'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def write_manifest(folder: str, described: dict) -> dict:
  """Writes `folder`/manifest.json: `described` plus the digests of every file under the local
  `folder` (so it is written last), plus its own digest. Returns the manifest."""
  manifest = dict(described, files=local_digests(folder))
  manifest['sha256'] = _manifest_sha256(manifest)
  with open(os.path.join(folder, MANIFEST_FILE), 'w') as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  return manifest


def local_digests(folder: str) -> dict:
  """{relative '/'-separated path: SHA-256 hex} of every file under the local `folder`."""
  digests = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      digests[os.path.relpath(path, folder).replace(os.sep, '/')] = _sha256(path)
  return dict(sorted(digests.items()))


def verify(folder: paths.PathLike) -> dict:
  """Checks every file of the export `folder` against its manifest.json; returns the manifest.

  Raises:
    errors.UserError: one line naming the missing or damaged file (manifest.json included).
  """
  folder = paths.path(folder)
  manifest = _read_manifest(folder)
  for name, expected in manifest['files'].items():
    file = folder / name
    if not file.is_file():
      raise errors.UserError(f'{file} is missing from the export. {reexport_hint(folder, manifest)}')
    if _sha256(file) != expected:
      raise errors.UserError(f'{file} is damaged: its SHA-256 is not the one {MANIFEST_FILE} '
                             f'records. {reexport_hint(folder, manifest)}')
  return manifest


def load_jax(folder: paths.PathLike) -> jax.export.Exported:
  """model.jax of the export `folder`, verified first, deserialized by this JAX.

  Raises:
    errors.UserError: a damaged or missing file (see `verify`), an export without model.jax, or a
      model.jax this JAX cannot load (both JAX versions and the re-export command in one line).
  """
  folder = paths.path(folder)
  manifest = verify(folder)
  if JAX_FILE not in manifest['files']:
    raise errors.UserError(f'{folder} has no {JAX_FILE} (it was exported without the jax format). '
                           f'{reexport_hint(folder, manifest)}')
  data = (folder / JAX_FILE).read_bytes()
  try:
    exported = jax.export.deserialize(bytearray(data))
    version = exported.calling_convention_version
    low = jax.export.minimum_supported_calling_convention_version
    high = jax.export.maximum_supported_calling_convention_version
    if not low <= version <= high:
      raise ValueError(f'serialization version {version}, outside the {low}..{high} it supports')
  except Exception as e:  # pylint: disable=broad-except  (the verified bytes are what was written)
    made_by = manifest.get('versions', {})
    reason = ' '.join(str(e).split())[:200] or type(e).__name__
    raise errors.UserError(
        f'{folder / JAX_FILE} was exported by JAX {made_by.get("jax")} (jaxlib '
        f'{made_by.get("jaxlib")}) and this JAX {jax.__version__} (jaxlib {_jaxlib_version()}) '
        f'cannot load it ({reason}). {reexport_hint(folder, manifest, " with this JAX")}'
    ) from None
  return exported


def reexport_hint(folder, manifest: dict, why: str = '') -> str:
  """'Re-export it from its checkpoint<why>: python scripts/export.py --workdir=... --out=...
  --overwrite', with the workdir the manifest records."""
  workdir = (manifest.get('source') or {}).get('workdir') or '<the training workdir>'
  return (f'Re-export it from its checkpoint{why}: python scripts/export.py '
          f'--workdir={workdir} --out={folder} --overwrite')


def _read_manifest(folder: paths.Path) -> dict:
  """The parsed manifest.json of `folder`, or a UserError if it is missing or damaged."""
  where = folder / MANIFEST_FILE
  if not where.is_file():
    raise errors.UserError(f'{where} is missing: {folder} is not a har_jax export, or was '
                           f'exported before manifests. {reexport_hint(folder, {})}')
  try:
    manifest = json.loads(where.read_bytes())
    claimed = manifest.pop('sha256')
    names = list(manifest['files'])
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise errors.UserError(f'{where} is damaged (not a manifest: {type(e).__name__}). '
                           f'{reexport_hint(folder, {})}') from None
  if claimed != _manifest_sha256(manifest):
    raise errors.UserError(f'{where} is damaged: its own SHA-256 does not match. '
                           f'{reexport_hint(folder, manifest)}')
  outside = [n for n in names if n.startswith('/') or '..' in n.split('/')]
  if outside:
    raise errors.UserError(f'{where} lists files outside the export: {outside[:3]}.')
  return manifest


def _manifest_sha256(manifest: dict) -> str:
  body = {k: v for k, v in manifest.items() if k != 'sha256'}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode('utf-8')).hexdigest()


def _sha256(path) -> str:
  digest = hashlib.sha256()
  with paths.path(path).open('rb') as f:
    for block in iter(lambda: f.read(_BLOCK), b''):
      digest.update(block)
  return digest.hexdigest()


def _har_jax_version() -> Optional[str]:
  try:
    return importlib.metadata.version('har_jax')
  except importlib.metadata.PackageNotFoundError:
    return None


def _git_commit() -> Optional[str]:
  """HEAD of the git checkout that holds this package, or None (installed, no git, any error)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, '.git')):
    return None
  try:
    done = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  commit = done.stdout.strip()
  return commit if done.returncode == 0 and len(commit) == 40 else None


def _jaxlib_version() -> Optional[str]:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None
