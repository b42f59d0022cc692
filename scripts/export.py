r"""Export a trained checkpoint for serving (SavedModel, jax.export and ONNX).

  python scripts/export.py --workdir=workdirs/synthetic --out=exports/synthetic

The same as the console command har-export (--help lists the flags); the code is in
har_jax/commands/export.py.
"""

from har_jax.commands import export

if __name__ == '__main__':
  export.run()
