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
    if plan.unit == "patient":
        unit, units, protects = "one patient (all their images)", "patients", (
            "It protects one patient with all of their images, however many they have.")
    else:
        unit, units, protects = "one training example", "examples", (
            "It protects one example (one image); a patient with several images is protected "
            "as a group, with a weaker guarantee that grows with the number of their images.")
    paragraphs = [
        f"Guarantee: ({eps:.3f}, {plan.delta:.3g})-differential privacy at the level of {unit}, "
        f"with add-or-remove-one adjacency, computed with the {plan.accountant.upper()} "
        "accountant.",
        f"What was run: {steps} logical steps of DP-SGD over N = {plan.num_examples} {units}. At "
        "every step each of them was included independently with probability "
        f"q = {plan.sampling_rate:.6g} (Poisson sampling, expected batch "
        f"{plan.expected_batch_size:g}, about {epochs:.2f} epochs); each one's gradient was "
        "clipped to norm C and Gaussian noise with standard deviation σ·C, "
        f"σ = {plan.noise_multiplier:.4g}, was added once per step.",
        "What it means: whoever sees the trained model - and every intermediate checkpoint - "
        "learns almost nothing about whether any single one of them was in the training set: "
        "any test they run to decide \"in\" versus \"out\" has a true-positive rate at most "
        f"e^ε = {_exp(eps):.3g} times its false-positive rate, plus δ. {protects} It does not "
        "protect the test set, the public pre-training data, statistics published outside the "
        "training run (e.g. training loss curves or the subgroup report on private data), or "
        "hyper-parameters tuned on the private data.",
    ]
    text = "\n\n".join(textwrap.fill(p, width=92) for p in paragraphs)
    caveats = [textwrap.fill(line, width=92) for line in _caveats(plan, eps)]
    return "\n\n".join([text, *caveats])


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
