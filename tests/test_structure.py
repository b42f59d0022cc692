"""Structure that keeps the library predictable: one table of defaults, no preparation code on
the training path, validation without side effects."""

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


@pytest.mark.slow
def test_the_training_path_imports_no_dataset_preparation_code():
  code = ('import sys; import main; from har_jax import inference; '
          'bad = [m for m in ("av", "har_jax.data.video_folder", "har_jax.data.synthetic_actions",'
          ' "har_jax.data.ucf101") if m in sys.modules]; print("loaded:", bad)')
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
