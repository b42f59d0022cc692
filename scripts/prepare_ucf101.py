r"""Build TFDS records or the frame store from your UCF101 copy.

  python scripts/prepare_ucf101.py --source ~/data/ucf101 --data_dir ~/tensorflow_datasets

The same as the console command har-prepare-ucf101 (--help lists the flags); the code is in
har_jax/commands/prepare_ucf101.py.
"""

from har_jax.commands import prepare_ucf101

if __name__ == '__main__':
  prepare_ucf101.run()
