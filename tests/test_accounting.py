"""Accounting against dp_accounting called directly, calibration, and bad arguments."""

import logging
import math
import warnings

import pytest
from absl import logging as absl_logging
from dp_reference import reference_epsilon as direct_epsilon

from tfdpfair.privacy import accounting as acc
from tfdpfair.privacy import calibration
from tfdpfair.privacy.tf_privacy_compat import tf_privacy_statement

PAPER_Q = 4096 / 223414  # CheXpert-size training set, logical batch 4096


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
    (lambda: acc.compute_epsilon(1.0, 0.1, 0, 1e-5, "prv"), "accountant"),
    (lambda: acc.calibrate_noise_multiplier(1e9, 0.1, 10, 1e-5), "no meaningful protection"),
    (lambda: acc.calibrate_noise_multiplier(1.0, 0.1, 10, 1e-5, "prv"), "accountant"),
    (lambda: acc.calibrate_noise_multiplier(1.0, 0.1, 0, 1e-5), "steps must be >= 1"),
    (lambda: acc.max_steps_for_budget(float("nan"), 1.0, 0.1, 1e-5), "target ε"),
    (lambda: acc.default_delta(1), "at least 2 examples"),
    (lambda: acc.resolve_delta(0), "num_examples"),
])
def test_bad_arguments_get_clear_errors(call, match):
    with pytest.raises(acc.PrivacyArgumentError, match=match):
        call()


# ---- default δ ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 1168, 60000, 223414])
def test_default_delta_is_n_to_the_minus_1_1_and_below_one_over_n(n):
    assert acc.default_delta(n) == pytest.approx(n ** -1.1, rel=1e-12)
    assert acc.default_delta(n) < 1.0 / n
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default must not warn about itself
        assert acc.resolve_delta(n) == pytest.approx(n ** -1.1, rel=1e-12)


def test_plan_with_default_delta_accounts_at_n_to_the_minus_1_1():
    n, batch, steps, sigma = 60000, 256, 14063, 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = acc.plan_dp_sgd(n, batch, steps=steps, noise_multiplier=sigma)
    assert plan.epsilon() == pytest.approx(
        direct_epsilon(sigma, batch / n, steps, n ** -1.1, "rdp"), rel=1e-9)


def test_delta_at_least_one_over_n_warns():
    with pytest.warns(acc.WeakDeltaWarning, match="1/N"):
        assert acc.resolve_delta(1000, 1 / 1000) == 1 / 1000
    with pytest.warns(acc.WeakDeltaWarning):
        acc.resolve_delta(1000, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc.resolve_delta(1000, 1e-5) == 1e-5


def test_one_example_has_no_default_delta():
    with pytest.raises(acc.PrivacyArgumentError, match="at least 2 examples"):
        acc.plan_dp_sgd(1, 1, steps=1, noise_multiplier=1.0)


# ---- plan_dp_sgd validates everything before any accounting --------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_examples=0), "num_examples"),
    (dict(num_examples=100.5), "num_examples"),
    (dict(num_examples=1, expected_batch_size=1, delta=None), "at least 2 examples"),
    (dict(expected_batch_size=0), "expected batch size"),
    (dict(expected_batch_size=float("inf")), "expected batch size"),
    (dict(expected_batch_size=2000), "exceeds the number of examples"),
    (dict(steps=10, epochs=1.0), "exactly one of steps or epochs"),
    (dict(steps=None), "exactly one of steps or epochs"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(steps=None, epochs=0.0), "epochs"),
    (dict(steps=None, epochs=float("nan")), "epochs"),
    (dict(noise_multiplier=0.0), "noise multiplier"),
    (dict(noise_multiplier=float("nan")), "noise multiplier"),
    (dict(noise_multiplier=None, target_epsilon=None), "a noise multiplier σ, a target ε"),
    (dict(noise_multiplier=None, target_epsilon=0.0), "target ε"),
    (dict(noise_multiplier=None, target_epsilon=float("inf")), "target ε"),
    (dict(noise_multiplier=None, target_epsilon=1e9), "no meaningful protection"),
    (dict(noise_multiplier=None, target_epsilon=1.0, steps=0), "steps must be >= 1"),
    (dict(delta=0.0), "δ"),
    (dict(delta=1.0), "δ"),
    (dict(delta="1e-5"), "δ"),
    (dict(accountant="prv"), "accountant"),
])
def test_plan_rejects_every_bad_argument_before_accounting(monkeypatch, kwargs, match):
    def no_accounting(*args, **kw):
        raise AssertionError("accounting ran before the arguments were validated")

    monkeypatch.setattr(acc, "compute_epsilon", no_accounting)
    monkeypatch.setattr(calibration, "calibrate_noise_multiplier", no_accounting)
    monkeypatch.setattr(calibration, "max_steps_for_budget", no_accounting)
    args = dict(num_examples=1000, expected_batch_size=100, steps=10, noise_multiplier=1.0,
                delta=1e-5)
    args.update(kwargs)
    with pytest.raises(acc.PrivacyArgumentError, match=match):
        acc.plan_dp_sgd(**args)


# ---- calibration: accuracy, PLD speed-up path, progress, non-binding targets -------------

@pytest.mark.parametrize("steps,target", [(10**4, 8.0), (10**5, 1.0)])
def test_pld_calibration_at_paper_scale_meets_target_exactly(steps, target):
    lines = []
    sigma = acc.calibrate_noise_multiplier(target, PAPER_Q, steps, 1e-6, "pld",
                                           progress=lines.append)
    eps = direct_epsilon(sigma, PAPER_Q, steps, 1e-6, "pld")  # dp_accounting, default settings
    assert 0.99 * target <= eps <= target
    assert direct_epsilon(sigma * 0.98, PAPER_Q, steps, 1e-6, "pld") > 0.99 * target
    pld_lines = [line for line in lines if "(pld)" in line]
    assert 1 <= len(pld_lines) <= 4  # RDP gives the start; few PLD evaluations are needed.
    assert f"σ = {sigma:.6g}" in pld_lines[-1] and " s" in pld_lines[-1]


def test_progress_reports_every_evaluation_of_max_steps():
    lines = []
    steps = acc.max_steps_for_budget(2.0, 1.0, 0.01, 1e-5, "pld", progress=lines.append)
    assert direct_epsilon(1.0, 0.01, steps, 1e-5, "pld") <= 2.0
    assert direct_epsilon(1.0, 0.01, steps + 1, 1e-5, "pld") > 2.0
    assert any(f"T = {steps} ->" in line for line in lines)
    assert all("ε =" in line and line.endswith(" s") for line in lines)


def test_plan_keeps_requested_steps_when_the_budget_allows_them():
    plan = acc.plan_dp_sgd(num_examples=10000, expected_batch_size=100, steps=500,
                           noise_multiplier=1.0, target_epsilon=3.0, delta=1e-5)
    assert plan.steps == 500
    assert direct_epsilon(1.0, 0.01, 500, 1e-5, "rdp") <= 3.0
    assert plan.target_binding() is False


def test_non_binding_target_is_explicit():
    # δ = 0.5 > q = 0.01: even σ = 0.1 (the least noise searched) stays far below ε = 50.
    with pytest.warns(acc.NonBindingTargetWarning, match="not binding"):
        sigma = acc.calibrate_noise_multiplier(50.0, 0.01, 1, 0.5)
    assert sigma == acc.MIN_NOISE_MULTIPLIER
    assert direct_epsilon(sigma, 0.01, 1, 0.5, "rdp") < 0.99 * 50.0
    with pytest.warns((acc.NonBindingTargetWarning, acc.WeakDeltaWarning)):
        plan = acc.plan_dp_sgd(100, 1, steps=1, target_epsilon=50.0, delta=0.5)
    assert plan.target_binding() is False


def test_calibrated_plan_reports_a_binding_target():
    plan = acc.plan_dp_sgd(50000, 4096, steps=875, target_epsilon=1.0, delta=1e-5)
    assert 0.99 <= direct_epsilon(plan.noise_multiplier, 4096 / 50000, 875, 1e-5) <= 1.0
    assert plan.target_binding() is True


# ---- dp_accounting's "failed to converge" log lines ---------------------------------------

def test_unconverged_rdp_order_messages_are_silenced(caplog, capfd):
    q, sigma, steps, delta = 0.5, 2.0, 92, 1e-4  # high q: several orders do not converge
    logger = absl_logging.get_absl_logger()
    ours = [f for f in logger.filters if isinstance(f, acc._DropUnconvergedRdpOrders)]
    assert len(ours) == 1
    caplog.set_level(logging.INFO)
    logger.removeFilter(ours[0])  # without the filter, dp_accounting does log them:
    try:
        direct_epsilon(sigma, q, steps, delta, "rdp")
    finally:
        logger.addFilter(ours[0])
    assert "failed to converge" in caplog.text
    caplog.clear()
    capfd.readouterr()
    acc.compute_epsilon.cache_clear()
    eps = acc.compute_epsilon(sigma, q, steps, delta, "rdp")
    acc.calibrate_noise_multiplier(4.0, 0.22, 92, 1e-4)  # the demo's q = 256/1168
    tf_privacy_statement(1168, 256, 20.0, 2.13, 1 / 1168)  # the demo report's cross-check
    out, err = capfd.readouterr()
    assert "failed to converge" not in caplog.text + out + err
    # The dropped orders leave a valid bound: our ε is dp_accounting's, unchanged.
    assert eps == pytest.approx(direct_epsilon(sigma, q, steps, delta, "rdp"), rel=1e-12)


@pytest.mark.parametrize("sigma,q,steps,delta", [
    (2.2, 256 / 1168, 92, 4e-4), (1.1, 256 / 60000, 14063, 1e-5), (10.0, 4096 / 50000, 875, 1e-5),
    (0.7, 1.0, 3, 1e-3)])
def test_cached_one_step_rdp_gives_dp_accountings_epsilon_exactly(sigma, q, steps, delta,
                                                                  monkeypatch):
    from tfdpfair.privacy import rdp_steps
    want = direct_epsilon(sigma, q, steps, delta)
    assert rdp_steps.epsilon(sigma, q, steps, delta, acc.NEIGHBORING_RELATION) == pytest.approx(
        want, rel=1e-12)
    acc.compute_epsilon.cache_clear()
    monkeypatch.setattr(rdp_steps, "one_step_rdp", lambda *a: None)  # fallback: full compose
    assert acc.compute_epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(want, rel=1e-12)
    acc.compute_epsilon.cache_clear()
