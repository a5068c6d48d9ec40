"""Gradient canaries (audit/canaries.py) and the white-box one-run audit of DPModel runs:
a non-private control is caught far above a DP run, a DP run stays below its accountant's ε,
and a mechanism with a tenth of the claimed noise is caught above its claimed ε."""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import reference_epsilon

from tfdpfair.audit import canaries as canaries_lib
from tfdpfair.audit import scores as scores_lib
from tfdpfair.audit.whitebox import audit_gradient_canaries
from tfdpfair.data.demo import load_demo_data
from tfdpfair.privacy import accounting
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.dp_model import make_private


def dense_model(inputs=4, units=3, hidden=None, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((inputs,))]
    if hidden:
        layers.append(keras.layers.Dense(hidden, activation="relu"))
    return keras.Sequential(layers + [keras.layers.Dense(units)])


def test_canaries_have_norm_c_and_recorded_bits():
    model = dense_model()
    c = canaries_lib.GradientCanaries(model.trainable_variables, 200, l2_norm_clip=0.7,
                                      sampling_rate=0.3, seed=5)
    np.testing.assert_allclose(np.linalg.norm(c.directions, axis=1), 0.7, rtol=1e-5)
    assert c.directions.shape == (200, 4 * 3 + 3)
    assert 70 < c.included.sum() < 130
    again = canaries_lib.GradientCanaries(model.trainable_variables, 200, 0.7, 0.3, seed=5)
    np.testing.assert_array_equal(again.included, c.included)
    np.testing.assert_array_equal(again.directions, c.directions)


def test_contribution_is_sum_of_sampled_included_canaries():
    model = dense_model()
    c = canaries_lib.GradientCanaries(model.trainable_variables, 50, 1.0, 0.3, seed=1)
    rates = []
    for step in range(40):
        sampled = c.sampled(step).numpy()
        rates.append(sampled.mean())
        expected = c.directions[sampled & c.included].sum(axis=0)
        got = tf.function(c.contribution)(tf.constant(step, tf.int64))
        np.testing.assert_allclose(canaries_lib.flatten([g.numpy() for g in got]), expected,
                                   atol=1e-5)
        assert [tuple(g.shape) for g in got] == [(4, 3), (3,)]
    assert np.mean(rates) == pytest.approx(0.3, abs=0.03)


def test_included_canaries_enter_the_update_once_before_the_noise():
    """Zero-gradient loss, q = 1, σ ≈ 0: each step's update is −lr·Σ_{included} u_j / B."""
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.zeros(8, np.int32)
    config = DPConfig(l2_norm_clip=1.0, expected_batch_size=8, micro_batch_size=3,
                      noise_multiplier=1e-6, delta=1e-3, noise_seed=0, sampling_seed=0)
    model = dense_model()
    dp = make_private(model, config)
    dp.compile(optimizer=keras.optimizers.SGD(0.5), loss=lambda yt, yp: 0.0 * keras.ops.sum(yp))
    plan = dp.prepare(8, steps=3)
    c = canaries_lib.GradientCanaries(model.trainable_variables, 6, 1.0, plan.sampling_rate, 2)
    recorder = canaries_lib.UpdateProjectionRecorder(c, model.trainable_variables)
    before = canaries_lib.flatten(model.get_weights())
    dp.set_audit_canaries(c)
    dp.fit(x, y, callbacks=[recorder], verbose=0)
    after = canaries_lib.flatten(model.get_weights())
    expected = -3 * 0.5 * c.directions[c.included].sum(axis=0) / 8
    np.testing.assert_allclose(after - before, expected, atol=1e-4)
    assert recorder.projections.shape == (3, 6)
    np.testing.assert_allclose(scores_lib.total_score(recorder.projections),
                               recorder.total_score(), rtol=1e-4, atol=1e-6)


def test_recorder_refuses_several_steps_per_call():
    model = dense_model()
    c = canaries_lib.GradientCanaries(model.trainable_variables, 4, 1.0, 0.5, seed=0)
    recorder = canaries_lib.UpdateProjectionRecorder(c, model.trainable_variables)
    recorder.set_model(type("M", (), {"steps_per_execution": 4})())
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        recorder.on_train_begin()


def test_scores_docstring_examples_run():
    assert doctest.testmod(scores_lib).failed == 0


# ---- end-to-end audits on the demo digits (small MLP, 500 canaries) --------------------------

NUM_CANARIES = 500
DELTA = 1e-5


def audited_run(noise_multiplier=None, target_epsilon=None, score_noise_multiplier=None):
    data = load_demo_data(public_fraction=0.15, test_fraction=0.2)
    x = data.private.images.reshape(len(data.private), -1)
    config = DPConfig(l2_norm_clip=1.0, expected_batch_size=64, micro_batch_size=64,
                      noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
                      delta=DELTA, rescale_to_unit_norm=True, noise_seed=1, sampling_seed=2)
    dp = make_private(dense_model(64, 10, hidden=512), config)
    dp.compile(optimizer=keras.optimizers.SGD(0.5),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return audit_gradient_canaries(dp, x, data.private.labels, num_canaries=NUM_CANARIES,
                                   seed=3, epochs=EPOCHS, score="llr",
                                   score_noise_multiplier=score_noise_multiplier)


EPOCHS = 5


@pytest.mark.slow
@pytest.mark.ci
def test_one_run_audit_separates_control_dp_run_and_broken_mechanism():
    # (b) DP run at ε = 4: the lower bound must not exceed the accountant's ε.
    dp_run = audited_run(target_epsilon=4.0)
    assert dp_run.accountant_epsilon <= 4.0
    assert dp_run.audit.epsilon <= dp_run.accountant_epsilon
    # (b) forced non-private control (σ = 1e-3): far above the DP run.
    control = audited_run(noise_multiplier=1e-3)
    assert control.audit.epsilon >= 3.0
    assert control.audit.epsilon >= dp_run.audit.epsilon + 1.5
    # (c) broken mechanism: noise std σ/10 while claiming the ε of σ (σ calibrated for ε = 2;
    # the auditor's score assumes the claimed σ).
    honest_sigma = accounting.plan_dp_sgd(
        num_examples=1168, expected_batch_size=64, epochs=EPOCHS, target_epsilon=2.0,
        delta=DELTA).noise_multiplier
    broken = audited_run(noise_multiplier=honest_sigma / 10,
                         score_noise_multiplier=honest_sigma)
    claimed = reference_epsilon(honest_sigma, broken.sampling_rate, broken.steps, DELTA)
    assert claimed == pytest.approx(2.0, abs=0.05)
    print(f"\nε_LB: DP run {dp_run.audit.epsilon:.3f} (accountant {dp_run.accountant_epsilon:.3f});"
          f" control {control.audit.epsilon:.3f}; broken {broken.audit.epsilon:.3f} "
          f"(claimed {claimed:.3f})")
    assert broken.audit.epsilon > claimed
