"""pip's resolver, as a dry run on wheels only, for each accelerator extra on each supported Python.

Needs the package registry. For each supported Python, one `pip install --dry-run --report` of the
requirements in pyproject.toml (`dependencies` plus every accelerator extra and the onnx extra at
once) for a manylinux x86_64 host with glibc 2.35 (Ubuntu 22.04, as on TPU VMs); the three calls
run in parallel threads.
The extras only add requirements, so a joint solution is also a solution of each extra alone.
pip evaluates environment markers (`; python_version >= "3.13"`) for the Python running it, whatever
--python-version says, so the test checks those markers for the target Python itself.
"""
import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
PYTHONS = [m.group(1) for c in PROJECT['classifiers']
           if (m := re.fullmatch(r'Programming Language :: Python :: (3\.\d+)', c))]
ACCELERATORS = ['cpu', 'cuda12', 'cuda13', 'tpu']
# Published only as a source archive (tensorflow-datasets needs it). It is pure Python, so one wheel
# built here stands in for it on every Python; --only-binary=:all: would refuse it otherwise.
SDIST_ONLY = ['promise']
GLIBC_MINOR = 35
PLATFORMS = ([f'manylinux_2_{minor}_x86_64' for minor in range(GLIBC_MINOR, 4, -1)]
             + ['manylinux2014_x86_64', 'manylinux2010_x86_64', 'manylinux1_x86_64'])
# Packages each accelerator must bring, at jaxlib's exact version (None: any version).
ACCELERATOR_PACKAGES = {
    'cpu': {},
    'cuda12': {'jax-cuda12-plugin': 'jaxlib', 'jax-cuda12-pjrt': 'jaxlib'},
    'cuda13': {'jax-cuda13-plugin': 'jaxlib', 'jax-cuda13-pjrt': 'jaxlib'},
    'tpu': {'libtpu': None},
}


def _pip(*args, timeout=600):
  env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INPUT='1')
  return subprocess.run([sys.executable, '-m', 'pip', *args], capture_output=True, text=True,
                        env=env, timeout=timeout, check=False)


def _canonical(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def _resolve(python, tmp, wheels):
  """Returns pip's report of what it would install on `python`, or raises with pip's error."""
  requirements = list(PROJECT['dependencies']) + PROJECT['optional-dependencies']['onnx']
  for accelerator in ACCELERATORS[1:]:
    requirements += PROJECT['optional-dependencies'][accelerator]
  report = tmp / f'report-{python}.json'
  # fast-deps reads each wheel's metadata with HTTP range requests. Without it, pip downloads every
  # wheel whole from an index that serves no separate metadata files (PEP 658): ~6 GB per Python.
  result = _pip('install', '--dry-run', '--ignore-installed', '--quiet', '--only-binary=:all:',
                '--use-feature=fast-deps', '--find-links', str(wheels), '--python-version', python,
                *(f'--platform={p}' for p in PLATFORMS), '--report', str(report), *requirements)
  if result.returncode:
    raise RuntimeError(f'pip could not resolve {ACCELERATORS} on Python {python}:\n'
                       + result.stderr[-3000:])
  return json.loads(report.read_text())['install']


@pytest.fixture(scope='module')
def resolutions(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('resolve')
  wheels = tmp / 'wheels'
  built = _pip('wheel', '--quiet', '--no-deps', '--wheel-dir', str(wheels), *SDIST_ONLY)
  assert built.returncode == 0, built.stderr[-3000:]
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(PYTHONS)) as pool:
    futures = {p: pool.submit(_resolve, p, tmp, wheels) for p in PYTHONS}
  out = {}
  for python, future in futures.items():
    try:
      out[python] = future.result()
    except RuntimeError as e:
      out[python] = e
  return out


def test_supported_pythons_match_requires_python():
  assert PYTHONS == ['3.11', '3.12', '3.13']
  assert PROJECT['requires-python'] == '>=3.11,<3.14'


@pytest.mark.parametrize('accelerator', ['cuda12', 'cuda13', 'tpu'])
def test_extra_keeps_the_jax_pin(accelerator):
  (base,) = [r for r in PROJECT['dependencies'] if r.startswith('jax[')]
  pin = base[base.index(']') + 1:]
  assert PROJECT['optional-dependencies'][accelerator] == [f'jax[{accelerator}]{pin}']


@pytest.mark.slow
@pytest.mark.parametrize('python', PYTHONS)
@pytest.mark.parametrize('accelerator', ACCELERATORS)
def test_resolves_within_the_pins(resolutions, python, accelerator):
  installs = resolutions[python]
  if isinstance(installs, Exception):
    raise installs
  versions = {_canonical(i['metadata']['name']): i['metadata']['version'] for i in installs}
  for name in ('jax', 'jaxlib'):
    assert re.fullmatch(r'0\.10\.\d+', versions[name]), (name, versions[name])
  for name, version in ACCELERATOR_PACKAGES[accelerator].items():
    assert name in versions, f'{accelerator} on Python {python} does not install {name}'
    if version == 'jaxlib':
      assert versions[name] == versions['jaxlib'], (name, versions[name], versions['jaxlib'])
  assert 'tensorflow-cpu' in versions


def test_the_onnx_converter_pin_is_the_one_setup_installs_without_its_dependencies():
  """jax2onnx declares orbax-checkpoint<0.11.37, which the orbax pin excludes: setup.sh installs
  it with --no-deps after the extras, and the onnx extra brings what it imports."""
  from har_jax import onnx_export  # pylint: disable=g-import-not-at-top
  pyproject = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  assert pyproject['tool']['har_jax']['install-no-deps'] == [onnx_export.CONVERTER_REQUIREMENT]
  assert onnx_export.CONVERTER_REQUIREMENT in onnx_export.INSTALL_COMMAND
  extra = {Requirement(r).name for r in PROJECT['optional-dependencies']['onnx']}
  assert extra == {'onnx', 'onnx-ir', 'onnxruntime', 'equinox', 'dm-pix'}
  setup = (ROOT / 'scripts' / 'setup.sh').read_text()
  assert 'extras=test,onnx ;;' in setup and '"test,onnx,$accelerator"' in setup
  assert '["tool"]["har_jax"]["install-no-deps"]' in setup and '--no-deps $no_deps' in setup


@pytest.mark.parametrize('args', [['gpu'], ['cuda12', 'tpu'], ['cuda']])
def test_setup_refuses_an_unknown_accelerator(tmp_path, args):
  venv = tmp_path / 'venv'
  result = subprocess.run(['bash', str(ROOT / 'scripts' / 'setup.sh'), *args], capture_output=True,
                          text=True, env=dict(os.environ, VENV=str(venv)), timeout=60, check=False)
  assert result.returncode == 2
  assert result.stdout == ''
  (line,) = result.stderr.splitlines()
  assert line.startswith('error: ') and 'cpu, cuda12, cuda13, tpu' in line
  assert not venv.exists()


@pytest.mark.slow
@pytest.mark.parametrize('python', PYTHONS)
def test_python_version_markers_hold_for_the_target(resolutions, python):
  installs = resolutions[python]
  if isinstance(installs, Exception):
    raise installs
  versions = {_canonical(i['metadata']['name']): i['metadata']['version'] for i in installs}
  target = {'python_version': python, 'python_full_version': f'{python}.0', 'extra': ''}
  unmet = []
  for install in installs:
    for line in install['metadata'].get('requires_dist', []):
      requirement = Requirement(line)
      marker = requirement.marker
      if marker and 'python' in str(marker) and marker.evaluate(target):
        version = versions.get(_canonical(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
          unmet.append(f'{install["metadata"]["name"]} needs {line}; resolved: {version}')
  assert not unmet, unmet
