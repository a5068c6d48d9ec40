"""Independent reference for the tests: dp_accounting called directly, event by event."""

import dp_accounting
from dp_accounting import pld, rdp

RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def reference_epsilon(sigma: float, q: float, steps: int, delta: float,
                      kind: str = "rdp") -> float:
    """ε of T Poisson-sampled Gaussian steps, composing the one-step event T times."""
    accountant = (rdp.RdpAccountant(neighboring_relation=RELATION) if kind == "rdp"
                  else pld.PLDAccountant(neighboring_relation=RELATION))
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(step, steps)
    return accountant.get_epsilon(delta)
