"""The one read-only loader of a trained model: evaluation, prediction, streaming and export.

  model = inference.load('workdirs/synthetic', checkpoint='best')
  logits = model.apply(clips)  # [n, T, S, S, 3] uint8 -> [n, num_classes] float32

A checkpoint carries everything inference needs: the model variables (params and BatchNorm
statistics; the optimizer state is never read), the run's config, its class names and how its
training frames were made (`Preprocessing`). The variables are restored into the shapes that
`jax.eval_shape` gives for the checkpoint's own model config: nothing is compiled to load.
"""

import dataclasses
import functools
import time
from typing import Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from har_jax import checkpoint_files
from har_jax import checkpoints
from har_jax import errors
from har_jax import geometry
from har_jax import models
from har_jax import paths

CHECKPOINT_CHOICES = ('latest', 'best', 'all')


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What the model saw in training, to give any other video the same.

  frame_geometry: how the training frames were made from the source videos:
    {'resize': 'squash', 'size': [h, w]} (each frame resized to h x w, aspect not kept: the stock
    TFDS ucf101_*_256 records), {'resize': 'short_side', 'size': s} (aspect kept) or
    {'resize': 'none'}. Then, as in training: `resize_size` (short side before cropping; 0: as
    stored), `num_clips` clips of `num_frames` frames at `frame_stride`, `num_crops` crops of
    `image_size` pixels, videos shorter than a clip padded as `short_video` says. The model
    normalises the uint8 pixels itself (config.model.preprocessing).
  """
  frame_geometry: dict
  resize_size: int
  num_frames: int
  frame_stride: int
  image_size: int
  num_clips: int
  num_crops: int
  short_video: str

  @classmethod
  def from_config(cls, config, frame_geometry: dict) -> 'Preprocessing':
    return cls(frame_geometry=dict(frame_geometry), resize_size=int(config.dataset.resize_size),
               num_frames=int(config.num_frames), frame_stride=int(config.frame_stride),
               image_size=int(config.image_size), num_clips=int(config.eval.num_clips),
               num_crops=int(config.eval.num_crops),
               short_video=str(config.dataset.short_video))

  def serving_json(self) -> dict:
    """What an exported model does to a clip it is given (model.json and the ONNX metadata)."""
    return {'frame_geometry': self.frame_geometry, 'resize_size': self.resize_size,
            'image_size': self.image_size, 'num_frames': self.num_frames,
            'frame_stride': self.frame_stride}

  def decode_size(self, height: int, width: int) -> Optional[tuple[int, int]]:
    """(height, width) to scale a source frame of height x width to as it is decoded (None: as
    decoded): `geometry.decode_size` for this checkpoint's frame geometry and resize_size."""
    return geometry.decode_size(self.frame_geometry, height, width, self.resize_size)


def guess_frame_geometry(dataset_name: str) -> dict:
  """The frame geometry of a checkpoint saved before checkpoints recorded it, from its dataset's
  name: the stock 256x256 UCF101 records squash; anything else is taken as decoded."""
  if dataset_name.split('/')[-1].startswith('ucf101_') and '_256' in dataset_name:
    return {'resize': 'squash', 'size': [256, 256]}
  return {'resize': 'none'}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A trained model, read-only, with what it needs to be given video the way it was trained.

  Attributes:
    workdir, step: where it was loaded from.
    config: the checkpoint's own config (ml_collections.ConfigDict).
    class_names: the names of the logits, in order.
    model: the flax module (har_jax.models.LRCN), outside pmap.
    variables: {'params', 'batch_stats'} as host numpy arrays.
    preprocessing: see Preprocessing.
  """
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  model: object
  variables: dict
  preprocessing: Preprocessing

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @functools.cached_property
  def apply(self) -> Callable[[np.ndarray], np.ndarray]:
    """`[n, T, S, S, 3] uint8 clips -> [n, num_classes] float32 logits`, jitted, one device."""
    forward = jax.jit(functools.partial(self.model.apply, train=False))
    variables = jax.device_put(self.variables)
    return lambda clips: np.asarray(forward(variables, jnp.asarray(clips)), np.float32)


def open_checkpoints(workdir: str) -> checkpoints.CheckpointManager:
  """A read-only view of `<workdir>/checkpoints`, with a clear error for a wrong workdir."""
  if not workdir or not paths.path(workdir).is_dir():
    raise errors.UserError(f'--workdir {workdir!r} is not a directory. Point it at the workdir '
                           'of a training run (the folder holding checkpoints/).')
  return checkpoints.CheckpointManager(workdir, read_only=True)


def resolve_steps(manager: checkpoints.CheckpointManager, checkpoint: str) -> list[int]:
  """Checkpoint steps named by 'latest', 'best', 'all' or a step number, in step order.

  'best' falls back to 'latest' (with a warning) when no checkpoint was saved with metrics.
  """
  steps = manager.all_steps()
  where = manager.directory
  if not steps:
    raise errors.UserError(f'No checkpoints in {where}. Train first, or fix --workdir.')
  spec = str(checkpoint).strip().lower()
  if spec == 'all':
    return steps
  if spec == 'latest':
    return [steps[-1]]
  if spec == 'best':
    best = manager.best_step()
    if best is None:
      logging.warning('No checkpoint in %s was saved with metrics; using the latest, %d.',
                      where, steps[-1])
      return [steps[-1]]
    return [best]
  try:
    step = int(spec)
  except ValueError:
    raise errors.UserError(
        f'--checkpoint={checkpoint!r} is not one of {CHECKPOINT_CHOICES} or a step number.'
    ) from None
  if step not in steps:
    raise errors.UserError(f'No checkpoint at step {step} in {where}; kept steps are {steps}.')
  return [step]


def load(workdir: str, checkpoint='best', *,
         manager: Optional[checkpoints.CheckpointManager] = None) -> LoadedModel:
  """Loads checkpoint 'best' | 'latest' | <step> of a training workdir for inference.

  Args:
    workdir: the training run's workdir (holding checkpoints/).
    checkpoint: 'best' (falls back to the latest without metrics), 'latest' or a step number.
    manager: an `open_checkpoints(workdir)` to reuse (several loads of one workdir).

  Raises:
    errors.UserError: a wrong workdir, no such checkpoint, or a checkpoint that is damaged,
      unreadable, or was not written by har_jax training.
  """
  start = time.perf_counter()
  own_manager = manager is None
  manager = manager or open_checkpoints(workdir)
  try:
    steps = resolve_steps(manager, checkpoint)
    if len(steps) != 1:
      raise errors.UserError(f'--checkpoint={checkpoint!r} names {len(steps)} checkpoints; load '
                             "one: 'best', 'latest' or a step number.")
    step = steps[0]
    meta = _read_meta(manager, step)
    config = ml_collections.ConfigDict(meta['config'])
    class_names = tuple(str(c) for c in meta['class_names'])
    model = models.create_model(config.model, len(class_names), dtype=config.dtype)
    variables = _restore(manager, step, model, config)
  finally:
    if own_manager:
      manager.close()
  geometry = meta.get('frame_geometry') or guess_frame_geometry(str(meta.get('dataset', '')))
  logging.info('Loaded checkpoint %d of %s for inference (%d classes) in %.2f s.', step, workdir,
               len(class_names), time.perf_counter() - start)
  return LoadedModel(workdir=workdir, step=step, config=config, class_names=class_names,
                     model=model, variables=variables,
                     preprocessing=Preprocessing.from_config(config, geometry))


def _restore(manager: checkpoints.CheckpointManager, step: int, model, config) -> dict:
  """The variables of checkpoint `step`, or a UserError saying why they cannot be had."""
  where = f'Checkpoint {step} in {manager.workdir}'
  try:
    return manager.restore_variables(step, abstract_variables(model, config))
  except checkpoints.ConfigMismatchError as e:
    raise errors.UserError(
        f'{where} does not match its saved config ({model.num_classes} classes, encoder '
        f'{config.model.encoder!r}, lstm_size {config.model.lstm_size}): {str(e)[:400]}'
    ) from None
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (orbax, TensorStore: many kinds)
    reason = f'{type(e).__name__}: {str(e)[:400]}'
    if checkpoint_files.is_io_error(e):
      raise errors.UserError(
          f'{where} could not be read ({reason}): an I/O problem (access, disk or network). Fix '
          'access to the folder and try again.') from None
    raise errors.UserError(f'{where} is corrupt or unreadable ({reason}); use another one '
                           f'(--checkpoint=<step>; kept: {manager.all_steps()}).') from None


def _read_meta(manager: checkpoints.CheckpointManager, step: int) -> dict:
  try:
    meta = manager.read_meta(step)
  except Exception as e:  # pylint: disable=broad-except  (orbax: any failure to read the JSON)
    raise errors.UserError(f'Checkpoint {step} in {manager.directory} has no readable metadata '
                           f'({type(e).__name__}: {str(e)[:300]}); use another checkpoint '
                           '(--checkpoint=<step>).') from None
  for key in ('config', 'class_names'):
    if not meta.get(key):
      raise errors.UserError(f'Checkpoint {step} in {manager.directory} has no saved {key!r}; it '
                             'was not written by har_jax training and cannot be loaded.')
  if meta.get('num_classes') not in (None, len(meta['class_names'])):
    raise errors.UserError(
        f'Checkpoint {step} in {manager.directory} lists {len(meta["class_names"])} class names '
        f"but num_classes={meta['num_classes']}; its metadata is damaged.")
  return meta


def abstract_variables(model, config) -> dict:
  """{'params', 'batch_stats'} of `model` as jax.ShapeDtypeStruct, for a clip of `config`'s
  shape; jax.eval_shape: nothing is compiled or allocated."""
  clip = jax.ShapeDtypeStruct((1, config.num_frames, config.image_size, config.image_size, 3),
                              jnp.uint8)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), clip)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
