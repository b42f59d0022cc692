r"""UCF101 split 1 on a TPU pod slice (e.g. v4-32: 4 hosts x 4 chips = 16 devices), one process/host.

Global batch 256 clips = 16 per device on 16 devices (a multiple of every slice size from v4-8 up to
v4-256 at 1-16 clips per chip). The learning rate follows the linear scaling rule from the default
recipe (0.02 at batch 32): 0.02 x 256 / 32 = 0.16, with a relatively longer warmup (500 steps, about
13 epochs of 9,537 videos at 37 steps/epoch, vs 500 of 30,000 steps in the default) because
large-batch SGD is unstable early. The number of steps is cut so that the run sees as many clips as
configs/default.py (30,000 x 32 = 960k clips = 3,750 x 256). Eval batches are global too: 64 videos.

Each host reads its own shard of the TFDS records (`tfds.split_for_jax_process`), so put the
records on storage every host can read (a GCS bucket: --config.dataset.data_dir=gs://...).

Command (TPU VM pod slice; see docs/pods.md):

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd har_jax && \
      .venv/bin/python main.py --config=configs/ucf101_tpu_pod.py --workdir=gs://$BUCKET/ucf_pod \
      --config.dataset.data_dir=gs://$BUCKET/tensorflow_datasets"

Expected result: not yet measured by this project (no pod available to it); from-scratch CNN+LSTM
models reach about 45-55% top-1 on UCF101 in the literature.

Short run on a CPU, measured 2026-11-29 (the 2-core VM, load average ~1.5): this config in bf16
with the short-run overrides, which replace its batch, learning rate and warm-up (so it checks that
the pod config builds, trains and evaluates end to end, not its large-batch schedule), on
generated UCF101-format videos whose 6 classes only temporal order separates (stock-format
records; split 1: 1,080 train and 420 test videos; data commands in benchmarks/RESULTS.md,
"Generated data for the short runs"), a small CNN on 8 frames of 64x64, 1,200 steps of 16 clips:

  python main.py --config=configs/ucf101_tpu_pod.py --workdir=workdirs/short_pod \
      --config.dataset.data_dir=/tmp/fake_tfds --config.model.encoder=small_cnn \
      --config.model.lstm_size=128 --config.image_size=64 --config.num_frames=8 \
      --config.frame_stride=4 --config.batch_size=16 --config.optimizer=adamw \
      --config.learning_rate=2e-3 --config.warmup_steps=30 --config.num_train_steps=1200 \
      --config.eval_every_steps=1200 --config.checkpoint_every_steps=1200

reached 80.5% video top-1 on the 420 test videos (77.9% per clip) in 8 min 53 s.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the pod-sized config."""
  config = default.get_config()
  config.batch_size = 256
  config.learning_rate = 0.02 * config.batch_size / 32
  config.warmup_steps = 500
  config.num_train_steps = 3_750
  config.eval.batch_size = 64
  config.dtype = 'bfloat16'
  config.log_every_steps = 20
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 250
  return config
