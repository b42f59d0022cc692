"""PyTorch-layout ResNet-18/34/50 weights -> har_jax encoder checkpoints (har_jax.pretrained).

Reads a state dict from:
  - a .safetensors file, with the `safetensors` package's numpy API (no torch needed);
  - a .pth/.pt file, only with `torch.load(weights_only=True)`, which refuses a pickle that holds
    code or objects other than tensors and plain containers. Without torch: a UserError saying to
    convert the file to safetensors first. Nothing else is ever unpickled.

Key layouts it knows (it says which one it found):
  'torchvision/timm'  torchvision.models.resnet* and timm's resnet* (the same names):
                      conv1.weight, bn1.running_mean, layer1.0.conv1.weight,
                      layer2.0.downsample.0.weight / .1.*; fc.* (the classifier) is dropped.
  'mmaction2'         mmaction2 recognisers (TSN etc.) with mmaction2's ResNet backbone: keys under
                      `backbone.`, ConvModule names (conv1.conv.weight, conv1.bn.running_var,
                      layer1.0.conv2.bn.weight, layer1.0.downsample.conv.weight); cls_head.* is
                      dropped. A checkpoint's {'state_dict': ...} wrapper (mmengine) is opened.
  'mmaction2 (torchvision backbone)'  a recogniser whose backbone is torchvision's ResNet:
                      torchvision names under `backbone.`.
num_batches_tracked counters are dropped everywhere.

Conversion (exact in inference mode): conv kernels OIHW -> HWIO; BN weight/bias -> scale/bias,
running_mean/running_var -> the batch_stats mean/var (torch's BN epsilon, 1e-5, is ours). These
ResNets are v1.5: the stride of a bottleneck sits on its 3x3 conv (mmaction2's default style
'pytorch'), the stem is a 7x7/2 conv and a 3x3/2 max pool with padding 1; the checkpoint records
encoder_kwargs {'stride_on_1x1': False} and preprocessing 'imagenet' (RGB, ImageNet mean/std), and
training takes both from it (pretrained.resolve_encoder_init).
"""

import os
import pickle
import re
from typing import Any, Optional

from absl import logging
import numpy as np

from har_jax import errors
from har_jax import pretrained

# Architectures: blocks per stage and whether blocks are bottlenecks (conv3, 4x expansion).
ARCHS: dict[str, dict[str, Any]] = {
    'resnet18': dict(stage_sizes=(2, 2, 2, 2), bottleneck=False),
    'resnet34': dict(stage_sizes=(3, 4, 6, 3), bottleneck=False),
    'resnet50': dict(stage_sizes=(3, 4, 6, 3), bottleneck=True),
}
ENCODER_KWARGS = {'stride_on_1x1': False}  # torchvision's ResNet v1.5.
PREPROCESSING = 'imagenet'  # RGB, (x / 255 - ImageNet mean) / ImageNet std.

LAYOUT_TORCHVISION = 'torchvision/timm'
LAYOUT_MMACTION2 = 'mmaction2'
LAYOUT_MMACTION2_TV = 'mmaction2 (torchvision backbone)'
# Dropped: the classifier, and mmaction2's input normalisation buffers (recorded as 'imagenet').
_HEADS = {LAYOUT_TORCHVISION: ('fc.',), LAYOUT_MMACTION2: ('cls_head.', 'data_preprocessor.'),
          LAYOUT_MMACTION2_TV: ('cls_head.', 'data_preprocessor.')}

# torchvision names (after any renaming) -> (flax module path, kind).
_TV_STEM = re.compile(r'^(conv1|bn1)\.(\w+)$')
_TV_BLOCK = re.compile(r'^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)$')
# mmaction2 ConvModule names -> torchvision names.
_MM_RENAMES = ((re.compile(r'^conv1\.conv\.'), 'conv1.'),
               (re.compile(r'^conv1\.bn\.'), 'bn1.'),
               (re.compile(r'^(layer\d\.\d+)\.conv(\d)\.conv\.'), r'\1.conv\2.'),
               (re.compile(r'^(layer\d\.\d+)\.conv(\d)\.bn\.'), r'\1.bn\2.'),
               (re.compile(r'^(layer\d\.\d+)\.downsample\.conv\.'), r'\1.downsample.0.'),
               (re.compile(r'^(layer\d\.\d+)\.downsample\.bn\.'), r'\1.downsample.1.'))
_BN_FIELDS = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors or .pth/.pt file as float32/int numpy arrays, by key.

  Raises:
    errors.UserError (one line) for a missing file, another extension, a pickle that holds code or
    other objects, or a .pth without torch installed.
  """
  if not os.path.isfile(path):
    raise errors.UserError(f'No weights file at {path}.')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    try:
      tensors = st_numpy.load_file(path)
    except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own errors)
      raise errors.UserError(f'{path} is not a readable safetensors file ({e}).') from e
    return {k: np.asarray(v) for k, v in tensors.items()}
  if ext in ('.pth', '.pt'):
    return _read_torch_file(path)
  raise errors.UserError(f'{path}: unknown weights format {ext or "(no extension)"!r}; give a '
                         '.safetensors file (or a .pth/.pt state dict with torch installed).')


def _read_torch_file(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: only for .pth files)
  except ImportError:
    raise errors.UserError(
        f'{path} is a PyTorch pickle, and reading one safely needs torch (torch.load with '
        'weights_only=True), which is not installed: convert it to safetensors first, or install '
        'torch (pip install "har_jax[torch]").') from None
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    reason = str(e).split('WeightsUnpickler error: ', 1)[-1].split('\n', 1)[0].split('. ', 1)[0]
    raise errors.UserError(
        f'Refusing {path}: its pickle holds more than tensors ({reason}), and loading it could run '
        'code. Convert it to safetensors where you trust it, or use a plain state dict.') from None
  except Exception as e:  # pylint: disable=broad-except  (a truncated or non-torch file)
    raise errors.UserError(f'{path} is not a readable PyTorch file ({type(e).__name__}: '
                           f'{str(e).splitlines()[0] if str(e) else ""}).') from None
  if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
    loaded = loaded['state_dict']  # mmengine/mmcv checkpoints: {'meta', 'state_dict', ...}.
  if not isinstance(loaded, dict):
    raise errors.UserError(f'{path} holds a {type(loaded).__name__}, not a state dict.')
  out = {}
  for key, value in loaded.items():
    if isinstance(value, torch.Tensor):
      if value.is_floating_point():
        value = value.to(torch.float32)
      out[key] = value.detach().cpu().numpy()
  return out


def detect_layout(keys) -> Optional[str]:
  """The layout (LAYOUT_*) whose names `keys` use, or None."""
  keys = set(keys)
  if 'conv1.weight' in keys and 'bn1.running_mean' in keys:
    return LAYOUT_TORCHVISION
  if 'backbone.conv1.conv.weight' in keys and 'backbone.conv1.bn.running_mean' in keys:
    return LAYOUT_MMACTION2
  if 'backbone.conv1.weight' in keys and 'backbone.bn1.running_mean' in keys:
    return LAYOUT_MMACTION2_TV
  return None


def _torchvision_names(state_dict: dict, layout: str) -> tuple[dict, list[str]]:
  """(the backbone's tensors under torchvision names, the dropped classifier keys)."""
  dropped, out = [], {}
  for key, value in state_dict.items():
    if key.startswith(_HEADS[layout]):
      dropped.append(key)
      continue
    if key.endswith('num_batches_tracked'):
      continue
    if layout != LAYOUT_TORCHVISION:
      if not key.startswith('backbone.'):
        raise errors.UserError(f'Key {key!r} is neither under backbone. nor cls_head. in an '
                               f'{layout} state dict; is this a 2D ResNet recogniser (TSN)?')
      key = key[len('backbone.'):]
    if layout == LAYOUT_MMACTION2:
      for pattern, replacement in _MM_RENAMES:
        key = pattern.sub(replacement, key)
    out[key] = value
  return out, dropped


def infer_arch(tv_names) -> Optional[str]:
  """The ARCHS key whose blocks per stage and block type the torchvision names show, or None."""
  blocks = [len({m.group(2) for k in tv_names if (m := _TV_BLOCK.match(k)) and m.group(1) == s})
            for s in '1234']
  bottleneck = any(k.endswith('.conv3.weight') for k in tv_names)
  for name, spec in ARCHS.items():
    if tuple(blocks) == spec['stage_sizes'] and bottleneck == spec['bottleneck']:
      return name
  return None


def _flax_leaf(tv_name: str) -> tuple[str, str]:
  """torchvision name -> ('params' | 'batch_stats', 'module/.../leaf'); UserError if unknown."""
  m = _TV_STEM.match(tv_name)
  if m:
    module, field = ('stem_conv' if m.group(1) == 'conv1' else 'stem_bn'), m.group(2)
  else:
    m = _TV_BLOCK.match(tv_name)
    if not m:
      raise errors.UserError(f'Tensor {tv_name!r} has no counterpart in the har_jax ResNet.')
    stage, block, layer, field = m.groups()
    layer = {'downsample.0': 'proj_conv', 'downsample.1': 'proj_bn'}.get(layer, layer)
    module = f'stage{stage}_block{block}/{layer}'
  if 'conv' in module.rsplit('/', 1)[-1]:
    if field != 'weight':
      raise errors.UserError(f'Tensor {tv_name!r}: the har_jax ResNet has no conv {field}.')
    return 'params', f'{module}/kernel'
  if field not in _BN_FIELDS:
    raise errors.UserError(f'Tensor {tv_name!r}: unknown BatchNorm field {field!r}.')
  collection, leaf = _BN_FIELDS[field]
  return collection, f'{module}/{leaf}'


def convert_state_dict(state_dict: dict, arch: str) -> tuple[dict, dict]:
  """A PyTorch-layout ResNet state dict -> ({'params', 'batch_stats'}, meta) of encoder `arch`.

  Logs one line naming the layout found. The variables are checked against the har_jax encoder's
  tree (errors.UserError naming the first parameter that does not fit).
  """
  if arch not in ARCHS:
    raise errors.UserError(f'Unknown --arch {arch!r}; convertible: {sorted(ARCHS)}.')
  layout = detect_layout(state_dict)
  if layout is None:
    sample = sorted(state_dict)[:4]
    raise errors.UserError(
        f'Found no known ResNet key layout (torchvision/timm: conv1.weight, bn1.running_mean; '
        f'mmaction2: backbone.conv1.conv.weight); the file starts with {sample}.')
  tv, dropped = _torchvision_names(state_dict, layout)
  logging.info('Layout: %s (%d backbone tensors; dropped the classifier: %s).', layout, len(tv),
               dropped or 'none')
  found = infer_arch(tv)
  if found != arch:
    raise errors.UserError(f'The {layout} weights are {found or "no ResNet-18/34/50"}, not '
                           f'--arch={arch}' + (f'; pass --arch={found}.' if found else '.'))
  flat = {'params': {}, 'batch_stats': {}}
  for name, value in tv.items():
    collection, leaf = _flax_leaf(name)
    value = np.asarray(value, np.float32)
    flat[collection][leaf] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  variables = {c: pretrained.unflatten(d) for c, d in flat.items()}
  pretrained.check_tree(pretrained.encoder_template(arch, ENCODER_KWARGS), variables,
                        f'the har_jax {arch!r} encoder')
  meta = {'encoder': arch, 'encoder_kwargs': dict(ENCODER_KWARGS), 'preprocessing': PREPROCESSING,
          'layout': layout}
  return variables, meta


def convert_file(path: str, arch: str) -> tuple[dict, dict, dict]:
  """Reads and converts `path`; returns (variables, meta, the file's state dict)."""
  state_dict = read_state_dict(path)
  variables, meta = convert_state_dict(state_dict, arch)
  meta['source'] = f'{meta["layout"]} weights from {os.path.basename(path)}'
  return variables, meta, state_dict


def torchvision_state_dict(state_dict: dict) -> dict:
  """The backbone of a state dict in any known layout, under torchvision names (for parity)."""
  layout = detect_layout(state_dict)
  if layout is None:
    raise errors.UserError('Found no known ResNet key layout.')
  return _torchvision_names(state_dict, layout)[0]


def torchvision_features(state_dict: dict, arch: str, images: np.ndarray) -> np.ndarray:
  """torchvision's `arch` with these weights, eval mode, pooled features (its fc replaced by the
  identity): `[N, H, W, 3]` preprocessed float -> `[N, F]`. Needs torch and torchvision."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  model = getattr(torchvision.models, arch)(weights=None)
  model.fc = torch.nn.Identity()
  tv = torchvision_state_dict(state_dict)
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.asarray(v)) for k, v in tv.items()}, strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise ValueError(f'torchvision {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}')
  model.eval()
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))
    return model(x).numpy()


def parity_error(state_dict: dict, variables: dict, meta: dict, *, image_size: int = 64,
                 num_images: int = 2, seed: int = 0) -> float:
  """max |har_jax - torchvision| / max |torchvision| of the pooled features on random images
  (ImageNet-normalised uniform pixels). Needs torch and torchvision."""
  rng = np.random.default_rng(seed)
  images = rng.normal(0.0, 1.0, (num_images, image_size, image_size, 3)).astype(np.float32)
  reference = torchvision_features(state_dict, meta['encoder'], images)
  return pretrained.relative_error(pretrained.encoder_features(variables, meta, images), reference)


def convert_and_save(from_path: str, arch: str, out: str, *, check_parity: bool = True,
                     parity_image_size: int = 64, max_relative_error: float = 1e-4) -> dict:
  """Converts the weights file `from_path` to encoder `arch` and writes the checkpoint `out`.

  With check_parity and torchvision installed, first compares the features of torchvision's
  model with these weights and of the converted encoder on random images (skipped, with a log
  line, without torchvision).

  Returns:
    The checkpoint's meta, plus 'parity_relative_error' when checked.
  Raises:
    errors.UserError for bad input, an existing `out`, or a failed parity check (nothing written).
  """
  if os.path.exists(out):
    raise errors.UserError(f'{out} exists; choose a new --out (nothing was written).')
  variables, meta, state_dict = convert_file(from_path, arch)
  if check_parity:
    try:
      import torchvision  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      logging.info('torchvision is not installed: no parity check against it.')
    else:
      error = parity_error(state_dict, variables, meta, image_size=parity_image_size)
      logging.info('Parity: max |har_jax - torchvision| / max |torchvision| = %.3g', error)
      if not error <= max_relative_error:
        raise errors.UserError(f'The converted {arch} differs from torchvision by {error:.3g} '
                               f'(relative) > {max_relative_error:g}; not writing {out}.')
      meta['parity_relative_error'] = error
  pretrained.save_encoder(out, variables, meta)
  return meta
