r"""The one-run audit for Gaussian f-DP (Mahloujifar, Melis & Chaudhuri, ICML 2025, 2410.22235).

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
forces on the event "≥ i correct"; the proof is the paper's.) The paper's theorem: if P[≥ v correct] ≥ τ under a μ-GDP run, then
c_0 + w_0 ≤ r/m (all r guesses, per canary). So c_0 + w_0 > r/m proves P[≥ v correct] < τ:
the claim "μ-GDP" is rejected at level τ. c_i + w_i never decreases as i goes down, and once
w stops growing nothing changes any more, so the loop stops early either way.

* :func:`fdp_p_value`: the smallest τ (bisection) at which the test rejects; P[≥ v correct]
  under any μ-GDP run is below it.
* :func:`fdp_mu_lower_bound`: μ_LB = sup{μ ≥ 0 : rejected at τ = p_threshold} (0.05: 95%).
* :func:`fdp_epsilon_lower_bound`: the ε of μ_LB-GDP at the run's δ, i.e. the ε solving the
  exact Gaussian-DP profile (Dong, Roth & Su 2019, Cor. 2.13; Balle & Wang 2018)

      δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2).

  δ(ε) falls from 2Φ(μ/2) − 1 at ε = 0 to 0 as ε → ∞, so ε = 0 if δ ≥ 2Φ(μ_LB/2) − 1 and
  ε = ∞ for δ = 0 (a Gaussian curve is not (ε, 0)-DP for any finite ε): read μ_LB then.

What it proves. μ_LB is a valid 95% lower bound on μ for any run that is μ-GDP. The ε is the
(ε, δ) of that Gaussian curve: a valid 95% bound on ε(δ) when the run's trade-off curve is
Gaussian (the paper's and jax_privacy's reading; DP-SGD with many steps is close to it by the
central limit theorem). The Steinke, Nasr & Jagielski bound (epsilon_lower_bound.py) assumes
only (ε, δ)-DP. With many correct guesses the f-DP bound is the higher one: it uses the whole
curve rather than one (ε, δ) point, has no 2mδ slack, and the Gaussian shape ties the accuracy
the guesses measure to the small-δ tail that ε(δ) describes (an assumption, not an observation).

>>> round(fdp_mu_lower_bound(m=1000, r=100, v=100), 3)          # all 100 guesses right
1.226
>>> round(fdp_epsilon_lower_bound(m=1000, r=100, v=100, delta=1e-5), 3)  # Steinke: 3.465
5.549
>>> fdp_epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5)   # chance level: nothing
0.0
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


def _inverse_power(x: float, mu: float) -> float:
    """g_μ(x) = Φ(Φ⁻¹(x) − μ): the type I error at which μ-GDP allows power x."""
    if mu == 0.0:
        return x
    return float(special.ndtr(special.ndtri(min(x, 1.0)) - mu))


def fdp_rejects(m: int, r: int, v: int, mu: float, tau: float) -> bool:
    """True when ≥ v correct of r guesses has probability < tau under every μ-GDP run."""
    check_counts(m, r, v, 0.0)
    if mu < 0 or not 0.0 <= tau <= 1.0:
        raise ValueError(f"need mu >= 0 and tau in [0, 1]; got mu={mu}, tau={tau}.")
    if r == 0:
        return False
    total = r / m
    correct, wrong = tau * v / m, tau * (r - v) / m
    for i in range(v - 1, -1, -1):
        if correct + wrong > total:
            return True
        needed = _inverse_power(correct, mu)
        if needed <= wrong:  # w and c stay fixed from here on
            break
        correct += i / (r - i) * (needed - wrong)
        wrong = needed
    return correct + wrong > total


def _bisect(holds: Callable[[float], bool], lo: float, hi: float) -> tuple[float, float]:
    """Shrinks [lo, hi] (holds(lo), not holds(hi)) around the switch of ``holds``."""
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if holds(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def fdp_p_value(m: int, r: int, v: int, mu: float) -> float:
    """Bound on P[≥ v of r guesses correct] under a μ-GDP run: the smallest rejecting τ.

    Returns a τ at which :func:`fdp_rejects` holds (to ~1e-15 above the crossing), or 1.0.
    """
    if not fdp_rejects(m, r, v, mu, 1.0):
        return 1.0
    return _bisect(lambda tau: not fdp_rejects(m, r, v, mu, tau), 0.0, 1.0)[1]


def fdp_mu_lower_bound(m: int, r: int, v: int, p_threshold: float = DEFAULT_P_VALUE) -> float:
    """μ_LB = sup{μ ≥ 0 : "μ-GDP" rejected at level p_threshold} (0 if μ = 0 is not rejected).

    Bisection to ~1e-15 in μ; the returned μ is itself rejected.
    """
    check_counts(m, r, v, 0.0)
    if not 0.0 < p_threshold < 1.0:
        raise ValueError(f"p_threshold must be in (0, 1), got {p_threshold}.")
    if not fdp_rejects(m, r, v, 0.0, p_threshold):
        return 0.0
    lo, hi = 0.0, 1.0
    while fdp_rejects(m, r, v, hi, p_threshold):
        lo, hi = hi, 2.0 * hi
        if hi > _MAX_MU:
            return math.inf
    return _bisect(lambda mu: fdp_rejects(m, r, v, mu, p_threshold), lo, hi)[0]


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
    """One f-DP audit: m canaries, k guesses each way (r = 2k), v correct, μ_LB and its ε."""

    m: int
    k: int
    r: int
    v: int
    delta: float
    mu: float
    epsilon: float
    p_threshold: float
    ks_tried: tuple[int, ...]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def report_fields(self) -> dict:
        """The f-DP entries of audit.json, named apart from the Steinke bound's."""
        return {"epsilon_lower_bound_fdp": self.epsilon, "mu_lower_bound_fdp": self.mu,
                "k_fdp": self.k, "r_fdp": self.r, "v_fdp": self.v}


def fdp_audit_from_scores(scores: Sequence[float], members: Sequence[int],
                          k: int | Sequence[int], delta: float,
                          p_threshold: float = DEFAULT_P_VALUE) -> FdpAuditResult:
    """The f-DP one-run audit of canary ``scores`` (higher = more likely included).

    Guesses and k selection exactly as :func:`epsilon_lower_bound.audit_from_scores`: one k
    fixed in advance, or several, each tested at p_threshold / len(ks) (Bonferroni), keeping
    the largest μ_LB (hence ε) with its k.
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}.")
    ks, kk, r, v, mu = bonferroni_best_k(
        scores, members, k, p_threshold,
        lambda m, r, v, level: fdp_mu_lower_bound(m, r, v, level))
    return FdpAuditResult(m=len(np.asarray(scores)), k=kk, r=r, v=v, delta=float(delta),
                          mu=float(mu), epsilon=float(gdp_epsilon(mu, delta)),
                          p_threshold=float(p_threshold), ks_tried=ks)
