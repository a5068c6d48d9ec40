"""Independent references for the f-DP one-run audit (Mahloujifar, Melis & Chaudhuri 2025):
the paper's recursion written out with full arrays and the stdlib normal distribution, its root
in μ by scipy.optimize.brentq, and the Gaussian mechanism's ε from dp_accounting's PLD. Used by
tests/test_audit_fdp_lower_bound.py and tests/test_audit_report.py."""

import statistics

from dp_accounting.pld import privacy_loss_distribution
from scipy import optimize

NORMAL = statistics.NormalDist()


def paper_objective(m, r, v, mu, tau):
    """c_0 + w_0 − r/m from the paper's arrays c[0..v], w[0..v] (no early exit); > 0 rejects."""
    c, w = [0.0] * (v + 1), [0.0] * (v + 1)
    c[v], w[v] = tau * v / m, tau * (r - v) / m
    for i in reversed(range(v)):
        x = min(c[i + 1], 1.0)
        power_inv = 0.0 if x <= 0 else (1.0 if x >= 1 else
                                        NORMAL.cdf(NORMAL.inv_cdf(x) - mu))
        w[i] = max(w[i + 1], power_inv)
        c[i] = c[i + 1] + i / (r - i) * (w[i] - w[i + 1])
    return c[0] + w[0] - r / m


def reference_mu(m, r, v, tau=0.05):
    """Root in μ of the paper's objective (brentq), 0 if μ = 0 is not rejected."""
    if paper_objective(m, r, v, 0.0, tau) <= 0:
        return 0.0
    return optimize.brentq(lambda mu: paper_objective(m, r, v, mu, tau), 0.0, 40.0,
                           xtol=1e-10)


def reference_epsilon(mu, delta):
    """ε of the Gaussian mechanism with σ = 1/μ at δ, from dp_accounting's PLD."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1 / mu, sensitivity=1.0, value_discretization_interval=1e-4)
    return pld.get_epsilon_for_delta(delta)
