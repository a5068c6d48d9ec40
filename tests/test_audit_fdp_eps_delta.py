"""The f-DP one-run audit with the (ε, δ)-DP trade-off curve (valid for every mechanism) against
independent computations: the paper's recursion written out with arrays on the trade-off
function f_{ε,δ} itself (tests/fdp_reference.py), the power curve inverted by brentq, exact
binomial tails of randomised response (which is exactly (ε, δ)-DP), the Steinke et al. bound
and the Gaussian-curve bound, and Monte-Carlo one-run games of randomised response."""

import math

import numpy as np
import pytest
from fdp_reference import (eps_delta_objective, eps_delta_tradeoff, reference_epsilon,
                           reference_eps_delta_bound, reference_mu)
from scipy import optimize, special, stats

from tfdpfair.audit import epsilon_lower_bound as steinke
from tfdpfair.audit import fdp_lower_bound as fdp

COUNTS = [(1000, 100, 100), (1000, 100, 90), (1000, 200, 180), (1000, 1000, 900),
          (1000, 1000, 600), (500, 50, 40), (100, 20, 18), (30, 30, 25)]


@pytest.mark.parametrize("eps,delta", [(0.0, 0.0), (0.7, 0.0), (2.0, 1e-5), (5.0, 0.1),
                                       (0.0, 0.2)])
def test_inverse_power_inverts_the_power_curve(eps, delta):
    """g(x) = min{α : 1 − f_{ε,δ}(α) ≥ x}, by brentq on the trade-off function itself."""
    for x in np.linspace(0.0, 1.0, 41):
        if x <= delta:  # power δ is free (α = 0)
            expected = 0.0
        else:
            expected = optimize.brentq(lambda a: 1 - eps_delta_tradeoff(a, eps, delta) - x,
                                       0.0, 1.0 - delta, xtol=1e-14)  # power 1 at 1 − δ
        assert fdp.eps_delta_inverse_power(x, eps, delta) == pytest.approx(expected, abs=1e-10)
    assert fdp.eps_delta_inverse_power(0.3, 800.0, 0.0) >= 0.0  # no overflow


@pytest.mark.parametrize("m,r,v", COUNTS)
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_bound_is_the_root_of_the_papers_recursion(m, r, v, delta):
    eps = fdp.fdp_eps_delta_lower_bound(m, r, v, delta)
    assert eps == pytest.approx(reference_eps_delta_bound(m, r, v, delta), abs=1e-7)
    assert eps > 0
    assert (eps_delta_objective(m, r, v, eps - 1e-6, delta, 0.05) > 0
            > eps_delta_objective(m, r, v, eps + 1e-6, delta, 0.05))


@pytest.mark.parametrize("m,r,v", COUNTS[:5])
@pytest.mark.parametrize("eps,delta", [(0.0, 0.0), (0.5, 1e-5), (1.5, 1e-3)])
def test_test_and_p_value_agree_with_the_recursion(m, r, v, eps, delta):
    for tau in (0.001, 0.01, 0.05, 0.3, 1.0):
        reference = eps_delta_objective(m, r, v, eps, delta, tau)
        if abs(reference) > 1e-12:
            assert fdp.eps_delta_rejects(m, r, v, eps, delta, tau) == (reference > 0)
    p = fdp.eps_delta_p_value(m, r, v, eps, delta)
    if eps_delta_objective(m, r, v, eps, delta, 1.0) <= 0:
        assert p == 1.0
    else:
        root = optimize.brentq(lambda t: eps_delta_objective(m, r, v, eps, delta, t), 1e-300,
                               1.0, xtol=1e-15, rtol=1e-12)
        assert p == pytest.approx(root, rel=1e-8)


def test_rejected_epsilons_form_an_interval():
    """ε_LB is a sup: on a grid, "(ε, δ)-DP" is rejected for all ε below it and none above."""
    for m, r, v in COUNTS[:5]:
        for delta in (0.0, 1e-3):
            rejected = [eps_delta_objective(m, r, v, e, delta, 0.05) > 0
                        for e in np.linspace(0, 6, 61)]
            assert rejected == sorted(rejected, reverse=True)


@pytest.mark.parametrize("r,v", [(100, 60), (100, 70), (1000, 560), (20, 18)])
def test_at_epsilon_and_delta_zero_it_is_the_gaussian_test_at_mu_zero(r, v):
    """f_{0,0}(α) = 1 − α = f_0 (perfect privacy): the same bound, just above the fair-coin
    tail P[Bin(r, ½) ≥ v]."""
    p = fdp.eps_delta_p_value(1000, r, v, 0.0, 0.0)
    assert p == pytest.approx(fdp.fdp_p_value(1000, r, v, 0.0), rel=1e-9)
    assert stats.binom.sf(v - 1, r, 0.5) <= p <= 1.2 * stats.binom.sf(v - 1, r, 0.5)


@pytest.mark.parametrize("eps,delta", [(0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (1.0, 0.02),
                                       (0.3, 0.1)])
def test_bound_covers_randomised_response_without_abstention(eps, delta):
    """r = m; each canary's bit is revealed w.p. δ, else reported by ε-randomised response:
    an (ε, δ)-DP mechanism whose guesses are right independently w.p. δ + (1 − δ)e^ε/(1+e^ε),
    so the bound on P[W ≥ v] may never fall below that binomial tail."""
    m = 400
    q = delta + (1 - delta) * special.expit(eps)
    for v in range(int(q * m) - 20, m + 1, 20):
        assert fdp.eps_delta_p_value(m, m, v, eps, delta) >= stats.binom.sf(v - 1, m, q) * (
            1 - 1e-9)


@pytest.mark.parametrize("r", [100, 200, 1000])
@pytest.mark.parametrize("frac", [0.7, 0.8, 0.9, 0.95, 1.0])
def test_against_steinke_and_the_gaussian_curve(r, frac):
    """m = 1000. At δ = 0 never above Steinke's (its tail is attained by randomised response,
    for which this bound is valid); at δ = 1e-5 within 0.02 nats of it and above it when every
    guess is right (no 2mδ slack); at δ = 1e-3 above it; always at most the Gaussian-curve ε
    (the Gaussian shape is the stronger assumption)."""
    m, v = 1000, int(frac * r)
    assert (fdp.fdp_eps_delta_lower_bound(m, r, v, 0.0)
            <= steinke.epsilon_lower_bound(m, r, v, 0.0) + 1e-9)
    eps, ref = fdp.fdp_eps_delta_lower_bound(m, r, v, 1e-5), steinke.epsilon_lower_bound(
        m, r, v, 1e-5)
    assert eps >= ref - 0.02
    if v == r:
        assert eps > ref
    assert eps < reference_epsilon(reference_mu(m, r, v), 1e-5)
    assert (fdp.fdp_eps_delta_lower_bound(m, r, v, 1e-3)
            > steinke.epsilon_lower_bound(m, r, v, 1e-3))


def randomised_response_games(eps, delta, m, k, games, seed):
    """v of each one-run game: canaries in w.p. ½; each reports its bit w.p. δ, otherwise
    ε-randomised response; score = report + small independent noise (tie-break), guesses "in"
    for the k largest and "out" for the k smallest scores."""
    rng = np.random.default_rng(seed)
    s = rng.random((games, m)) < 0.5
    truthful = (rng.random((games, m)) < delta) | (rng.random((games, m)) < special.expit(eps))
    report = np.where(truthful, s, ~s)
    order = np.argsort(-(report + 0.01 * rng.random((games, m))), axis=1)
    top = np.take_along_axis(s, order[:, :k], axis=1).sum(axis=1)
    bottom = (~np.take_along_axis(s, order[:, m - k:], axis=1)).sum(axis=1)
    return top + bottom


@pytest.mark.parametrize("eps,delta,k", [(2.0, 0.0, 50), (1.0, 0.0, 250), (2.0, 1e-3, 100)])
def test_monte_carlo_validity_and_power(eps, delta, k):
    m, games = 1000, 2000
    v = randomised_response_games(eps, delta, m, k, games, seed=int(eps * 100) + k)
    rejects = {int(x): fdp.eps_delta_rejects(m, 2 * k, int(x), eps, delta, 0.05)
               for x in np.unique(v)}
    # Validity: the true (ε, δ) is rejected in at most ~5% of the runs.
    assert np.mean([rejects[int(x)] for x in v]) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / games)
    for x in np.unique(v)[::3]:
        tail = np.mean(v >= x)
        assert fdp.eps_delta_p_value(m, 2 * k, int(x), eps, delta) >= tail - 4 * math.sqrt(
            tail / games)
    # Power: ε/4 is rejected in most runs.
    weak = {int(x): fdp.eps_delta_rejects(m, 2 * k, int(x), eps / 4, delta, 0.05)
            for x in np.unique(v)}
    assert np.mean([weak[int(x)] for x in v]) > 0.5


def test_scores_entry_point_reports_the_eps_delta_bound_with_its_own_k():
    rng = np.random.default_rng(0)
    members = rng.random(1000) < 0.5
    scores = members * 1.5 + rng.normal(size=1000)
    ks = (50, 100, 250)
    result = fdp.fdp_audit_from_scores(scores, members, ks, 1e-5)
    bounds = {k: reference_eps_delta_bound(1000, *steinke.guess_counts(scores, members, k),
                                           1e-5, 0.05 / 3) for k in ks}
    best = max(bounds, key=bounds.get)
    assert result.k_eps_delta == best
    assert (result.r_eps_delta, result.v_eps_delta) == steinke.guess_counts(scores, members,
                                                                            best)
    assert result.epsilon_eps_delta == pytest.approx(bounds[best], abs=1e-7)
    fields = result.report_fields()
    assert fields["epsilon_lower_bound_fdp_eps_delta"] == result.epsilon_eps_delta
    assert (fields["k_fdp_eps_delta"], fields["r_fdp_eps_delta"],
            fields["v_fdp_eps_delta"]) == (best, result.r_eps_delta, result.v_eps_delta)


def test_invalid_input_is_refused():
    with pytest.raises(ValueError, match="v <= r <= m"):
        fdp.fdp_eps_delta_lower_bound(10, 20, 5, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        fdp.fdp_eps_delta_lower_bound(10, 5, 5, 1.5)
    with pytest.raises(ValueError, match="p_threshold"):
        fdp.fdp_eps_delta_lower_bound(10, 5, 5, 1e-5, 1.0)
    with pytest.raises(ValueError, match="epsilon"):
        fdp.eps_delta_rejects(10, 5, 5, -1.0, 0.0, 0.05)


def test_edge_cases():
    for m, r in [(1000, 100), (1000, 0), (10, 10)]:
        assert fdp.eps_delta_p_value(m, r, 0, 0.0, 0.0) == 1.0
        assert fdp.fdp_eps_delta_lower_bound(m, r, 0, 1e-5) == 0.0
    assert fdp.fdp_eps_delta_lower_bound(1000, 200, 100, 1e-5) == 0.0  # chance level
    # δ = 0 is finite here (unlike the Gaussian curve's ε).
    assert 0 < fdp.fdp_eps_delta_lower_bound(1000, 100, 100, 0.0) < 4
