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
scripts/benchmark_input.py in one run against the stock 256x256 records, see docs/speed.md
"Input speed" and benchmarks/RESULTS.md.

Short run on a CPU, measured 2026-11-29 (the 2-core VM, shared, load average 2-3.5): the frame
store of generated UCF101-format videos whose 6 classes only temporal order separates
(scripts/make_fake_ucf101.py --motion reversal, prepared with --short_side 128; split 1: 1,080
train and 420 test videos; data commands in benchmarks/RESULTS.md, "Generated data for the short
runs"), a small CNN on 8 frames of 64x64, 1,200 steps of 16 clips:

  python main.py --config=configs/ucf101_frames.py --workdir=workdirs/short_frames \
      --config.dataset.data_dir=/tmp/fake_tfds --config.model.encoder=small_cnn \
      --config.model.lstm_size=128 --config.image_size=64 --config.num_frames=8 \
      --config.frame_stride=4 --config.batch_size=16 --config.optimizer=adamw \
      --config.learning_rate=2e-3 --config.warmup_steps=30 --config.num_train_steps=1200 \
      --config.eval_every_steps=1200 --config.checkpoint_every_steps=1200

reached 70.7% video top-1 on the 420 test videos in 8 min 46 s: the first run of the three-split
run that trained exactly this config as its split 1 (scripts/run_splits.py, 41 min 44 s; splits 2
and 3: 81.4% and 92.9%; the frame-average baseline 26.9%, 26.0%, 26.7%; docs/ucf101.md "The
three-split protocol"). It shows the pipeline and the recurrence learning temporal order, not UCF101
accuracy.
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
