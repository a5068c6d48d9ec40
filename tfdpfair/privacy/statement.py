"""A plain-language statement of what a DP-SGD run protects, for reports and the CLI."""

from __future__ import annotations

import math
import textwrap

from tfdpfair.privacy.accounting import PrivacyPlan

LARGE_EPSILON = 10.0  # above this, the statement says the guarantee is weak.


def privacy_statement(plan: PrivacyPlan, steps_taken: int | None = None) -> str:
    """Explains, without jargon where possible, the (ε, δ) guarantee of a run.

    Args:
      plan: the run's privacy parameters.
      steps_taken: logical steps actually run (default: the planned number).
    """
    steps = plan.steps if steps_taken is None else steps_taken
    eps = plan.epsilon(steps)
    epochs = steps * plan.expected_batch_size / plan.num_examples
    text = f"""\
    Guarantee: ({eps:.3f}, {plan.delta:.3g})-differential privacy at the level of one training
    example, with add-or-remove-one adjacency, computed with the {plan.accountant.upper()}
    accountant.

    What was run: {steps} logical steps of DP-SGD over N = {plan.num_examples} examples.
    At every step each example was included independently with probability
    q = {plan.sampling_rate:.6g} (Poisson sampling, expected batch {plan.expected_batch_size:g},
    about {epochs:.2f} epochs); each example's gradient was clipped to norm C and Gaussian noise
    with standard deviation σ·C, σ = {plan.noise_multiplier:.4g}, was added once per step.

    What it means: whoever sees the trained model - and every intermediate checkpoint - learns
    almost nothing about whether any single example was in the training set: any test they run
    to decide "in" versus "out" has a true-positive rate at most e^ε = {_exp(eps):.3g}
    times its false-positive rate, plus δ. It protects one example (one image); a patient with
    several images is protected as a group, with a weaker guarantee that grows with the number
    of their images. It does not protect the test set, the public pre-training data, statistics
    published outside the training run (e.g. training loss curves or the subgroup report on
    private data), or hyper-parameters tuned on the private data.
    """
    caveats = [textwrap.fill(line, width=92) for line in _caveats(plan, eps)]
    return "\n\n".join([textwrap.dedent(text).strip(), *caveats])


def _caveats(plan: PrivacyPlan, eps: float) -> list[str]:
    """Plain-language warnings about a weak δ (>= 1/N) or a large ε (> 10)."""
    lines = []
    if plan.delta >= 1.0 / plan.num_examples:
        lines.append(
            f"Caution: δ = {plan.delta:.3g} is at least 1/N = {1.0 / plan.num_examples:.3g}, so "
            "this guarantee cannot rule out that one whole training record is leaked (releasing "
            "one random record in the clear already satisfies it).")
    if eps > LARGE_EPSILON:
        lines.append(
            f"Caution: at ε = {eps:.3g} the factor e^ε = {_exp(eps):.3g} is so large that the "
            "guarantee gives little meaningful protection against membership inference.")
    return lines


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
