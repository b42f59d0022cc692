"""Learning-rate schedules and optimizers (optax), built from the config.

Frozen-encoder warm start (config.model.freeze_encoder_steps = N > 0): the first N optimizer
updates change only the non-encoder params (LSTM, head); from update N on, everything trains.
  - Params are split by optax.multi_transform into 'encoder' (params['encoder']) and 'rest'.
  - The encoder's optimizer is wrapped in optax.transforms.conditionally_mask: while frozen, its
    updates are exactly zero (no weight decay either) and its inner state (momentum, Adam moments
    and counts) is not touched, so nothing carries over into the unfrozen phase.
  - The encoder's gradients are zeroed before global-norm clipping while frozen, so they do not
    shrink the LSTM/head updates.
  - Once unfrozen, the encoder follows the global schedule, ramped linearly from 0 over
    config.warmup_steps (a second warmup: its Adam/momentum statistics start from zero there).
  - The encoder's BatchNorm running statistics are held too: train_step passes its new batch_stats
    through `hold_frozen_encoder_batch_stats`.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from har_jax import config_fields

OPTIMIZERS = ('sgd', 'adamw')
ENCODER = 'encoder'  # The LRCN submodule whose params freeze_encoder_steps freezes.


def create_learning_rate_fn(config) -> optax.Schedule:
  """Linear warmup to config.learning_rate, then cosine decay to 0 at config.num_train_steps."""
  warmup = min(config.warmup_steps, max(config.num_train_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.0)


def freeze_encoder_steps(config) -> int:
  """config.model.freeze_encoder_steps, 0 when absent: the number of frozen-encoder updates."""
  steps = config_fields.get(config, 'model.freeze_encoder_steps')
  steps = int(steps or 0)
  if steps < 0:
    raise ValueError(f'config.model.freeze_encoder_steps must be >= 0, got {steps}.')
  return steps


def _decay_mask(params):
  """Weight decay applies to kernels only, not to biases or BatchNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def _param_group(params):
  """'encoder' for every leaf under params['encoder'], 'rest' for the others."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: ENCODER if getattr(path[0], 'key', None) == ENCODER else 'rest', params)


def _core(config, learning_rate_fn: Callable) -> optax.GradientTransformation:
  """SGD with Nesterov momentum or AdamW, with decoupled weight decay on kernels."""
  if config.optimizer == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=True))
  if config.optimizer == 'adamw':
    return optax.adamw(learning_rate_fn, weight_decay=config.weight_decay, mask=_decay_mask)
  raise ValueError(f'Unknown config.optimizer {config.optimizer!r}; use one of {OPTIMIZERS}.')


def _with_clipping(config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Global-norm clipping before `tx` if config.grad_clip_norm > 0."""
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def encoder_learning_rate_fn(config, learning_rate_fn: Callable) -> optax.Schedule:
  """The encoder's schedule, as a function of its own update count c (0 at the first unfrozen
  update): learning_rate_fn(c + N) * min(1, (c + 1) / warmup_steps)."""
  frozen = freeze_encoder_steps(config)
  warmup = max(int(config.warmup_steps), 1)

  def schedule(count):
    ramp = jnp.minimum(1.0, (count + 1) / warmup)
    return learning_rate_fn(count + frozen) * ramp
  return schedule


def create_optimizer(config, learning_rate_fn: Callable) -> optax.GradientTransformation:
  """Global-norm clipping, then SGD with momentum or AdamW with decoupled weight decay.

  With config.model.freeze_encoder_steps = N > 0 the encoder is frozen for the first N updates
  (see the module docstring).
  """
  frozen = freeze_encoder_steps(config)
  if not frozen:
    return _with_clipping(config, _core(config, learning_rate_fn))
  unfrozen = lambda count: count >= frozen
  zero_frozen_grads = optax.multi_transform(
      {ENCODER: optax.transforms.conditionally_mask(optax.identity(), unfrozen),
       'rest': optax.identity()}, _param_group)
  body = optax.multi_transform(
      {ENCODER: optax.transforms.conditionally_mask(
          _core(config, encoder_learning_rate_fn(config, learning_rate_fn)), unfrozen),
       'rest': _core(config, learning_rate_fn)}, _param_group)
  return optax.chain(zero_frozen_grads, _with_clipping(config, body))


def hold_frozen_encoder_batch_stats(step, old_batch_stats, new_batch_stats, config):
  """Keeps the encoder's BatchNorm running statistics fixed while the encoder is frozen.

  Args:
    step: the number of updates applied before this one (TrainState.step), an int array.
    old_batch_stats: batch_stats before the step, e.g. {'encoder': ...}.
    new_batch_stats: batch_stats the forward pass produced.
    config: the run config (reads config.model.freeze_encoder_steps).

  Returns:
    new_batch_stats, with 'encoder' taken from old_batch_stats while step < N.
  """
  frozen = freeze_encoder_steps(config)
  if not frozen or ENCODER not in new_batch_stats:
    return new_batch_stats
  keep = step < frozen
  encoder = jax.tree.map(lambda old, new: jnp.where(keep, old, new),
                         old_batch_stats[ENCODER], new_batch_stats[ENCODER])
  return dict(new_batch_stats, **{ENCODER: encoder})
