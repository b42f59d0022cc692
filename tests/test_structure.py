"""Structure that keeps the library predictable: one table of defaults, no preparation code on
the training path, validation without side effects."""

import ast
import os
import subprocess
import sys

import pytest

from configs import default
from har_jax import config_fields
from har_jax import config_validation
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_the_values_the_default_config_sets():
  config = default.get_config()
  for dotted, value in config_fields.DEFAULTS.items():
    assert config_fields.get(config, dotted, 'missing') == value, dotted


def test_getter_reads_config_dicts_and_saved_json_alike():
  config = default.get_config()
  saved = config.to_dict()
  del saved['model']['conv_impl']
  assert config_fields.get(config, 'model.encoder') == config_fields.get(saved, 'model.encoder')
  assert config_fields.get(saved, 'model.conv_impl') == 'auto'  # A config saved before the field.
  assert config_fields.get(saved, 'model.nope') is None
  assert config_fields.get(saved, 'model.encoder.deeper', 'x') == 'x'


def import_graph(root: str, package: str = 'har_jax') -> dict[str, set[str]]:
  """{module: the package's modules it imports}, from the source of every module under root/package
  (imports inside functions included); a package is its __init__ module."""
  modules = {}
  for folder, _, files in os.walk(os.path.join(root, package)):
    for file in files:
      if file.endswith('.py'):
        parts = os.path.relpath(os.path.join(folder, file), root)[:-3].split(os.sep)
        modules['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = (
            os.path.join(folder, file))
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        imported.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        imported.update(f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
                        else node.module for a in node.names)
    graph[name] = {m for m in imported if m in modules and m != name}
  return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import cycles of a graph, one per strongly connected component (Tarjan), each as a path
  [a, b, ..., a] through it."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  cycles = []
  for component in components:
    start = min(component)
    path, seen = [start], {start}
    while True:  # Walk inside the component until a module repeats.
      step = min(w for w in graph[path[-1]] if w in component)
      path.append(step)
      if step in seen:
        cycles.append(path[path.index(step):])
        break
      seen.add(step)
  return cycles


def test_the_import_cycle_finder_finds_a_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert import_cycles(graph) == [['a', 'b', 'c', 'a']]
  assert import_cycles({'a': {'b'}, 'b': set()}) == []


def test_no_module_of_the_package_imports_itself_in_a_circle():
  graph = import_graph(REPO)
  assert 'har_jax.data.datasets' in graph['har_jax.data.pipeline']  # The graph is read.
  assert import_cycles(graph) == []


_SOURCE_TYPES = ('FrameStore', 'DatasetBuilder', 'DataSource', 'TfdsSource', 'FrameStoreSource')


def test_only_the_data_layer_asks_which_kind_of_dataset_it_has():
  """Code outside har_jax/data reads datasets through the DataSource interface: no isinstance on
  a dataset type (a frame store, a TFDS builder, a source)."""
  found = []
  for folder in ('har_jax', 'scripts', 'benchmarks'):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
      for file in files:
        path = os.path.join(root, file)
        if not file.endswith('.py') or path.startswith(os.path.join(REPO, 'har_jax', 'data')):
          continue
        with open(path) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          if (isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'isinstance' and
              len(node.args) == 2 and any(t in ast.unparse(node.args[1]) for t in _SOURCE_TYPES)):
            found.append(f'{os.path.relpath(path, REPO)}:{node.lineno}')
  assert found == []


@pytest.mark.slow
def test_the_training_path_imports_no_dataset_preparation_code():
  """Training, evaluation and inference read prepared datasets: importing them loads neither the
  preparation package (har_jax.data.prepare) nor PyAV. (The one import of har_jax.data.prepare
  on that path is where the built-in synthetic set is generated on first use.)"""
  code = ('import sys; import main; from har_jax import inference; from har_jax import train; '
          'from har_jax.evaluation import checkpoint_eval; '
          'bad = sorted(m for m in sys.modules if m == "av" or m.startswith("av.") or '
          'm.startswith("har_jax.data.prepare")); print("loaded:", bad)')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=True).stdout
  assert out.strip().splitlines()[-1] == 'loaded: []'


def test_validating_an_ungenerated_synthetic_set_writes_nothing(tmp_path):
  """Validation only reads: the synthetic set is generated where the pipeline is built."""
  config = conftest.make_tiny_config(tmp_path / 'tfds')
  assert config_validation.find_problems(config, num_devices=4) == []
  config.image_size = 64  # Larger than the tiny set's 32x32 frames: known without generating.
  problems = config_validation.find_problems(config, num_devices=4)
  assert len(problems) == 1 and 'image_size=64' in problems[0], problems
  assert not os.path.exists(tmp_path / 'tfds')
