"""Train/eval step semantics: params move, devices agree, eval counts every video exactly once."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import checkpoints
from har_jax import models
from har_jax import optim
from har_jax import parallel
from har_jax import steps
from har_jax import train
from har_jax.data import datasets
from har_jax.data import tfds_records
from har_jax.evaluation import metrics
from har_jax.evaluation import runner


def _state_and_model(config, num_classes=10):
  lr_fn = optim.create_learning_rate_fn(config)
  state = train.create_train_state(jax.random.PRNGKey(0), config, num_classes, lr_fn)
  model = models.create_model(config.model, num_classes, dtype=config.dtype, bn_axis_name='batch')
  return state, model, lr_fn


def _random_batch(config, n, seed=0):
  rng = np.random.RandomState(seed)
  return {
      'video': rng.randint(0, 256, (n, config.num_frames, config.image_size, config.image_size,
                                    3)).astype(np.uint8),
      'label': rng.randint(0, 10, (n,)).astype(np.int32)}


def _pmapped_step(config, model, lr_fn, devices):
  return jax.pmap(functools.partial(steps.train_step, model=model, learning_rate_fn=lr_fn,
                                    config=config), axis_name='batch', devices=devices)


@pytest.mark.slow
def test_every_param_changes_after_one_step(tiny_config):
  config = tiny_config(warmup_steps=0, learning_rate=1e-2)
  state, model, lr_fn = _state_and_model(config)
  p_step = _pmapped_step(config, model, lr_fn, jax.devices()[:1])
  batch = jax.tree.map(lambda x: x[None], _random_batch(config, 8))
  new_state, out = p_step(parallel.replicate(state, jax.devices()[:1]), batch)
  assert bool(out['finite'][0])
  before = jax.tree_util.tree_leaves_with_path(state.params)
  after = jax.tree.leaves(parallel.unreplicate(new_state).params)
  unchanged = [jax.tree_util.keystr(p) for (p, a), b in zip(before, after)
               if np.allclose(np.asarray(a), np.asarray(b))]
  assert not unchanged, f'params that did not change: {unchanged}'
  assert int(parallel.unreplicate(new_state).step) == 1


@pytest.mark.slow
def test_four_devices_match_one_device(tiny_config):
  assert jax.device_count() == 4
  # SGD: the update is linear in the gradient (Adam's first step amplifies rounding noise).
  config = tiny_config(learning_rate=1e-2, warmup_steps=0, optimizer='sgd')
  state, model, lr_fn = _state_and_model(config)
  batch = _random_batch(config, 8, seed=3)

  one = _pmapped_step(config, model, lr_fn, jax.devices()[:1])
  s1, _ = one(parallel.replicate(state, jax.devices()[:1]), jax.tree.map(lambda x: x[None], batch))
  four = _pmapped_step(config, model, lr_fn, jax.devices())
  s4, _ = four(parallel.replicate(state, jax.devices()),
               jax.tree.map(lambda x: x.reshape((4, 2) + x.shape[1:]), batch))

  for a, b in zip(jax.tree.leaves(parallel.unreplicate(s1).params),
                  jax.tree.leaves(parallel.unreplicate(s4).params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(parallel.unreplicate(s1).batch_stats),
                  jax.tree.leaves(parallel.unreplicate(s4).batch_stats)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for leaf in jax.tree.leaves(s4.batch_stats):  # Identical on every replica.
    leaf = np.asarray(leaf)
    for r in range(1, 4):
      np.testing.assert_array_equal(leaf[r], leaf[0])


class _FakeModel:
  """Logits = one-hot(first pixel of the first frame) * 3: known, label-controlled outputs."""
  num_classes = 10

  def apply(self, variables, video, train=False):
    del variables, train
    return jax.nn.one_hot(video[:, 0, 0, 0, 0].astype(jnp.int32) % 10, 10) * 3.0


def test_scalar_metrics_exact_from_known_logits():
  logits = np.array([[5, 1, 0, 0, 0, 0], [0, 5, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6],
                     [6, 5, 4, 3, 2, 1], [0, 0, 0, 0, 0, 9]], np.float32)
  labels = np.array([0, 2, 0, 1, 5])
  # top-1 right for videos 0 and 4; top-5 wrong only for video 2 (label 0 ranks 6th).
  out = metrics.EvalOutputs(logits=logits, labels=labels, view_top1=np.array([1, 0, 0, .5, 1.]),
                            tfds_ids=np.array(['a', 'b', 'c', 'd', 'e']))
  m = metrics.scalar_metrics(out, num_classes=6)
  assert m['top1'] == pytest.approx(2 / 5)
  assert m['top5'] == pytest.approx(4 / 5)
  # Per class: 0 -> 1/2 (videos 0, 2), 1 -> 0, 2 -> 0, 5 -> 1; classes 3, 4 absent.
  assert m['mean_class_accuracy'] == pytest.approx((0.5 + 0 + 0 + 1) / 4)
  assert m['clip_top1'] == pytest.approx(2.5 / 5)
  expected_loss = np.mean([-jax.nn.log_softmax(l)[y] for l, y in zip(logits, labels)])
  assert m['loss'] == pytest.approx(float(expected_loss), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('num_devices', [1, 2, 4])
def test_eval_counts_every_video_once(tiny_config, num_devices):
  """13 videos (odd), batches of 8 over 1/2/4 devices: every video once, views averaged."""
  config = tiny_config(**{'dataset.eval_split': 'test[:13]', 'eval.num_clips': 2,
                          'eval.num_crops': 3})
  builder = datasets.get_builder(config.dataset)
  devices = jax.devices()[:num_devices]
  p_eval = jax.pmap(functools.partial(steps.eval_step, model=_FakeModel()), axis_name='batch',
                    devices=devices)
  variables = parallel.replicate({'params': {}, 'batch_stats': {}}, devices)
  from unittest import mock  # pylint: disable=g-import-not-at-top
  with mock.patch.object(jax, 'local_devices', lambda: devices):
    outputs = runner.run_eval(p_eval, variables, builder, config, 'test[:13]')
  assert len(outputs.labels) == 13
  assert len(set(outputs.tfds_ids)) == 13
  reference = {}
  for ex in builder.as_dataset(split='test[:13]', read_config=__import__(
      'tensorflow_datasets').ReadConfig(add_tfds_id=True)).as_numpy_iterator():
    reference[ex['tfds_id'].decode()] = int(ex['label'])
  assert sorted(outputs.tfds_ids) == sorted(reference)
  for tid, label in zip(outputs.tfds_ids, outputs.labels):
    assert reference[tid] == label
  # Six views per video, each with logits 3 * one_hot(first pixel % 10): the average has the
  # same total mass.
  np.testing.assert_allclose(outputs.logits.sum(axis=1), 3.0, rtol=1e-6)


def test_a_failing_evaluation_saves_its_step_first(tiny_config, tmp_path, monkeypatch):
  """Evaluation at a checkpoint step used to run before the save: an error lost every step since
  the last checkpoint (issue 27.4). Now the step is committed before the error ends the run."""
  def fail(*args, **kwargs):
    raise RuntimeError('evaluation broke')
  monkeypatch.setattr(train, 'run_periodic_eval', fail)
  config = tiny_config(num_train_steps=6, checkpoint_every_steps=100, eval_every_steps=3)
  with pytest.raises(RuntimeError, match='evaluation broke'):
    train.train_and_evaluate(config, str(tmp_path))
  manager = checkpoints.CheckpointManager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [3]
  manager.close()


def test_input_bound_warning_names_the_remedy_of_each_source(synthetic_data_dir, synthetic_frames,
                                                             tiny_config):
  """The H200 host trained stock records waiting for input ~65% of the time and said nothing."""
  records = datasets.open_source(tiny_config().dataset)
  store = datasets.open_source(tiny_config(**{'dataset.name': synthetic_frames}).dataset)
  waiting = {'perf/input_wait_fraction': 0.65, 'perf/clips_per_sec': 878.0}
  message = train.input_bound_warning(waiting, 'gpu', records)
  assert message.startswith('Input-bound: the gpu waited for input 65%') and '878 clips/s' in message
  assert 'threadpool_size' in message and 'docs/speed.md' in message and '\n' not in message
  ucf101 = tfds_records.TfdsSource(types.SimpleNamespace(
      name='ucf101', info=types.SimpleNamespace(config_name='ucf101_1_256'), data_dir_root='/d'))
  message = train.input_bound_warning(waiting, 'tpu', ucf101)
  assert ('har-prepare-ucf101 --frame_index --data_dir /d --config ucf101_1_256 --variant ucf101'
          in message)
  assert '--config.dataset.name=frame_index/ucf101/ucf101_1_256' in message
  folder = tfds_records.TfdsSource(types.SimpleNamespace(
      name=tfds_records.VIDEO_FOLDER_NAME, info=types.SimpleNamespace(config_name='lab')))
  message = train.input_bound_warning(waiting, 'gpu', folder)
  assert 'har-prepare-videos with --frame_index' in message and '(--fps)' in message
  assert '--config.dataset.name=frame_index/video_folder/lab' in message
  assert 'threadpool_size' in train.input_bound_warning(waiting, 'gpu', store)
  assert train.input_bound_warning(waiting, 'cpu', records) is None  # The host runs the step too.
  fine = dict(waiting, **{'perf/input_wait_fraction': train.INPUT_BOUND_FRACTION})
  assert train.input_bound_warning(fine, 'gpu', records) is None


def test_training_judges_input_waits_after_the_first_window_and_warns_once(tiny_config, tmp_path,
                                                                           monkeypatch, caplog):
  config = tiny_config(num_train_steps=3, log_every_steps=1, eval_every_steps=100,
                       checkpoint_every_steps=100)
  for warn, expected_calls in ((False, 2), (True, 1)):
    calls = []

    def judged(timing, backend, source, warn=warn, calls=calls):
      calls.append(timing['perf/input_wait_fraction'])
      return 'Input-bound: test' if warn else None

    monkeypatch.setattr(train, 'input_bound_warning', judged)
    caplog.clear()
    with caplog.at_level('WARNING'):
      train.train_and_evaluate(config, str(tmp_path / str(warn)))
    # Windows 2 and 3 (the first holds the pipeline's start), until one warns.
    assert len(calls) == expected_calls
    assert [r.getMessage() for r in caplog.records].count('Input-bound: test') == int(warn)
