"""Writes random torchvision ResNets and torch's own features on fixed images (for
tests/test_torch_weights.py), in a process of its own.

  python tests/torch_reference.py OUT_DIR resnet18 resnet50

torch's bundled triton crashes on import (SIGSEGV) in a process that has already imported
TensorFlow, as every pytest worker of this suite has; so torch runs here, without TensorFlow or JAX.

Per arch, into OUT_DIR: <arch>.safetensors (the torchvision state dict), tsn_<arch>.pth (the same
weights as an mmaction2 TSN checkpoint: mmengine's {'meta', 'state_dict'}, backbone.* with mmaction2's
ConvModule names, a 400-way cls_head), <arch>_features.npy (torch's pooled features of images.npy,
eval mode). Also images.npy ([2, 64, 64, 3] float32) and code.pth (a pickle whose unpickling would
create the file code_ran in OUT_DIR).
"""

import os
import re
import sys

import numpy as np
from safetensors import torch as st_torch
import torch
import torchvision

MM_RENAMES = ((r'^conv1\.', 'conv1.conv.'), (r'^bn1\.', 'conv1.bn.'),
              (r'^(layer\d\.\d+)\.conv(\d)\.', r'\1.conv\2.conv.'),
              (r'^(layer\d\.\d+)\.bn(\d)\.', r'\1.conv\2.bn.'),
              (r'^(layer\d\.\d+)\.downsample\.0\.', r'\1.downsample.conv.'),
              (r'^(layer\d\.\d+)\.downsample\.1\.', r'\1.downsample.bn.'))


class _Code:
  """Unpickles by calling open(path, 'w'): code run at load time."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, 'w'))


def random_resnet(arch: str) -> torch.nn.Module:
  """torchvision's `arch`, random weights, random BN affine params and running stats, eval."""
  torch.manual_seed(0)
  model = getattr(torchvision.models, arch)(weights=None)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
        module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
        module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
  return model.eval()


def mmaction2_state_dict(state: dict, num_classes: int = 400) -> dict:
  out = {}
  for key, value in state.items():
    if key.startswith('fc.'):
      continue
    for pattern, replacement in MM_RENAMES:
      key = re.sub(pattern, replacement, key)
    out[f'backbone.{key}'] = value
  out['cls_head.fc_cls.weight'] = torch.randn(num_classes, state['fc.weight'].shape[1])
  out['cls_head.fc_cls.bias'] = torch.zeros(num_classes)
  return out


def main(out_dir: str, archs: list[str]):
  images = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
  np.save(os.path.join(out_dir, 'images.npy'), images)
  for arch in archs:
    model = random_resnet(arch)
    state = model.state_dict()
    st_torch.save_file({k: v.contiguous() for k, v in state.items()},
                       os.path.join(out_dir, f'{arch}.safetensors'))
    torch.save({'meta': {'epoch': 100, 'mmaction2_version': '1.2.0'},
                'state_dict': mmaction2_state_dict(state)},
               os.path.join(out_dir, f'tsn_{arch}.pth'))
    model.fc = torch.nn.Identity()
    with torch.no_grad():
      features = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.save(os.path.join(out_dir, f'{arch}_features.npy'), features)
  torch.save({'conv1.weight': torch.zeros(1), 'x': _Code(os.path.join(out_dir, 'code_ran'))},
             os.path.join(out_dir, 'code.pth'))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
