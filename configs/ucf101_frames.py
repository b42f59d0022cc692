r"""UCF101 split 1 from the compact frame store: the LRCN recipe of default.py, frames at 171x128.

The store holds every UCF101 video once, its frames JPEG-encoded with the short side at 128 px and
the aspect kept (171x128), one record per frame: a 16-frame clip reads and decodes 16 small frames
and nothing else. Build it once, for all three splits (needs ffmpeg, like the stock records):

  python scripts/prepare_ucf101.py --source ~/data/ucf101 --data_dir $HOME/tensorflow_datasets \
      --short_side 128

Command:

  python main.py --config=configs/ucf101_frames.py --workdir=workdirs/ucf101_frames_r18 \
      --config.dataset.data_dir=$HOME/tensorflow_datasets

Splits 2 and 3: --config.dataset.train_split=train2 --config.dataset.eval_split=test2 (or 3).
`--config.dataset.val_split=0.1` holds out whole UCF101 groups (people) for validation.

Expected result: the model and its accuracy are default.py's (not yet measured on UCF101). What
changes is the host's cost per training clip: on generated UCF101-format videos, measured by
scripts/benchmark_input.py in one run against the stock 256x256 records, see README "Input speed"
and benchmarks/RESULTS.md.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the split-1 LRCN config on the ucf101_frames/s128 frame store."""
  config = default.get_config()
  config.dataset.name = 'ucf101_frames/s128'
  config.dataset.train_split = 'train1'
  config.dataset.eval_split = 'test1'
  # dataset.resize_size follows image_size (112 -> 128 = the stored short side): the frames decode
  # at full size, with no resize pass.
  return config
