r"""The UCF101 three-split protocol, with a frame-average baseline.

  python scripts/run_splits.py --config=configs/ucf101_frames.py --workdir_root=workdirs/splits

The same as the console command har-run-splits (--help lists the flags); the code is in
har_jax/commands/run_splits.py.
"""

from har_jax.commands import run_splits

if __name__ == '__main__':
  run_splits.run()
