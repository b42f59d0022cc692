r"""Times the project's pmapped train step on synthetic input, against the measured matmul peak.

  python scripts/benchmark_train.py --config=configs/default.py --batch_size=8 --num_frames=16 \
      --image_size=112 --steps=3 [--conv_impl=auto|xla|cpu] [--remat] [--dtype=bfloat16] \
      [--compare_conv_impl=xla] [--device_crop_from=128]

Builds the model, state and step as training does (models.create_model, train.create_train_state,
steps.train_step, parallel.replicate), compiles once (compile time reported), runs one warm-up step and then times
`--steps` steps. FLOPs per step come from XLA's cost analysis of the step (see model_flops);
the matmul peak is a square matmul in the same dtype on the same device, measured in the same run
after the steps.
Peak host memory is the process's maximum resident set (resource.getrusage; with
--compare_conv_impl it covers both steps); XLA's temp buffer size of the step, the minor page faults
and the system CPU seconds per timed step are printed next to it.
The first line after the settings says which host malloc the run used: start the script with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to measure CPU steps with huge-page malloc (har_jax/hostmem.py).
--compare_conv_impl=xla also compiles the step with plain XLA ops and alternates the two step by step,
printing `compare: ... speedup=<x>` (the median of the per-pair ratios). The last line is

  clips_per_s=<x> step_s=<y> gflops_per_s=<z> fraction_of_matmul_peak=<w>

where gflops_per_s counts all local devices and the peak is per device times the device count
(nan where the backend gives no cost analysis of the uncompiled step, as GPUs with JAX 0.11).
"""

import functools
import os
import resource
import time

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from har_jax import cli
from har_jax import config_fields
from har_jax import config_validation
from har_jax import hostmem
from har_jax import models
from har_jax import optim
from har_jax import parallel
from har_jax import steps
from har_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config module.', lock_config=False)
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Global batch (clips); 0 -> the config.')
_FRAMES = flags.DEFINE_integer('num_frames', 0, 'Frames per clip; 0 -> the config.')
_SIZE = flags.DEFINE_integer('image_size', 0, 'Frame height = width; 0 -> the config.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps, after one warm-up step.')
_CLASSES = flags.DEFINE_integer('num_classes', 0, '0 -> 10 for synthetic_actions, else 101.')
_CONV = flags.DEFINE_enum('conv_impl', None, list(models.CONV_IMPLS),
                          'Overrides config.model.conv_impl.')
_REMAT = flags.DEFINE_bool('remat', None, 'Overrides config.model.remat.')
_DTYPE = flags.DEFINE_string('dtype', None, 'Overrides config.dtype.')
_MATMUL = flags.DEFINE_integer('matmul_size', 2048, 'Side of the square peak matmul.')
_CROP_FROM = flags.DEFINE_integer(
    'device_crop_from', 0, 'N > 0: frames arrive N x N with a random-resized-crop window and a '
    'flip per clip, and the step crops them to image_size on the device (as the input pipeline '
    'ships them for datasets of one frame size).')
_COMPARE = flags.DEFINE_enum(
    'compare_conv_impl', None, list(models.CONV_IMPLS),
    'Also compile the step with this conv_impl and alternate the two step by step in this process '
    '(the fairest ratio on a shared machine); prints a `compare:` line with the speed-up.')


def _apply_overrides(config):
  """Applies the command-line overrides to `config` (in place)."""
  for flag, key in ((_BATCH, 'batch_size'), (_FRAMES, 'num_frames'), (_SIZE, 'image_size')):
    if flag.value:
      config[key] = flag.value
  if _DTYPE.value:
    config.dtype = _DTYPE.value
  if _CONV.value:
    config.model.conv_impl = _CONV.value
  if _REMAT.value is not None:
    config.model.remat = _REMAT.value


def _num_classes(config) -> int:
  if _CLASSES.value:
    return _CLASSES.value
  return 10 if config.dataset.name.startswith('synthetic_actions') else 101


def _batch(config, num_classes: int, seed: int = 0) -> dict:
  """`{'video': [devices, per_device, T, S, S, 3] uint8, 'label': [devices, per_device]}`, with
  --device_crop_from=N frames N x N and 'crop' `[devices, per_device, 4]`, 'flip'."""
  n = jax.local_device_count()
  config_validation.validate(config, num_devices=n, check_dataset=False)
  per_device = config.batch_size // n
  rng = np.random.default_rng(seed)
  size = _CROP_FROM.value or config.image_size
  shape = (n, per_device, config.num_frames, size, size, 3)
  batch = {'video': rng.integers(0, 256, shape, dtype=np.uint8),
           'label': rng.integers(0, num_classes, (n, per_device), dtype=np.int32)}
  if _CROP_FROM.value:
    sides = rng.uniform(0.6 * size, size, (n, per_device, 2))
    corners = rng.uniform(0, 1, (n, per_device, 2)) * (size - sides)
    batch['crop'] = np.concatenate([corners, sides], axis=-1).astype(np.float32)
    batch['flip'] = rng.uniform(size=(n, per_device)) < 0.5
  return batch


def _flops(stage) -> float:
  """FLOPs of one execution on one device, from XLA's cost analysis of a Lowered/Compiled."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  if not cost:  # GPUs with JAX 0.11 analyse compiled programs only, and the compiled count
    return float('nan')  # leaves out cuDNN's convolutions: no figure rather than a wrong one.
  return float(cost.get('flops', 0.0))


def _pmapped_step(config, num_classes: int, learning_rate_fn):
  model = models.create_model(config.model, num_classes, dtype=config.dtype, bn_axis_name='batch')
  return jax.pmap(
      functools.partial(steps.train_step, model=model, learning_rate_fn=learning_rate_fn,
                        config=config), axis_name='batch', donate_argnums=(0,))


def model_flops(config, num_classes: int, learning_rate_fn, state, batch) -> float:
  """FLOPs of one step on one device with XLA's own convolutions (cost analysis of the lowered,
  uncompiled step). The same for every conv_impl; XLA counts a loop body once, so the compiled
  'cpu' step (scans and maps over batch chunks) would undercount."""
  config = config.copy_and_resolve_references()
  config.model.conv_impl = 'xla'
  return _flops(_pmapped_step(config, num_classes, learning_rate_fn).lower(state, batch))


def matmul_peak(dtype, size: int, reps: int = 5) -> float:
  """Best GFLOP/s of a jitted `[size, size] x [size, size]` matmul on the default device."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * size**3 / best / 1e9


def _time_steps(step_fn, state, batch, steps: int) -> tuple[object, list[float]]:
  """Runs `steps` steps, each waited for; returns the final state and per-step seconds."""
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, out = step_fn(state, batch)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t0)
  return state, times


def _compile(config, num_classes: int, learning_rate_fn, batch):
  """(replicated state, compiled step, compile seconds, XLA temp GiB) for `config`."""
  state = train.create_train_state(jax.random.PRNGKey(config.seed), config, num_classes,
                                   learning_rate_fn)
  state = parallel.replicate(state)
  t0 = time.perf_counter()
  compiled = _pmapped_step(config, num_classes, learning_rate_fn).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  temp_gib = getattr(memory, 'temp_size_in_bytes', 0) / 2**30 if memory is not None else 0.0
  return state, compiled, compile_s, temp_gib


def main(argv):
  del argv
  config = _CONFIG.value
  _apply_overrides(config)
  num_classes = _num_classes(config)
  conv_impl = config_fields.get(config, 'model.conv_impl')
  print(f'backend={jax.default_backend()} devices={jax.local_device_count()} '
        f'conv_impl={conv_impl}->{models.resolve_conv_impl(conv_impl)} '
        f'remat={config.model.get("remat", False)} dtype={config.dtype} '
        f'batch={config.batch_size} frames={config.num_frames} size={config.image_size} '
        f'encoder={config.model.encoder} device_crop_from={_CROP_FROM.value}', flush=True)
  print(hostmem.status(), flush=True)

  learning_rate_fn = optim.create_learning_rate_fn(config)
  batch = _batch(config, num_classes)
  state, compiled, compile_s, temp_gib = _compile(config, num_classes, learning_rate_fn, batch)
  flops = model_flops(config, num_classes, learning_rate_fn, state, batch)
  flops *= jax.local_device_count()
  state, _ = _time_steps(compiled, state, batch, 1)  # Warm-up.

  other = None
  if _COMPARE.value:
    other_config = config.copy_and_resolve_references()
    other_config.model.conv_impl = _COMPARE.value
    other = list(_compile(other_config, num_classes, learning_rate_fn, batch))
    other[0], _ = _time_steps(other[1], other[0], batch, 1)  # Warm-up.
    print(f'compare: conv_impl={_COMPARE.value}->{models.resolve_conv_impl(_COMPARE.value)} '
          f'compile_s={other[2]:.1f} xla_temp_gib={other[3]:.2f}', flush=True)

  times, other_times = [], []
  usage0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(_STEPS.value):  # Alternating, so that both see the same machine load.
    state, (t,) = _time_steps(compiled, state, batch, 1)
    times.append(t)
    if other is not None:
      other[0], (t,) = _time_steps(other[1], other[0], batch, 1)
      other_times.append(t)
  usage1 = resource.getrusage(resource.RUSAGE_SELF)
  timed = _STEPS.value * (2 if other is not None else 1)
  faults = (usage1.ru_minflt - usage0.ru_minflt) / timed
  sys_s = (usage1.ru_stime - usage0.ru_stime) / timed
  step_s = float(np.median(times))
  if other is not None:
    ratios = np.asarray(other_times) / np.asarray(times)
    other_s = float(np.median(other_times))
    print(f'compare: conv_impl={_COMPARE.value} step_s={other_s:.3f} '
          f'clips_per_s={config.batch_size / other_s:.3f} '
          f'step_times_s={",".join(f"{t:.2f}" for t in other_times)} '
          f'speedup={np.median(ratios):.3f} speedup_min={ratios.min():.3f} '
          f'speedup_max={ratios.max():.3f} (the config\'s conv_impl over {_COMPARE.value}, '
          f'median of per-pair ratios)', flush=True)
  peak = matmul_peak(jnp.dtype(config.dtype), _MATMUL.value) * jax.local_device_count()
  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux.

  gflops_per_s = flops / step_s / 1e9
  print(f'compile_s={compile_s:.1f} gflop_per_step={flops / 1e9:.1f} '
        f'step_times_s={",".join(f"{t:.2f}" for t in times)} '
        f'matmul_peak_gflops_per_s={peak:.1f} peak_rss_gib={rss_gib:.2f} '
        f'xla_temp_gib={temp_gib:.2f} page_faults_per_step={faults:.0f} '
        f'system_cpu_s_per_step={sys_s:.2f} load_avg={os.getloadavg()[0]:.2f}')
  print(f'clips_per_s={config.batch_size / step_s:.3f} step_s={step_s:.3f} '
        f'gflops_per_s={gflops_per_s:.1f} fraction_of_matmul_peak={gflops_per_s / peak:.3f}',
        flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
