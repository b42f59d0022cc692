"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel, and is committed clean."""

import os

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'quickstart.ipynb')


def test_committed_notebook_has_no_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  env_workdir = str(tmp_path / 'workdir')
  os.environ['HAR_JAX_NOTEBOOK_WORKDIR'] = env_workdir
  try:
    client = NotebookClient(notebook, timeout=900, kernel_name='python3',
                            resources={'metadata': {'path': os.path.join(REPO, 'notebooks')}})
    client.execute()
  finally:
    del os.environ['HAR_JAX_NOTEBOOK_WORKDIR']
  images = sum('image/png' in output.get('data', {})
               for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs)
  assert images >= 5, f'{images} pictures drawn'
  errors = [output for cell in notebook.cells if cell.cell_type == 'code'
            for output in cell.outputs if output.output_type == 'error']
  assert not errors, errors
  assert os.path.isdir(os.path.join(env_workdir, 'checkpoints', '300'))
