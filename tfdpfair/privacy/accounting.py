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
import math
import warnings

from tfdpfair.privacy import calibration
from tfdpfair.privacy.calibration import (  # noqa: F401 (re-exported)
    calibrate_noise_multiplier, max_steps_for_budget)
from tfdpfair.privacy.dp_events import (  # noqa: F401 (re-exported)
    NEIGHBORING_RELATION, PLD_DISCRETIZATION, _DropUnconvergedRdpOrders, compute_epsilon,
    dp_sgd_event, make_accountant)
from tfdpfair.privacy.limits import (  # noqa: F401 (re-exported)
    ACCOUNTANTS, CALIBRATION_REL_TOL, MAX_NOISE_MULTIPLIER, MAX_STEPS, MAX_TARGET_EPSILON,
    MIN_NOISE_MULTIPLIER, AccountantKind, BudgetUnreachableError, NonBindingTargetWarning,
    PrivacyArgumentError, Progress, WeakDeltaWarning, _real, validate_accountant,
    validate_delta, validate_noise_multiplier, validate_num_examples, validate_sampling_rate,
    validate_steps, validate_target_epsilon)

DEFAULT_DELTA_EXPONENT = 1.1  # δ = N^-1.1 when not given.


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
    if noise_multiplier is None:
        noise_multiplier = calibration.calibrate_noise_multiplier(
            target_epsilon, q, steps, delta, accountant, progress=progress)
    elif target_epsilon is not None and steps > 0 and compute_epsilon(
            noise_multiplier, q, steps, delta, accountant) > target_epsilon:
        steps = calibration.max_steps_for_budget(target_epsilon, noise_multiplier, q, delta,
                                                 accountant, max_steps=steps, progress=progress)
    return PrivacyPlan(validate_num_examples(num_examples), float(expected_batch_size),
                       float(noise_multiplier), steps, delta, accountant, target_epsilon)
