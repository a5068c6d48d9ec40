r"""The one-run f-DP audit (Mahloujifar, Melis & Chaudhuri, ICML 2025, 2410.22235): Gaussian
and (ε, δ) trade-off curves.

Numpy/scipy only, like :mod:`tfdpfair.audit.epsilon_lower_bound` (whose game and guessing rule
it shares): m canaries, each included independently with probability ½; the auditor guesses
"in" / "out" for r of them (k "in" for the top scores, k "out" for the bottom, r = 2k; the other
m − r are abstentions) and v guesses are correct.

Null hypothesis: the run is μ-GDP with respect to adding or removing one canary, i.e. every
test of "canary in" against "canary out" has type II error at least the Gaussian trade-off

    f_μ(α) = Φ(Φ⁻¹(1 − α) − μ)           (α: type I error; Φ the standard normal CDF).

Tail bound (the paper's recursion over the number of correct guesses). Write
g_μ(x) = Φ(Φ⁻¹(x) − μ) for the inverse of the power curve 1 − f_μ(α) = Φ(Φ⁻¹(α) + μ). For a
probability level τ start at i = v with

    c_v = τ·v/m,   w_v = τ·(r − v)/m,

and step down i = v−1, …, 0:

    w_i = max(w_{i+1}, g_μ(c_{i+1})),
    c_i = c_{i+1} + i/(r − i) · (w_i − w_{i+1}).

(Intuition: c_i and w_i are the correct and wrong guesses per canary that P[≥ v correct] ≥ τ
forces on the event "≥ i correct"; the proof is the paper's.) The paper's theorem: if
P[≥ v correct] ≥ τ under a μ-GDP run, then c_0 + w_0 ≤ r/m (all r guesses, per canary). So
c_0 + w_0 > r/m proves P[≥ v correct] < τ: the claim "μ-GDP" is rejected at level τ.
c_i + w_i never decreases as i goes down, and once w stops growing nothing changes any more,
so the loop stops early either way.

* :func:`fdp_p_value`: the smallest τ (bisection) at which the test rejects; P[≥ v correct]
  under any μ-GDP run is below it.
* :func:`fdp_mu_lower_bound`: μ_LB = sup{μ ≥ 0 : rejected at τ = p_threshold} (0.05: 95%).
* :func:`fdp_epsilon_lower_bound`: the ε of μ_LB-GDP at the run's δ, i.e. the ε solving the
  exact Gaussian-DP profile (Dong, Roth & Su 2019, Cor. 2.13; Balle & Wang 2018)

      δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2).

  δ(ε) falls from 2Φ(μ/2) − 1 at ε = 0 to 0 as ε → ∞, so ε = 0 if δ ≥ 2Φ(μ_LB/2) − 1 and
  ε = ∞ for δ = 0 (a Gaussian curve is not (ε, 0)-DP for any finite ε): read μ_LB then.

Any trade-off curve. The theorem holds for every trade-off function f with g(x) =
min{α : 1 − f(α) ≥ x} in place of g_μ (:func:`curve_rejects`). Every (ε, δ)-DP mechanism is
f_{ε,δ}-DP for

    f_{ε,δ}(α) = max(0, 1 − δ − e^ε·α, e^{−ε}·(1 − δ − α)),
    g_{ε,δ}(x) = max(0, e^{−ε}·(x − δ), 1 − δ − e^ε·(1 − x))     (f_{ε,δ} is symmetric),

so the same recursion with g_{ε,δ} tests "(ε, δ)-DP" with no assumption on the curve's shape:

* :func:`eps_delta_p_value`: bound on P[≥ v correct] under any (ε, δ)-DP run.
* :func:`fdp_eps_delta_lower_bound`: ε_LB = sup{ε ≥ 0 : "(ε, δ)-DP" rejected at
  p_threshold}, at the run's δ (g_{ε,δ} falls as ε grows; the rejected ε form an interval
  on every grid tested).

What it proves. μ_LB is a valid 95% lower bound on μ for any run that is μ-GDP. The ε is the
(ε, δ) of that Gaussian curve: a valid 95% bound on ε(δ) when the run's trade-off curve is
Gaussian (the paper's and jax_privacy's reading; DP-SGD with many steps is close to it by the
central limit theorem). The Steinke, Nasr & Jagielski bound (epsilon_lower_bound.py) assumes
only (ε, δ)-DP. With many correct guesses the Gaussian-curve bound is the higher one: it has
no 2mδ slack, and the Gaussian shape ties the accuracy the guesses measure to the small-δ tail
that ε(δ) describes (an assumption, not an observation).

The (ε, δ)-curve ε_LB is, like Steinke's, a 95% lower bound on the run's ε at δ for every
mechanism, so a value above the accountant's ε proves a bug. At δ = 0 it is never above
Steinke's (whose tail P[Bin(r, e^ε/(1+e^ε)) ≥ v] randomised response attains; the recursion
is that tail up to a few per cent); it gains where Steinke's 2mδ slack costs (all guesses
right, or mδ not small): m = 1000, r = 100, δ = 1e-5: v = 100 gives 3.492 against Steinke's
3.465, v = 90 gives 1.614 against 1.626; with δ = 1e-3, v = 90: 1.542 against 0.388.

>>> round(fdp_mu_lower_bound(m=1000, r=100, v=100), 3)          # all 100 guesses right
1.226
>>> round(fdp_epsilon_lower_bound(m=1000, r=100, v=100, delta=1e-5), 3)  # Steinke: 3.465
5.549
>>> fdp_epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5)   # chance level: nothing
0.0
>>> round(fdp_eps_delta_lower_bound(m=1000, r=100, v=100, delta=1e-5), 3)  # any mechanism
3.492
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
from scipy import optimize, special

from tfdpfair.audit.epsilon_lower_bound import (DEFAULT_P_VALUE, bonferroni_best_k,
                                                check_counts)

_BISECTION_STEPS = 60
_MAX_MU = 64.0  # Φ(−32) ≈ 1e-225: past this g_μ ≡ 0 in floating point
_MAX_EPSILON = 100.0  # as epsilon_lower_bound's cap


def _inverse_power(x: float, mu: float) -> float:
    """g_μ(x) = Φ(Φ⁻¹(x) − μ): the type I error at which μ-GDP allows power x."""
    if mu == 0.0:
        return x
    return float(special.ndtr(special.ndtri(min(x, 1.0)) - mu))


def eps_delta_inverse_power(x: float, epsilon: float, delta: float) -> float:
    """g_{ε,δ}(x) = max(0, e^{−ε}(x − δ), 1 − δ − e^ε(1 − x)): the type I error at which
    (ε, δ)-DP allows power x, i.e. the α solving 1 − f_{ε,δ}(α) = x (f_{ε,δ} in the module
    docstring; ε = δ = 0 gives x, up to rounding)."""
    x = min(x, 1.0)
    gap = 1.0 - x  # type II error
    low = math.exp(-epsilon) * (x - delta)
    # 1 − δ − e^ε·gap > 0 only for gap < e^{−ε}(1 − δ) (then e^ε·gap cannot overflow).
    high = (1.0 - delta - math.exp(min(epsilon, 700.0)) * gap
            if gap < math.exp(-epsilon) * (1.0 - delta) else 0.0)
    return max(0.0, low, high)


def curve_rejects(m: int, r: int, v: int, inverse_power: Callable[[float], float],
                  tau: float) -> bool:
    """The paper's test for any trade-off curve f, given by its ``inverse_power``
    g(x) = min{α : 1 − f(α) ≥ x} (non-decreasing): True when ≥ v correct of r guesses has
    probability < tau under every f-DP run (recursion in the module docstring)."""
    check_counts(m, r, v, 0.0)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"need tau in [0, 1]; got tau={tau}.")
    if r == 0:
        return False
    total = r / m
    correct, wrong = tau * v / m, tau * (r - v) / m
    for i in range(v - 1, -1, -1):
        if correct + wrong > total:
            return True
        needed = inverse_power(correct)
        if needed <= wrong:  # w and c stay fixed from here on
            break
        correct += i / (r - i) * (needed - wrong)
        wrong = needed
    return correct + wrong > total


def fdp_rejects(m: int, r: int, v: int, mu: float, tau: float) -> bool:
    """True when ≥ v correct of r guesses has probability < tau under every μ-GDP run."""
    if mu < 0 or not 0.0 <= tau <= 1.0:
        raise ValueError(f"need mu >= 0 and tau in [0, 1]; got mu={mu}, tau={tau}.")
    return curve_rejects(m, r, v, lambda x: _inverse_power(x, mu), tau)


def eps_delta_rejects(m: int, r: int, v: int, epsilon: float, delta: float,
                      tau: float) -> bool:
    """True when ≥ v correct of r guesses has probability < tau under every (ε, δ)-DP run."""
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1]; got epsilon={epsilon}, "
                         f"delta={delta}.")
    return curve_rejects(m, r, v, lambda x: eps_delta_inverse_power(x, epsilon, delta), tau)


def _bisect(holds: Callable[[float], bool], lo: float, hi: float) -> tuple[float, float]:
    """Shrinks [lo, hi] (holds(lo), not holds(hi)) around the switch of ``holds``."""
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if holds(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def _smallest_rejecting_tau(rejects: Callable[[float], bool]) -> float:
    """The smallest τ with rejects(τ) (to ~1e-15 above the crossing), or 1.0."""
    if not rejects(1.0):
        return 1.0
    return _bisect(lambda tau: not rejects(tau), 0.0, 1.0)[1]


def _sup_rejected(rejects: Callable[[float], bool], cap: float) -> float:
    """sup{x ≥ 0 : rejects(x)} for a claim that gets weaker as x grows: 0 if x = 0 is not
    rejected, ∞ once x = cap still is; otherwise bisection, the returned x itself rejected."""
    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):
        lo, hi = hi, 2.0 * hi
        if hi > cap:
            return math.inf
    return _bisect(rejects, lo, hi)[0]


def _check_threshold(p_threshold: float) -> None:
    if not 0.0 < p_threshold < 1.0:
        raise ValueError(f"p_threshold must be in (0, 1), got {p_threshold}.")


def fdp_p_value(m: int, r: int, v: int, mu: float) -> float:
    """Bound on P[≥ v of r guesses correct] under a μ-GDP run: the smallest rejecting τ.

    Returns a τ at which :func:`fdp_rejects` holds (to ~1e-15 above the crossing), or 1.0.
    """
    return _smallest_rejecting_tau(lambda tau: fdp_rejects(m, r, v, mu, tau))


def fdp_mu_lower_bound(m: int, r: int, v: int, p_threshold: float = DEFAULT_P_VALUE) -> float:
    """μ_LB = sup{μ ≥ 0 : "μ-GDP" rejected at level p_threshold} (0 if μ = 0 is not rejected).

    Bisection to ~1e-15 in μ; the returned μ is itself rejected.
    """
    check_counts(m, r, v, 0.0)
    _check_threshold(p_threshold)
    return _sup_rejected(lambda mu: fdp_rejects(m, r, v, mu, p_threshold), _MAX_MU)


def eps_delta_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Bound on P[≥ v of r guesses correct] under ANY (ε, δ)-DP run: the smallest τ at which
    :func:`eps_delta_rejects` holds, or 1.0."""
    return _smallest_rejecting_tau(lambda tau: eps_delta_rejects(m, r, v, epsilon, delta, tau))


def fdp_eps_delta_lower_bound(m: int, r: int, v: int, delta: float,
                              p_threshold: float = DEFAULT_P_VALUE) -> float:
    """ε_LB = sup{ε ≥ 0 : "(ε, δ)-DP" rejected at level p_threshold} by the f-DP test with
    the (ε, δ) curve: valid for every mechanism, like the Steinke bound (module docstring).

    0 if ε = 0 is not rejected; bisection to ~1e-13 in ε, the returned ε itself rejected.
    """
    check_counts(m, r, v, delta)
    _check_threshold(p_threshold)
    return _sup_rejected(lambda eps: eps_delta_rejects(m, r, v, eps, delta, p_threshold),
                         _MAX_EPSILON)


def _gdp_log_delta(epsilon: float, mu: float) -> float:
    """log δ(ε) of μ-GDP (module docstring), stable for δ down to ~1e-300; −inf for δ = 0."""
    log_a = float(special.log_ndtr(-epsilon / mu + mu / 2))
    t = epsilon + float(special.log_ndtr(-epsilon / mu - mu / 2)) - log_a  # log(e^ε Φ(b)/Φ(a))
    return -math.inf if t >= 0 else log_a + math.log1p(-math.exp(t))


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (0 for μ = 0)."""
    return 0.0 if mu == 0.0 else math.exp(_gdp_log_delta(epsilon, mu))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which μ-GDP is (ε, δ)-DP: the root of δ(ε) = delta (0 or ∞ at the ends)."""
    if mu < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need mu >= 0 and delta in [0, 1]; got mu={mu}, delta={delta}.")
    if mu == 0.0 or delta >= gdp_delta(0.0, mu):
        return 0.0
    if delta == 0.0 or math.isinf(mu):
        return math.inf
    log_delta = math.log(delta)
    hi = 1.0
    while _gdp_log_delta(hi, mu) > log_delta:
        hi *= 2.0
    return float(optimize.brentq(lambda eps: _gdp_log_delta(eps, mu) - log_delta, 0.0, hi,
                                 xtol=1e-12, rtol=1e-12))


def fdp_epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                            p_threshold: float = DEFAULT_P_VALUE) -> float:
    """ε at δ of the Gaussian curve μ_LB (module docstring): gdp_epsilon(μ_LB, δ)."""
    check_counts(m, r, v, delta)
    return gdp_epsilon(fdp_mu_lower_bound(m, r, v, p_threshold), delta)


@dataclasses.dataclass(frozen=True)
class FdpAuditResult:
    """One f-DP audit: m canaries, k guesses each way (r = 2k), v correct, μ_LB and its ε;
    and, with its own best k, the ε_LB of the (ε, δ)-curve test (``*_eps_delta``)."""

    m: int
    k: int
    r: int
    v: int
    delta: float
    mu: float
    epsilon: float
    p_threshold: float
    ks_tried: tuple[int, ...]
    epsilon_eps_delta: float
    k_eps_delta: int
    r_eps_delta: int
    v_eps_delta: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def report_fields(self) -> dict:
        """The f-DP entries of audit.json, named apart from the Steinke bound's."""
        return {"epsilon_lower_bound_fdp": self.epsilon, "mu_lower_bound_fdp": self.mu,
                "k_fdp": self.k, "r_fdp": self.r, "v_fdp": self.v,
                "epsilon_lower_bound_fdp_eps_delta": self.epsilon_eps_delta,
                "k_fdp_eps_delta": self.k_eps_delta, "r_fdp_eps_delta": self.r_eps_delta,
                "v_fdp_eps_delta": self.v_eps_delta}


def fdp_audit_from_scores(scores: Sequence[float], members: Sequence[int],
                          k: int | Sequence[int], delta: float,
                          p_threshold: float = DEFAULT_P_VALUE) -> FdpAuditResult:
    """The f-DP one-run audits of canary ``scores`` (higher = more likely included): the
    Gaussian curve (μ_LB and its ε) and the (ε, δ) curve (ε_LB valid for every mechanism).

    Guesses and k selection exactly as :func:`epsilon_lower_bound.audit_from_scores`: one k
    fixed in advance, or several, each tested at p_threshold / len(ks) (Bonferroni); each
    test keeps its own best k (the largest μ_LB, resp. ε_LB).
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}.")
    ks, kk, r, v, mu = bonferroni_best_k(
        scores, members, k, p_threshold,
        lambda m, r, v, level: fdp_mu_lower_bound(m, r, v, level))
    _, k_ed, r_ed, v_ed, eps_ed = bonferroni_best_k(
        scores, members, k, p_threshold,
        lambda m, r, v, level: fdp_eps_delta_lower_bound(m, r, v, delta, level))
    return FdpAuditResult(m=len(np.asarray(scores)), k=kk, r=r, v=v, delta=float(delta),
                          mu=float(mu), epsilon=float(gdp_epsilon(mu, delta)),
                          p_threshold=float(p_threshold), ks_tried=ks,
                          epsilon_eps_delta=float(eps_ed), k_eps_delta=k_ed, r_eps_delta=r_ed,
                          v_eps_delta=v_ed)
