"""Preemption and Ctrl-C: one step at which every process saves a checkpoint and stops.

`PreemptionNotice` turns SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C) into a flag
the train loop reads between steps; `exit_on_interrupt` makes Ctrl-C end phases with nothing to
save at once. Signals are logged the moment they arrive, also while XLA compiles.
"""

import contextlib
import os
import signal
import sys
import threading
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class _SignalWatcher:
  """Calls `callback(signum)` from a thread as soon as a signal with a Python handler arrives.

  Python runs signal handlers only between bytecodes of the main thread, so not while it is inside
  an XLA compile or step; the C-level handler writes the signal number to `signal.set_wakeup_fd`
  at once, and this thread reads it. Main thread only; `close()` restores the previous wakeup fd.
  """

  def __init__(self, callback, signals):
    self._read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)
    self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._run, args=(callback, set(signals)),
                                    name='har_jax_signals', daemon=True)
    self._thread.start()

  def _run(self, callback, signals):
    while data := os.read(self._read_fd, 64):  # b'' once close() closed the write end.
      for signum in data:
        if signum in signals:
          callback(signum)

  def close(self):
    signal.set_wakeup_fd(self._previous_fd)
    os.close(self._write_fd)
    self._thread.join(5)
    os.close(self._read_fd)


def _exit_at_once(signum: int, what: str, message: Optional[str] = None):
  """Logs 'Received <signal><what>' (or prints `message` on stderr) and ends the process now,
  exit code 128 + signum."""
  if message is None:
    logging.warning('Received %s%s The checkpoints already committed are kept; rerun the same '
                    'command to resume.', signal.Signals(signum).name, what)
  logging.flush()
  if message is not None:
    try:
      print(f'\n{message}', file=sys.stderr, flush=True)
    except OSError:  # A closed stderr: exit all the same.
      pass
  os._exit(128 + signum)  # pylint: disable=protected-access


@contextlib.contextmanager
def exit_on_interrupt(message: Optional[str] = None):
  """Within this context, Ctrl-C exits at once (exit code 130), for phases with nothing to save.

  A PreemptionNotice entered inside takes over until it closes. Orbax commits checkpoints
  atomically, so those already committed are kept; without this, a KeyboardInterrupt can be
  swallowed (raised inside a garbage-collection callback) or wait for an XLA compile to end.

  Args:
    message: the one line printed on stderr at Ctrl-C (for programs that write no checkpoints);
      None: a log line saying that the checkpoints already committed are kept.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  previous = signal.signal(signal.SIGINT, lambda *_: None)
  watcher = _SignalWatcher(lambda signum: _exit_at_once(signum, ': exiting now.', message),
                           [signal.SIGINT])
  try:
    yield
  finally:
    watcher.close()
    signal.signal(signal.SIGINT, previous)


class PreemptionNotice:
  """Turns SIGTERM (a preemption notice) or SIGINT (Ctrl-C) into one step at which every process
  saves a checkpoint and stops.

  One process: the signal is logged the moment it arrives (even during the first compile) and
  `reached(step)` is True from the next step on. A second Ctrl-C exits at once, without saving
  (exit code 130): the checkpoints already committed stay. Several processes: JAX's preemption
  sync service (started by jax.distributed.initialize) picks a step that every process reaches,
  and Ctrl-C is passed to it as a SIGTERM; where the service is off, the local flags are OR-ed
  across processes at every step. Use as a context manager: the previous handlers are restored.
  """

  def __init__(self, initial_step: int, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signum = None
    self._received = []  # Every signal the watcher saw, in order.
    self._stepped = False  # Whether reached() was called, i.e. a step has finished.
    self._announced = False
    self._previous = {}
    self._use_service = False
    self._watcher = None
    if jax.process_count() > 1:
      try:
        multihost_utils.reached_preemption_sync_point(int(initial_step))
        self._use_service = True
      except RuntimeError:
        pass
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not in the main thread: SIGTERM and Ctrl-C will not trigger a checkpoint.')
      return
    # With the service, SIGTERM belongs to it (its own handler); Ctrl-C is forwarded to it.
    handled = [s for s in signals if not (self._use_service and s == signal.SIGTERM)]
    for signum in handled:
      self._previous[signum] = signal.signal(signum, self._handle)
    self._watcher = _SignalWatcher(self._on_signal, handled)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._watcher is None:  # The watcher logs and counts signals; without it, do it here.
      self._on_signal(signum)
    elif not self._use_service:
      self._signum = self._signum or signum

  def _on_signal(self, signum: int):
    """Logs a signal when it arrives and records it (only a flag: the loop acts between steps);
    exits at once on a second Ctrl-C."""
    name = signal.Signals(signum).name
    self._received.append(signum)
    if self._received.count(signal.SIGINT) > 1:
      _exit_at_once(signum, ' again: exiting now without saving.')
    if len(self._received) > 1:
      logging.warning('Received %s again; still finishing the step to save a checkpoint.', name)
      return
    logging.warning(
        'Received %s: finishing the current step%s, then saving a checkpoint and stopping.%s', name,
        '' if self._stepped else ' (the first one includes compiling, which can take minutes)',
        ' Press Ctrl-C again to exit at once without saving.' if signum == signal.SIGINT else '')
    if self._use_service:
      os.kill(os.getpid(), signal.SIGTERM)  # The preemption sync service's own notice.
    else:
      self._signum = self._signum or signum

  @property
  def cause(self) -> str:
    """'Interrupted' after Ctrl-C, else 'Preempted'."""
    return 'Interrupted' if self._signum == signal.SIGINT else 'Preempted'

  def reached(self, step: int) -> bool:
    """True when training should save a checkpoint at `step` and stop."""
    if self._use_service:
      flag = bool(multihost_utils.reached_preemption_sync_point(int(step)))
    else:
      flag = self._signum is not None
      if jax.process_count() > 1:
        flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    self._stepped = True
    if flag and not self._announced:
      self._announced = True
      name = signal.Signals(self._signum).name if self._signum else 'a preemption notice'
      logging.warning('Received %s: saving a checkpoint at step %d and stopping.', name, step)
    return flag

  def close(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    if self._watcher is not None:
      self._watcher.close()
      self._watcher = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
