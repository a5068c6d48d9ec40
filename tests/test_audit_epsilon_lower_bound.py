"""The one-run audit's ε lower bound against the formula worked out by hand with scipy.stats.binom
(Steinke, Nasr & Jagielski 2023, App. D), and the guessing rule."""

import doctest
import math

import numpy as np
import pytest
from scipy import optimize, stats

from tfdpfair.audit import epsilon_lower_bound as elb


def hand_p_value(m, r, v, eps, delta):
    """p(ε) written out term by term from the paper's formula."""
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = stats.binom.sf(v - 1, r, q)  # P[Bin(r, q) >= v]
    alpha = 0.0
    for i in range(1, v + 1):
        alpha = max(alpha, (stats.binom.sf(v - i - 1, r, q) - beta) / i)
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize("m,r,v,delta,eps", [
    (100, 20, 15, 1e-5, 0.0), (100, 20, 15, 1e-5, 0.7), (1000, 100, 80, 1e-5, 1.2),
    (1000, 100, 100, 1e-3, 3.0), (50, 50, 30, 0.01, 0.3), (10, 4, 4, 0.0, 2.0),
    (500, 250, 0, 1e-5, 0.5), (1000, 200, 140, 1e-4, 0.0)])
def test_p_value_matches_hand_computation(m, r, v, delta, eps):
    assert elb.p_value(m, r, v, eps, delta) == pytest.approx(hand_p_value(m, r, v, eps, delta),
                                                             rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("m,r,v,delta", [
    (100, 20, 18, 1e-5), (1000, 100, 80, 1e-5), (1000, 500, 350, 1e-4), (200, 60, 55, 1e-3),
    (10000, 1000, 700, 1e-6)])
def test_bound_is_the_largest_rejected_epsilon(m, r, v, delta):
    """ε_LB solves hand_p(ε) = 0.05 (hand p-value, a root finder, no code under test)."""
    eps = elb.epsilon_lower_bound(m, r, v, delta)
    root = optimize.brentq(lambda e: hand_p_value(m, r, v, e, delta) - 0.05, 0.0, 20.0,
                           xtol=1e-12)
    assert eps == pytest.approx(root, abs=1e-6)
    assert hand_p_value(m, r, v, eps - 1e-6, delta) < 0.05 <= hand_p_value(m, r, v, eps + 1e-6,
                                                                           delta)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_without_delta_is_closed_form(r):
    """v = r, δ = 0: p(ε) = q^r, so ε_LB = logit(0.05^(1/r)) (r = 100: 3.493)."""
    x = 0.05 ** (1 / r)
    assert elb.epsilon_lower_bound(m=r, r=r, v=r, delta=0.0) == pytest.approx(
        math.log(x / (1 - x)), abs=1e-9)


def test_all_correct_with_delta_is_lower_but_positive():
    no_delta = elb.epsilon_lower_bound(1000, 100, 100, 0.0)
    with_delta = elb.epsilon_lower_bound(1000, 100, 100, 1e-4)
    assert 0 < with_delta < no_delta


@pytest.mark.parametrize("m,r,delta", [(100, 20, 1e-5), (1000, 1000, 0.0), (10, 0, 1e-3)])
def test_no_correct_guess_gives_zero(m, r, delta):
    assert elb.p_value(m, r, 0, 0.0, delta) == 1.0  # β = P[Bin >= 0] = 1
    assert elb.epsilon_lower_bound(m, r, 0, delta) == 0.0


def test_chance_level_gives_zero():
    assert elb.epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert elb.epsilon_lower_bound(1000, 200, 112, 1e-5) == 0.0  # p(0) ≈ 0.05+: not rejected


def test_delta_zero_matches_binomial_tail_only():
    m, r, v = 300, 80, 65
    root = optimize.brentq(lambda e: stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-e))) - 0.05,
                           0, 20, xtol=1e-12)
    assert elb.epsilon_lower_bound(m, r, v, 0.0) == pytest.approx(root, abs=1e-6)


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta():
    values = [elb.epsilon_lower_bound(1000, 100, v, 1e-5) for v in (60, 70, 80, 90, 100)]
    assert values == sorted(values) and values[0] < values[-1]
    assert elb.epsilon_lower_bound(1000, 100, 90, 1e-3) < elb.epsilon_lower_bound(
        1000, 100, 90, 1e-6)


def test_invalid_counts_are_refused():
    with pytest.raises(ValueError, match="v <= r <= m"):
        elb.epsilon_lower_bound(10, 20, 5, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        elb.epsilon_lower_bound(10, 5, 5, 2.0)


def test_guess_counts_top_and_bottom_k():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.4])
    members = np.array([1, 0, 0, 0, 1, 1])
    # k = 2: "in" = {0 (in), 2 (out)}, "out" = {1 (out), 3 (out)} -> 3 of 4 right.
    assert elb.guess_counts(scores, members, 2) == (4, 3)
    assert elb.guess_counts(scores, members, 0) == (0, 0)
    with pytest.raises(ValueError, match="k must be"):
        elb.guess_counts(scores, members, 4)


def test_several_ks_are_bonferroni_corrected():
    rng = np.random.default_rng(0)
    members = rng.random(1000) < 0.5
    scores = members + rng.normal(scale=0.8, size=1000)
    single = elb.audit_from_scores(scores, members, 100, 1e-5)
    r, v = elb.guess_counts(scores, members, 100)
    assert (single.r, single.v) == (r, v)
    assert single.epsilon == pytest.approx(elb.epsilon_lower_bound(1000, r, v, 1e-5))
    several = elb.audit_from_scores(scores, members, (50, 100, 250), 1e-5)
    expected = max(elb.epsilon_lower_bound(1000, *elb.guess_counts(scores, members, k), 1e-5,
                                           0.05 / 3) for k in (50, 100, 250))
    assert several.epsilon == pytest.approx(expected)
    assert several.ks_tried == (50, 100, 250)


def test_docstring_examples_run():
    assert doctest.testmod(elb).failed == 0
