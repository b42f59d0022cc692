"""PyTorch-layout ResNet weights -> har_jax encoders: parity with torchvision, layouts, refusals,
and a fine-tune from converted weights.

The parity tests build random torchvision ResNets with random BatchNorm affine parameters and
running statistics (a wrong transposition, a stats/affine swap or a stride on the wrong conv cannot
pass), save them as safetensors and as an mmaction2 recogniser checkpoint (.pth: backbone.* with
ConvModule names, cls_head.*, mmengine's {'meta', 'state_dict'}), convert both, and compare the
pooled features with torch's own forward pass on 64x64 images. torch runs in a process of its own
(tests/torch_reference.py says why). They need torch and torchvision (the `torch` extra); they skip
without them, except where HAR_JAX_REQUIRE_TORCH=1 (CI), where a missing torch fails.
"""

import importlib.util
import os
import re
import subprocess
import sys

from flax import traverse_util
import jax
import numpy as np
import pytest

from configs import ucf101_imagenet
from configs import ucf101_resnet50_imagenet
from har_jax import errors
from har_jax import inference
from har_jax import pretrained
from har_jax import torch_weights
from har_jax import train
from har_jax.evaluation import checkpoint_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_ARCHS = ('resnet18', 'resnet50')


def _require_torch():
  """Skips without torch and torchvision, unless HAR_JAX_REQUIRE_TORCH=1 (then fails)."""
  missing = [m for m in ('torch', 'torchvision') if importlib.util.find_spec(m) is None]
  if missing:
    if os.environ.get('HAR_JAX_REQUIRE_TORCH') == '1':
      pytest.fail(f'HAR_JAX_REQUIRE_TORCH=1 but {missing} are not installed.')
    pytest.skip('needs torch and torchvision (pip install -e ".[torch]")')


@pytest.fixture(scope='module')
def torch_files(tmp_path_factory):
  """The folder tests/torch_reference.py filled for PARITY_ARCHS (torch in its own process)."""
  _require_torch()
  folder = tmp_path_factory.mktemp('torch_reference')
  run = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'torch_reference.py'),
                        str(folder), *PARITY_ARCHS], capture_output=True, text=True, timeout=600,
                       check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  return folder


@pytest.mark.parametrize('arch', PARITY_ARCHS)
@pytest.mark.parametrize('source,layout', [('{arch}.safetensors', 'torchvision/timm'),
                                           ('tsn_{arch}.pth', 'mmaction2')])
def test_converted_features_match_torchvision(torch_files, arch, source, layout):
  images = np.load(torch_files / 'images.npy')
  reference = np.load(torch_files / f'{arch}_features.npy')
  variables, meta, _ = torch_weights.convert_file(str(torch_files / source.format(arch=arch)),
                                                  arch)
  assert meta['layout'] == layout
  assert meta['encoder'] == arch and meta['preprocessing'] == 'imagenet'
  assert meta['encoder_kwargs'] == {'stride_on_1x1': False}
  ours = pretrained.encoder_features(variables, meta, images)
  assert ours.shape == reference.shape == (2, 2048 if arch == 'resnet50' else 512)
  assert pretrained.relative_error(ours, reference) < 1e-4
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
  if arch == 'resnet50':  # Power: the stride on the 1x1 (ResNet v1) is not what torch computes.
    v1 = dict(meta, encoder_kwargs={'stride_on_1x1': True})
    assert pretrained.relative_error(
        pretrained.encoder_features(variables, v1, images), reference) > 1e-2


def test_pickle_holding_code_is_refused(torch_files):
  path = str(torch_files / 'code.pth')
  with pytest.raises(errors.UserError) as raised:
    torch_weights.read_state_dict(path)
  message = str(raised.value)
  assert message.startswith(f'Refusing {path}: its pickle holds more than tensors')
  assert '\n' not in message and 'open' in message, message
  assert not (torch_files / 'code_ran').exists()


def test_pth_without_torch_says_convert_to_safetensors(tmp_path, monkeypatch):
  path = tmp_path / 'weights.pth'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError.
  with pytest.raises(errors.UserError, match=r'convert it to safetensors first') as raised:
    torch_weights.read_state_dict(str(path))
  assert '\n' not in str(raised.value)


def _numpy_state_dict(arch: str, seed: int = 0) -> dict:
  """Random weights of `arch` under torchvision names, made from the har_jax template's shapes
  (kernels HWIO -> OIHW), plus torchvision's fc and num_batches_tracked."""
  rng = np.random.default_rng(seed)
  template = pretrained.encoder_template(arch, torch_weights.ENCODER_KWARGS)
  flat = {f'{c}/{k}': v for c in template
          for k, v in traverse_util.flatten_dict(template[c], sep='/').items()}
  fields = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
            'var': 'running_var'}
  out = {}
  for key, leaf in flat.items():
    _, *module, field = key.split('/')
    if module[0] in ('stem_conv', 'stem_bn'):
      name = 'conv1' if module[0] == 'stem_conv' else 'bn1'
    else:
      stage, block = re.fullmatch(r'stage(\d)_block(\d+)', module[0]).groups()
      layer = {'proj_conv': 'downsample.0', 'proj_bn': 'downsample.1'}.get(module[1], module[1])
      name = f'layer{stage}.{block}.{layer}'
    shape = leaf.shape
    if field == 'kernel':
      value = rng.normal(0, 0.05, (shape[3], shape[2], shape[0], shape[1]))
    elif field == 'var':
      value = rng.uniform(0.5, 2.0, shape)
    else:
      value = rng.normal(0.5 if field == 'scale' else 0.0, 0.1, shape)
    out[f'{name}.{fields[field]}'] = value.astype(np.float32)
    if field == 'var':
      out[f'{name}.num_batches_tracked'] = np.asarray(7, np.int64)
  out['fc.weight'] = rng.normal(size=(1000, 512)).astype(np.float32)
  out['fc.bias'] = np.zeros(1000, np.float32)
  return out


def _save_safetensors(state_dict: dict, path) -> str:
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  st_numpy.save_file(state_dict, str(path))
  return str(path)


def test_layouts_and_bad_files_each_give_one_line(tmp_path):
  state = _numpy_state_dict('resnet18')
  variables, meta = torch_weights.convert_state_dict(state, 'resnet18')
  assert meta['layout'] == 'torchvision/timm'
  # The conversion itself: OIHW -> HWIO, running stats into batch_stats, fc dropped.
  np.testing.assert_array_equal(variables['params']['stage2_block0']['conv1']['kernel'],
                                state['layer2.0.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['stage4_block1']['bn2']['var'],
                                state['layer4.1.bn2.running_var'])
  np.testing.assert_array_equal(variables['params']['stage3_block0']['proj_bn']['scale'],
                                state['layer3.0.downsample.1.weight'])
  backbone = {f'backbone.{k}': v for k, v in state.items() if not k.startswith('fc.')}
  _, tv_meta = torch_weights.convert_state_dict(
      dict(backbone, **{'cls_head.fc_cls.weight': np.zeros((3, 512), np.float32),
                        'data_preprocessor.mean': np.zeros((3, 1, 1), np.float32)}), 'resnet18')
  assert tv_meta['layout'] == 'mmaction2 (torchvision backbone)'

  cases = [
      (dict(state), 'resnet50', r'weights are resnet18, not --arch=resnet50; pass --arch=resnet18'),
      ({'weight': np.zeros(3, np.float32)}, 'resnet18', r'Found no known ResNet key layout'),
      (dict(state, **{'layer1.0.conv1.bias': np.zeros(64, np.float32)}), 'resnet18',
       r"'layer1.0.conv1.bias': the har_jax ResNet has no conv bias"),
      ({k: v for k, v in state.items() if k != 'layer1.1.bn2.running_mean'}, 'resnet18',
       r"'batch_stats/stage1_block1/bn2/mean' \(64,\) .* missing"),
  ]
  for i, (bad, arch, message) in enumerate(cases):
    path = _save_safetensors(bad, tmp_path / f'bad{i}.safetensors')
    with pytest.raises(errors.UserError, match=message) as raised:
      torch_weights.convert_file(path, arch)
    assert '\n' not in str(raised.value)
  for name, message in (('missing.safetensors', 'No weights file'),
                        ('weights.h5', "unknown weights format '.h5'"),
                        ('garbage.safetensors', 'not a readable safetensors file')):
    if name != 'missing.safetensors':
      (tmp_path / name).write_bytes(b'\x00' * 16)
    with pytest.raises(errors.UserError, match=message):
      torch_weights.read_state_dict(str(tmp_path / name))


@pytest.mark.slow
def test_script_converts_and_names_the_layout(tmp_path):
  """scripts/convert_weights.py: a checkpoint and one line naming the layout; errors in one line."""
  source = _save_safetensors(_numpy_state_dict('resnet18'), tmp_path / 'r18.safetensors')
  out = tmp_path / 'encoder'
  command = [sys.executable, os.path.join(REPO, 'scripts', 'convert_weights.py'),
             f'--from={source}', '--arch=resnet18', f'--out={out}']
  run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.startswith('Layout: torchvision/timm. Wrote '), run.stdout
  meta = pretrained.read_encoder_meta(str(out))
  assert (meta['encoder'], meta['preprocessing']) == ('resnet18', 'imagenet')
  again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
  assert again.returncode == 1 and 'Traceback' not in again.stderr
  assert [l for l in again.stderr.splitlines() if l.startswith('error: ')] == [
      f'error: {out} exists; choose a new --out (nothing was written).']


def _converted(tmp_path, arch: str = 'resnet18') -> tuple[str, dict]:
  variables, meta = torch_weights.convert_state_dict(_numpy_state_dict(arch), arch)
  path = str(tmp_path / f'{arch}_converted')
  pretrained.save_encoder(path, variables, dict(meta, source='test'))
  return path, variables


def test_configs_take_the_stride_and_input_from_the_weights(tmp_path):
  torch_path, _ = _converted(tmp_path)
  config = ucf101_imagenet.get_config()
  config.model.encoder_init = torch_path
  resolved = pretrained.resolve_encoder_init(config)
  assert dict(resolved.model.encoder_kwargs) == {'stride_on_1x1': False}
  assert resolved.model.preprocessing == 'imagenet'
  assert not dict(config.model.encoder_kwargs)  # The caller's config is left as it was.

  # The ResNet-50 recipe, from PyTorch weights (v1.5, 'imagenet') or Keras weights (v1, 'caffe').
  keras_like = str(tmp_path / 'keras_like')
  template = pretrained.encoder_template('resnet50', {'stride_on_1x1': True})
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), template)
  pretrained.save_encoder(keras_like, zeros, {'encoder': 'resnet50', 'preprocessing': 'caffe',
                                              'encoder_kwargs': {'stride_on_1x1': True}})
  torch50 = str(tmp_path / 'torch_like')
  pretrained.save_encoder(torch50, zeros, {'encoder': 'resnet50', 'preprocessing': 'imagenet',
                                           'encoder_kwargs': {'stride_on_1x1': False}})
  recipe = ucf101_resnet50_imagenet.get_config()
  for path, want in ((keras_like, ({'stride_on_1x1': True}, 'caffe')),
                     (torch50, ({'stride_on_1x1': False}, 'imagenet'))):
    recipe.model.encoder_init = path
    model = pretrained.resolve_encoder_init(recipe).model
    assert (dict(model.encoder_kwargs), model.preprocessing) == want
    assert not pretrained.config_mismatches(pretrained.read_encoder_meta(path), model)

  config.model.encoder = 'resnet34'
  with pytest.raises(errors.UserError, match=r"holds a 'resnet18' encoder, model.encoder is "
                                             r"'resnet34'; pass --config.model.encoder=resnet18"):
    pretrained.resolve_encoder_init(config)


@pytest.mark.slow
def test_fine_tune_from_converted_weights_holds_bn_stats_while_frozen(tiny_config, tmp_path):
  """A ResNet-18 LRCN from converted torchvision-layout weights trains and evaluates on generated
  data; during the frozen phase the encoder's params and BatchNorm statistics stay as converted,
  after it both move; --mode=eval with the same config reads the run."""
  path, converted = _converted(tmp_path)
  config = tiny_config(**{'model.encoder': 'resnet18', 'model.encoder_init': path,
                          'model.preprocessing': 'caffe',  # Replaced by the checkpoint's.
                          'model.freeze_encoder_steps': 2, 'num_train_steps': 4,
                          'checkpoint_every_steps': 2, 'eval_every_steps': 4,
                          'learning_rate': 1e-2,
                          'model.conv_impl': 'xla'})  # Compiles faster than the CPU kernels.
  workdir = str(tmp_path / 'run')
  metrics = train.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics['loss']) and metrics['num_videos'] > 0 and 0 <= metrics['top1'] <= 1

  frozen, tuned = inference.load(workdir, 2), inference.load(workdir, 4)
  assert frozen.config.model.preprocessing == 'imagenet'
  assert dict(frozen.config.model.encoder_kwargs) == {'stride_on_1x1': False}
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, frozen.variables[collection]['encoder'],
                 converted[collection])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         tuned.variables[collection]['encoder'], converted[collection])
    assert all(jax.tree.leaves(moved)), collection

  reports = checkpoint_eval.evaluate(config, workdir, checkpoint='latest')
  assert len(reports) == 1 and reports[0]['report_path']
