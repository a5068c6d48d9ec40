"""The privacy plan's limits, errors and argument checks, shared by accounting and calibration.

``accounting`` (the plan), ``calibration`` (the searches) and ``dp_events`` (ε) all import this
module, which imports nothing from tfdpfair, so the imports run one way:
accounting -> calibration -> dp_events -> limits. Import these names from
``tfdpfair.privacy.accounting``, which re-exports them.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Literal

AccountantKind = Literal["rdp", "pld"]
Progress = Callable[[str], None]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
MIN_NOISE_MULTIPLIER = 0.1  # smallest σ calibration searches; see calibrate_noise_multiplier.
MAX_NOISE_MULTIPLIER = 1e4  # beyond this, a target ε is treated as unreachable.
MAX_TARGET_EPSILON = 100.0  # larger targets are rejected: e^100 bounds nothing.
CALIBRATION_REL_TOL = 0.01
MAX_STEPS = 10**9


class PrivacyArgumentError(ValueError):
    """Raised for an accounting input that has no valid meaning (q > 1, σ <= 0, ...)."""


class BudgetUnreachableError(PrivacyArgumentError):
    """Raised when no setting of the searched parameter meets the target ε."""


class WeakDeltaWarning(UserWarning):
    """δ is at least 1/N, which is too large to rule out leaking one whole record."""


class NonBindingTargetWarning(UserWarning):
    """The target ε does not constrain the run: the least noise searched already stays below."""


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PrivacyArgumentError(f"{name} must be a number, got {value!r}.")
    return float(value)


def validate_sampling_rate(sampling_rate: float) -> float:
    """Checks 0 < q <= 1 and returns q as a float."""
    q = _real("sampling rate q", sampling_rate)
    if not 0.0 < q <= 1.0:
        raise PrivacyArgumentError(
            f"sampling rate q = expected batch size / number of examples must be in (0, 1], "
            f"got {q:g}. Use an expected batch size between 1 and the dataset size.")
    return q


def validate_noise_multiplier(noise_multiplier: float) -> float:
    """Checks σ > 0 (finite) and returns σ as a float."""
    sigma = _real("noise multiplier σ", noise_multiplier)
    if not (sigma > 0.0 and math.isfinite(sigma)):
        raise PrivacyArgumentError(
            f"noise multiplier σ must be a finite number > 0, got {noise_multiplier!r}. "
            "σ = 0 means no noise and no privacy; train without DP instead if that is intended.")
    return sigma


def validate_steps(steps: int) -> int:
    """Checks T is a non-negative integer (an integral float such as 1e4 is accepted)."""
    t = _real("steps", steps)
    if not (math.isfinite(t) and t == int(t) and t >= 0):
        raise PrivacyArgumentError(f"steps must be a non-negative integer, got {steps!r}.")
    return int(t)


def validate_delta(delta: float) -> float:
    """Checks 0 < δ < 1."""
    d = _real("δ", delta)
    if not 0.0 < d < 1.0:
        raise PrivacyArgumentError(
            f"δ must be in (0, 1), got {delta!r}. Leave it unset for the default N^-1.1, or "
            "pick a value well below 1/N for N training examples.")
    return d


def validate_num_examples(num_examples: int) -> int:
    """Checks N is an integer >= 1."""
    n = _real("num_examples", num_examples)
    if not (math.isfinite(n) and n == int(n) and n >= 1):
        raise PrivacyArgumentError(
            f"num_examples (N, the number of private training examples) must be an integer "
            f">= 1, got {num_examples!r}.")
    return int(n)


def validate_accountant(accountant: str) -> str:
    """Checks the accountant name is one of ACCOUNTANTS."""
    if accountant not in ACCOUNTANTS:
        raise PrivacyArgumentError(
            f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}: 'rdp' (what the "
            "papers reproduced here used) or 'pld' (tighter, slower).")
    return accountant


def validate_target_epsilon(target_epsilon: float) -> float:
    """Checks 0 < target ε <= MAX_TARGET_EPSILON.

    A target above 100 is rejected rather than warned about: the guarantee bounds any
    membership test's true-positive rate by e^ε times its false-positive rate, and
    e^100 ≈ 2.7e43 bounds nothing. A target ε <= 0 needs infinite noise (unreachable).
    """
    t = _real("target ε", target_epsilon)
    if not math.isfinite(t):
        raise PrivacyArgumentError(
            f"target ε must be a finite number > 0, got {target_epsilon!r}.")
    if t <= 0:
        raise BudgetUnreachableError(
            f"target ε must be > 0 (ε = 0 would need infinite noise), got {target_epsilon!r}.")
    if t > MAX_TARGET_EPSILON:
        raise PrivacyArgumentError(
            f"target ε = {t:g} exceeds {MAX_TARGET_EPSILON:g}: such an ε gives no meaningful "
            f"protection (a membership test may have e^ε ≈ {_exp_text(t)} times more true than "
            "false positives). Use a target of at most about 10, or omit DP if no protection "
            "is intended.")
    return t


def _exp_text(x: float) -> str:
    return f"{math.exp(x):.3g}" if x < 700 else f"e^{x:g}"
