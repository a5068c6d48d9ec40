"""Calibration: the σ that meets a target ε, and the number of steps a budget affords.

Both searches solve a monotone equation in ε, which is close to a power law in each parameter:
ε ∝ σ^-s (s between about 1 and 2) and ε ∝ T^a (a between 1/2 and 1). They step along the
local power law (a secant in log-log coordinates), safeguarded by bisection, so they need few
evaluations; for the PLD accountant (about 1 s per evaluation at T = 10^6) they start from the
RDP answer (about 20 ms per evaluation). Every returned value has been evaluated with the
requested accountant, so ε <= target holds exactly (up to dp_accounting's own numerics).

Import these from ``tfdpfair.privacy.accounting``, which re-exports them; they live here to
keep that module small. This module imports only ``limits`` and ``dp_events``, never
``accounting``, so the imports run one way: accounting -> calibration -> dp_events -> limits.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable

from tfdpfair.privacy import limits as lim
from tfdpfair.privacy.dp_events import compute_epsilon


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: lim.AccountantKind = "rdp",
    rel_tol: float = lim.CALIBRATION_REL_TOL,
    progress: lim.Progress | None = None,
) -> float:
    """The σ whose ε after T steps is <= target and >= (1 − rel_tol)·target.

    Solves log ε(σ) = log((1 − rel_tol/2)·target) in log σ (see the module docstring). For
    "pld", the RDP solution σ_R and RDP's local exponent s give the start, and 2-3 PLD
    evaluations usually suffice; σ_R is only a guess, never relied on as a bound (at T = 10^7
    the default-discretised PLD ε can exceed the RDP ε).

    The returned σ is always one at which ε was computed (for PLD: dp_accounting's default
    discretisation) and found <= target, so ε <= target holds exactly, up to dp_accounting's
    own numerics. σ is searched in [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER] = [0.1, 1e4].
    If ε(0.1) is already below (1 − rel_tol)·target, the target is not binding (in practice
    this needs δ not far below q): σ = 0.1 is returned with a NonBindingTargetWarning.

    Args:
      target_epsilon: the budget ε, in (0, MAX_TARGET_EPSILON].
      sampling_rate, steps, delta, accountant: q, T >= 1, δ and the accountant, as in
        compute_epsilon.
      rel_tol: accepted relative shortfall of ε below the target, in (0, 1).
      progress: called with one short line (σ tried, ε, seconds elapsed) per evaluation.

    Raises:
      BudgetUnreachableError: if even σ = MAX_NOISE_MULTIPLIER exceeds the target.
      PrivacyArgumentError: for any invalid argument, before any evaluation.
    """
    target = lim.validate_target_epsilon(target_epsilon)
    q, d = lim.validate_sampling_rate(sampling_rate), lim.validate_delta(delta)
    lim.validate_accountant(accountant)
    steps = lim.validate_steps(steps)
    if steps == 0:
        raise lim.PrivacyArgumentError("steps must be >= 1 to calibrate σ.")
    if not 0.0 < rel_tol < 1.0:
        raise lim.PrivacyArgumentError(f"rel_tol must be in (0, 1), got {rel_tol!r}.")
    setting, start = (q, steps, d), time.perf_counter()
    sigma, slope = 1.0, 1.0
    if accountant == "pld":  # start from RDP's answer and its local exponent s
        try:
            sigma = _solve_sigma(_sigma_evaluator("rdp", setting, target, progress, start),
                                 target, rel_tol, sigma, slope, setting)
        except lim.BudgetUnreachableError:  # RDP is almost always looser; let PLD decide.
            sigma = lim.MAX_NOISE_MULTIPLIER
        slope = _log_slope((0.0, _log(compute_epsilon(sigma, q, steps, d, "rdp"))),
                           (math.log(1.05), _log(compute_epsilon(sigma * 1.05, q, steps, d,
                                                                 "rdp"))), 1.0)
    sigma = _solve_sigma(_sigma_evaluator(accountant, setting, target, progress, start),
                         target, rel_tol, sigma, slope, setting)
    eps = compute_epsilon(sigma, q, steps, d, accountant)
    if eps < (1.0 - rel_tol) * target:
        warnings.warn(
            f"target ε = {target:g} is not binding for q = {q:g}, T = {steps}, δ = {d:g}: even "
            f"the least noise searched, σ = {sigma:g}, gives ε = {eps:.4g}. σ = {sigma:g} is "
            "returned; a smaller target, or a smaller δ, would make the budget meaningful.",
            lim.NonBindingTargetWarning, stacklevel=2)
    return sigma


def _sigma_evaluator(kind: str, setting: tuple[float, int, float], target: float,
                     progress: lim.Progress | None, start: float) -> Callable[[float], float]:
    """σ ↦ ε(σ, q, T, δ) with the ``kind`` accountant, reporting each call to ``progress``."""
    q, steps, delta = setting

    def eps(sigma: float) -> float:
        e = compute_epsilon(sigma, q, steps, delta, kind)
        if progress is not None:
            progress(f"calibrating σ ({kind}): σ = {sigma:.6g} -> ε = {e:.6g} (target "
                     f"{target:g}), {time.perf_counter() - start:.1f} s")
        return e
    return eps


def _solve_sigma(eps: Callable[[float], float], target: float, rel_tol: float, sigma: float,
                 slope: float, setting: tuple[float, int, float]) -> float:
    """Safeguarded secant search in (log σ, log ε); see calibrate_noise_multiplier.

    Returns the first evaluated σ with (1 − rel_tol)·target <= ε(σ) <= target, or
    MIN_NOISE_MULTIPLIER if ε there is <= target (not binding).
    """
    aim = math.log((1.0 - rel_tol / 2.0) * target)
    lo: tuple[float, float] | None = None  # (log σ, log ε) with ε > target
    hi: tuple[float, float] | None = None  # (log σ, log ε) with ε <= target
    best: float | None = None  # the σ of hi, exactly as evaluated
    points: list[tuple[float, float]] = []
    widths: list[float] = []
    for _ in range(_MAX_SEARCH_STEPS):
        e = eps(sigma)
        points.append((math.log(sigma), _log(e)))
        if e > target:
            if sigma >= lim.MAX_NOISE_MULTIPLIER:
                q, steps, delta = setting
                raise lim.BudgetUnreachableError(
                    f"target ε = {target:g} is unreachable for q = {q:g}, T = {steps} steps, "
                    f"δ = {delta:g}: even σ = {lim.MAX_NOISE_MULTIPLIER:g} exceeds it. Train for "
                    "fewer steps, use a smaller batch, or raise the target.")
            lo = points[-1]
        else:
            if e >= (1.0 - rel_tol) * target or sigma <= lim.MIN_NOISE_MULTIPLIER:
                return sigma
            hi, best = points[-1], sigma
        if lo is not None and hi is not None:
            widths.append(hi[0] - lo[0])
            x = _bracketed_step(points, lo, hi, aim, widths)
        else:  # one-sided: follow the local power law ε ∝ σ^-slope, at most ×4 per step.
            if len(points) > 1:
                slope = _log_slope(points[-2], points[-1], slope)
            x = points[-1][0] + _clamp_abs((points[-1][1] - aim) / slope, rel_tol / 4.0,
                                           math.log(4.0))
        sigma = min(lim.MAX_NOISE_MULTIPLIER, max(lim.MIN_NOISE_MULTIPLIER, math.exp(x)))
    if best is None:
        raise lim.BudgetUnreachableError(f"no σ found with ε <= target ε = {target:g}.")
    return best  # ε(best) <= target, but the search did not narrow down to rel_tol.


def max_steps_for_budget(
    target_epsilon: float,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    accountant: lim.AccountantKind = "rdp",
    max_steps: int = lim.MAX_STEPS,
    progress: lim.Progress | None = None,
) -> int:
    """The largest T <= max_steps with ε(σ, q, T, δ) <= target (ε is non-decreasing in T).

    ε(T) is close to a power law T^a (a between 1/2 and 1), so the search steps along it from a
    start (for "pld": the RDP answer and RDP's local exponent a) until it brackets the answer,
    then interpolates in (log T, log ε), safeguarded by bisection, down to a bracket [T, T + 1].
    The returned T has been evaluated with the requested accountant.

    Args:
      progress: called with one short line (T tried, ε, seconds elapsed) per evaluation.

    Raises:
      BudgetUnreachableError: if a single step already exceeds the target.
    """
    target = lim.validate_target_epsilon(target_epsilon)
    sigma = lim.validate_noise_multiplier(noise_multiplier)
    q = lim.validate_sampling_rate(sampling_rate)
    d, upper = lim.validate_delta(delta), lim.validate_steps(max_steps)
    lim.validate_accountant(accountant)
    start = time.perf_counter()

    def eps(steps: int) -> float:
        e = compute_epsilon(sigma, q, steps, d, accountant)
        if progress is not None:
            progress(f"max steps ({accountant}): T = {steps} -> ε = {e:.6g} (target {target:g}), "
                     f"{time.perf_counter() - start:.1f} s")
        return e

    eps1 = eps(1)
    if eps1 > target:
        raise lim.BudgetUnreachableError(
            f"a single step with σ = {sigma:g}, q = {q:g} already spends ε = {eps1:.4g} > target "
            f"{target:g} (δ = {d:g}). Increase σ or decrease the batch size.")
    guess, exponent = 1, 0.5
    if accountant == "pld" and upper > 1:
        guess = max_steps_for_budget(target, sigma, q, d, "rdp", upper)
        if guess < upper:
            exponent = _log_slope((0.0, _log(compute_epsilon(sigma, q, guess, d, "rdp"))),
                                  (math.log(2.0), _log(compute_epsilon(sigma, q, guess * 2,
                                                                       d, "rdp"))), 0.5)
    return _last_fitting_step(eps, target, (1, eps1), guess, upper, exponent)


def _last_fitting_step(eps: Callable[[int], float], target: float, lo: tuple[int, float],
                       steps: int, upper: int, exponent: float) -> int:
    """Largest T in [lo, upper] with eps(T) <= target, starting at ``steps``; lo fits."""
    aim = _log(target)
    hi: tuple[int, float] | None = None
    points: list[tuple[float, float]] = [(math.log(lo[0]), _log(lo[1]))]
    widths: list[float] = []
    for _ in range(_MAX_SEARCH_STEPS):
        if steps != lo[0]:
            e = eps(steps)
            points.append((math.log(steps), _log(e)))
            if e > target:
                hi = (steps, e)
            else:
                lo = (steps, e)
        if hi is not None and hi[0] - lo[0] <= 1:
            return lo[0]
        if hi is None and lo[0] >= upper:
            return upper
        if hi is None:  # ε ∝ T^a: T·(target/ε)^(1/a) (aiming 1% over), at most ×4 per step.
            grow = math.exp(min(math.log(4.0), (aim - _log(lo[1])) / exponent))
            steps = min(upper, max(lo[0] + 1, math.ceil(lo[0] * grow * 1.01)))
        else:
            widths.append(math.log(hi[0]) - math.log(lo[0]))
            x = _bracketed_step(points, (math.log(lo[0]), _log(lo[1])),
                                (math.log(hi[0]), _log(hi[1])), aim, widths)
            steps = min(hi[0] - 1, max(lo[0] + 1, math.floor(math.exp(x))))
    return lo[0]


_MAX_SEARCH_STEPS = 100


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _clamp_abs(x: float, smallest: float, largest: float) -> float:
    """x with |x| clamped to [smallest, largest], sign kept."""
    return math.copysign(min(largest, max(smallest, abs(x))), x)


def _log_slope(a: tuple[float, float], b: tuple[float, float], default: float) -> float:
    """|Δy / Δx| between points a, b (log-log), clamped to [0.5, 4]; ``default`` if undefined."""
    if a[0] == b[0] or not math.isfinite(a[1] - b[1]):
        return default
    return min(4.0, max(0.5, abs((a[1] - b[1]) / (a[0] - b[0]))))


def _bracketed_step(points: list[tuple[float, float]], lo: tuple[float, float],
                    hi: tuple[float, float], aim: float, widths: list[float]) -> float:
    """Next x inside the bracket (lo, hi), in log-log coordinates.

    Where the secant through the last two evaluations hits y = aim, if that is inside the
    bracket; else regula falsi between lo and hi (kept 5% off the ends); bisection if the
    bracket did not halve over the last two steps.
    """
    left, right = min(lo[0], hi[0]), max(lo[0], hi[0])
    if len(widths) >= 3 and abs(widths[-1]) > 0.5 * abs(widths[-3]):
        return (left + right) / 2.0
    (x0, y0), (x1, y1) = points[-2], points[-1]
    if y0 != y1 and math.isfinite(y0 - y1):
        x = x1 + (aim - y1) * (x1 - x0) / (y1 - y0)
        if left < x < right:
            return x
    t = (lo[1] - aim) / (lo[1] - hi[1]) if lo[1] != hi[1] else 0.5
    t = min(0.95, max(0.05, t)) if math.isfinite(t) else 0.5
    return lo[0] + t * (hi[0] - lo[0])
