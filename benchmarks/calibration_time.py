"""Wall time of PLD noise calibration (calibrate_noise_multiplier); prints one JSON line.

For each T in --steps and each target ε in --targets, times one call of
``calibrate_noise_multiplier(target, q, T, δ, accountant)`` from a cold cache, then checks the
returned σ with dp_accounting called directly (default PLD settings, not timed): the JSON holds
the seconds, σ and that independently computed ε for every (T, target).

  python benchmarks/calibration_time.py [--steps 10000 100000 1000000] [--targets 1 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import dp_accounting
from dp_accounting import pld, rdp

from tfdpfair.privacy import accounting

RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def direct_epsilon(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    """ε from dp_accounting with its default settings, independent of tfdpfair."""
    acc = (pld.PLDAccountant(neighboring_relation=RELATION) if kind == "pld"
           else rdp.RdpAccountant(neighboring_relation=RELATION))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps)
    return float(acc.get_epsilon(delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--num-examples", type=int, default=223414)
    parser.add_argument("--batch", type=float, default=4096.0)
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    args = parser.parse_args()
    q = args.batch / args.num_examples
    runs = []
    for steps in args.steps:
        for target in args.targets:
            if hasattr(accounting.compute_epsilon, "cache_clear"):
                accounting.compute_epsilon.cache_clear()
            start = time.perf_counter()
            sigma = accounting.calibrate_noise_multiplier(target, q, steps, args.delta,
                                                          args.accountant)
            seconds = time.perf_counter() - start
            eps = direct_epsilon(sigma, q, steps, args.delta, args.accountant)
            runs.append(dict(steps=steps, target_epsilon=target, seconds=round(seconds, 3),
                             noise_multiplier=sigma, epsilon_direct=eps,
                             within_target=eps <= target))
    print(json.dumps(dict(benchmark="calibration_time", accountant=args.accountant,
                          sampling_rate=q, delta=args.delta, machine=platform.machine(),
                          python=platform.python_version(), runs=runs)))


if __name__ == "__main__":
    main()
