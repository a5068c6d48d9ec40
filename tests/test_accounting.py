"""Accounting against dp_accounting called directly, calibration, and bad arguments."""

import math
import warnings

import pytest
from dp_reference import reference_epsilon as direct_epsilon

from tfdpfair.privacy import accounting as acc


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize("sigma,q,steps,delta", [
    (1.1, 256 / 60000, 14063, 1e-5),
    (10.0, 4096 / 50000, 875, 1e-5),
    (0.8, 0.5, 20, 1e-3),
])
def test_epsilon_matches_dp_accounting(kind, sigma, q, steps, delta):
    assert acc.compute_epsilon(sigma, q, steps, delta, kind) == pytest.approx(
        direct_epsilon(sigma, q, steps, delta, kind), rel=1e-9)


def test_pld_is_tighter_than_rdp():
    args = (1.1, 256 / 60000, 14063, 1e-5)
    assert acc.compute_epsilon(*args, "pld") < acc.compute_epsilon(*args, "rdp")


def test_zero_steps_cost_nothing():
    assert acc.compute_epsilon(1.0, 0.01, 0, 1e-5) == 0.0


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibrated_sigma_hits_target(kind, target):
    q, steps, delta = 512 / 50000, 500, 1e-5
    sigma = acc.calibrate_noise_multiplier(target, q, steps, delta, kind)
    eps = direct_epsilon(sigma, q, steps, delta, kind)
    assert 0.99 * target <= eps <= target
    # A slightly smaller σ would overshoot: the calibration is not wastefully conservative.
    assert direct_epsilon(sigma * 0.97, q, steps, delta, kind) > eps


def test_max_steps_is_the_last_step_within_budget():
    sigma, q, delta, target = 1.0, 0.01, 1e-5, 2.0
    steps = acc.max_steps_for_budget(target, sigma, q, delta)
    assert direct_epsilon(sigma, q, steps, delta, "rdp") <= target
    assert direct_epsilon(sigma, q, steps + 1, delta, "rdp") > target


def test_plan_with_sigma_and_budget_caps_steps():
    plan = acc.plan_dp_sgd(num_examples=10000, expected_batch_size=100, epochs=1000,
                           noise_multiplier=1.0, target_epsilon=3.0, delta=1e-5)
    assert plan.steps < 1000 * 100
    assert plan.epsilon() <= 3.0
    assert direct_epsilon(1.0, 0.01, plan.steps + 1, 1e-5, "rdp") > 3.0


def test_plan_uses_expected_logical_batch_for_q():
    plan = acc.plan_dp_sgd(num_examples=50000, expected_batch_size=4096, steps=875,
                           noise_multiplier=10.0, delta=1e-5)
    assert plan.sampling_rate == pytest.approx(4096 / 50000)
    assert plan.epsilon() == pytest.approx(direct_epsilon(10.0, 4096 / 50000, 875, 1e-5, "rdp"))


def test_epochs_to_steps():
    assert acc.steps_for_epochs(60, 60000, 256) == math.ceil(60 * 60000 / 256)
    assert acc.steps_for_epochs(1, 100, 10) == 10


def test_default_delta_is_one_over_n_and_warns():
    with pytest.warns(acc.WeakDeltaWarning, match="1/N"):
        assert acc.resolve_delta(1000) == pytest.approx(1e-3)
    with pytest.warns(acc.WeakDeltaWarning):
        acc.resolve_delta(1000, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc.resolve_delta(1000, 1e-5) == 1e-5


@pytest.mark.parametrize("call,match", [
    (lambda: acc.compute_epsilon(1.0, 1.5, 10, 1e-5), "sampling rate"),
    (lambda: acc.compute_epsilon(0.0, 0.1, 10, 1e-5), "noise multiplier"),
    (lambda: acc.compute_epsilon(-1.0, 0.1, 10, 1e-5), "noise multiplier"),
    (lambda: acc.compute_epsilon(1.0, 0.1, 10, 0.0), "δ"),
    (lambda: acc.compute_epsilon(1.0, 0.1, 10, 1.0), "δ"),
    (lambda: acc.compute_epsilon(1.0, 0.1, -1, 1e-5), "steps"),
    (lambda: acc.calibrate_noise_multiplier(0.0, 0.1, 10, 1e-5), "target ε"),
    (lambda: acc.calibrate_noise_multiplier(1e-9, 1.0, 10**6, 1e-9), "unreachable"),
    (lambda: acc.max_steps_for_budget(0.01, 0.5, 0.5, 1e-5), "single step"),
    (lambda: acc.sampling_rate_for(300, 100), "exceeds the number of examples"),
    (lambda: acc.make_accountant("prv"), "accountant"),
])
def test_bad_arguments_get_clear_errors(call, match):
    with pytest.raises(acc.PrivacyArgumentError, match=match):
        call()
