"""The f-DP one-run audit (Mahloujifar, Melis & Chaudhuri 2025) against independent computations:
the paper's recursion written out with full arrays and the stdlib normal distribution, roots by
scipy.optimize.brentq on its continuous objective, exact binomial tails of mechanisms whose
tail is known, dp_accounting's Gaussian-mechanism (ε, δ), and Monte-Carlo one-run games of a
Gaussian mechanism with known μ."""

import doctest
import math

import dp_accounting
import numpy as np
import pytest
from fdp_reference import paper_objective, reference_epsilon, reference_mu
from scipy import optimize, stats

from tfdpfair.audit import epsilon_lower_bound as steinke
from tfdpfair.audit import fdp_lower_bound as fdp

COUNTS = [(1000, 100, 100), (1000, 100, 90), (1000, 200, 180), (1000, 1000, 900),
          (1000, 1000, 600), (500, 50, 40), (100, 20, 18), (1000, 1000, 1000), (30, 30, 25)]


@pytest.mark.parametrize("m,r,v", COUNTS)
def test_mu_bound_is_the_root_of_the_papers_recursion(m, r, v):
    mu = fdp.fdp_mu_lower_bound(m, r, v)
    assert mu == pytest.approx(reference_mu(m, r, v), abs=1e-7)
    assert mu > 0
    assert paper_objective(m, r, v, mu - 1e-6, 0.05) > 0 > paper_objective(m, r, v, mu + 1e-6,
                                                                            0.05)


@pytest.mark.parametrize("m,r,v", COUNTS[:6])
@pytest.mark.parametrize("mu", [0.0, 0.4, 1.5])
def test_test_and_p_value_agree_with_the_recursion(m, r, v, mu):
    for tau in (0.001, 0.01, 0.05, 0.3, 1.0):
        reference = paper_objective(m, r, v, mu, tau)
        if abs(reference) > 1e-12:
            assert fdp.fdp_rejects(m, r, v, mu, tau) == (reference > 0)
    p = fdp.fdp_p_value(m, r, v, mu)
    if paper_objective(m, r, v, mu, 1.0) <= 0:
        assert p == 1.0
    else:
        root = optimize.brentq(lambda t: paper_objective(m, r, v, mu, t), 1e-300, 1.0,
                               xtol=1e-15, rtol=1e-12)
        assert p == pytest.approx(root, rel=1e-8)


def test_rejection_regions_are_intervals():
    """μ_LB is a sup and p(μ) an inf: rejected for all μ < μ_LB, all τ > p (on grids)."""
    for m, r, v in COUNTS[:5]:
        rejected = [paper_objective(m, r, v, mu, 0.05) > 0 for mu in np.linspace(0, 4, 81)]
        assert rejected == sorted(rejected, reverse=True)
        rejected = [paper_objective(m, r, v, 0.5, t) > 0 for t in np.linspace(0.001, 1, 80)]
        assert rejected == sorted(rejected)


@pytest.mark.parametrize("r,v", [(100, 60), (100, 70), (1000, 540), (1000, 560), (20, 18)])
def test_at_mu_zero_the_bound_is_just_above_the_fair_coin_tail(r, v):
    """μ = 0 (perfect privacy): guesses are fair coins, P[≥ v] = P[Bin(r, ½) ≥ v] exactly; the
    bound is valid (≥) and, as the paper says, tight (within 20% here)."""
    exact = stats.binom.sf(v - 1, r, 0.5)
    p = fdp.fdp_p_value(1000, r, v, 0.0)
    assert exact <= p <= 1.2 * exact


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.0])
def test_bound_covers_the_independent_gaussian_mechanism_without_abstention(mu):
    """r = m, one N(μ·s_j, 1) per canary (μ-GDP), guess s_j = [x_j > μ/2]: W ~ Bin(m, Φ(μ/2)),
    so the bound on P[W ≥ v] may never fall below that tail."""
    m = 400
    q = stats.norm.cdf(mu / 2)
    for v in range(int(q * m) - 20, m + 1, 20):
        assert fdp.fdp_p_value(m, m, v, mu) >= stats.binom.sf(v - 1, m, q) * (1 - 1e-9)


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-12, 0.3])
def test_gaussian_epsilon_matches_dp_accounting(mu, delta):
    eps = fdp.gdp_epsilon(mu, delta)
    if delta >= 2 * stats.norm.cdf(mu / 2) - 1:
        assert eps == 0.0
    else:
        assert eps == pytest.approx(reference_epsilon(mu, delta), abs=2e-3)
        sigma = dp_accounting.get_sigma_gaussian(eps, delta)  # its own inversion
        assert 1 / sigma == pytest.approx(mu, rel=1e-3)


def test_epsilon_bound_converts_the_mu_bound_at_delta():
    m, r, v = 1000, 200, 180
    mu = reference_mu(m, r, v)
    for delta in (1e-5, 1e-12):
        assert fdp.fdp_epsilon_lower_bound(m, r, v, delta) == pytest.approx(
            reference_epsilon(mu, delta), abs=2e-3)
    assert fdp.fdp_epsilon_lower_bound(m, r, v, 1e-12) > fdp.fdp_epsilon_lower_bound(m, r, v,
                                                                                     1e-5)


def test_edge_cases():
    # v = r: every guess right.
    assert fdp.fdp_mu_lower_bound(1000, 100, 100) == pytest.approx(reference_mu(1000, 100, 100))
    # v = 0 and r = 0: nothing is rejected, the tail bound is 1.
    for m, r in [(1000, 100), (1000, 0), (10, 10)]:
        assert fdp.fdp_p_value(m, r, 0, 0.0) == 1.0
        assert fdp.fdp_mu_lower_bound(m, r, 0) == 0.0
        assert fdp.fdp_epsilon_lower_bound(m, r, 0, 1e-5) == 0.0
    # δ = 0: a Gaussian curve is (ε, 0)-DP for no finite ε.
    assert fdp.fdp_epsilon_lower_bound(1000, 100, 100, 0.0) == math.inf
    assert fdp.fdp_epsilon_lower_bound(1000, 100, 50, 0.0) == 0.0
    # δ at least 2Φ(μ/2) − 1 (the δ of ε = 0): ε = 0.
    mu = reference_mu(1000, 100, 90)
    assert fdp.fdp_epsilon_lower_bound(1000, 100, 90, 2 * stats.norm.cdf(mu / 2) - 1) == 0.0
    # Chance level.
    assert fdp.fdp_epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0


def test_invalid_input_is_refused():
    with pytest.raises(ValueError, match="v <= r <= m"):
        fdp.fdp_mu_lower_bound(10, 20, 5)
    with pytest.raises(ValueError, match="delta"):
        fdp.fdp_epsilon_lower_bound(10, 5, 5, 1.5)
    with pytest.raises(ValueError, match="p_threshold"):
        fdp.fdp_mu_lower_bound(10, 5, 5, 0.0)
    with pytest.raises(ValueError, match="delta"):
        fdp.fdp_audit_from_scores([1.0, 0.0], [1, 0], 1, -1e-5)


def test_bound_grows_with_correct_guesses():
    values = [fdp.fdp_epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(110, 201, 10)]
    assert all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("r", [100, 200, 1000])
@pytest.mark.parametrize("frac", [0.8, 0.9, 1.0])
def test_fdp_bound_is_above_steinke_on_typical_counts(r, frac):
    """The paper's finding: the f-DP audit gives the higher ε (here δ = 1e-5, m = 1000)."""
    v = int(frac * r)
    mu = reference_mu(1000, r, v)
    assert reference_epsilon(mu, 1e-5) > steinke.epsilon_lower_bound(1000, r, v, 1e-5) > 0


def one_run_games(mu, m, k, games, seed):
    """v of each game: canaries in w.p. ½, observed as N(μ·s_j, 1) (μ-GDP per canary); guess
    "in" for the k largest observations and "out" for the k smallest."""
    rng = np.random.default_rng(seed)
    s = rng.random((games, m)) < 0.5
    x = mu * s + rng.standard_normal((games, m))
    order = np.argsort(-x, axis=1)
    top = np.take_along_axis(s, order[:, :k], axis=1).sum(axis=1)
    bottom = (~np.take_along_axis(s, order[:, m - k:], axis=1)).sum(axis=1)
    return top + bottom


@pytest.mark.parametrize("mu,k", [(1.0, 50), (2.0, 20), (0.5, 250)])
def test_monte_carlo_validity_and_power(mu, k):
    m, games = 1000, 2000
    v = one_run_games(mu, m, k, games, seed=int(mu * 100) + k)
    # Validity: the true μ is rejected (μ_LB > μ) in at most ~5% of the runs.
    rejected = {int(x): fdp.fdp_rejects(m, 2 * k, int(x), mu, 0.05) for x in np.unique(v)}
    rate = np.mean([rejected[int(x)] for x in v])
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / games)
    # The tail bound covers the simulated tail at every observed v.
    for x in np.unique(v)[::3]:
        tail = np.mean(v >= x)
        assert fdp.fdp_p_value(m, 2 * k, int(x), mu) >= tail - 4 * math.sqrt(tail / games)
    # Power: μ/4-GDP is rejected in most runs (the audit is not vacuous).
    weak = {int(x): fdp.fdp_rejects(m, 2 * k, int(x), mu / 4, 0.05) for x in np.unique(v)}
    assert np.mean([weak[int(x)] for x in v]) > 0.5


def test_scores_entry_point_is_bonferroni_corrected():
    rng = np.random.default_rng(0)
    members = rng.random(1000) < 0.5
    scores = members * 1.5 + rng.normal(size=1000)
    single = fdp.fdp_audit_from_scores(scores, members, 100, 1e-5)
    r, v = steinke.guess_counts(scores, members, 100)
    assert (single.r, single.v, single.k) == (r, v, 100)
    assert single.mu == pytest.approx(reference_mu(1000, r, v), abs=1e-7)
    assert single.epsilon == pytest.approx(reference_epsilon(single.mu, 1e-5), abs=2e-3)
    ks = (50, 100, 250)
    several = fdp.fdp_audit_from_scores(scores, members, ks, 1e-5)
    mus = {k: reference_mu(1000, *steinke.guess_counts(scores, members, k), 0.05 / 3)
           for k in ks}
    best = max(mus, key=mus.get)
    assert (several.k, several.ks_tried) == (best, ks)
    assert several.mu == pytest.approx(mus[best], abs=1e-7)
    assert several.mu < mus[best] + 1e-7 and single.mu > mus[100]  # the correction costs
    fields = several.report_fields()
    assert fields["epsilon_lower_bound_fdp"] == several.epsilon
    assert fields["mu_lower_bound_fdp"] == several.mu


def test_docstring_examples_run():
    assert doctest.testmod(fdp).failed == 0
