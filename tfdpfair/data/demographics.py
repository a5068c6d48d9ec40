"""Demographic subgroup binning shared by the chest X-ray readers (CheXclusion convention).

Every example carries integer group codes; the code ``i`` of group ``g`` means
``GROUP_NAMES[g][i]``. Missing or uninformative values get the explicit category "Unknown"
(always the last code), so nothing is dropped and fairness reports can show the unknown group.

Rules (also in docs/data.md):
- sex: "Female"/"F" -> Female, "Male"/"M" -> Male, blank/"Unknown" -> Unknown; anything else is an
  error (the caller names the file and row).
- age (years) -> bins [0,20) "0-20", [20,40) "20-40", [40,60) "40-60", [60,80) "60-80",
  [80, inf) "80+"; NaN or negative -> Unknown.
- race (free-text race and, optionally, ethnicity), case-insensitive, first rule that matches:
  1. Hispanic if the ethnicity or the race text says Hispanic/Latino (but not "non-Hispanic",
     "not Hispanic", "non-Latino"): Hispanic of any race is binned Hispanic;
  2. "black" or "african" -> Black;
  3. "white" or "caucasian" -> White  (checked before Asian: "caucasian" contains "asian");
  4. "american indian" or "alaska" -> American Indian;
  5. "asian" -> Asian;
  6. blank, "unknown", "declined", "refused", "unable", "not specified" -> Unknown;
  7. anything else (Pacific Islander, multiple races, "Other", ...) -> Other.
- insurance: contains "medicare" -> Medicare, "medicaid" -> Medicaid, blank -> Unknown, any other
  value (Private, Other, No charge, ...) -> Other.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import numpy as np

UNKNOWN = "Unknown"
SEX_NAMES = ("Female", "Male", UNKNOWN)
AGE_BIN_NAMES = ("0-20", "20-40", "40-60", "60-80", "80+", UNKNOWN)
AGE_BIN_EDGES = (20.0, 40.0, 60.0, 80.0)  # years; a bin is [lower, upper)
RACE_NAMES = ("White", "Black", "Hispanic", "Asian", "American Indian", "Other", UNKNOWN)
INSURANCE_NAMES = ("Medicare", "Medicaid", "Other", UNKNOWN)

GROUP_NAMES: dict[str, tuple[str, ...]] = {
    "sex": SEX_NAMES,
    "age_bin": AGE_BIN_NAMES,
    "race": RACE_NAMES,
    "insurance": INSURANCE_NAMES,
}

_SEX_MAP = {"female": "Female", "f": "Female", "male": "Male", "m": "Male",
            "unknown": UNKNOWN, "": UNKNOWN}
_NOT_HISPANIC = re.compile(r"non[- ]?hispanic|not hispanic|non[- ]?latin")
_UNKNOWN_RACE = ("unknown", "declined", "refused", "unable", "not specified", "unavailable")


def _text(value: Any) -> str:
    """Lower-cased stripped string; NaN/None -> ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip().lower()


def bin_sex(value: Any) -> str:
    """Sex/gender value -> "Female" | "Male" | "Unknown"; raises ValueError on other strings."""
    key = _text(value)
    if key not in _SEX_MAP:
        raise ValueError(f"unknown sex value {value!r} (expected Female/Male/F/M/Unknown/blank)")
    return _SEX_MAP[key]


def bin_age(age: Any) -> str:
    """Age in years -> one of AGE_BIN_NAMES; bins are [lower, upper); NaN/negative -> Unknown."""
    try:
        years = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if math.isnan(years) or years < 0:
        return UNKNOWN
    for edge, name in zip(AGE_BIN_EDGES, AGE_BIN_NAMES):
        if years < edge:
            return name
    return "80+"


def is_hispanic(text: Any) -> bool:
    """True if the text states Hispanic/Latino ethnicity (and does not negate it)."""
    key = _text(text)
    if not key or _NOT_HISPANIC.search(key):
        return False
    return "hispanic" in key or "latin" in key


def bin_race(race: Any, ethnicity: Any = None) -> str:
    """Race (+ optional ethnicity) text -> one of RACE_NAMES by the module's ordered rules."""
    if is_hispanic(ethnicity) or is_hispanic(race):
        return "Hispanic"
    key = _text(race)
    if "black" in key or "african" in key:
        return "Black"
    if "white" in key or "caucasian" in key:
        return "White"
    if "american indian" in key or "alaska" in key:
        return "American Indian"
    if "asian" in key:
        return "Asian"
    if not key or any(word in key for word in _UNKNOWN_RACE):
        return UNKNOWN
    return "Other"


def bin_insurance(value: Any) -> str:
    """Insurance text -> "Medicare" | "Medicaid" | "Other" | "Unknown" (blank)."""
    key = _text(value)
    if not key:
        return UNKNOWN
    if "medicare" in key:
        return "Medicare"
    if "medicaid" in key:
        return "Medicaid"
    return "Other"


def encode(group: str, names: Iterable[str]) -> np.ndarray:
    """Category names of group ``group`` -> int32 codes (index into GROUP_NAMES[group])."""
    vocab = {name: i for i, name in enumerate(GROUP_NAMES[group])}
    return np.asarray([vocab[name] for name in names], dtype=np.int32)
