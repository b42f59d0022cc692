"""The model-side steps: the losses and metrics, and the pmapped train and eval steps.

Pure functions of their arguments; their dependencies are keyword-only and bound with
functools.partial before jax.pmap(..., axis_name='batch'), as train.py, evaluation and the
benchmarks do.
"""

from clu import metrics
import flax
import jax
import jax.numpy as jnp
import optax

from har_jax import augment
from har_jax import config_fields
from har_jax import optim


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  top1: metrics.Average.from_output('top1')
  top5: metrics.Average.from_output('top5')
  grad_norm: metrics.LastValue.from_output('grad_norm')
  param_norm: metrics.LastValue.from_output('param_norm')
  update_norm: metrics.LastValue.from_output('update_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with optional label smoothing, `[batch]` float32."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def topk_correct(logits, labels, k: int):
  """1.0 where the label is among the k highest logits, `[batch]` float32."""
  topk = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  return jnp.any(topk == labels[..., None], axis=-1).astype(jnp.float32)


def train_step(state, batch, *, model, learning_rate_fn, config, frozen_encoder: bool = False):
  """One synchronous data-parallel step; runs under pmap(axis_name='batch').

  Args:
    state: replicated train.TrainState.
    batch: {'video': [per_device_batch, T, H, W, 3] uint8, 'label': [per_device_batch] int32};
      with 'crop' [per_device_batch, 4] and 'flip' [per_device_batch], the frames are cropped,
      resized to image_size and flipped here (har_jax.augment), else H = W = image_size.
    frozen_encoder: a step of the frozen-encoder phase (config.model.freeze_encoder_steps): the
      encoder runs in inference mode (LRCN frozen_encoder), so the head trains on the features
      it is evaluated on, and its BatchNorm statistics stay as they are.

  Returns:
    (new_state, metrics) where metrics holds the gathered TrainMetrics and 'finite': False when
    the loss, the gradients or the updated params/BatchNorm statistics hold a NaN or an inf. With
    config.skip_nonfinite_updates such a step leaves the state as it was (except the step).
  """
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                jax.lax.axis_index('batch'))
  num_classes = model.num_classes
  video = augment.apply_to_batch(batch, config.image_size)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, video, train=True,
        frozen_encoder=frozen_encoder, mutable=['batch_stats'], rngs={'dropout': step_rng})
    loss = cross_entropy(logits, batch['label'], num_classes, config.label_smoothing).mean()
    return loss, (logits, updates.get('batch_stats', {}))

  (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = jax.lax.pmean(grads, 'batch')
  loss = jax.lax.pmean(loss, 'batch')
  # BatchNorm statistics are already synchronised by the BN axis_name; pmean guards against drift.
  new_batch_stats = jax.lax.pmean(new_batch_stats, 'batch')
  new_batch_stats = optim.hold_frozen_encoder_batch_stats(state.step, state.batch_stats,
                                                          new_batch_stats, config)
  new_state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)
  grad_norm = optax.global_norm(grads)
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_state.params)
            & _all_finite(new_state.batch_stats))
  if config_fields.get(config, 'skip_nonfinite_updates'):
    # Keep the old state (but count the step), so that the data position still advances.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
  step_metrics = TrainMetrics.gather_from_model_output(
      loss=loss, top1=topk_correct(logits, batch['label'], 1).mean(),
      top5=topk_correct(logits, batch['label'], 5).mean(), grad_norm=grad_norm,
      param_norm=optax.global_norm(new_state.params),
      update_norm=optax.global_norm(jax.tree.map(jnp.subtract, new_state.params, state.params)),
      learning_rate=learning_rate_fn(state.step))
  return new_state, {'metrics': step_metrics, 'finite': finite}


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def eval_step(variables: dict, batch, *, model, shuffle_time: bool = False):
  """Video-level logits for a batch of multi-view videos; runs under pmap(axis_name='batch').

  Args:
    variables: replicated {'params', 'batch_stats'} of the model.
    batch: {'video': [per_device_batch, views, T, H, W, 3] uint8, 'label', 'mask'}.
    shuffle_time: permute the frames of every clip in time (the temporal-order diagnostic).

  Returns:
    {'logits': [per_device_batch, num_classes] float32 mean over views,
     'view_top1': [per_device_batch] fraction of single views whose top-1 is right}.
  """
  video = batch['video']
  b, v = video.shape[:2]
  clips = video.reshape((b * v,) + video.shape[2:])
  if shuffle_time:
    rng = jax.random.fold_in(jax.random.PRNGKey(0), jax.lax.axis_index('batch'))
    keys = jax.random.split(rng, b * v)
    perms = jax.vmap(lambda k: jax.random.permutation(k, clips.shape[1]))(keys)
    clips = jax.vmap(lambda clip, perm: clip[perm])(clips, perms)
  logits = model.apply(variables, clips, train=False)
  logits = logits.astype(jnp.float32).reshape(b, v, -1)
  view_top1 = (jnp.argmax(logits, -1) == batch['label'][:, None]).astype(jnp.float32).mean(-1)
  return {'logits': logits.mean(axis=1), 'view_top1': view_top1}
