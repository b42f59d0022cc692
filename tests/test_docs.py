"""The README and docs/ stay true to the tree: every relative link resolves, every module of
har_jax/ is in the README's layout, and the layout is what scripts/update_readme_layout.py writes."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
RERUN = 'run python scripts/update_readme_layout.py'
_LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')  # [text](target), inline links only.
_FENCE = re.compile(r'^```.*?^```', re.S | re.M)


def _layout_script():
  spec = importlib.util.spec_from_file_location(
      'update_readme_layout', REPO / 'scripts' / 'update_readme_layout.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _pages() -> list[pathlib.Path]:
  return [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md')),
          *sorted((REPO / 'benchmarks').glob('*.md'))]


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(page: pathlib.Path) -> set[str]:
  text = _FENCE.sub('', page.read_text(encoding='utf-8'))
  return {_slug(m.group(1)) for m in re.finditer(r'^#{1,6} (.+)$', text, re.M)}


def _links(page: pathlib.Path) -> list[str]:
  text = _FENCE.sub('', page.read_text(encoding='utf-8'))
  return [t for t in _LINK.findall(text) if not re.match(r'[a-z][a-z0-9+.-]*:', t)]


def test_the_docs_exist_and_the_readme_is_a_front_page():
  names = {p.name for p in (REPO / 'docs').glob('*.md')}
  assert {'ucf101.md', 'own_videos.md', 'evaluation.md', 'streaming.md', 'export.md', 'pods.md',
          'preemption.md', 'speed.md', 'pretrained.md'} <= names, names
  readme = (REPO / 'README.md').read_text(encoding='utf-8')
  for name in names:  # The map on the front page names every page.
    assert f'](docs/{name})' in readme, name
  prose = _layout_script()._BLOCK.sub('', readme)
  assert len(prose.splitlines()) <= 120, 'README.md: keep the front page short; move text to docs/'


def test_every_relative_link_in_the_readme_and_docs_resolves():
  bad = []
  for page in _pages():
    for target in _links(page):
      path, _, anchor = target.partition('#')
      resolved = (page.parent / path).resolve() if path else page
      if not resolved.exists():
        bad.append(f'{page.relative_to(REPO)}: {target} (no such file)')
      elif anchor and resolved.suffix == '.md' and anchor not in _anchors(resolved):
        bad.append(f'{page.relative_to(REPO)}: {target} (no such heading)')
  assert not bad, '\n'.join(bad)


def test_slugs_follow_github():
  assert _slug('Quick start: the synthetic set') == 'quick-start-the-synthetic-set'
  assert _slug('Compatibility window of `model.jax`') == 'compatibility-window-of-modeljax'
  assert _slug('Training on a TPU pod / several GPU nodes') == (
      'training-on-a-tpu-pod--several-gpu-nodes')


def test_every_module_of_the_package_is_in_the_readme_layout():
  readme = (REPO / 'README.md').read_text(encoding='utf-8')
  script = _layout_script()
  blocks = script._BLOCK.findall(readme)
  assert len(blocks) == 1, f'README.md has no layout block; {RERUN}'
  missing = [p.as_posix() for p in script.module_paths()
             if f'[`{p.as_posix() if p.name != "__init__.py" else p.parent.as_posix() + "/"}`]'
             not in blocks[0]]
  assert not missing, f'README.md layout lacks {missing}; {RERUN}'
  assert blocks[0] == script.layout(), f'README.md layout is out of date; {RERUN}'


def test_the_layout_script_is_idempotent_and_follows_the_tree(tmp_path):
  script = _layout_script()
  package = tmp_path / 'har_jax'
  (package / 'video').mkdir(parents=True)
  (package / '__init__.py').write_text('"""The package."""\n')
  (package / 'video' / '__init__.py').write_text('"""Video I/O.\n\nMore text."""\n')
  (package / 'video' / 'files.py').write_text('"""Opening files: one\nline wrapped. Then more."""\n')
  (package / 'zeta.py').write_text('x = 1\n')
  readme = 'Intro.\n\n<!-- layout:start -->\nstale\n<!-- layout:end -->\n\nEnd.\n'
  once = script.updated_readme(readme, tmp_path)
  assert script.updated_readme(once, tmp_path) == once
  assert once.startswith('Intro.\n\n' + script.START) and once.endswith(script.END + '\n\nEnd.\n')
  assert once.split('\n')[3:7] == [
      '- [`har_jax/`](har_jax/): The package.',
      '- [`har_jax/video/`](har_jax/video/): Video I/O.',
      '- [`har_jax/video/files.py`](har_jax/video/files.py): Opening files: one line wrapped.',
      '- [`har_jax/zeta.py`](har_jax/zeta.py): (no docstring)']
  (package / 'video' / 'files.py').unlink()
  assert 'files.py' not in script.updated_readme(once, tmp_path)
  with pytest.raises(ValueError, match='exactly one block'):
    script.updated_readme('no markers', tmp_path)


def test_the_layout_check_names_the_command_to_run():
  out = subprocess.run([sys.executable, 'scripts/update_readme_layout.py', '--check'], cwd=REPO,
                       capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, 'PYTHONPATH': ''})
  if out.returncode:
    assert RERUN in out.stderr, out.stderr
  assert out.returncode == 0, out.stderr
