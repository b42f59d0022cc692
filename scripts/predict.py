r"""Recognise the action in your own video files with a trained checkpoint.

  python scripts/predict.py --workdir=workdirs/synthetic [--checkpoint=best] video1.avi ...

The same as the console command har-predict (--help lists the flags); the code is in
har_jax/commands/predict.py.
"""

from har_jax.commands import predict

if __name__ == '__main__':
  predict.run()
