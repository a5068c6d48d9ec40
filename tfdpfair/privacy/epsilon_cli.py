"""``tfdpfair-epsilon``: ε of a DP-SGD run, or the σ that reaches a target ε.

Examples:
  tfdpfair-epsilon --num-examples 60000 --batch-size 256 --noise-multiplier 1.1 \\
      --epochs 60 --delta 1e-5 --accountant rdp --json
  tfdpfair-epsilon --num-examples 50000 --batch-size 4096 --target-epsilon 1 --steps 875

A calibration (``--target-epsilon``) that runs longer than PROGRESS_AFTER_SECONDS reports each
accountant evaluation on stderr (always with ``--verbose``). A target that does not constrain
the run (even the least noise searched stays well below it) is reported as such, and as
``"target_binding": false`` with a ``"note"`` in ``--json`` output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Sequence, TextIO

from tfdpfair.privacy import accounting
from tfdpfair.privacy.statement import privacy_statement

PROGRESS_AFTER_SECONDS = 2.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfdpfair-epsilon",
        description="Privacy of Poisson-sampled DP-SGD (add-or-remove-one adjacency).")
    parser.add_argument("--num-examples", type=int, required=True,
                        help="N, the number of private training examples.")
    parser.add_argument("--batch-size", type=float, required=True,
                        help="expected logical batch size B (sampling rate q = B/N).")
    noise = parser.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, help="σ: noise std / clipping norm.")
    noise.add_argument("--target-epsilon", type=float,
                       help="calibrate σ so that the run ends at this ε (at most "
                            f"{accounting.MAX_TARGET_EPSILON:g}).")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="number of logical steps T.")
    length.add_argument("--epochs", type=float, help="expected passes; T = ceil(epochs·N/B).")
    parser.add_argument("--delta", type=float, default=None,
                        help="δ (default N^-1.1, just below the 1/N of the papers reproduced; "
                             "pass 1/N explicitly to reproduce them exactly).")
    parser.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default="rdp")
    parser.add_argument("--json", action="store_true", help="print one JSON object only.")
    parser.add_argument("--verbose", action="store_true",
                        help="report every accountant evaluation of a search on stderr.")
    return parser


class _ProgressPrinter:
    """Prints search progress lines to ``stream`` once the search has run for ``delay`` s."""

    def __init__(self, stream: TextIO, delay: float) -> None:
        self.stream, self.delay, self.start = stream, delay, time.perf_counter()

    def __call__(self, line: str) -> None:
        if time.perf_counter() - self.start >= self.delay:
            print(f"progress: {line}", file=self.stream, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = _ProgressPrinter(sys.stderr, 0.0 if args.verbose else PROGRESS_AFTER_SECONDS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", accounting.WeakDeltaWarning)
        warnings.simplefilter("always", accounting.NonBindingTargetWarning)
        try:
            plan = accounting.plan_dp_sgd(
                num_examples=args.num_examples, expected_batch_size=args.batch_size,
                steps=args.steps, epochs=args.epochs, noise_multiplier=args.noise_multiplier,
                target_epsilon=args.target_epsilon, delta=args.delta,
                accountant=args.accountant, progress=progress)
        except accounting.PrivacyArgumentError as err:
            print(f"tfdpfair-epsilon: error: {err}", file=sys.stderr)
            return 2
    for warning in caught:  # a non-binding target is reported below, in plain words.
        if not issubclass(warning.category, accounting.NonBindingTargetWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
    result = _result(plan)
    if args.json:
        print(json.dumps(result))
        return 0
    if result["note"]:
        print(result["note"])
    elif args.target_epsilon is not None:
        print(f"noise multiplier σ = {plan.noise_multiplier:.6g} reaches "
              f"ε = {result['epsilon']:.4f} (target {args.target_epsilon:g})")
    else:
        print(f"ε = {result['epsilon']:.4f}")
    print(f"δ = {plan.delta:.3g}, σ = {plan.noise_multiplier:.6g}, T = {plan.steps} steps, "
          f"q = {plan.sampling_rate:.6g}, accountant = {plan.accountant}\n")
    print(privacy_statement(plan))
    return 0


def _result(plan: accounting.PrivacyPlan) -> dict[str, object]:
    """The JSON fields; ``note`` explains a target that does not constrain the run."""
    eps, binding, note = plan.epsilon(), plan.target_binding(), None
    if binding is False:
        note = (f"target ε = {plan.target_epsilon:g} is not binding: even the least noise "
                f"searched, σ = {plan.noise_multiplier:g}, gives only ε = {eps:.4g} over "
                f"T = {plan.steps} steps. The target does not constrain this run; the ε reported "
                "is the guarantee.")
    return {"epsilon": eps, "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
            "steps": plan.steps, "sampling_rate": plan.sampling_rate,
            "accountant": plan.accountant, "target_epsilon": plan.target_epsilon,
            "target_binding": binding, "note": note}


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
