r"""Times loading a checkpoint for inference (har_jax.inference.load), each in a fresh process.

  python scripts/benchmark_load.py --workdir=workdirs/ucf101_r18 [--checkpoint=latest] [--repeats=3]

Each repeat starts a new Python process, imports har_jax, then times `inference.load` alone
(reading the metadata, building the abstract target with jax.eval_shape, restoring params and
BatchNorm statistics) and reports its peak resident memory. The last line is

  load_s_median=<s> load_s=[...] maxrss_mb_median=<MB>
"""

import json
import os
import statistics
import subprocess
import sys

from absl import flags

from har_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', "'best', 'latest' or a step.")
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Fresh processes to time.')

_CHILD = '''
import json, resource, sys, time
from har_jax import inference
start = time.perf_counter()
model = inference.load(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - start
print(json.dumps({'load_s': seconds, 'step': model.step,
                  'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def main(argv):
  del argv
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  runs = []
  for i in range(_REPEATS.value):
    proc = subprocess.run([sys.executable, '-c', _CHILD, _WORKDIR.value, _CHECKPOINT.value],
                          cwd=repo, capture_output=True, text=True, check=False)
    if proc.returncode:
      print(proc.stderr[-2000:], file=sys.stderr)
      raise SystemExit(f'error: loading {_WORKDIR.value} failed (rc {proc.returncode}).')
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f'repeat {i + 1}: load_s={run["load_s"]:.2f} maxrss_mb={run["maxrss_mb"]:.0f} '
          f'(step {run["step"]})', flush=True)
    runs.append(run)
  times = [r['load_s'] for r in runs]
  print(f'load_s_median={statistics.median(times):.2f} load_s={[round(t, 2) for t in times]} '
        f'maxrss_mb_median={statistics.median(r["maxrss_mb"] for r in runs):.0f}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  cli.run(main)
