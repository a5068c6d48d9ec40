"""Privacy accounting for Poisson-sampled Gaussian DP-SGD, on top of dp_accounting.

The mechanism accounted for is exactly the one tfdpfair runs (privacy/sampling.py and
privacy/dp_sgd.py): T logical steps; at each step every one of the N training examples joins
the batch independently with probability q (Poisson sampling); the sum of per-example gradients
clipped to L2 norm C receives Gaussian noise N(0, σ²C²) per coordinate. In dp_accounting terms
this is ``SelfComposed(PoissonSampled(q, Gaussian(σ)), T)``, with add-or-remove-one adjacency
(datasets differ by the presence of one example), which is what Poisson sampling's
amplification bound is stated for.

Two accountants are offered:
  * ``"rdp"``: Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019), converted to (ε, δ). The
    papers we reproduce calibrated their runs with RDP.
  * ``"pld"``: privacy loss distributions (Koskela et al.; Doroshenko et al. 2022): tighter,
    i.e. a smaller ε for the same run, and slower.

Units: ε is in nats (the usual convention), δ is a probability, q = expected batch / N is a
probability, σ is the noise multiplier (noise std divided by C), T counts logical steps (one
noise draw each), never micro-batches.
"""

from __future__ import annotations

import dataclasses
import contextlib
import functools
import logging
import math
import warnings
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

AccountantKind = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
PLD_DISCRETIZATION = 1e-4  # dp_accounting's default value discretisation for PLDs.
MAX_NOISE_MULTIPLIER = 1e4  # beyond this, a target ε is treated as unreachable.
MAX_STEPS = 10**9


class PrivacyArgumentError(ValueError):
    """Raised for an accounting input that has no valid meaning (q > 1, σ <= 0, ...)."""


class BudgetUnreachableError(PrivacyArgumentError):
    """Raised when no setting of the searched parameter meets the target ε."""


class WeakDeltaWarning(UserWarning):
    """δ is at least 1/N, which is too large to rule out leaking one whole record."""


def validate_sampling_rate(sampling_rate: float) -> float:
    """Checks 0 < q <= 1 and returns q as a float."""
    q = float(sampling_rate)
    if not 0.0 < q <= 1.0:
        raise PrivacyArgumentError(
            f"sampling rate q = expected batch size / number of examples must be in (0, 1], "
            f"got {q:g}. Use an expected batch size between 1 and the dataset size.")
    return q


def validate_noise_multiplier(noise_multiplier: float) -> float:
    """Checks σ > 0 and returns σ as a float."""
    sigma = float(noise_multiplier)
    if not (sigma > 0.0 and math.isfinite(sigma)):
        raise PrivacyArgumentError(
            f"noise multiplier σ must be a finite number > 0, got {noise_multiplier!r}. "
            "σ = 0 means no noise and no privacy; train without DP instead if that is intended.")
    return sigma


def validate_steps(steps: int) -> int:
    """Checks steps is a non-negative integer."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise PrivacyArgumentError(f"steps must be a non-negative integer, got {steps!r}.")
    return int(steps)


def validate_delta(delta: float) -> float:
    """Checks 0 < δ < 1."""
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise PrivacyArgumentError(
            f"δ must be in (0, 1), got {delta!r}. A common choice is well below 1/N, "
            "for N training examples.")
    return d


def resolve_delta(num_examples: int, delta: float | None = None) -> float:
    """δ to use for a dataset of N examples: 1/N when not given; warns when δ >= 1/N.

    Why the warning: the mechanism "publish one uniformly random training record in the clear"
    is (0, 1/N)-DP, so a guarantee with δ >= 1/N cannot exclude that kind of leak. δ = 1/N is
    nevertheless the convention of the medical-imaging DP papers tfdpfair reproduces.
    """
    if int(num_examples) != num_examples or num_examples < 1:
        raise PrivacyArgumentError(f"num_examples must be a positive integer, got {num_examples!r}.")
    d = 1.0 / num_examples if delta is None else validate_delta(delta)
    if d >= 1.0 / num_examples:
        warnings.warn(
            f"δ = {d:.3g} is >= 1/N = {1.0 / num_examples:.3g}. A mechanism that releases one "
            "random training example in full already satisfies (0, 1/N)-DP, so this δ cannot "
            "rule out leaking a whole record. Prefer δ well below 1/N (e.g. 1/(10·N)) if the "
            "budget allows; δ = 1/N is only the convention of the papers reproduced here.",
            WeakDeltaWarning, stacklevel=2)
    return d


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of T Poisson-sampled Gaussian steps: SelfComposed(PoissonSampled(q, N(σ)), T)."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            validate_sampling_rate(sampling_rate),
            dp_accounting.GaussianDpEvent(validate_noise_multiplier(noise_multiplier))),
        validate_steps(steps))


def make_accountant(accountant: AccountantKind = "rdp") -> dp_accounting.PrivacyAccountant:
    """A fresh dp_accounting accountant (add-or-remove-one adjacency) of the named kind."""
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=NEIGHBORING_RELATION)
    if accountant == "pld":
        return pld.PLDAccountant(
            neighboring_relation=NEIGHBORING_RELATION,
            value_discretization_interval=PLD_DISCRETIZATION)
    raise PrivacyArgumentError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")


@functools.lru_cache(maxsize=4096)
def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = "rdp",
) -> float:
    """ε(σ, q, T, δ) of Poisson-sampled Gaussian DP-SGD; 0 for T = 0.

    Args:
      noise_multiplier: σ, noise std per coordinate divided by the clipping norm C.
      sampling_rate: q, the probability that one example joins one logical step.
      steps: T, the number of logical steps (noise draws) that touched the data.
      delta: δ in (0, 1).
      accountant: "rdp" or "pld".
    """
    event = dp_sgd_event(noise_multiplier, sampling_rate, steps)
    delta = validate_delta(delta)
    if event.count == 0:
        return 0.0
    acc = make_accountant(accountant)
    with _quiet_rdp_order_warnings():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = "rdp",
    rel_tol: float = 0.01,
) -> float:
    """The σ whose ε after T steps is <= target and >= (1 − rel_tol)·target.

    Bisection on log σ over a bracket [σ_lo, σ_hi] with ε(σ_lo) > target >= ε(σ_hi); ε is
    decreasing in σ. The upper end is always returned, so the guarantee ε <= target holds
    exactly (up to the accountant's own numerics), never approximately.

    Raises:
      BudgetUnreachableError: if even σ = MAX_NOISE_MULTIPLIER exceeds the target.
    """
    _check_target_epsilon(target_epsilon)
    steps = validate_steps(steps)
    if steps == 0:
        raise PrivacyArgumentError("steps must be >= 1 to calibrate σ.")
    eps = functools.partial(_epsilon_of_sigma, sampling_rate=sampling_rate, steps=steps,
                            delta=delta, accountant=accountant)
    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > MAX_NOISE_MULTIPLIER:
            raise BudgetUnreachableError(
                f"target ε = {target_epsilon:g} is unreachable for q = {sampling_rate:g}, "
                f"T = {steps} steps, δ = {delta:g}: even σ = {MAX_NOISE_MULTIPLIER:g} exceeds "
                "it. Train for fewer steps, use a smaller batch, or raise the target.")
    lo = hi / 2.0
    while eps(lo) <= target_epsilon and lo > 1e-3:
        hi, lo = lo, lo / 2.0
    for _ in range(100):
        if eps(hi) >= (1.0 - rel_tol) * target_epsilon:
            break
        mid = math.sqrt(lo * hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def max_steps_for_budget(
    target_epsilon: float,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    accountant: AccountantKind = "rdp",
) -> int:
    """The largest T with ε(σ, q, T, δ) <= target (ε is non-decreasing in T).

    Raises:
      BudgetUnreachableError: if a single step already exceeds the target.
    """
    _check_target_epsilon(target_epsilon)

    def fits(steps: int) -> bool:
        return compute_epsilon(noise_multiplier, sampling_rate, steps, delta,
                               accountant) <= target_epsilon

    if not fits(1):
        eps1 = compute_epsilon(noise_multiplier, sampling_rate, 1, delta, accountant)
        raise BudgetUnreachableError(
            f"a single step with σ = {noise_multiplier:g}, q = {sampling_rate:g} already spends "
            f"ε = {eps1:.4g} > target {target_epsilon:g} (δ = {delta:g}). Increase σ or "
            "decrease the batch size.")
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_STEPS:
            return MAX_STEPS
    while hi - lo > 1:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def steps_for_epochs(epochs: float, num_examples: int, expected_batch_size: float) -> int:
    """T = ceil(epochs · N / B): logical steps such that, in expectation, each example is seen
    ``epochs`` times."""
    if not epochs > 0:
        raise PrivacyArgumentError(f"epochs must be > 0, got {epochs!r}.")
    return int(math.ceil(epochs * num_examples / expected_batch_size - 1e-9))


def sampling_rate_for(expected_batch_size: float, num_examples: int) -> float:
    """q = B / N, validated to lie in (0, 1]."""
    if not num_examples >= 1:
        raise PrivacyArgumentError(f"num_examples must be >= 1, got {num_examples!r}.")
    if not expected_batch_size > 0:
        raise PrivacyArgumentError(f"expected batch size must be > 0, got {expected_batch_size!r}.")
    q = expected_batch_size / num_examples
    if q > 1.0:
        raise PrivacyArgumentError(
            f"expected batch size {expected_batch_size:g} exceeds the number of examples "
            f"{num_examples}: the sampling rate q = B/N = {q:.3g} would be > 1.")
    return validate_sampling_rate(q)


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """Everything needed to account a DP-SGD run, fixed before the run touches data.

    Attributes:
      num_examples: N, the size of the private training set.
      expected_batch_size: B = q·N, the expected logical batch size.
      noise_multiplier: σ.
      steps: T, the planned number of logical steps.
      delta: δ.
      accountant: "rdp" or "pld".
      target_epsilon: the budget, if one was set; T never exceeds what it affords.
    """

    num_examples: int
    expected_batch_size: float
    noise_multiplier: float
    steps: int
    delta: float
    accountant: AccountantKind = "rdp"
    target_epsilon: float | None = None

    @property
    def sampling_rate(self) -> float:
        return sampling_rate_for(self.expected_batch_size, self.num_examples)

    def epsilon(self, steps: int | None = None) -> float:
        """ε after ``steps`` logical steps (default: the planned T)."""
        return compute_epsilon(self.noise_multiplier, self.sampling_rate,
                               self.steps if steps is None else steps, self.delta,
                               self.accountant)

    def as_dict(self) -> dict[str, float | int | str | None]:
        return dict(num_examples=self.num_examples, expected_batch_size=self.expected_batch_size,
                    noise_multiplier=self.noise_multiplier, steps=self.steps,
                    sampling_rate=self.sampling_rate, delta=self.delta,
                    accountant=self.accountant, target_epsilon=self.target_epsilon,
                    epsilon=self.epsilon())


def plan_dp_sgd(
    num_examples: int,
    expected_batch_size: float,
    steps: int | None = None,
    epochs: float | None = None,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    accountant: AccountantKind = "rdp",
) -> PrivacyPlan:
    """Resolves a run's privacy parameters; exactly one of steps/epochs must be given.

    * σ and target ε given: T is capped at the steps the budget affords.
    * only target ε: σ is calibrated so that ε(T) <= target within 1%.
    * only σ: ε(T) is whatever it is (no budget).
    """
    q = sampling_rate_for(expected_batch_size, num_examples)
    if (steps is None) == (epochs is None):
        raise PrivacyArgumentError("give exactly one of steps or epochs.")
    if steps is None:
        steps = steps_for_epochs(epochs, num_examples, expected_batch_size)
    steps = validate_steps(steps)
    delta = resolve_delta(num_examples, delta)
    if noise_multiplier is None and target_epsilon is None:
        raise PrivacyArgumentError("give a noise multiplier, a target ε, or both.")
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, q, steps, delta, accountant)
    else:
        noise_multiplier = validate_noise_multiplier(noise_multiplier)
        if target_epsilon is not None:
            steps = min(steps, max_steps_for_budget(target_epsilon, noise_multiplier, q, delta,
                                                    accountant))
    return PrivacyPlan(num_examples, float(expected_batch_size), float(noise_multiplier), steps,
                       delta, accountant, target_epsilon)


def _epsilon_of_sigma(sigma: float, sampling_rate: float, steps: int, delta: float,
                      accountant: AccountantKind) -> float:
    return compute_epsilon(sigma, sampling_rate, steps, delta, accountant)


def _check_target_epsilon(target_epsilon: float) -> None:
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise BudgetUnreachableError(
            f"target ε must be a finite number > 0, got {target_epsilon!r}.")


@contextlib.contextmanager
def _quiet_rdp_order_warnings():
    """dp_accounting logs (via absl) when a fractional RDP order's series does not converge for
    a large q; it then excludes that order, which keeps the bound valid (the ε is the minimum
    over the remaining orders). Silence that message during our calls only."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
