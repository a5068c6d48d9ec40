"""ε of T Poisson-sampled Gaussian steps under RDP, from a cached one-step RDP curve.

dp_accounting's RdpAccountant composes ``SelfComposed(event, T)`` as T · RDP₁(α) over its
orders α and converts that curve to (ε, δ). RDP₁ (the expensive part: a series per fractional
order, ~70 ms at q ≈ 0.2) depends only on (σ, q), so a training run that reports ε after every
step recomputes it needlessly. Here RDP₁ is computed once per (σ, q) by the same accountant and
cached; ε(T) = dp_accounting's own ``compute_epsilon(orders, T · RDP₁, δ)``, the exact same
arithmetic as the accountant's (which also multiplies the one-step curve by the count), so the
result is identical. tests/test_accounting.py compares it with dp_accounting called directly.
"""

from __future__ import annotations

import functools

import dp_accounting
import numpy as np
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant


@functools.lru_cache(maxsize=256)
def one_step_rdp(noise_multiplier: float, sampling_rate: float,
                 relation: dp_accounting.NeighboringRelation) -> tuple[np.ndarray, np.ndarray] | None:
    """(orders, RDP₁ at those orders) of one Poisson-sampled Gaussian step, or None if this
    dp_accounting version does not expose them (callers then compose the full event)."""
    accountant = rdp.RdpAccountant(neighboring_relation=relation)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)))
    orders, values = getattr(accountant, "_orders", None), getattr(accountant, "_rdp", None)
    if orders is None or values is None:
        return None
    return np.array(orders, copy=True), np.array(values, copy=True)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            relation: dp_accounting.NeighboringRelation) -> float | None:
    """ε after T steps at δ, or None when the one-step curve is unavailable."""
    curve = one_step_rdp(float(noise_multiplier), float(sampling_rate), relation)
    if curve is None:
        return None
    orders, values = curve
    eps, _ = rdp_privacy_accountant.compute_epsilon(orders, steps * values, delta)
    return float(eps)
