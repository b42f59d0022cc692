r"""Converts PyTorch-layout ResNet-18/34/50 weights into a har_jax encoder checkpoint.

  har-convert-weights --from=resnet18.safetensors --arch=resnet18 \
      --out=pretrained/resnet18_tv_in1k

(or python scripts/convert_weights.py with the same flags).

--from: a .safetensors file (read without torch), or a .pth/.pt state dict (read only with
torch.load(weights_only=True): a pickle that holds code is refused). Layouts: torchvision and timm
ResNets (fc.* dropped) and mmaction2 recognisers such as TSN (backbone.*, cls_head.* dropped); the
script says which one it found. The checkpoint records the encoder, encoder_kwargs (ResNet v1.5)
and the preprocessing ('imagenet': RGB, ImageNet mean/std); a run whose config.model.encoder_init
is --out takes both from it. Where to get the weights: docs/pretrained.md
(har_jax/torch_weights.py for the formats). With torchvision installed the script also compares
torchvision's features with the converted encoder's on random images and writes nothing if they
differ by more than --max_relative_error. Exit status: 0 on success, 1 with a one-line `error:`,
2 for bad flags (har_jax/cli.py).
"""

from absl import app
from absl import flags

from har_jax import cli
from har_jax import torch_weights

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('from', None, 'Weights file: .safetensors, or a .pth/.pt state dict.')
  flags.DEFINE_enum('arch', None, sorted(torch_weights.ARCHS), 'The ResNet the file holds.')
  flags.DEFINE_string('out', None, 'Directory to write the encoder checkpoint to (must not exist).')
  flags.DEFINE_bool('check_parity', True,
                    'Compare with torchvision on random images (when torchvision is installed).')
  flags.DEFINE_integer('parity_image_size', 64, 'Height and width of the parity-check images.')
  flags.DEFINE_float('max_relative_error', 1e-4,
                     'Parity tolerance: max |har_jax - torchvision| / max |torchvision|.')
  flags.mark_flags_as_required(['from', 'arch', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  meta = torch_weights.convert_and_save(
      FLAGS['from'].value, FLAGS.arch, FLAGS.out, check_parity=FLAGS.check_parity,
      parity_image_size=FLAGS.parity_image_size, max_relative_error=FLAGS.max_relative_error)
  parity = meta.get('parity_relative_error')
  print(f'Layout: {meta["layout"]}. Wrote {FLAGS.out}: encoder {meta["encoder"]} '
        f'{meta["encoder_kwargs"]}, preprocessing {meta["preprocessing"]!r}'
        + (f', parity with torchvision {parity:.2g}.' if parity is not None else '.'))
  return 0


def run():
  """The console command har-convert-weights."""
  cli.run(main, define_flags)
