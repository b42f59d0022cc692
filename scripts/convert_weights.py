r"""Converts PyTorch-layout ResNet-18/34/50 weights into a har_jax encoder checkpoint.

  python scripts/convert_weights.py --from=resnet18.safetensors --arch=resnet18 \
      --out=pretrained/resnet18_tv_in1k

The same as the console command har-convert-weights (--help lists the flags); the code is in
har_jax/commands/convert_weights.py.
"""

from har_jax.commands import convert_weights

if __name__ == '__main__':
  convert_weights.run()
