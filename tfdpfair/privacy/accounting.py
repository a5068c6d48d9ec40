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
  * ``"pld"``: privacy loss distributions (Koskela et al.; Doroshenko et al. 2022), with
    dp_accounting's default discretisation: usually tighter (a smaller ε for the same run), and
    slower (about 1 s per evaluation at T = 10^6, 20-50 s at T = 10^7).

δ defaults to N^-1.1 (``default_delta``). Units: ε is in nats, δ is a probability,
q = expected batch / N is a probability, σ is the noise multiplier (noise std divided by C),
T counts logical steps (one noise draw each), never micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import time
import warnings
from typing import Callable, Literal

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import pld, rdp

from tfdpfair.privacy import rdp_steps

AccountantKind = Literal["rdp", "pld"]
Progress = Callable[[str], None]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
PLD_DISCRETIZATION = 1e-4  # dp_accounting's default value discretisation for PLDs.
DEFAULT_DELTA_EXPONENT = 1.1  # δ = N^-1.1 when not given.
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


def default_delta(num_examples: int) -> float:
    """δ = N^-1.1 for a dataset of N examples.

    Strictly below 1/N for N >= 2 (so it passes the δ < 1/N check that ``resolve_delta`` warns
    about), and close to the 1/N convention of the medical-imaging DP papers reproduced here:
    for N = 10^4..10^6 it is 1/N divided by 2.5..4. Reproducing a paper exactly means passing
    ``delta=1/N`` explicitly (which then warns).

    Raises:
      PrivacyArgumentError: for N = 1, where N^-1.1 = 1 is not a valid δ.
    """
    n = validate_num_examples(num_examples)
    d = math.exp(-DEFAULT_DELTA_EXPONENT * math.log(n))
    if not 0.0 < d < 1.0:
        raise PrivacyArgumentError(
            f"DP needs at least 2 examples for the default δ = N^-{DEFAULT_DELTA_EXPONENT:g}; "
            f"N = {n} gives δ = {d:g}, outside (0, 1). Use a larger training set, or pass δ "
            "explicitly.")
    return d


def resolve_delta(num_examples: int, delta: float | None = None) -> float:
    """δ to use for a dataset of N examples: ``default_delta(N)`` if not given.

    Warns (WeakDeltaWarning) when δ >= 1/N: the mechanism "publish one uniformly random training
    record in the clear" is (0, 1/N)-DP, so such a δ cannot exclude that kind of leak. δ = 1/N
    is nevertheless the convention of the medical-imaging DP papers tfdpfair reproduces.
    """
    n = validate_num_examples(num_examples)
    d = default_delta(n) if delta is None else validate_delta(delta)
    if d >= 1.0 / n:
        warnings.warn(
            f"δ = {d:.3g} is >= 1/N = {1.0 / n:.3g}. A mechanism that releases one random "
            "training example in full already satisfies (0, 1/N)-DP, so this δ cannot rule out "
            "leaking a whole record. Leave δ unset for the default N^-1.1 if the budget allows; "
            "δ = 1/N is only the convention of the papers reproduced here.",
            WeakDeltaWarning, stacklevel=2)
    return d


def dp_sgd_event(noise_multiplier: float, sampling_rate: float,
                 steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of T Poisson-sampled Gaussian steps: SelfComposed(PoissonSampled(q, N(σ)), T).

    (dp_accounting's PLD accountant turns this into one FFT power of the one-step PLD, exactly as
    ``accountant.compose(step, T)`` does; the two take the same time.)
    """
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            validate_sampling_rate(sampling_rate),
            dp_accounting.GaussianDpEvent(validate_noise_multiplier(noise_multiplier))),
        validate_steps(steps))


def make_accountant(accountant: AccountantKind = "rdp") -> dp_accounting.PrivacyAccountant:
    """A fresh dp_accounting accountant (add-or-remove-one adjacency) of the named kind."""
    if validate_accountant(accountant) == "rdp":
        return rdp.RdpAccountant(neighboring_relation=NEIGHBORING_RELATION)
    return pld.PLDAccountant(neighboring_relation=NEIGHBORING_RELATION,
                             value_discretization_interval=PLD_DISCRETIZATION)


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
    acc = make_accountant(accountant)
    if event.count == 0:
        return 0.0
    if accountant == "rdp":  # same arithmetic as the accountant, one-step curve cached
        fast = rdp_steps.epsilon(noise_multiplier, sampling_rate, event.count, delta,
                                 NEIGHBORING_RELATION)
        if fast is not None:
            return fast
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def steps_for_epochs(epochs: float, num_examples: int, expected_batch_size: float) -> int:
    """T = ceil(epochs · N / B), at least 1: logical steps such that, in expectation, each
    example is seen ``epochs`` times."""
    e = _real("epochs", epochs)
    if not (e > 0 and math.isfinite(e)):
        raise PrivacyArgumentError(f"epochs must be a finite number > 0, got {epochs!r}.")
    return max(1, int(math.ceil(e * num_examples / expected_batch_size - 1e-9)))


def sampling_rate_for(expected_batch_size: float, num_examples: int) -> float:
    """q = B / N, validated to lie in (0, 1]."""
    n = validate_num_examples(num_examples)
    b = _real("expected batch size", expected_batch_size)
    if not (b > 0 and math.isfinite(b)):
        raise PrivacyArgumentError(
            f"expected batch size must be a finite number > 0, got {expected_batch_size!r}.")
    if b > n:
        raise PrivacyArgumentError(
            f"expected batch size {b:g} exceeds the number of examples {n}: the sampling rate "
            f"q = B/N = {b / n:.3g} would be > 1. Use a batch size of at most N.")
    return validate_sampling_rate(b / n)


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
      unit: the unit of privacy N counts: "example" (one image) or "patient" (all of one
        patient's images; see tfdpfair/training/patients.py).
    """

    num_examples: int
    expected_batch_size: float
    noise_multiplier: float
    steps: int
    delta: float
    accountant: AccountantKind = "rdp"
    target_epsilon: float | None = None
    unit: str = "example"

    @property
    def sampling_rate(self) -> float:
        return sampling_rate_for(self.expected_batch_size, self.num_examples)

    def epsilon(self, steps: int | None = None) -> float:
        """ε after ``steps`` logical steps (default: the planned T)."""
        return compute_epsilon(self.noise_multiplier, self.sampling_rate,
                               self.steps if steps is None else steps, self.delta,
                               self.accountant)

    def target_binding(self) -> bool | None:
        """Whether the target ε constrains the run (None without a target).

        True when the planned ε is within CALIBRATION_REL_TOL of the target, or when one more
        step would exceed it (T was capped by the budget); False when the target leaves room to
        spare, e.g. a target that even the least noise searched (σ = MIN_NOISE_MULTIPLIER)
        stays well below.
        """
        if self.target_epsilon is None:
            return None
        if self.epsilon() >= (1.0 - CALIBRATION_REL_TOL) * self.target_epsilon:
            return True
        return self.epsilon(self.steps + 1) > self.target_epsilon

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
    progress: Progress | None = None,
) -> PrivacyPlan:
    """Resolves a run's privacy parameters; exactly one of steps/epochs must be given.

    * σ and target ε given: T is capped at the steps the budget affords.
    * only target ε: σ is calibrated so that ε(T) <= target within 1%.
    * only σ: ε(T) is whatever it is (no budget).

    Every argument is validated before any accounting is done. δ defaults to N^-1.1
    (``default_delta``); ``progress`` receives one line per accountant evaluation of a search.
    """
    q = sampling_rate_for(expected_batch_size, num_examples)
    if (steps is None) == (epochs is None):
        raise PrivacyArgumentError(
            f"give exactly one of steps or epochs (got steps={steps!r}, epochs={epochs!r}).")
    steps = (steps_for_epochs(epochs, num_examples, expected_batch_size) if steps is None
             else validate_steps(steps))
    if noise_multiplier is None and target_epsilon is None:
        raise PrivacyArgumentError(
            "give a noise multiplier σ, a target ε, or both: with only a target, σ is "
            "calibrated to it; with only σ, ε is reported.")
    if noise_multiplier is not None:
        noise_multiplier = validate_noise_multiplier(noise_multiplier)
    if target_epsilon is not None:
        target_epsilon = validate_target_epsilon(target_epsilon)
        if noise_multiplier is None and steps == 0:
            raise PrivacyArgumentError("steps must be >= 1 to calibrate σ to a target ε.")
    validate_accountant(accountant)
    delta = resolve_delta(num_examples, delta)
    from tfdpfair.privacy import calibration  # here: calibration imports this module.
    if noise_multiplier is None:
        noise_multiplier = calibration.calibrate_noise_multiplier(
            target_epsilon, q, steps, delta, accountant, progress=progress)
    elif target_epsilon is not None and steps > 0 and compute_epsilon(
            noise_multiplier, q, steps, delta, accountant) > target_epsilon:
        steps = calibration.max_steps_for_budget(target_epsilon, noise_multiplier, q, delta,
                                                 accountant, max_steps=steps, progress=progress)
    return PrivacyPlan(validate_num_examples(num_examples), float(expected_batch_size),
                       float(noise_multiplier), steps, delta, accountant, target_epsilon)


def __getattr__(name: str) -> object:
    """Re-exports calibrate_noise_multiplier and max_steps_for_budget (PEP 562), which live in
    privacy/calibration.py; imported lazily because that module imports this one."""
    if name in ("calibrate_noise_multiplier", "max_steps_for_budget"):
        from tfdpfair.privacy import calibration
        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _DropUnconvergedRdpOrders(logging.Filter):
    """Drops dp_accounting's "_compute_log_a_frac failed to converge" warnings.

    For a large q, the series for a fractional Rényi order α may not converge within
    dp_accounting's iteration cap; dp_accounting then logs this warning and gives that order an
    RDP of +inf, i.e. drops it. ε = min over orders of the (ε, δ) conversion is then taken over
    the remaining orders, each of which is a valid bound on its own, so the result is still a
    valid upper bound, merely not improved by the dropped order. The warning is emitted once per
    order and evaluation, so a calibration (or TF Privacy's statement at the end of the demo)
    prints dozens of them. Other dp_accounting warnings, e.g. "Negative Renyi divergence",
    which signal a real numerical problem, still get through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


def _install_rdp_log_filter() -> None:
    """Adds the filter to absl's logger (where dp_accounting logs) once per process; it applies
    to every dp_accounting call, also those made by TF Privacy (tf_privacy_compat.py)."""
    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _DropUnconvergedRdpOrders) for f in logger.filters):
        logger.addFilter(_DropUnconvergedRdpOrders())


def _exp_text(x: float) -> str:
    return f"{math.exp(x):.3g}" if x < 700 else f"e^{x:g}"


_install_rdp_log_filter()
