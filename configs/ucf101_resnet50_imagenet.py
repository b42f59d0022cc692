r"""UCF101 split 1, the recommended recipe: ImageNet ResNet-50 frames -> LSTM(512) -> head.

The frame encoder starts from a converted ResNet-50, from either source:
  - Keras Applications' ImageNet ResNet-50 (the default encoder_init): ResNet v1, the stride on the
    first 1x1 conv of a block; Keras 'caffe' input (BGR, mean-subtracted 0..255 pixels);
  - PyTorch-layout weights (torchvision/timm ImageNet, or mmaction2's TSN trained on Kinetics-400):
    ResNet v1.5, the stride on the 3x3 conv; 'imagenet' input (RGB, ImageNet mean/std).
The converted checkpoint records its stride convention and input, and the run takes both from it
(the encoder_kwargs and preprocessing below are the Keras source's). For the first 1,000 steps only the LSTM and the head train (the encoder's params and BatchNorm statistics
stay as converted); then everything is fine-tuned, the encoder with its own linear warmup.
16 frames at stride 2, 224x224 crops from the 256x256 TFDS records (`ucf101/ucf101_1_256`).

Commands (convert the weights once, online or from a downloaded .h5 file, see the script):

  python scripts/convert_keras_encoder.py --arch=resnet50 --out=pretrained/resnet50_keras_imagenet
  python main.py --config=configs/ucf101_resnet50_imagenet.py --workdir=workdirs/ucf101_r50_in \
      --config.dataset.data_dir=$HOME/tensorflow_datasets

or from PyTorch weights, e.g. torchvision's ImageNet ResNet-50 from the Hugging Face Hub (or the
.pth of mmaction2's TSN R50 Kinetics-400; the docs on pretrained weights list the sources):

  hf download timm/resnet50.tv_in1k model.safetensors --local-dir pretrained/hub/resnet50.tv_in1k
  python scripts/convert_weights.py --from=pretrained/hub/resnet50.tv_in1k/model.safetensors \
      --arch=resnet50 --out=pretrained/resnet50_tv_in1k
  python main.py --config=configs/ucf101_resnet50_imagenet.py --workdir=workdirs/ucf101_r50_tv \
      --config.dataset.data_dir=$HOME/tensorflow_datasets \
      --config.model.encoder_init=pretrained/resnet50_tv_in1k

If the accelerator memory is short, add --config.model.remat=True or --config.dtype=bfloat16, or
lower --config.batch_size together with --config.learning_rate.

Expected result: NOT YET MEASURED on UCF101 by this project. The published figures for this family
of models: LRCN (Donahue et al. 2015, CaffeNet-based encoder, ImageNet-initialised) reports 68.2%
RGB top-1 averaged over the three splits; the I3D paper (Carreira & Zisserman 2017, Table 2) reports
81.0% on split 1 for ConvNet+LSTM with an ImageNet-pretrained Inception-v1. A ResNet-50 encoder
should land in that range, but treat it as a target, not a result. Runtime: not measured; a CPU is
impractical (use a GPU or TPU).

Short run on a CPU, measured 2026-11-29 (the 2-core VM, shared, load average ~2): the recipe's
schedule (frozen encoder phase, then fine-tuning with the encoder's own warmup, 'caffe' input) with
a small CNN in place of ResNet-50 and no pretrained weights, on generated UCF101-format videos
whose 6 classes only temporal order separates (stock-format records; split 1: 1,080 train and 420
test videos; data commands in benchmarks/RESULTS.md, "Generated data for the short runs"), 8
frames of 64x64, 1,200 steps of 16 clips, the first 50 with the encoder frozen:

  python main.py --config=configs/ucf101_resnet50_imagenet.py --workdir=workdirs/short_r50 \
      --config.dataset.data_dir=/tmp/fake_tfds --config.model.encoder=small_cnn \
      --config.model.encoder_init= '--config.model.encoder_kwargs={}' \
      --config.model.freeze_encoder_steps=50 --config.model.lstm_size=128 \
      --config.image_size=64 --config.num_frames=8 --config.frame_stride=4 --config.batch_size=16 \
      --config.optimizer=adamw --config.learning_rate=2e-3 --config.warmup_steps=30 \
      --config.num_train_steps=1200 --config.eval_every_steps=1200 \
      --config.checkpoint_every_steps=1200

reached 85.0% video top-1 on the 420 test videos (82.6% per clip) in 6 min 51 s. It checks the
recipe's machinery end to end, not its UCF101 accuracy, which needs the ResNet-50 on an accelerator.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the ImageNet-initialised ResNet-50 LRCN config for UCF101 split 1."""
  config = default.get_config()
  config.image_size = 224  # dataset.resize_size follows: 224 * 8 // 7 = 256.
  config.num_frames = 16
  config.frame_stride = 2

  config.model.encoder = 'resnet50'
  # The Keras source's; with encoder_init, the checkpoint's replace them (PyTorch weights: v1.5,
  # 'imagenet').
  config.model.encoder_kwargs = {'stride_on_1x1': True}  # Keras ResNet50 is ResNet v1.
  config.model.preprocessing = 'caffe'  # What the Keras ImageNet weights expect.
  # Made by scripts/convert_keras_encoder.py or scripts/convert_weights.py; loaded at the start of
  # a fresh run, not on resume.
  config.model.encoder_init = 'pretrained/resnet50_keras_imagenet'
  config.model.freeze_encoder_steps = 1_000
  config.model.lstm_size = 512
  config.model.dropout_rate = 0.5
  config.model.temporal_pooling = 'mean'

  # Fine-tuning a pretrained encoder: a lower peak rate than training from scratch.
  config.optimizer = 'sgd'
  config.learning_rate = 0.005  # For batch_size 32; scale linearly with the batch.
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.warmup_steps = 500
  config.grad_clip_norm = 1.0
  config.label_smoothing = 0.1

  config.batch_size = 32
  config.num_train_steps = 15_000  # About 50 epochs of the 9,537 split-1 training videos.
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 1_000
  return config
