"""A plain-language statement of what a DP-SGD run protects, for reports and the CLI."""

from __future__ import annotations

import math
import textwrap

from tfdpfair.privacy.accounting import PrivacyPlan

STRONG_EPSILON = 1.0  # ε <= 1: a strong guarantee (e^ε <= 2.72).
MODERATE_EPSILON = 3.0  # 1 < ε <= 3: moderate (e^ε <= 20).
LARGE_EPSILON = 10.0  # 3 < ε <= 10: the range used in practice; above: formal only.


def epsilon_band(epsilon: float) -> str:
    """The interpretation band of ε (natural-log units): "strong" (ε <= 1), "moderate"
    (1 < ε <= 3), "practical" (3 < ε <= 10) or "weak" (ε > 10, also for ε = inf/NaN)."""
    if epsilon <= STRONG_EPSILON:
        return "strong"
    if epsilon <= MODERATE_EPSILON:
        return "moderate"
    if epsilon <= LARGE_EPSILON:
        return "practical"
    return "weak"


def epsilon_interpretation(epsilon: float, who: str = "one of them") -> str:
    """One or two sentences on what an ε of this size means in practice, by band.

    e^ε bounds the likelihood ratio of any outcome with versus without one unit of privacy
    (up to δ): P[outcome | with] <= e^ε · P[outcome | without] + δ, and symmetrically.
    ``who`` names one unit of privacy in the text (default "one of them").
    """
    factor = _exp(epsilon)
    band = epsilon_band(epsilon)
    if band == "strong":
        return (f"At ε = {epsilon:.3g} (ε <= {STRONG_EPSILON:g}) this is a strong guarantee: "
                f"with e^ε = {factor:.3g}, no outcome becomes more than {factor:.3g} times as "
                f"likely because {who} was used, so an observer learns very little about "
                f"{who}.")
    if band == "moderate":
        return (f"At ε = {epsilon:.3g} ({STRONG_EPSILON:g} < ε <= {MODERATE_EPSILON:g}) this "
                f"is a moderate guarantee: an outcome may become up to e^ε = {factor:.3g} "
                f"times as likely because {who} was used, a real but bounded leak.")
    if band == "practical":
        return (f"At ε = {epsilon:.3g} ({MODERATE_EPSILON:g} < ε <= {LARGE_EPSILON:g}) this is "
                "in the range used in practice for deep learning (the reproduced papers' "
                "CheXpert and MIMIC-CXR runs used ε from 1 to 10): a likelihood ratio of up to "
                f"e^ε = {factor:.3g} is far from negligible, so the guarantee limits, but does "
                f"not rule out, inference about {who}.")
    return (f"At ε = {epsilon:.3g} (above {LARGE_EPSILON:g}) the factor e^ε = {factor:.3g} is "
            "so large that the bound is too weak to mean much in practice: it does not rule "
            f"out that an observer can tell whether {who} was in the training set. The "
            "guarantee is formal only.")


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
        "What it means: the probability of any outcome of training (the trained model, every "
        "intermediate checkpoint, anything computed from them) with any single one of them in "
        f"the training set is at most e^ε = {_exp(eps):.3g} times its probability without it "
        "(and the other way round), plus δ. So any test that decides \"in\" versus \"out\" "
        "has a true-positive rate at most e^ε times its false-positive rate, plus δ. "
        f"{epsilon_interpretation(eps)}",
        f"{protects} It does not protect the test set, the public pre-training data, statistics "
        "published outside the training run (e.g. training loss curves, the membership audit "
        "or the subgroup report on private data), or hyper-parameters tuned on the private "
        "data.",
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
            f"Caution: ε = {eps:.3g} is above {LARGE_EPSILON:g}; treat this run as offering no "
            "practical protection against membership inference (see \"What it means\").")
    return lines


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
