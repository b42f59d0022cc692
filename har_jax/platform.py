"""Process-level setup: the distributed runtime (several processes) and CPU collectives."""

import jax


def initialize():
  """Prepares JAX before any backend is created.

  Selects gloo for CPU cross-process collectives (harmless on GPU/TPU, where it is unused).
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
