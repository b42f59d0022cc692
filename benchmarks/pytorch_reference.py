r"""The issue-7 reference: the same LRCN train step in PyTorch (CPU, oneDNN), for a same-machine ratio.

Not part of har_jax and not imported by its tests: PyTorch is not a project dependency. Run it from
a separate virtual environment, e.g.

  python -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy
  /tmp/torch/bin/python benchmarks/pytorch_reference.py --steps=3

benchmarks/compare_pytorch.sh alternates it with scripts/benchmark_train.py so that both see the
same machine load. Workload (matching configs/default.py at the issue's sizes): ResNet-18 frame
encoder (torchvision layout, 11.2 M params), LSTM(512) over the frames, dropout 0.5, a 101-way head
applied per step and averaged over time, label-smoothed cross-entropy, gradient clipping at norm 1,
SGD momentum 0.9 with weight decay; float32. The last line has the benchmark's format:

  clips_per_s=<x> step_s=<y>
"""

import argparse
import os
import resource
import time

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet18(nn.Module):

  def __init__(self):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                              nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    blocks, cin = [], 64
    for i, width in enumerate((64, 128, 256, 512)):
      for j in range(2):
        blocks.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
        cin = width
    self.blocks = nn.Sequential(*blocks)

  def forward(self, x):
    return self.blocks(self.stem(x)).mean(dim=(2, 3))


class LRCN(nn.Module):

  def __init__(self, num_classes, lstm_size=512):
    super().__init__()
    self.encoder = ResNet18()
    self.lstm = nn.LSTM(512, lstm_size, batch_first=True)
    self.dropout = nn.Dropout(0.5)
    self.head = nn.Linear(lstm_size, num_classes)

  def forward(self, video):  # [B, T, 3, H, W] float
    b, t = video.shape[:2]
    features = self.encoder(video.flatten(0, 1)).view(b, t, -1)
    y, _ = self.lstm(features)
    return self.head(self.dropout(y)).mean(dim=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--num_frames', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=112)
  parser.add_argument('--num_classes', type=int, default=101)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--channels_last', action='store_true')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = LRCN(args.num_classes)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model.encoder.to(memory_format=fmt)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
  video = torch.randint(0, 256, (args.batch_size, args.num_frames, 3, args.image_size,
                                 args.image_size), dtype=torch.uint8)
  labels = torch.randint(0, args.num_classes, (args.batch_size,))
  mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 1, 3, 1, 1)
  std = torch.tensor((0.229, 0.224, 0.225)).view(1, 1, 3, 1, 1)

  def step():
    x = (video.float() / 255 - mean) / std
    loss = F.cross_entropy(model(x), labels, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss)

  print(f'torch={torch.__version__} threads={torch.get_num_threads()} '
        f'onednn={torch.backends.mkldnn.is_available()} channels_last={args.channels_last} '
        f'batch={args.batch_size} frames={args.num_frames} size={args.image_size}', flush=True)
  step()  # Warm-up.
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  step_s = sorted(times)[len(times) // 2]
  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f'step_times_s={",".join(f"{t:.2f}" for t in times)} peak_rss_gib={rss_gib:.2f} '
        f'load_avg={os.getloadavg()[0]:.2f}')
  print(f'clips_per_s={args.batch_size / step_s:.3f} step_s={step_s:.3f}', flush=True)


if __name__ == '__main__':
  main()
