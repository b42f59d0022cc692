"""Smoke test of scripts/benchmark_train.py: it runs end to end on a tiny workload and prints the
figures it promises (no assertion on time: the machines are shared)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_benchmark_train_prints_its_figures_and_the_comparison():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark_train.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'synthetic.py'), '--batch_size=4',
       '--num_frames=2', '--image_size=16', '--steps=2', '--matmul_size=64',
       '--compare_conv_impl=xla'],
      capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  last = lines[-1]
  figures = dict(re.findall(r'(\w+)=([0-9.]+)', last))
  assert set(figures) == {'clips_per_s', 'step_s', 'gflops_per_s', 'fraction_of_matmul_peak'}, last
  assert all(float(v) > 0 for v in figures.values()), last
  stats = next(line for line in lines if line.startswith('compile_s='))
  for key in ('gflop_per_step', 'matmul_peak_gflops_per_s', 'peak_rss_gib', 'xla_temp_gib',
              'page_faults_per_step', 'system_cpu_s_per_step'):
    assert re.search(key + r'=[0-9.]+', stats), stats
  compare = [line for line in lines if line.startswith('compare: conv_impl=xla step_s=')]
  assert len(compare) == 1 and re.search(r'speedup=[0-9.]+', compare[0]), result.stdout
  assert 'conv_impl=auto->cpu' in lines[0]
  assert lines[1].startswith('host malloc: '), lines[1]
