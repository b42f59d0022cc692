r"""Recognise actions in a stream: a camera, a network stream, a pipe or a file.

  python scripts/stream.py --workdir=workdirs/synthetic SOURCE

The same as the console command har-stream (--help lists the flags); the code is in
har_jax/commands/stream.py.
"""

from har_jax.commands import stream

if __name__ == '__main__':
  stream.run()
