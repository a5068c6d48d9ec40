"""The privacy statement interprets ε by band, and never calls a weak guarantee strong.

The plans' ε is checked with dp_accounting directly (tests/dp_reference.py), so each case is
known to sit in its band independently of the library's accountant.
"""

import math

import pytest
from dp_reference import reference_epsilon

from tfdpfair.privacy.accounting import PrivacyPlan
from tfdpfair.privacy.statement import epsilon_band, epsilon_interpretation, privacy_statement

N, B, T, DELTA = 100_000, 1000, 2000, 1e-6

# σ giving ε ≈ 0.5, 2, 8, 50 for q = 0.01, T = 2000, δ = 1e-6 (RDP).
CASES = [
    (4.0, (0.3, 1.0), "strong guarantee"),
    (1.3128, (1.5, 3.0), "moderate guarantee"),
    (0.7027, (5.0, 10.0), "range used in practice for deep learning"),
    (0.3974, (40.0, 60.0), "too weak to mean much in practice"),
]
# Wording that would overstate a guarantee outside the strong band.
OVERSTATEMENTS = ["almost nothing", "very little", "strong guarantee"]


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("sigma,eps_range,phrase", CASES)
def test_statement_words_its_band(sigma, eps_range, phrase):
    eps = reference_epsilon(sigma, B / N, T, DELTA)
    assert eps_range[0] < eps < eps_range[1]
    text = _flat(privacy_statement(PrivacyPlan(N, B, sigma, T, DELTA)))
    assert phrase in text
    assert f"e^ε = {math.exp(eps):.3g}" in text  # the likelihood-ratio bound, spelled out
    assert "likelihood ratio" in text or "times its probability without it" in text
    if eps > 1:
        for words in OVERSTATEMENTS:
            assert words not in text, (eps, words)
    if eps > 10:
        assert "formal only" in text and "Caution" in text
        assert "range used in practice" not in text
    else:
        assert "formal only" not in text


def test_bands_at_their_edges():
    assert [epsilon_band(e) for e in (0.01, 1.0, 1.01, 3.0, 3.01, 10.0, 10.01, 50.0)] == [
        "strong", "strong", "moderate", "moderate", "practical", "practical", "weak", "weak"]
    assert epsilon_band(float("inf")) == "weak" and epsilon_band(float("nan")) == "weak"


def test_interpretation_of_a_huge_epsilon_does_not_overflow():
    text = epsilon_interpretation(1e6, who="one patient")
    assert "e^ε = inf" in text and "whether one patient was in the training set" in text
    assert "almost nothing" not in text
