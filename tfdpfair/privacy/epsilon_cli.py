"""``tfdpfair-epsilon``: ε of a DP-SGD run, or the σ that reaches a target ε.

Examples:
  tfdpfair-epsilon --num-examples 60000 --batch-size 256 --noise-multiplier 1.1 \\
      --epochs 60 --delta 1e-5 --accountant rdp --json
  tfdpfair-epsilon --num-examples 50000 --batch-size 4096 --target-epsilon 1 --steps 875
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Sequence

from tfdpfair.privacy import accounting
from tfdpfair.privacy.statement import privacy_statement


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
                       help="calibrate σ so that the run ends at this ε (printed).")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="number of logical steps T.")
    length.add_argument("--epochs", type=float, help="expected passes; T = ceil(epochs·N/B).")
    parser.add_argument("--delta", type=float, default=None, help="δ (default 1/N).")
    parser.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default="rdp")
    parser.add_argument("--json", action="store_true", help="print one JSON object only.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", accounting.WeakDeltaWarning)
        try:
            plan = accounting.plan_dp_sgd(
                num_examples=args.num_examples, expected_batch_size=args.batch_size,
                steps=args.steps, epochs=args.epochs, noise_multiplier=args.noise_multiplier,
                target_epsilon=args.target_epsilon, delta=args.delta,
                accountant=args.accountant)
        except accounting.PrivacyArgumentError as err:
            print(f"tfdpfair-epsilon: error: {err}", file=sys.stderr)
            return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    result = {
        "epsilon": plan.epsilon(),
        "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier,
        "steps": plan.steps,
        "sampling_rate": plan.sampling_rate,
        "accountant": plan.accountant,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    if args.target_epsilon is not None:
        print(f"noise multiplier σ = {plan.noise_multiplier:.6g} reaches ε = {result['epsilon']:.4f}"
              f" (target {args.target_epsilon:g})")
    else:
        print(f"ε = {result['epsilon']:.4f}")
    print(f"δ = {plan.delta:.3g}, σ = {plan.noise_multiplier:.6g}, T = {plan.steps} steps, "
          f"q = {plan.sampling_rate:.6g}, accountant = {plan.accountant}\n")
    print(privacy_statement(plan))
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
