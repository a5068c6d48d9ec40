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


def test_canary_sampling_has_rate_q():
    model = dense_model()
    c = canaries_lib.GradientCanaries(model.trainable_variables, 50, 1.0, 0.3, seed=1)
    rates = [c.sampled(step).numpy().mean() for step in range(40)]
    assert np.mean(rates) == pytest.approx(0.3, abs=0.03)


def zero_gradient_run(canaries_for, steps=3, n=8, clip=1.0, lr=0.5):
    """σ ≈ 0 and a loss without gradient: the update is −lr·Σ_t Σ_j clip_C(u_j)/B exactly."""
    x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    y = np.zeros(n, np.int32)
    config = DPConfig(l2_norm_clip=clip, expected_batch_size=8, micro_batch_size=3,
                      noise_multiplier=1e-6, delta=1e-3, noise_seed=0, sampling_seed=0)
    model = dense_model()
    dp = make_private(model, config)
    dp.compile(optimizer=keras.optimizers.SGD(lr), loss=lambda yt, yp: 0.0 * keras.ops.sum(yp))
    c = canaries_for(model, dp)
    recorder = canaries_lib.UpdateProjectionRecorder(c, model.trainable_variables)
    before = canaries_lib.flatten(model.get_weights())
    dp.set_audit_canaries(c)
    dp.fit(x, y, steps=steps, callbacks=[recorder], verbose=0)
    return dp, c, recorder, canaries_lib.flatten(model.get_weights()) - before


def numpy_clipped_canary_sum(directions, present, clip):
    norms = np.linalg.norm(directions.astype(np.float64), axis=1)
    factors = np.minimum(1.0, clip / norms)
    return (directions * (factors * present)[:, None]).sum(axis=0)


def test_included_canaries_enter_the_update_once_before_the_noise():
    """Each logical step adds Σ_j S_j·[j sampled at t]·u_j (norm C each) once, before the noise;
    the plan counts the 6 canaries in N (q = B/(N + m))."""
    def canaries_for(model, dp):
        q = dp.plan_privacy(8 + 6, steps=3).sampling_rate
        return canaries_lib.GradientCanaries(model.trainable_variables, 6, 1.0, q, 2)

    dp, c, recorder, moved = zero_gradient_run(canaries_for)
    assert dp.plan.num_examples == 8 + 6 and dp.audit_canaries == 6
    expected = sum(-0.5 * numpy_clipped_canary_sum(
        c.directions, c.sampled(t).numpy() & c.included, 1.0) / 8 for t in range(3))
    np.testing.assert_allclose(moved, expected, atol=1e-4)
    assert recorder.projections.shape == (3, 6)
    np.testing.assert_allclose(scores_lib.total_score(recorder.projections),
                               recorder.total_score(), rtol=1e-4, atol=1e-6)


class OversizedCanaries:
    """A hostile canary object: gradients of norm 387 (C = 1), one NaN, every one included."""

    def __init__(self, model, q):
        rng = np.random.default_rng(4)
        self.num_canaries, self.sampling_rate, self.sampling_seed = 5, q, 11
        sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
        g = rng.standard_normal((5, sum(sizes)))
        g *= 387.0 / np.linalg.norm(g, axis=1, keepdims=True)
        g[4, 0] = np.nan
        self.directions = g.astype(np.float32)
        self.included = np.ones(5, bool)
        blocks = np.split(self.directions, np.cumsum(sizes)[:-1], axis=1)
        self.gradient_blocks = [tf.constant(b.reshape((5,) + tuple(v.shape)))
                                for b, v in zip(blocks, model.trainable_variables)]

    def sampled(self, step):
        return canaries_lib.GradientCanaries.sampled(self, step)

    def project(self, flat_vector):
        return np.nan_to_num(self.directions) @ flat_vector


def test_every_canary_is_clipped_to_c_whatever_the_object_returns():
    """set_audit_canaries is public: a canary of norm 387 moves the sum by C, a NaN one by 0."""
    def canaries_for(model, dp):
        return OversizedCanaries(model, dp.plan_privacy(8 + 5, steps=4).sampling_rate)

    dp, c, _, moved = zero_gradient_run(canaries_for, steps=4)
    present = [c.sampled(t).numpy() for t in range(4)]
    finite = np.isfinite(c.directions).all(axis=1)
    expected = sum(-0.5 * numpy_clipped_canary_sum(
        np.nan_to_num(c.directions), p & finite, 1.0) / 8 for p in present)
    assert sum(p.sum() for p in present) > 0
    np.testing.assert_allclose(moved, expected, atol=1e-4)
    per_step_bound = 0.5 * 1.0 * 5 / 8 * 4  # at most m canaries of norm C per step
    assert np.linalg.norm(moved) <= per_step_bound + 1e-5


def test_a_canary_run_is_marked_and_not_released_as_a_dp_model(tmp_path):
    import json

    from tfdpfair.training.release_binding import ReleaseBindingError

    def canaries_for(model, dp):
        q = dp.plan_privacy(8 + 6, steps=2).sampling_rate
        return canaries_lib.GradientCanaries(model.trainable_variables, 6, 1.0, q, 2)

    dp, *_ = zero_gradient_run(canaries_for, steps=2)
    with pytest.raises(ReleaseBindingError, match="audit run, trained with 6 gradient canaries"):
        dp.export_release(tmp_path / "release")
    out = dp.export_release(tmp_path / "marked", allow_audit_run=True)
    record = json.loads((out / "privacy.json").read_text())
    assert record["audit_run"]["canaries"] == 6
    assert "AUDIT RUN" in (out / "PRIVACY.md").read_text()
    from tfdpfair.tfx import export as export_lib
    with pytest.raises(ReleaseBindingError, match="audit run"):
        export_lib.privacy_record_of(dp)
    with pytest.raises(ReleaseBindingError, match="audit run"):
        export_lib.privacy_record_from_release(out)


def test_canaries_must_be_set_before_the_plan():
    model = dense_model()
    dp = make_private(model, DPConfig(l2_norm_clip=1.0, expected_batch_size=8,
                                      noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer=keras.optimizers.SGD(0.5),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dp.prepare(40, steps=3)
    c = canaries_lib.GradientCanaries(model.trainable_variables, 6, 1.0, 0.2, 2)
    from tfdpfair.training.guards import DPUsageError
    with pytest.raises(DPUsageError, match="before the privacy plan is fixed"):
        dp.set_audit_canaries(c)


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
        num_examples=1168 + NUM_CANARIES, expected_batch_size=64, epochs=EPOCHS, target_epsilon=2.0,
        delta=DELTA).noise_multiplier
    broken = audited_run(noise_multiplier=honest_sigma / 10,
                         score_noise_multiplier=honest_sigma)
    claimed = reference_epsilon(honest_sigma, broken.sampling_rate, broken.steps, DELTA)
    assert claimed == pytest.approx(2.0, abs=0.05)
    print(f"\nε_LB: DP run {dp_run.audit.epsilon:.3f} (accountant {dp_run.accountant_epsilon:.3f});"
          f" control {control.audit.epsilon:.3f}; broken {broken.audit.epsilon:.3f} "
          f"(claimed {claimed:.3f})")
    assert broken.audit.epsilon > claimed
