"""Custom training loops (GitHub issue 22): tfdpfair.training.custom_loop.DPOptimizer.

* The custom loop gives DPModel.fit's weights for the same model, data, seeds and plan.
* ε after T steps equals dp_accounting's; step T + 1 is refused; one example moves the
  pre-noise sum of a step by at most C.
* Misuse is refused before budget is spent (a mean loss, a batch not from the sampler, a release
  before the step's micro-batches or a second one, a micro-batch too many).
* A tf.train.Checkpoint restore continues at the stored step with a fresh noise seed.
The MirroredStrategy runs are in tests/test_custom_loop_distributed.py.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import reference_epsilon

from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.custom_loop import DPOptimizer
from tfdpfair.training.dp_model import make_private
from tfdpfair.training.fit_loop import PrivacyBudgetExhaustedError
from tfdpfair.training.guards import DPUsageError
from tfdpfair.training.release_binding import ReleaseBindingError

N, D, K = 160, 6, 4
EQUIVALENCE = dict(l2_norm_clip=1.0, expected_batch_size=48, micro_batch_size=2,
                   noise_multiplier=1e-3, delta=1e-3, noise_seed=11, sampling_seed=22)
NOISY = dict(l2_norm_clip=1.0, expected_batch_size=16, micro_batch_size=4,
             noise_multiplier=1.0, delta=1e-3, noise_seed=11, sampling_seed=22)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    x = (scale * rng.normal(size=(N, D))).astype(np.float32)
    y = rng.integers(0, K, N).astype(np.int32)
    weights = [(0.3 * rng.normal(size=(D, K))).astype(np.float32),
               (0.1 * rng.normal(size=(K,))).astype(np.float32)]
    return x, y, weights


def softmax_model(weights: list[np.ndarray]) -> keras.Model:
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K)])
    model.set_weights(weights)
    return model


def train_step_fn(opt: DPOptimizer):
    """The documented custom loop: k_t accumulate calls, then one release."""
    strategy = opt.strategy

    @tf.function
    def train_step(iterator):
        for _ in tf.range(opt.microbatches_in_step()):
            strategy.run(opt.accumulate, args=(next(iterator),))
        strategy.run(opt.release)

    return train_step


def custom_run(dp: dict, steps: int, lr: float = 0.5, scale: float = 1.0, **kwargs):
    x, y, weights = data(scale)
    model = softmax_model(weights)
    opt = DPOptimizer(model, keras.optimizers.SGD(lr), LOSS, DPConfig(**{**dp, **kwargs}),
                      x=x, y=y, steps=steps)
    return model, opt


def train_all(opt: DPOptimizer) -> int:
    iterator, step, calls = iter(opt.distribute_dataset()), train_step_fn(opt), 0
    while opt.steps_remaining:
        opt.run(step, iterator)
        calls += 1
    return calls


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_custom_loop_gives_the_weights_of_fit(clipping):
    """Same model, data, seeds and plan: DPModel.fit and the custom loop agree within 1e-6."""
    x, y, weights = data()
    reference = softmax_model(weights)
    dp = make_private(reference, DPConfig(**EQUIVALENCE, clipping=clipping))
    dp.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    dp.fit(x, y, steps=6, verbose=0)

    model, opt = custom_run(EQUIVALENCE, 6, clipping=clipping)
    assert train_all(opt) == 6
    assert opt._runtime.loop.config.clipping == clipping
    assert max_abs_diff(model.get_weights(), reference.get_weights()) <= 1e-6
    assert max_abs_diff(model.get_weights(), weights) > 1e-2  # it trained
    assert opt.logical_steps_done == int(opt.optimizer.iterations.numpy()) == 6


def test_epsilon_after_T_steps_and_step_T_plus_1_is_refused():
    model, opt = custom_run(NOISY, 3)
    train_all(opt)
    q = NOISY["expected_batch_size"] / N
    assert opt.epsilon_spent() == pytest.approx(
        reference_epsilon(NOISY["noise_multiplier"], q, 3, NOISY["delta"]), rel=1e-6)
    assert "ε" in opt.privacy_statement() or "epsilon" in opt.privacy_statement().lower()
    before = model.get_weights()
    with pytest.raises(PrivacyBudgetExhaustedError, match="3 planned logical steps"):
        opt.run(lambda: None)
    # A release outside run() is refused in the graph, before the step is counted.
    release = tf.function(lambda: opt.strategy.run(opt.release))
    with pytest.raises(tf.errors.InvalidArgumentError, match="steps are used up"):
        release()
    assert opt.logical_steps_done == 3
    assert max_abs_diff(model.get_weights(), before) == 0.0


def test_one_example_moves_the_pre_noise_sum_by_at_most_C():
    """Removing one sampled example (mask 0, as the sampler marks an absent one) changes the
    accumulated clipped sum of the step by <= C; with every gradient clipped, by about C."""
    clip = NOISY["l2_norm_clip"]
    _, opt = custom_run(NOISY, 3, scale=50.0, clipping="vectorized")
    iterator = iter(opt.distribute_dataset())
    elements = [next(iterator) for _ in range(int(opt.microbatches_in_step()))]
    accumulator = opt._runtime.loop.accumulator

    def pre_noise_sum(elements):
        for element in elements:
            opt.accumulate(element)
        total = [tf.convert_to_tensor(g).numpy() for g in accumulator.grad_sums]
        opt._runtime.loop.drop_partial_step()
        opt._zero_counter()
        return total

    full = pre_noise_sum(elements)
    which = next(i for i, e in enumerate(elements) if float(e[3][0]) == 1.0)
    step, x, y, mask = elements[which]
    removed = list(elements)
    removed[which] = (step, x, y, tf.tensor_scatter_nd_update(mask, [[0]], [0.0]))
    without = pre_noise_sum(removed)
    distance = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(full, without)))
    assert 0.9 * clip < distance <= clip * (1 + 1e-5)
    assert opt.logical_steps_done == 0


def test_refuses_a_mean_loss_before_the_plan_is_fixed():
    x, y, weights = data()
    model = softmax_model(weights)

    def mean_loss(y_true, y_pred):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=True))

    with pytest.raises(DPUsageError, match="one loss per example"):
        DPOptimizer(model, keras.optimizers.SGD(0.5), mean_loss, DPConfig(**NOISY), x=x, y=y,
                    steps=3)

    def per_example(y_true, y_pred):  # the fix: no reduce_mean
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    opt = DPOptimizer(model, keras.optimizers.SGD(0.5), per_example, DPConfig(**NOISY), x=x,
                      y=y, steps=3)
    assert opt.logical_steps_done == 0 and opt.plan.steps == 3


def test_refuses_batches_not_from_the_sampler():
    x, y, _ = data()
    model, opt = custom_run(NOISY, 3)
    before = model.get_weights()
    fixed_batch = tf.function(lambda: opt.strategy.run(
        opt.accumulate, args=((tf.constant(x[:4]), tf.constant(y[:4])),)))
    with pytest.raises(DPUsageError, match="distribute_dataset"):
        opt.run(fixed_batch)
    # An element of another step (here step 1 while the loop is at step 0).
    later = iter(opt._runtime.dp_model.distribute_strategy.distribute_datasets_from_function(
        _dataset_from(opt, first_step=1)))
    with pytest.raises(DPUsageError, match="disagree on where a logical step ends"):
        opt.run(train_step_fn(opt), later)
    assert opt.logical_steps_done == 0
    assert max_abs_diff(model.get_weights(), before) == 0.0


def _dataset_from(opt: DPOptimizer, first_step: int):
    from tfdpfair.training import input_pipeline
    return input_pipeline.dataset_fn(
        opt._runtime.data, sampling_seed=opt.dp_state.seeds()["sampling"],
        sampling_rate=opt.plan.sampling_rate, micro_batch_size=NOISY["micro_batch_size"],
        start_step=first_step, end_step=opt.plan.steps)


def test_refuses_release_before_the_step_and_a_second_release():
    model, opt = custom_run(NOISY, 3)
    strategy, before = opt.strategy, model.get_weights()
    early = tf.function(lambda: strategy.run(opt.release))
    with pytest.raises(DPUsageError, match="before all k_t micro-batches"):
        opt.run(early)
    assert opt.logical_steps_done == 0 and max_abs_diff(model.get_weights(), before) == 0.0

    iterator = iter(opt.distribute_dataset())

    @tf.function
    def twice(iterator):
        for _ in tf.range(opt.microbatches_in_step()):
            strategy.run(opt.accumulate, args=(next(iterator),))
        strategy.run(opt.release)
        strategy.run(opt.release)

    with pytest.raises(DPUsageError, match="second release in one step"):
        opt.run(twice, iterator)
    assert opt.logical_steps_done == 1  # the first release happened and is counted

    @tf.function
    def one_too_many(iterator):
        for _ in tf.range(opt.microbatches_in_step() + 1):
            strategy.run(opt.accumulate, args=(next(iterator),))

    with pytest.raises(DPUsageError, match="more micro-batches than logical step t has"):
        opt.run(one_too_many, iter(opt.distribute_dataset()))
    assert opt.logical_steps_done == 1
    train_all(opt)  # a fresh iterator continues correctly
    assert opt.logical_steps_done == 3


def test_checkpoint_restore_continues_at_the_stored_step_with_fresh_noise(tmp_path):
    model, opt = custom_run(NOISY, 4)
    checkpoint = tf.train.Checkpoint(dp_optimizer=opt)
    manager = tf.train.CheckpointManager(checkpoint, tmp_path / "ckpt", max_to_keep=2)
    iterator, step = iter(opt.distribute_dataset()), train_step_fn(opt)
    for _ in range(2):
        opt.run(step, iterator)
    manager.save(checkpoint_number=opt.logical_steps_done)
    at_two = model.get_weights()
    while opt.steps_remaining:
        opt.run(step, iterator)
    uninterrupted, epsilon = model.get_weights(), opt.epsilon_spent()
    with pytest.raises(DPUsageError, match="re-running released steps"):
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        opt.distribute_dataset()  # this process released steps 3 and 4 already

    model_b, opt_b = custom_run(NOISY, 4)  # a new process: same recipe, then restore
    tf.train.Checkpoint(dp_optimizer=opt_b).restore(
        manager.latest_checkpoint).assert_existing_objects_matched()
    assert opt_b.logical_steps_done == 2
    assert max_abs_diff(model_b.get_weights(), at_two) == 0.0
    assert train_all(opt_b) == 2 and opt_b.logical_steps_done == 4
    assert int(opt_b.optimizer.iterations.numpy()) == 4
    seeds = opt_b.dp_state.seeds()
    assert seeds["sampling"] == NOISY["sampling_seed"]
    assert seeds["noise"] != NOISY["noise_seed"]  # restores never replay noise
    assert max_abs_diff(model_b.get_weights(), uninterrupted) > 1e-3
    assert opt_b.epsilon_spent() == pytest.approx(epsilon, rel=1e-12)
    with pytest.raises(PrivacyBudgetExhaustedError):
        opt_b.run(lambda: None)


def test_export_release_is_bound_to_the_released_weights(tmp_path):
    model, opt = custom_run(NOISY, 2)
    train_all(opt)
    exported = opt.export_release(tmp_path / "release")
    record = json.loads((exported / "privacy.json").read_text())
    assert record["logical_steps"] == 2
    assert record["epsilon"] == pytest.approx(opt.epsilon_spent())
    model.layers[0].kernel.assign(np.zeros((D, K), np.float32))  # trained outside DP-SGD
    with pytest.raises(ReleaseBindingError):
        opt.export_release(tmp_path / "edited")


def test_experiments_custom_loop_trains_exports_and_resumes(tmp_path):
    """The documented example binary (experiments/custom_loop.py), without a strategy."""
    from experiments import custom_loop as example
    settings = dict(epsilon=4.0, delta=1e-5, epochs=1.0, expected_batch_size=128,
                    micro_batch_size=64, l2_norm_clip=1.0, learning_rate=1.0, save_every=3)
    first = example.train(tmp_path, tf.distribute.get_strategy(), **settings)
    record = json.loads((tmp_path / "release" / "privacy.json").read_text())
    assert record["logical_steps"] == first["logical_steps"] > 0
    assert first["epsilon"] <= 4.0 + 1e-9
    again = example.train(tmp_path, tf.distribute.get_strategy(), **settings)  # resumes at T
    assert again["logical_steps"] == first["logical_steps"]
    assert again["epsilon"] == pytest.approx(first["epsilon"], rel=1e-12)


def test_any_checkpoint_restore_draws_a_fresh_noise_seed(tmp_path):
    """Even a restore of the same step with the same (test-fixed) seeds is a new continuation:
    without a fresh noise seed, two continuations of one checkpoint would share their noise."""
    _, opt = custom_run(NOISY, 3)
    path = tf.train.Checkpoint(dp_optimizer=opt).save(tmp_path / "step0")
    _, fresh = custom_run(NOISY, 3)
    assert fresh.dp_state.seeds()["noise"] == NOISY["noise_seed"]
    tf.train.Checkpoint(dp_optimizer=fresh).restore(path).assert_existing_objects_matched()
    assert fresh.logical_steps_done == 0
    fresh.distribute_dataset()
    assert fresh.dp_state.seeds()["noise"] != NOISY["noise_seed"]
    assert fresh.dp_state.seeds()["sampling"] == NOISY["sampling_seed"]
    _, untouched = custom_run(NOISY, 3)  # no restore: the run keeps its own seed
    untouched.distribute_dataset()
    assert untouched.dp_state.seeds()["noise"] == NOISY["noise_seed"]


def _fit_and_custom(model_fn, dp_config, steps, x, y=None, **fit_kwargs):
    """(fit weights, custom-loop weights) for one recipe."""
    reference = model_fn()
    dp = make_private(reference, dp_config)
    dp.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    dp.fit(x, y, steps=steps, verbose=0, **fit_kwargs)
    model = model_fn()
    opt = DPOptimizer(model, keras.optimizers.SGD(0.5), LOSS, dp_config, x=x, y=y, steps=steps,
                      **fit_kwargs)
    assert train_all(opt) == steps
    return reference.get_weights(), model.get_weights()


def test_custom_loop_on_an_indexed_source_and_patients_matches_fit():
    """An IndexedSource (Conv2D model) and patient-level units go through the same pipeline."""
    from tfdpfair.data.sources import ArraySource, ImageConfig
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 30)
    source = ArraySource(images, labels, ImageConfig(image_size=(8, 8), channels=1,
                                                     normalization="zero_one"), num_classes=3)

    def conv():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, strides=2),
                                 keras.layers.Flatten(), keras.layers.Dense(3)])

    config = DPConfig(expected_batch_size=6, micro_batch_size=4, noise_multiplier=1.0,
                      delta=1e-3, noise_seed=1, sampling_seed=2)
    fit_weights, custom_weights = _fit_and_custom(conv, config, 3, source)
    assert max_abs_diff(fit_weights, custom_weights) <= 1e-6

    x, y, weights = data()
    patients = DPConfig(**{**NOISY, "privacy_unit": "patient", "max_examples_per_patient": 2,
                           "expected_batch_size": 8})
    fit_weights, custom_weights = _fit_and_custom(lambda: softmax_model(weights), patients, 3,
                                                  x, y, patient_ids=np.arange(N) // 3)
    assert max_abs_diff(fit_weights, custom_weights) <= 1e-6


def test_an_update_outside_the_release_unbinds_the_weights(tmp_path):
    """A non-private optimizer.apply inside the run() call is caught: no export, no more steps."""
    model, opt = custom_run(NOISY, 3)
    strategy, iterator = opt.strategy, iter(opt.distribute_dataset())

    @tf.function
    def step_and_more(iterator):
        for _ in tf.range(opt.microbatches_in_step()):
            strategy.run(opt.accumulate, args=(next(iterator),))
        strategy.run(opt.release)
        opt.optimizer.apply([tf.ones_like(v) for v in model.trainable_variables],
                            model.trainable_variables)

    with pytest.raises(ReleaseBindingError, match="1 were DP releases"):
        opt.run(step_and_more, iterator)
    assert opt.logical_steps_done == 1
    with pytest.raises(ReleaseBindingError):
        opt.export_release(tmp_path / "release")
    with pytest.raises(ReleaseBindingError):
        opt.run(train_step_fn(opt), iterator)
