r"""Build TFDS records from your own videos, one folder per class.

  python scripts/prepare_video_folder.py --source ~/clips --data_dir ~/tensorflow_datasets \
      --name lab

The same as the console command har-prepare-videos (--help lists the flags); the code is in
har_jax/commands/prepare_videos.py.
"""

from har_jax.commands import prepare_videos

if __name__ == '__main__':
  prepare_videos.run()
