r"""UCF101 split 1, the LRCN recipe: ResNet-18 frames -> LSTM(512) -> 101-way head.

16 frames at stride 2, 112x112 crops from the 256x256 TFDS records (`ucf101/ucf101_1_256`), decoded at
half scale by the JPEG decoder (128x128) and randomly cropped. Trained from scratch. The resize
follows the crop (dataset.resize_size = image_size * 8 // 7) unless set.

Command (build the records first, see docs/ucf101.md):

  python main.py --config=configs/default.py --workdir=workdirs/ucf101_r18 \
      --config.dataset.data_dir=$HOME/tensorflow_datasets

Expected result: not yet measured on UCF101 by this project. CNN+LSTM models trained from scratch on
UCF101 reach about 45-55% top-1 in the literature; an ImageNet-initialised encoder is what gives the
published LRCN figures (see configs/ucf101_resnet50_imagenet.py). Runtime on a CPU is impractical
(4.0-4.7 s per step of 8 clips on the 2-core machine, so ~17-19 s per step of the default 32; see
benchmarks/RESULTS.md); use a GPU or TPU.

Short run on a CPU, measured 2026-11-29 (the 2-core VM, shared, load average 4-5): generated
UCF101-format videos whose 6 classes only temporal order separates (scripts/make_fake_ucf101.py
--motion reversal; split 1: 1,080 train and 420 test videos; the data commands are in
benchmarks/RESULTS.md), a small CNN on 8 frames of 64x64, 1,200 steps of 16 clips:

  python main.py --config=configs/default.py --workdir=workdirs/short_default \
      --config.dataset.data_dir=/tmp/fake_tfds --config.model.encoder=small_cnn \
      --config.model.lstm_size=128 --config.image_size=64 --config.num_frames=8 \
      --config.frame_stride=4 --config.batch_size=16 --config.optimizer=adamw \
      --config.learning_rate=2e-3 --config.warmup_steps=30 --config.num_train_steps=1200 \
      --config.eval_every_steps=400 --config.checkpoint_every_steps=400

reached 82.1% video top-1 on the 420 test videos (53.6% at step 400, 72.4% at 800) in 12 min 05 s.
The same run with the resize pinned at 128 (--config.dataset.resize_size=128, the trap the
following resize removes): 76.9%. It shows the pipeline and the recurrence learning temporal order,
not the recipe's UCF101 accuracy.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the UCF101 split-1 LRCN config."""
  config = ml_collections.ConfigDict()

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'ucf101/ucf101_1_256'
  config.dataset.data_dir = ''  # '' -> TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  # Fraction of train held out for periodic evaluation (0 -> periodic eval uses eval_split). On
  # 'ucf101_meta/...' records whole UCF101 groups (people) are held out; elsewhere a plain percentage.
  config.dataset.val_split = 0.0
  config.dataset.short_video = 'loop'  # 'loop' | 'pad': clips longer than the video.
  config.dataset.cache = False  # Cache the encoded records in memory (small TFDS datasets only).
  # Clips (num_frames JPEGs each) in the shuffle buffer of TFDS records. Frame stores need neither
  # (their order is a seeded permutation; the OS caches their files).
  config.dataset.shuffle_buffer = 512
  config.dataset.num_parallel_calls = -1  # -1 -> tf.data.AUTOTUNE.
  config.dataset.threadpool_size = 0  # 0 -> number of host CPUs.

  config.num_frames = 16
  config.frame_stride = 2
  config.image_size = 112
  # Frames are decoded (JPEG downscaling where possible) and resized so the short side is this many
  # pixels, then cropped to image_size. By default it follows image_size (a crop of 87.5% of the
  # short side: 112 -> 128, 224 -> 256, 64 -> 73), so that evaluation's centre crop sees the frame
  # at the scale training's random crops saw it; --config.image_size=N alone moves both, and
  # --config.dataset.resize_size=N still sets it (0 -> keep the stored size).
  config.dataset.resize_size = config.get_ref('image_size') * 8 // 7

  # Augmentations that keep the label true for this dataset.
  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True  # UCF101 classes are mirror-symmetric.
  config.augment.min_area = 0.35  # Random-resized-crop area range (1.0 -> plain random crop).
  config.augment.max_aspect_ratio = 4 / 3

  config.model = ml_collections.ConfigDict()
  config.model.encoder = 'resnet18'
  config.model.lstm_size = 512
  config.model.num_lstm_layers = 1
  config.model.dropout_rate = 0.5
  config.model.temporal_pooling = 'mean'
  # Rematerialise the encoder in the backward pass, per residual block for ResNets: less activation
  # memory on GPU/TPU for long clips. No saving on CPU (XLA:CPU drops remat's barriers).
  config.model.remat = False
  # Convolutions and max pool: 'auto' = the CPU kernels ('cpu': Winograd 3x3 convolutions, im2col
  # weight gradients, routed max-pool gradient; har_jax/models/cpu_kernels/) on CPU, plain XLA on
  # GPU/TPU | 'xla' | 'cpu'. 'patches', the old name of 'cpu', is still accepted.
  # See benchmarks/RESULTS.md.
  config.model.conv_impl = 'auto'
  config.model.preprocessing = 'imagenet'  # 'imagenet' (RGB, mean/std) | 'caffe' (Keras ResNet50).
  config.model.encoder_kwargs = {}  # Extra encoder attributes, e.g. {'stride_on_1x1': True}.
  # Encoder checkpoint (scripts/convert_weights.py or convert_keras_encoder.py) loaded at the start
  # of a fresh run; with one, encoder_kwargs and preprocessing are the checkpoint's.
  config.model.encoder_init = ''
  config.model.freeze_encoder_steps = 0  # Train only the LSTM and head for this many steps.

  config.dtype = 'float32'

  config.optimizer = 'sgd'  # 'sgd' (with momentum) | 'adamw'
  config.learning_rate = 0.02  # Peak learning rate for batch_size; scale linearly with the batch.
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.warmup_steps = 500
  config.grad_clip_norm = 1.0  # 0 -> no clipping.
  config.label_smoothing = 0.1

  config.batch_size = 32  # Global batch, across all devices and hosts.
  config.num_train_steps = 30_000
  config.seed = 0
  # True: the data of every step is a function of (seed, step) alone, whatever the number of hosts
  # and devices, so a resumed run is bitwise identical to an uninterrupted one (slower input).
  config.deterministic_data = False
  config.skip_nonfinite_updates = False  # True: skip NaN/inf steps instead of stopping.
  config.max_consecutive_nonfinite = 10  # With skipping: stop after this many bad steps in a row.

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 16  # Videos per eval batch (global); each video has clips x crops views.
  config.eval.num_clips = 5
  config.eval.num_crops = 3
  config.eval.num_periodic_videos = 0  # Videos per periodic eval during training; 0 -> all.

  config.log_every_steps = 50
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  return config
