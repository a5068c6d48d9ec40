"""Independent references for the f-DP one-run audit (Mahloujifar, Melis & Chaudhuri 2025):
the paper's recursion written out with full arrays (the Gaussian curve with the stdlib normal
distribution, the (ε, δ) curve from its trade-off function), its roots by
scipy.optimize.brentq, and the Gaussian mechanism's ε from dp_accounting's PLD. Used by
tests/test_audit_fdp_lower_bound.py, tests/test_audit_fdp_eps_delta.py and
tests/test_audit_report.py."""

import math
import statistics

from dp_accounting.pld import privacy_loss_distribution
from scipy import optimize

NORMAL = statistics.NormalDist()


def curve_objective(m, r, v, inverse_power, tau):
    """c_0 + w_0 − r/m from the paper's arrays c[0..v], w[0..v] (no early exit) for the curve
    whose inverse power is ``inverse_power``; > 0 rejects."""
    c, w = [0.0] * (v + 1), [0.0] * (v + 1)
    c[v], w[v] = tau * v / m, tau * (r - v) / m
    for i in reversed(range(v)):
        w[i] = max(w[i + 1], inverse_power(min(c[i + 1], 1.0)))
        c[i] = c[i + 1] + i / (r - i) * (w[i] - w[i + 1])
    return c[0] + w[0] - r / m


def paper_objective(m, r, v, mu, tau):
    """curve_objective of the Gaussian curve, g_μ(x) = Φ(Φ⁻¹(x) − μ) (stdlib normal)."""
    def power_inv(x):
        return 0.0 if x <= 0 else (1.0 if x >= 1 else NORMAL.cdf(NORMAL.inv_cdf(x) - mu))
    return curve_objective(m, r, v, power_inv, tau)


def eps_delta_tradeoff(alpha, eps, delta):
    """f_{ε,δ}(α) = max(0, 1 − δ − e^ε α, e^{−ε}(1 − δ − α)), the (ε, δ)-DP trade-off curve."""
    return max(0.0, 1 - delta - math.exp(eps) * alpha, math.exp(-eps) * (1 - delta - alpha))


def eps_delta_objective(m, r, v, eps, delta, tau):
    """curve_objective of f_{ε,δ}: its inverse power is f_{ε,δ}(1 − x) (f_{ε,δ} symmetric)."""
    return curve_objective(m, r, v, lambda x: eps_delta_tradeoff(1 - x, eps, delta), tau)


def reference_eps_delta_bound(m, r, v, delta, tau=0.05):
    """Root in ε of eps_delta_objective (brentq), 0 if ε = 0 is not rejected."""
    if eps_delta_objective(m, r, v, 0.0, delta, tau) <= 0:
        return 0.0
    return optimize.brentq(lambda e: eps_delta_objective(m, r, v, e, delta, tau), 0.0, 50.0,
                           xtol=1e-10)


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
