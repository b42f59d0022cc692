"""Smoke test of scripts/benchmark_input.py: it runs on TFDS records and a frame store and prints
the figures it promises (no assertion on time: the machines are shared)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_benchmark_input_prints_both_layouts_the_floor_and_the_naive_ratio(synthetic_data_dir,
                                                                           synthetic_frames):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark_input.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'synthetic.py'),
       f'--data_dir={synthetic_data_dir}',
       f'--datasets=synthetic_actions/tiny:train,{synthetic_frames}:train', '--rounds=2',
       '--seconds=0.5', '--warmup_seconds=0.2', '--floor_clips=16', '--config.batch_size=8',
       '--config.num_frames=4', '--config.frame_stride=1', '--config.dataset.val_split=0'],
      capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1].startswith('ratio_vs_naive=') and float(lines[-1].split('=')[1]) > 0, lines
  figures = dict(re.findall(r'(\w+)=([0-9.]+)', lines[-2]))
  assert set(figures) == {'ms_per_clip_core', 'floor_ms_per_clip_core', 'ratio_to_floor'}, lines
  assert all(float(v) > 0 for v in figures.values())
  per_dataset = {line.split(':')[0]: dict(re.findall(r'(\w+)=([0-9.]+)', line))
                 for line in lines if 'bytes_read_per_clip=' in line}
  assert set(per_dataset) == {'synthetic_actions/tiny', synthetic_frames}, lines
  for figures in per_dataset.values():
    assert {'ms_per_clip_core', 'clips_per_s_per_core', 'host_cores_per_1000_clips_per_s',
            'floor_ms_per_clip_core'} <= set(figures)
  # A clip of the frame store reads its 4 frames; one of the TFDS records reads its 8-frame video.
  assert (float(per_dataset[synthetic_frames]['bytes_read_per_clip'])
          < 0.75 * float(per_dataset['synthetic_actions/tiny']['bytes_read_per_clip']))
  assert sum(line.startswith('round ') for line in lines) == 2 * 2 * 2
  assert any(line.startswith('vs_first_floor=') for line in lines)
