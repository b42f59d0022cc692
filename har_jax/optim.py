"""Learning-rate schedules and optimizers (optax), built from the config."""

from typing import Callable

import jax
import optax

OPTIMIZERS = ('sgd', 'adamw')


def create_learning_rate_fn(config) -> optax.Schedule:
  """Linear warmup to config.learning_rate, then cosine decay to 0 at config.num_train_steps."""
  warmup = min(config.warmup_steps, max(config.num_train_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.0)


def _decay_mask(params):
  """Weight decay applies to kernels only, not to biases or BatchNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(config, learning_rate_fn: Callable) -> optax.GradientTransformation:
  """SGD with momentum or AdamW, with decoupled weight decay and global-norm clipping."""
  if config.optimizer == 'sgd':
    core = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=True))
  elif config.optimizer == 'adamw':
    core = optax.adamw(learning_rate_fn, weight_decay=config.weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f'Unknown config.optimizer {config.optimizer!r}; use one of {OPTIMIZERS}.')
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), core)
  return core
