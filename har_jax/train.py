"""Training: the TrainState, and the train_and_evaluate loop around the steps of har_jax.steps."""

import contextlib
import functools
import time
from typing import Any, Callable, Optional

from absl import logging
from clu import periodic_actions
from flax import traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from har_jax import checkpoints
from har_jax import config_fields
from har_jax import config_validation
from har_jax import errors
from har_jax import models
from har_jax import optim
from har_jax import parallel
from har_jax import paths
from har_jax import preemption
from har_jax import pretrained
from har_jax import steps
from har_jax import workdir_lock
from har_jax.data import datasets
from har_jax.data import pipeline
from har_jax.evaluation import metrics
from har_jax.evaluation import runner


class TrainState(train_state.TrainState):
  """Everything that must survive a restart (the step doubles as the data position)."""
  batch_stats: Any
  rng: jax.Array


def create_train_state(rng: jax.Array, config, num_classes: int,
                       learning_rate_fn: Callable) -> TrainState:
  """Initialises params and BatchNorm statistics on the host (unreplicated)."""
  init_seed, state_rng = jax.random.split(rng)
  # Param init with the 'rbg' PRNG compiles several times faster on CPU than threefry.
  init_rng = jax.random.key(jax.random.randint(init_seed, (), 0, 2**31 - 1), impl='rbg')
  model = models.create_model(config.model, num_classes, dtype=config.dtype)
  dummy = jnp.zeros((1, config.num_frames, config.image_size, config.image_size, 3), jnp.uint8)
  variables = jax.jit(functools.partial(model.init, train=False))({'params': init_rng}, dummy)
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      tx=optim.create_optimizer(config, learning_rate_fn), rng=state_rng)


def _write_train_metrics(writer, step: int, metric_list, timing: dict):
  merged = metric_list[0]
  for m in metric_list[1:]:
    merged = merged.merge(m)
  scalars = {f'train/{k}': v for k, v in merged.compute().items()}
  scalars.update(timing)
  writer.write_scalars(step, scalars)


class _Throughput:
  """Steps/s, clips/s and the fraction of wall time spent waiting for input."""

  def __init__(self, clips_per_step: int):
    self.clips_per_step = clips_per_step
    self.reset()

  def reset(self):
    self.start, self.wait, self.steps = time.perf_counter(), 0.0, 0

  def summary(self) -> dict:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    out = {'perf/steps_per_sec': self.steps / elapsed,
           'perf/clips_per_sec': self.steps * self.clips_per_step / elapsed,
           'perf/input_wait_fraction': self.wait / elapsed}
    self.reset()
    return out


# A log window in which an accelerator waited for input longer than this fraction of the wall
# time makes training warn once, with what to change (input_bound_warning).
INPUT_BOUND_FRACTION = 0.25


def input_bound_warning(timing: dict, backend: str, source) -> Optional[str]:
  """One line when an accelerator waited for input more than INPUT_BOUND_FRACTION of a log window
  (`timing`: _Throughput.summary()), with the source's advice; None otherwise. On the CPU backend
  the host runs the step too, so waiting says nothing about the pipeline alone."""
  fraction = timing['perf/input_wait_fraction']
  if backend == 'cpu' or fraction <= INPUT_BOUND_FRACTION:
    return None
  return (f'Input-bound: the {backend} waited for input {fraction:.0%} of the last log window '
          f'({timing["perf/clips_per_sec"]:.0f} clips/s). {source.input_bound_advice()} See '
          'docs/speed.md, "Input speed".')


class InputReads:
  """What this process read for the clips it trained on: records and bytes (host-only keys)."""

  def __init__(self):
    self.clips, self.records, self.bytes = 0, 0, 0

  def add(self, host_batch: dict):
    if 'read_records' in host_batch:
      self.clips += len(host_batch['read_records'])
      self.records += int(np.sum(host_batch['read_records']))
      self.bytes += int(np.sum(host_batch['read_bytes']))

  def summary(self) -> dict:
    clips = max(self.clips, 1)
    return {'data/records_read_per_clip': self.records / clips,
            'data/kib_read_per_clip': self.bytes / clips / 1024}

  def log(self):
    logging.info('Input: process %d of %d read %d records (%.1f MiB) for %d training clips.',
                 jax.process_index(), jax.process_count(), self.records, self.bytes / 2**20,
                 self.clips)


class NonFiniteGuard:
  """Acts on the per-step 'finite' flags, read one step late so the host never stalls the device.

  Without config.skip_nonfinite_updates a non-finite step raises errors.UserError naming it.
  With it, the step was skipped on the device; this counts it and raises once
  config.max_consecutive_nonfinite steps in a row were skipped.
  """

  def __init__(self, config):
    self.skip = bool(config_fields.get(config, 'skip_nonfinite_updates'))
    self.max_consecutive = int(config_fields.get(config, 'max_consecutive_nonfinite'))
    self.consecutive = 0
    self.skipped = 0
    self._pending = None

  def push(self, step: int, finite):
    """Records step `step`'s flag (a device array) and checks the previous one."""
    previous, self._pending = self._pending, (step, finite)
    if previous is not None:
      self._check(*previous)

  def flush(self):
    """Checks the newest flag now (before a checkpoint or an evaluation uses the state)."""
    if self._pending is not None:
      self._check(*self._pending)
      self._pending = None

  def _check(self, step: int, finite):
    if bool(np.all(jax.device_get(finite))):
      self.consecutive = 0
      return
    if not self.skip:
      raise errors.UserError(
          f'Non-finite loss, gradient or parameter at step {step}. No checkpoint of this state '
          'was written. Lower config.learning_rate, enable config.grad_clip_norm, check the input '
          'data, or set config.skip_nonfinite_updates=True to skip such steps.')
    self.consecutive += 1
    self.skipped += 1
    logging.warning('Skipped the update of step %d: non-finite loss, gradient or parameter '
                    '(%d in a row, %d in this run).', step, self.consecutive, self.skipped)
    if self.consecutive >= self.max_consecutive:
      raise errors.UserError(
          f'{self.consecutive} consecutive non-finite steps up to step {step} '
          f'(config.max_consecutive_nonfinite={self.max_consecutive}); stopping. No checkpoint '
          'holds a non-finite state. Lower config.learning_rate or check the input data.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluating periodically and at the end.

  With config.model.encoder_init, the model's encoder_kwargs and preprocessing are the encoder
  checkpoint's (pretrained.resolve_encoder_init); the run's checkpoints store the resolved config.

  On SIGTERM or Ctrl-C (SIGINT), finishes the current step, saves a checkpoint synchronously and
  returns {}; the same call resumes from it. A second Ctrl-C exits at once without saving. With
  config.deterministic_data, a resumed run reads exactly the batches an uninterrupted run would
  have (and ends with bitwise identical params on CPU).

  One training run at a time may use a workdir: a second is refused (har_jax.workdir_lock).

  Returns:
    The final evaluation metrics (on config.dataset.eval_split), or {} when preempted.
  """
  config_validation.validate(config)
  config = pretrained.resolve_encoder_init(config)
  if jax.process_index() == 0:
    checkpoints.make_writable_folder(workdir)  # A file or a read-only folder: before the lock.
  lock = workdir_lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  source = datasets.open_source(config.dataset)
  config_validation.validate_splits(config, source)  # Also a dataset the run just generated.
  info = datasets.get_info(source)
  local_batch = config.batch_size // jax.process_count()
  logging.info('Dataset %s: %d classes, splits %s', info.name, info.num_classes, info.split_sizes)

  learning_rate_fn = optim.create_learning_rate_fn(config)
  state = create_train_state(jax.random.PRNGKey(config.seed), config, info.num_classes,
                             learning_rate_fn)
  manager = checkpoints.CheckpointManager(workdir, config, info)
  state = manager.restore_latest(state)
  initial_step = int(state.step)
  if initial_step == 0 and config_fields.get(config, 'model.encoder_init'):
    state = pretrained.load_encoder_into_state(state, config.model.encoder_init,
                                               model_config=config.model)
    logging.info('Initialised the encoder from %s.', config.model.encoder_init)
  if initial_step >= config.num_train_steps:
    logging.info('Checkpoint is at step %d >= num_train_steps; only evaluating.', initial_step)
  state = parallel.replicate(state)

  model = models.create_model(config.model, info.num_classes, dtype=config.dtype,
                              bn_axis_name='batch')
  make_train_step = lambda frozen_encoder: jax.pmap(
      functools.partial(steps.train_step, model=model, learning_rate_fn=learning_rate_fn,
                        config=config, frozen_encoder=frozen_encoder),
      axis_name='batch', donate_argnums=(0,))
  p_train_step = make_train_step(False)
  # Updates 1..N of a frozen-encoder phase run the encoder in inference mode (a second program,
  # compiled only when such a phase remains).
  num_frozen = optim.freeze_encoder_steps(config)
  p_frozen_step = make_train_step(True) if initial_step < num_frozen else None
  p_eval_step = jax.pmap(functools.partial(steps.eval_step, model=model), axis_name='batch')

  writer = paths.metric_writer(workdir, just_logging=jax.process_index() > 0)
  if initial_step == 0:
    writer.write_hparams(traverse_util.flatten_dict(config.to_dict(), sep='.'))
  # Progress notes (ETA, time in eval and checkpoints); the steps/s metric is _Throughput's.
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps)
  train_ds = pipeline.create_train_dataset(
      source, config, local_batch=local_batch, process_index=jax.process_index(),
      process_count=jax.process_count(), start_step=initial_step)
  train_iter = pipeline.device_iterator(train_ds)
  val_split = datasets.resolve_split(config.dataset, 'val')

  throughput = _Throughput(config.batch_size)
  windows, input_bound_warned = 0, False
  reads = InputReads()
  guard = NonFiniteGuard(config)
  metric_list, eval_metrics, host_batch = [], None, {}
  logging.info('Training from step %d to %d.', initial_step, config.num_train_steps)
  with preemption.PreemptionNotice(initial_step) as notice:
    for step in range(initial_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        t0 = time.perf_counter()
        batch, host_batch = next(train_iter)
        throughput.wait += time.perf_counter() - t0
        reads.add(host_batch)
        state, out = (p_frozen_step if step <= num_frozen else p_train_step)(state, batch)
        throughput.steps += 1
      guard.push(step, out['finite'])
      metric_list.append(out['metrics'])
      report_progress(step)
      preempted = notice.reached(step)
      is_last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or is_last or preempted:
        timing = throughput.summary()
        windows += 1
        # The first window holds the pipeline's start (shuffle buffer, first files): not judged.
        if windows > 1 and not input_bound_warned:
          warning = input_bound_warning(timing, jax.default_backend(), source)
          if warning:
            logging.warning('%s', warning)
            input_bound_warned = True
        _write_train_metrics(writer, step, parallel.unreplicate(metric_list),
                             dict(timing, **_health(guard, host_batch), **reads.summary()))
        metric_list = []
      eval_metrics = None
      if (step % config.eval_every_steps == 0 or is_last) and not preempted:
        guard.flush()
        try:
          with report_progress.timed('eval'):
            eval_metrics = run_periodic_eval(p_eval_step, state, source, config, val_split,
                                             info)
        except Exception:
          # A failing evaluation (bad data, a bug) must not cost the steps since the last save.
          if step not in manager.all_steps():
            manager.save_now(step, parallel.unreplicate(state))
            logging.warning('Evaluation at step %d failed; saved checkpoint %d first.', step,
                            step)
          raise
        writer.write_scalars(step, {f'val/{k}': v for k, v in eval_metrics.items()})
      if step % config.checkpoint_every_steps == 0 or eval_metrics is not None or preempted:
        guard.flush()
        save = manager.save_now if preempted else manager.save  # save_now: synchronous.
        with report_progress.timed('checkpoint'):
          save(step, parallel.unreplicate(state), eval_metrics)
          writer.flush()  # Events up to each checkpoint survive a kill (uploaded, on a bucket).
      if preempted:
        reads.log()
        logging.warning('%s: saved checkpoint %d in %s; run the same command to resume.',
                        notice.cause, step, manager.directory)
        return {}
  guard.flush()
  reads.log()
  skipped = _health(guard, host_batch).get('data/skipped_examples', 0)
  if skipped:
    logging.warning('Skipped %d draws of damaged training examples in this run (each video '
                    'named once above).', skipped)
  manager.wait_until_finished()

  if (val_split == config.dataset.eval_split and not config.eval.num_periodic_videos
      and eval_metrics is not None):
    final = eval_metrics  # The last periodic eval already covered the whole eval split.
  else:
    with report_progress.timed('final_eval'):
      final = run_periodic_eval(p_eval_step, state, source, config, config.dataset.eval_split,
                                info, max_examples=0)
  writer.write_scalars(int(parallel.unreplicate(state.step)),
                       {f'test/{k}': v for k, v in final.items()})
  writer.flush()
  logging.info('Final %s metrics at step %d: %s', config.dataset.eval_split,
               int(parallel.unreplicate(state.step)), final)
  return final


def _health(guard: NonFiniteGuard, host_batch: dict) -> dict:
  """Skipped non-finite steps and skipped bad examples, for the train summaries."""
  out = {'train/skipped_nonfinite_steps': guard.skipped}
  if 'num_skipped' in host_batch:
    out['data/skipped_examples'] = int(np.max(host_batch['num_skipped']))
  return out


def run_periodic_eval(p_eval_step, state, source, config, split: str, info,
                      max_examples: int = -1) -> dict:
  """Evaluates `split` (every example once, across processes) and returns scalar metrics."""
  if max_examples < 0:
    max_examples = config.eval.num_periodic_videos
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  outputs = runner.run_eval(p_eval_step, variables, source, config, split,
                            max_examples=max_examples)
  return metrics.scalar_metrics(outputs, info.num_classes)
