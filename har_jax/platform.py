"""Process-level setup: CPU collectives and quieter library logs."""

import logging as py_logging

from absl import logging
import jax

# Libraries whose INFO lines drown the training log (orbax logs every file it writes).
_CHATTY_PATHS = ('/orbax/', '/tensorflow_datasets/core/')


class _QuietLibraries(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(p in record.pathname for p in _CHATTY_PATHS)


def quiet_library_logs():
  """Drops INFO/DEBUG records from orbax and TFDS internals; their warnings still show."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def initialize():
  """Prepares JAX before any backend is created.

  Selects gloo for CPU cross-process collectives (harmless on GPU/TPU, where it is unused).
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  quiet_library_logs()
