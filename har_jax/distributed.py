"""Process-level setup: JAX's multi-controller runtime, CPU collectives, quieter library logs.

One process per host: TPU VM pod slices, SLURM and Open MPI jobs are detected by JAX itself; an
explicit coordinator address / process count / process id (flags or environment) works anywhere,
including several CPU processes on one machine over 127.0.0.1.
"""

import dataclasses
import logging as py_logging
import os
import socket
import time
from typing import Optional

from absl import logging
import jax

from har_jax import errors

# Libraries whose INFO lines drown the training log (orbax logs every file it writes).
# INFO records dropped from the log: orbax and TFDS internals, and JAX's backend probing ("Unable
# to initialize backend 'tpu'" on every machine without one).
_CHATTY_PATHS = ('/orbax/', '/tensorflow_datasets/core/', '/jax/_src/xla_bridge.py')
# Environment variables that mean "this process is one of several" to JAX's cluster detection.
_CLUSTER_ENV = {
    'SLURM_NTASKS': 'SLURM',
    'OMPI_COMM_WORLD_SIZE': 'Open MPI',
    'TPU_WORKER_HOSTNAMES': 'TPU pod',
}



@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """How to join the runtime. All None -> auto-detect (or run as a single process)."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  timeout_s: int = 300

  @classmethod
  def from_env(cls, **overrides) -> 'DistributedSpec':
    """Fills unset fields from HAR_JAX_COORDINATOR / HAR_JAX_NUM_PROCESSES / HAR_JAX_PROCESS_ID."""
    env = os.environ
    values = {
        'coordinator_address': env.get('HAR_JAX_COORDINATOR') or None,
        'num_processes': int(env['HAR_JAX_NUM_PROCESSES']) if env.get(
            'HAR_JAX_NUM_PROCESSES') else None,
        'process_id': int(env['HAR_JAX_PROCESS_ID']) if env.get('HAR_JAX_PROCESS_ID') else None,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))

  def validate(self):
    if not self.explicit:
      return
    missing = [name for name in ('coordinator_address', 'num_processes', 'process_id')
               if getattr(self, name) is None]
    if missing:
      raise errors.UserError(
          f'Explicit multi-process launch needs --coordinator_address, --num_processes and '
          f'--process_id together; missing: {", ".join(missing)}.')
    if self.num_processes < 1:
      raise errors.UserError(f'--num_processes={self.num_processes} must be >= 1.')
    if not 0 <= self.process_id < self.num_processes:
      raise errors.UserError(
          f'--process_id={self.process_id} is out of range for --num_processes='
          f'{self.num_processes}: use 0..{self.num_processes - 1}, one per process.')
    if ':' not in self.coordinator_address:
      raise errors.UserError(
          f'--coordinator_address={self.coordinator_address!r} needs a port, e.g. '
          '10.0.0.2:1234 (the address of process 0).')


def detected_cluster() -> Optional[str]:
  """The cluster JAX will auto-detect (several processes), or None."""
  for var, name in _CLUSTER_ENV.items():
    value = os.environ.get(var, '')
    several = (len(value.split(',')) > 1) if var == 'TPU_WORKER_HOSTNAMES' else (
        value.isdigit() and int(value) > 1)
    if several:
      return name
  return None


def initialize(spec: Optional[DistributedSpec] = None):
  """Prepares JAX before any backend is created; joins the distributed runtime when needed."""
  quiet_library_logs()
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  spec = spec or DistributedSpec.from_env()
  spec.validate()
  if spec.explicit:
    if spec.num_processes > 1:
      _initialize_distributed(spec, f'explicit, coordinator {spec.coordinator_address}')
  elif detected_cluster():
    _initialize_distributed(spec, f'{detected_cluster()} auto-detection')
  logging.info('Process %d of %d: %d local devices, %d global devices (%s).',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)


def wait_for_coordinator(address: str, timeout_s: float):
  """Waits until a TCP connection to `address` (host:port) succeeds; raises after timeout_s.

  JAX's client aborts the whole process (a C++ fatal error, no Python exception) when it cannot
  register with the coordinator, so processes other than 0 check reachability first.
  """
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  last_error = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2.0):
        return
    except OSError as e:
      last_error = e
      time.sleep(0.5)
  raise errors.UserError(
      f'Could not join the distributed runtime: no coordinator answered at {address} within '
      f'{timeout_s:g} s ({last_error}). Start process 0 (it hosts the coordinator) and check that '
      'the address and port are reachable from this host.')


def _initialize_distributed(spec: DistributedSpec, how: str):
  logging.info('Joining the JAX distributed runtime (%s).', how)
  if spec.explicit and spec.process_id != 0:
    wait_for_coordinator(spec.coordinator_address, spec.timeout_s)
  try:
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
        process_id=spec.process_id, initialization_timeout=spec.timeout_s)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(
        f'Could not join the distributed runtime ({how}) within {spec.timeout_s} s: '
        f'{type(e).__name__}: {e}. Check that process 0 is running and that the coordinator '
        'address and port are reachable from this host, and that every process got the same '
        '--num_processes.') from e


class _QuietLibraries(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(p in record.pathname for p in _CHATTY_PATHS)


class _NoLibraryDeprecations(py_logging.Filter):
  """Drops TensorFlow's deprecation warnings about calls made inside TFDS (nothing a user can
  change); deprecations in the user's own code still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (record.pathname.endswith('deprecation.py')
                and '/tensorflow_datasets/' in record.getMessage())


def quiet_library_logs():
  """Drops INFO/DEBUG records from orbax, TFDS and JAX backend probing, and TensorFlow's
  deprecation warnings about TFDS internals; other warnings still show."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  tf_logger = py_logging.getLogger('tensorflow')
  if not any(isinstance(f, _NoLibraryDeprecations) for f in tf_logger.filters):
    tf_logger.addFilter(_NoLibraryDeprecations())
