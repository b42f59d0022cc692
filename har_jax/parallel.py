"""Moving pytrees between the host and the local devices for pmap (one replica per device)."""

from typing import Optional

from flax import jax_utils
import jax
import numpy as np


def replicate(tree, devices: Optional[list] = None):
  """Copies a host pytree to every local device: leaves become `[num_devices, ...]` arrays."""
  return jax_utils.replicate(tree, devices)


def _first(x):
  if isinstance(x, jax.Array) and x.ndim > 0:
    return x.addressable_shards[0].data[0]  # A pmap shard is [1, ...]: one replica.
  if isinstance(x, np.ndarray) and x.ndim > 0:
    return x[0]
  return x


def unreplicate(tree):
  """The first replica of a `[num_devices, ...]` pytree, read from one device only."""
  return jax.tree.map(_first, tree)
