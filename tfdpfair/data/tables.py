"""Loading tables of examples: bad-row handling, patient-level splits, file checks.

Every reader follows one rule for bad input (missing files, corrupt images, unknown label
values, missing columns): with ``on_bad="error"`` (the default) it raises an error naming the
file (and row) and what to do; with ``on_bad="skip"`` it removes the rows, counts them by reason
in a :class:`LoadReport` and logs a warning. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd


@dataclasses.dataclass
class LoadReport:
    """Counts of rows removed while loading, by reason (e.g. "lateral view", "missing file").

    Filters the user asked for (views, frontal-only) and rows skipped because of bad input
    (only with on_bad="skip") are both counted here and logged; nothing is dropped silently.
    """

    removed: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, count: int, examples: Sequence[str] = ()) -> None:
        if count <= 0:
            return
        self.removed[reason] = self.removed.get(reason, 0) + int(count)
        self.examples.setdefault(reason, []).extend(list(examples)[:5])
        logging.getLogger("tfdpfair.data").warning("removed %d rows: %s (e.g. %s)",
                                                   count, reason, list(examples)[:3])

    @property
    def total(self) -> int:
        return int(sum(self.removed.values()))


def check_on_bad(on_bad: str) -> None:
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}.")


def split_patients(patient_ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> list[np.ndarray]:
    """The patients of each part of a patient-level random split.

    The sorted unique patients are permuted by ``np.random.default_rng(seed)`` and cut into
    consecutive parts of round(f * P) patients (cumulative rounding; the last part takes the
    remainder), so no patient is in two parts and the split depends only on the set of patients
    and the seed. Fractions are of patients, so image fractions are only approximately
    ``fractions``.
    """
    fractions = np.asarray(fractions, np.float64)
    if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions.tolist()}.")
    patients = np.unique(np.asarray([str(p) for p in patient_ids]))
    order = np.random.default_rng(seed).permutation(len(patients))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(patients)).astype(int)
    return np.split(patients[order], cuts)


def patient_split(patient_ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> list[np.ndarray]:
    """Row indices (ascending int64) of each part of :func:`split_patients` of these rows."""
    ids = pd.Series([str(p) for p in patient_ids])
    return [np.flatnonzero(ids.isin(part).to_numpy()).astype(np.int64)
            for part in split_patients(ids, fractions, seed)]


def resolve_file(directory: Any, name: str, hint: str) -> str:
    """``directory/name`` or ``directory/name.gz``; raises FileNotFoundError with ``hint``."""
    for candidate in (os.path.join(directory, name), os.path.join(directory, name + ".gz")):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"Neither {os.path.join(directory, name)} nor its .gz exists. {hint}")


def require_columns(frame: Any, columns: Iterable[str], path: str, hint: str = "") -> None:
    """Raises ValueError naming ``path`` and the missing columns if any is absent."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks required column(s) {missing}; it has "
                         f"{list(frame.columns)}. {hint}".strip())


def filter_rows(keep: np.ndarray, reason: str, names: Sequence[str], report: LoadReport,
                on_bad: str | None, message: Callable[[list[str]], str] | None = None
                ) -> np.ndarray:
    """Applies a boolean row filter, counting removed rows in ``report``.

    With ``on_bad="error"`` (and a ``message``) any removal raises ValueError instead; use
    ``on_bad=None`` for filters the user asked for (always applied, always counted).
    """
    keep = np.asarray(keep, bool)
    dropped = [names[i] for i in np.flatnonzero(~keep)]
    if dropped and on_bad == "error":
        raise ValueError(message(dropped) if message else f"{len(dropped)} rows: {reason}")
    report.add(reason, len(dropped), dropped)
    return keep


def check_image_files(paths: np.ndarray, verify: bool, report: LoadReport, on_bad: str,
                      expected_channels: int | None = None) -> np.ndarray:
    """Boolean mask of rows whose image file exists and, with ``verify``, passes
    :func:`tfdpfair.data.image_check.check_images` (decodes completely as JPEG/PNG with the
    training pipeline's decoder; ``expected_channels`` channels if given).

    Missing or bad files raise ValueError naming one of them and the reason
    (``on_bad="error"``) or are removed and counted in ``report`` under "missing image file" /
    "corrupt image file" (``"skip"``), so the caller's N never counts them.
    """
    paths = np.asarray(paths, dtype=object)
    exists = np.array([os.path.exists(p) for p in paths], bool)
    filter_rows(exists, "missing image file", list(paths), report, on_bad, lambda m: (
        f"{len(m)} image file(s) listed in the CSV do not exist, e.g. {m[0]}. Check the dataset "
        "root, or pass on_bad='skip' to skip them."))
    if not verify:
        return exists
    from tfdpfair.data import image_check  # TensorFlow: only when verifying

    ok, names = np.ones(len(paths), bool), [str(p) for p in paths]
    present = np.flatnonzero(exists)
    for bad in image_check.check_images(paths[present], expected_channels):
        ok[present[bad.row]] = False
        names[present[bad.row]] = str(bad)
    filter_rows(ok, "corrupt image file", names, report, on_bad, lambda m: (
        f"{len(m)} corrupt image file(s), e.g. {m[0]}; every file was checked before training. "
        "Re-download or replace them, or pass on_bad='skip' (config: --config.data.on_bad=skip) "
        "to drop them before N is counted."))
    return exists & ok
