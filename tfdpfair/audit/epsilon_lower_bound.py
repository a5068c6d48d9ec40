"""The one-run audit's ε lower bound (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846, App. D).

Numpy/scipy only: this module takes canary scores and membership bits, never a model.

Set-up. m canaries; each is included in the training run independently with probability 1/2
(bit S_j). After training the auditor makes r ≤ m guesses T_j ∈ {in, out} (abstaining on the
other m − r canaries) and v of them are correct. If the training algorithm is (ε, δ)-DP with
respect to adding or removing one canary, then for every v

    P[v correct] ≤ p(ε),   p(ε) = min(1, β + 2·m·δ·α),
    q = e^ε / (1 + e^ε),                       (accuracy of ε-DP randomised response)
    β = P[Bin(r, q) ≥ v],
    α = max_{i = 1..v} (P[Bin(r, q) ≥ v − i] − β) / i.

p(ε) is non-decreasing in ε, so the audit rejects "the run is ε-DP" at level p_threshold
(0.05: 95% confidence) for every ε below

    ε_LB = sup { ε ≥ 0 : p(ε) < p_threshold },

found by bisection; ε_LB = 0 when not even ε = 0 is rejected. ε is in nats, δ a probability.

Choosing the guesses. Guess "in" for the k highest scores and "out" for the k lowest (r = 2k;
abstaining on the middle is what makes few, confident guesses count). The theorem holds for a
guessing rule fixed before the scores are seen. The paper's experiments show results for
several numbers of guesses; a bound that keeps the best of several k after seeing the scores is
not a valid 95% bound as it stands. :func:`audit_from_scores` therefore uses one k given in
advance, or, when several are given, tests each at level p_threshold / len(ks) (Bonferroni) and
keeps the largest bound, which is valid at the stated level.

>>> round(epsilon_lower_bound(m=1000, r=100, v=100, delta=0.0), 3)   # all 100 guesses right
3.493
>>> epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5)             # chance level: nothing
0.0
>>> result = audit_from_scores([5.0, 4.0, 0.1, 0.0], [1, 1, 0, 0], k=2, delta=0.0)
>>> (result.r, result.v, round(result.epsilon, 3))
(4, 4, 0.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
from scipy import special, stats

DEFAULT_P_VALUE = 0.05  # 95% confidence
_BISECTION_STEPS = 60
_MAX_EPSILON = 100.0


def check_counts(m: int, r: int, v: int, delta: float) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m (v correct of r guesses among m canaries); "
                         f"got m={m}, r={r}, v={v}.")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}.")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """p(ε): bound on P[≥ v of r guesses correct] if the run is (ε, δ)-DP (module docstring)."""
    check_counts(m, r, v, delta)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    alpha = 0.0
    if v > 0 and delta > 0:
        # P[Bin >= v - i] - β = P[v - i <= Bin < v] for i = 1..v.
        between = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(between / np.arange(1, v + 1)))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                        p_threshold: float = DEFAULT_P_VALUE) -> float:
    """ε_LB = sup{ε ≥ 0 : p(ε) < p_threshold}, by bisection to ~1e-12 (0 if p(0) ≥ threshold)."""
    check_counts(m, r, v, delta)
    if not 0.0 < p_threshold < 1.0:
        raise ValueError(f"p_threshold must be in (0, 1), got {p_threshold}.")
    if p_value(m, r, v, 0.0, delta) >= p_threshold:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p_threshold:  # p(ε) -> 1 as ε grows (unless r = 0)
        lo, hi = hi, 2.0 * hi
        if hi > _MAX_EPSILON:
            return math.inf
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < p_threshold:
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """One audit: m canaries, k guesses each way (r = 2k made), v correct, bound ε_LB."""

    m: int
    k: int
    r: int
    v: int
    delta: float
    epsilon: float
    p_threshold: float
    ks_tried: tuple[int, ...]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def guess_counts(scores: Sequence[float], members: Sequence[int], k: int) -> tuple[int, int]:
    """(r, v): guess "in" for the k highest scores, "out" for the k lowest; count correct.

    Ties in the score are broken by canary index (stable sort), which does not look at the
    membership bits, so the rule stays fixed in advance.
    """
    s = np.asarray(scores, float)
    b = np.asarray(members).astype(bool)
    if s.shape != b.shape or s.ndim != 1:
        raise ValueError(f"scores and members must be 1-D of equal length; got {s.shape}, "
                         f"{b.shape}.")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN.")
    if not 0 <= 2 * k <= len(s):
        raise ValueError(f"k must be in [0, m/2] = [0, {len(s) // 2}], got {k}.")
    order = np.argsort(-s, kind="stable")
    top, bottom = order[:k], order[len(s) - k:]
    return 2 * k, int(b[top].sum() + (~b[bottom]).sum())


def bonferroni_best_k(scores: Sequence[float], members: Sequence[int], k: int | Sequence[int],
                      p_threshold: float, bound: Callable[[int, int, int, float], float]
                      ) -> tuple[tuple[int, ...], int, int, int, float]:
    """Runs ``bound(m, r, v, level)`` for each k at level = p_threshold / len(ks) (Bonferroni).

    Returns (ks, best k, its r, its v, the largest bound); ties keep the first k.
    """
    ks = (k,) if isinstance(k, (int, np.integer)) else tuple(int(x) for x in k)
    if not ks:
        raise ValueError("give at least one k.")
    m = len(np.asarray(scores))
    level = p_threshold / len(ks)
    best = None
    for kk in ks:
        r, v = guess_counts(scores, members, kk)
        value = bound(m, r, v, level)
        if best is None or value > best[3]:
            best = (kk, r, v, value)
    return (ks, *best)


def audit_from_scores(scores: Sequence[float], members: Sequence[int], k: int | Sequence[int],
                      delta: float, p_threshold: float = DEFAULT_P_VALUE) -> AuditResult:
    """The one-run audit of canary ``scores`` (higher = more likely included) and ``members``.

    ``k`` fixed before looking at the scores: one int. Several ks: each is tested at
    p_threshold / len(ks) (Bonferroni) and the largest bound is returned, with its k.
    """
    ks, kk, r, v, eps = bonferroni_best_k(
        scores, members, k, p_threshold,
        lambda m, r, v, level: epsilon_lower_bound(m, r, v, delta, level))
    return AuditResult(m=len(np.asarray(scores)), k=kk, r=r, v=v, delta=float(delta),
                       epsilon=float(eps), p_threshold=float(p_threshold), ks_tried=ks)
