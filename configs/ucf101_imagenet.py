r"""UCF101 split 1, the default ResNet-18 LRCN started from ImageNet weights (PyTorch layout).

The frame encoder starts from torchvision's ImageNet ResNet-18, published as safetensors on the
Hugging Face Hub (timm/resnet18.tv_in1k; timm/resnet18.a1_in1k also works) and converted once by
scripts/convert_weights.py. The converted checkpoint records ResNet v1.5 and 'imagenet' input (RGB,
ImageNet mean/std); the run takes both from it. For the first 1,000 steps only the LSTM and the head
train (the encoder's params and BatchNorm statistics stay as converted); then everything is
fine-tuned, the encoder with its own linear warmup. 16 frames at stride 2, 112x112 crops (as
default.py). Any depth converts the same way (--arch=resnet34 with --config.model.encoder=resnet34).

Commands (fetch and convert the weights once; the docs on pretrained weights list the sources):

  hf download timm/resnet18.tv_in1k model.safetensors --local-dir pretrained/hub/resnet18.tv_in1k
  python scripts/convert_weights.py --from=pretrained/hub/resnet18.tv_in1k/model.safetensors \
      --arch=resnet18 --out=pretrained/resnet18_tv_in1k
  python main.py --config=configs/ucf101_imagenet.py --workdir=workdirs/ucf101_r18_in \
      --config.dataset.data_dir=$HOME/tensorflow_datasets

Expected result: NOT YET MEASURED on UCF101 by this project. Literature, not this code: an
ImageNet-initialised 2D CNN reaches about 84.5% RGB top-1 on split 1 with TSN (BN-Inception; Wang
et al., ECCV 2016), well above the same network trained from scratch; CNN+LSTM models with ImageNet
encoders report 68-81% (see configs/ucf101_resnet50_imagenet.py). Treat these as targets, not
results (docs/pretrained.md lists them with their sources). Runtime: not measured; a CPU is impractical (see default.py), use a GPU or TPU. The converter, the loading and
the frozen phase are checked end to end on generated data in tests/test_torch_weights.py.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the ImageNet-initialised ResNet-18 LRCN config for UCF101 split 1."""
  config = default.get_config()
  config.model.encoder = 'resnet18'
  config.model.preprocessing = 'imagenet'  # What the PyTorch ImageNet weights expect.
  # Made by scripts/convert_weights.py; loaded at the start of a fresh run, not on resume. Its
  # encoder_kwargs and preprocessing replace the config's.
  config.model.encoder_init = 'pretrained/resnet18_tv_in1k'
  config.model.freeze_encoder_steps = 1_000

  # Fine-tuning a pretrained encoder: a lower peak rate than training from scratch.
  config.learning_rate = 0.005  # For batch_size 32; scale linearly with the batch.
  config.warmup_steps = 500
  config.num_train_steps = 15_000  # About 50 epochs of the 9,537 split-1 training videos.
  config.eval_every_steps = 1_000
  return config
