"""ε of Poisson-sampled Gaussian DP-SGD: the DpEvent, the dp_accounting accountants, and the
RDP log filter (see privacy/accounting.py for the mechanism and the units).

Import these names from ``tfdpfair.privacy.accounting``, which re-exports them; they live here so
that ``calibration`` can use them without importing ``accounting`` (which imports calibration).
"""

from __future__ import annotations

import functools
import logging

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import pld, rdp

from tfdpfair.privacy import rdp_steps
from tfdpfair.privacy.limits import (
    AccountantKind, validate_accountant, validate_delta, validate_noise_multiplier,
    validate_sampling_rate, validate_steps)

NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
PLD_DISCRETIZATION = 1e-4  # dp_accounting's default value discretisation for PLDs.


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


_install_rdp_log_filter()
