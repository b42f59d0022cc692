"""har_jax entry point: train or evaluate an LRCN action recogniser (the console command har-train).

  python main.py --config=configs/synthetic.py --workdir=workdirs/synthetic
  python main.py --config=configs/synthetic.py --workdir=workdirs/synthetic --mode=eval

Config fields can be overridden on the command line, e.g. --config.batch_size=16. The flags and
the code are in har_jax/commands/train.py; the exit codes in har_jax/cli.py.
"""

from har_jax.commands import train

if __name__ == '__main__':
  train.run()
