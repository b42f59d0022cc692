"""Moving pytrees between the host and the local devices for pmap (one replica per device)."""

from typing import Optional

import jax
import numpy as np


def local_device_sharding(devices: Optional[list] = None) -> jax.sharding.NamedSharding:
  """Sharding of a `[num_local_devices, ...]` array over the local devices, one row each (pmap)."""
  devices = devices or jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))


def replicate(tree, devices: Optional[list] = None):
  """Copies a host pytree to every local device: leaves become `[num_devices, ...]` arrays.

  The layout is the one pmap outputs have (flax's replicate uses another mesh axis name, which
  makes the first pmapped step compile twice).
  """
  devices = devices or jax.local_devices()
  sharding = local_device_sharding(devices)
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)),
                               sharding), tree)


def _first(x):
  if isinstance(x, jax.Array) and x.ndim > 0:
    return x.addressable_shards[0].data[0]  # A pmap shard is [1, ...]: one replica.
  if isinstance(x, np.ndarray) and x.ndim > 0:
    return x[0]
  return x


def unreplicate(tree):
  """The first replica of a `[num_devices, ...]` pytree, read from one device only."""
  return jax.tree.map(_first, tree)
