"""Privacy hardening (issue 8, DESIGN.md invariants 3-6): no public Keras path releases an
unaccounted step or leaks un-noised state. Each test is an attack an ordinary user could run."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import numpy_dp_sgd_softmax_regression
from dp_reference import reference_epsilon as rdp_epsilon
from step_callbacks import StopAtStep

from tfdpfair.models.validate import DPIncompatibleModelError
from tfdpfair.privacy.accounting import PrivacyArgumentError
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.dp_model import PrivacyBudgetExhaustedError, make_private
from tfdpfair.training.guards import DPUsageError

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SEEDS = dict(noise_seed=7, sampling_seed=8)


def dense(inputs=4, units=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(units, name="head")])


def toy(n=40, inputs=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, inputs)).astype(np.float32),
            rng.integers(0, 3, n).astype(np.int32))


def private(model, lr=0.5, **config):
    settings = dict(expected_batch_size=8, micro_batch_size=3, noise_multiplier=1.2,
                    delta=1e-3, **SEEDS)
    settings.update(config)
    dp = make_private(model, DPConfig(**settings))
    dp.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    return dp


def test_backup_and_restore_resumes_with_the_right_epsilon(tmp_path):
    """Keras's own fault tolerance: crash after 13 of 20 steps, rerun the same script (new
    objects): the DP state is restored with the weights, so the run ends with 20 releases and
    ε(20). The steps after the restore draw fresh noise (restores never replay noise), so the
    weights are not those of the uninterrupted run."""
    x, y = toy()  # N = 40, B = 8: 5 logical steps per Keras epoch, backups at epoch ends
    reference = private(dense())
    reference.fit(x, y, steps=20, verbose=0)

    def script(extra):
        dp = private(dense())
        dp.fit(x, y, steps=20, verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), *extra])
        return dp

    with pytest.raises(KeyboardInterrupt):
        script([StopAtStep(13, crash=True)])
    resumed = script([])
    assert resumed.logical_steps_done == 20
    assert int(resumed.optimizer.iterations.numpy()) == 20  # weights carry 20 noisy updates
    assert resumed.epsilon_spent() == pytest.approx(rdp_epsilon(1.2, 0.2, 20, 1e-3), rel=1e-9)
    assert resumed.seeds["sampling"] == reference.seeds["sampling"]
    assert resumed.seeds["noise"] != reference.seeds["noise"]
    difference = np.concatenate([(a - b).ravel() for a, b in zip(
        resumed.inner.get_weights(), reference.inner.get_weights())])
    assert np.abs(difference).max() > 1e-3


def test_weights_only_checkpoint_restores_the_dp_state(tmp_path):
    x, y = toy()
    dp = private(dense())
    path = str(tmp_path / "ck.weights.h5")
    dp.fit(x, y, steps=10, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    fresh = private(dense(seed=1), noise_seed=None, sampling_seed=None)
    fresh.load_weights(path)
    assert fresh.logical_steps_done == 10
    assert fresh.plan == dp.plan
    assert fresh.seeds == dp.seeds  # secret seeds travel with the resume checkpoint
    assert fresh.epsilon_spent() == pytest.approx(rdp_epsilon(1.2, 0.2, 10, 1e-3), rel=1e-9)
    with pytest.raises(PrivacyBudgetExhaustedError):
        fresh.fit(x, y, steps=10, verbose=0)


def test_non_finite_examples_contribute_zero():
    """NaN and Inf inputs among N: the weights stay finite and equal a numpy DP-SGD run where
    those rows contribute nothing."""
    x, y = toy(n=30)
    bad_rows = (3, 11, 17)
    x[3, 0], x[11, 2], x[17, :] = np.nan, np.inf, -np.inf
    model = dense()
    kernel, bias = (w.copy() for w in model.get_weights())
    dp = private(model, lr=0.5, expected_batch_size=10, noise_multiplier=0.7)
    history = dp.fit(x, y, steps=6, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert history.history["nonprivate_nonfinite_examples"][-1] > 0  # they were sampled
    want_kernel, want_bias = numpy_dp_sgd_softmax_regression(
        x, y, kernel, bias, steps=6, sampling_seed=8, noise_seed=7, sampling_rate=10 / 30,
        clip=1.0, sigma=0.7, expected_batch=10, lr=0.5, skip_rows=bad_rows)
    np.testing.assert_allclose(model.get_weights()[0], want_kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.get_weights()[1], want_bias, rtol=1e-4, atol=1e-5)


def test_no_step_past_the_plan_by_any_path():
    x, y = toy()
    dp = private(dense(), target_epsilon=2.0)
    dp.fit(x, y, epochs=100, verbose=0)
    planned = dp.plan.steps
    assert dp.logical_steps_done == planned
    eps = dp.epsilon_spent()
    with pytest.raises(DPUsageError, match="not a DP-SGD step"):
        dp.train_step((x[:3], y[:3]))
    with pytest.raises(DPUsageError):
        dp.train_on_batch(x[:3], y[:3])
    with pytest.raises(PrivacyBudgetExhaustedError):
        dp.fit(x, y, epochs=1, verbose=0)
    # The release itself refuses in-graph, whatever calls it: drive the compiled loop directly.
    loop = dp._runtime["loop"]
    dataset = tf.data.Dataset.from_tensors(
        (tf.constant(planned, tf.int64), x[:3], y[:3], tf.ones([3]))).repeat()
    with pytest.raises(tf.errors.InvalidArgumentError, match="steps are used up"):
        loop.train_call(iter(dataset), tf.constant(planned, tf.int64), tf.constant(1, tf.int64))
    assert dp.logical_steps_done == planned and dp.epsilon_spent() == eps


def test_the_budget_belongs_to_the_model_not_the_wrapper():
    x, y = toy()
    model = dense()
    first = private(model, target_epsilon=3.0)
    first.fit(x, y, epochs=100, verbose=0)
    spent = first.epsilon_spent()
    second = private(model, target_epsilon=3.0)  # same model object, a new wrapper
    assert second.logical_steps_done == first.logical_steps_done
    assert second.epsilon_spent() == spent
    with pytest.raises(PrivacyBudgetExhaustedError, match="belongs to the model"):
        second.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="already carries a DP plan"):
        private(model, l2_norm_clip=5.0).fit(x, y, epochs=1, verbose=0)


def test_rolling_back_released_steps_in_one_process_is_refused():
    x, y = toy()
    dp = private(dense())
    weights = dp.get_weights()  # includes the DP state at step 0
    dp.fit(x, y, steps=10, verbose=0, callbacks=[StopAtStep(4)])
    dp.set_weights(weights)  # back to step 0, after steps 1-4 were released
    with pytest.raises(DPUsageError, match="release them twice"):
        dp.fit(x, y, verbose=0)


@pytest.mark.parametrize("callback", [
    keras.callbacks.EarlyStopping(monitor="loss"),
    keras.callbacks.EarlyStopping(monitor="nonprivate_loss"),
    keras.callbacks.ReduceLROnPlateau(monitor="nonprivate_accuracy"),
    keras.callbacks.ModelCheckpoint("x.keras", monitor="loss", save_best_only=True),
])
def test_callbacks_acting_on_unnoised_statistics_are_refused(callback):
    x, y = toy()
    dp = private(dense())
    with pytest.raises(DPUsageError, match="no noise"):
        dp.fit(x, y, steps=2, verbose=0, callbacks=[callback])
    assert dp.logical_steps_done == 0


def test_unnoised_training_statistics_are_named_as_such():
    x, y = toy()
    dp = private(dense())
    history = dp.fit(x, y, steps=5, verbose=0,
                     callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss")],
                     validation_data=toy(n=10, seed=1))
    keys = set(history.history)
    assert {"epsilon", "logical_steps", "val_loss"} <= keys
    assert all(k.startswith(("nonprivate_", "val_")) or k in ("epsilon", "logical_steps")
               for k in keys), keys
    assert "val_nonprivate_clipped_fraction" not in keys and "loss" not in keys


def test_unfreezing_batch_norm_after_wrapping_is_refused():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4)(inputs)
    bn = keras.layers.BatchNormalization(name="bn")
    outputs = keras.layers.Dense(3)(bn(h))
    model = keras.Model(inputs, outputs)
    bn.trainable = False  # inference mode in Keras 3: DP-safe
    x, y = toy(inputs=6)
    dp = private(model)
    dp.fit(x, y, steps=2, verbose=0)
    bn.trainable = True  # training-mode BN again: mixes examples, keeps private statistics
    with pytest.raises(DPIncompatibleModelError, match="bn"):
        dp.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    with pytest.raises(DPIncompatibleModelError, match="bn"):
        dp.fit(x, y, verbose=0)  # even without recompiling
    assert dp.logical_steps_done == 2


@pytest.mark.parametrize("labels,error,match", [
    (lambda y: np.where(np.arange(len(y)) == 5, 12345, y), ValueError, "outside the class ids"),
    (lambda y: y.astype(np.float32) + np.where(np.arange(len(y)) == 2, np.nan, 0),
     ValueError, "NaN or infinite"),
    (lambda y: y.astype(str), TypeError, "numeric"),
])
def test_bad_labels_fail_before_any_step_without_echoing_values(labels, error, match):
    x, y = toy()
    dp = private(dense())
    with pytest.raises(error, match=match) as info:
        dp.fit(x, labels(y), steps=3, verbose=0)
    assert "12345" not in str(info.value)
    assert dp.logical_steps_done == 0 and dp.epsilon_spent() == 0.0


def test_wrong_input_shape_fails_before_any_step():
    x, y = toy(inputs=5)
    dp = private(dense(inputs=4))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        dp.fit(x, y, steps=3, verbose=0)
    assert dp.logical_steps_done == 0


def test_a_single_example_is_refused_before_any_step():
    x, y = toy(n=1)
    dp = private(dense(), expected_batch_size=1, delta=None)
    with pytest.raises(PrivacyArgumentError):
        dp.fit(x, y, steps=3, verbose=0)
    assert dp.logical_steps_done == 0


class FailsOnLargeInput(keras.layers.Layer):
    """Fails inside TensorFlow with an error message that would print the input values."""

    def call(self, x):
        check = tf.debugging.assert_less(x, 5.0, message="input too large", summarize=100)
        with tf.control_dependencies([check]):
            return tf.identity(x)


def test_failure_inside_a_step_is_counted_and_its_message_withheld():
    x, y = toy()
    x[:, 0] = 7.77  # every example fails
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), FailsOnLargeInput(), keras.layers.Dense(3)])
    dp = private(model)
    with pytest.raises(RuntimeError, match="withheld") as info:
        dp.fit(x, y, steps=3, verbose=0)
    assert "7.77" not in str(info.value)
    assert dp.logical_steps_done == 1  # the failed step touched data: it is accounted


def test_mixed_float16_is_refused_and_bfloat16_trains():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        with pytest.raises(DPUsageError, match="mixed_bfloat16"):
            private(dense(units=2))
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = dense(units=2)
        dp = private(model, lr=1.0, expected_batch_size=100, micro_batch_size=50,
                     noise_multiplier=1.0)
        dp.fit(x, y, epochs=5, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    accuracy = np.mean(np.argmax(model.predict(x, verbose=0), 1) == y)
    assert accuracy > 0.85


class RunningMean(keras.layers.Layer):
    """Keeps a running mean of its inputs in a non-trainable variable (private, un-noised)."""

    def build(self, shape):
        self.mean = self.add_weight(shape=shape[1:], initializer="zeros", trainable=False)

    def call(self, x, training=False):
        if training:
            self.mean.assign(0.9 * self.mean + 0.1 * keras.ops.mean(x, axis=0))
        return x - self.mean


def test_layer_with_data_dependent_state_is_refused_before_training():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), RunningMean(name="running_mean"),
                              keras.layers.Dense(3)])
    x, y = toy()
    dp = private(model)
    with pytest.raises(DPIncompatibleModelError, match="running_mean"):
        dp.fit(x, y, steps=2, verbose=0)
    assert dp.logical_steps_done == 0
    np.testing.assert_array_equal(model.get_layer("running_mean").mean.numpy(), np.zeros(4))


def test_validation_on_the_training_arrays_is_refused():
    x, y = toy()
    dp = private(dense())
    with pytest.raises(DPUsageError, match="held-out"):
        dp.fit(x, y, steps=2, verbose=0, validation_data=(x[:20], y[:20]))
    assert dp.logical_steps_done == 0
