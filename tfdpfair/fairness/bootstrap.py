"""Seeded (cluster) bootstrap of metric tables, shared by several models (paired bootstrap).

A bootstrap resample is represented by its counts: c_i = how many times example i was drawn.
* Example bootstrap: N draws with replacement from the N examples, c ~ Multinomial(N, 1/N).
* Cluster bootstrap (when patient ids exist): P draws with replacement from the P patients,
  d ~ Multinomial(P, 1/P), and every example of patient p gets c_i = d_p, i.e. whole patients
  are resampled with all their examples. This keeps the within-patient correlation (several
  images of one patient) in the resampling, so the CIs are not too narrow.
Every model is evaluated on the *same* counts (paired bootstrap), so a difference between two
models, replicate by replicate, has a CI that accounts for their correlation.
Percentile CI at level 1−α: the α/2 and 1−α/2 quantiles of the replicates; replicates where the
statistic is undefined (NaN, e.g. a resample with one label class in a group) are excluded and
counted.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator, Mapping, Sequence

import numpy as np

from tfdpfair.fairness import metrics as metrics_lib

# Upper bound on the elements of one [chunk, N] count matrix (memory ~ 8 bytes each).
_MAX_CHUNK_ELEMENTS = 4_000_000


def resample_counts(num_examples: int, patient_id: np.ndarray | None, num_resamples: int,
                    seed: int, chunk_size: int | None = None) -> Iterator[np.ndarray]:
    """Yield bootstrap count matrices [b, N] (b ≤ chunk_size), num_resamples rows in total.

    Rows are reproducible for a given (seed, chunk_size). With patient_id, whole patients are
    resampled (cluster bootstrap): counts are equal within a patient and sum to the number of
    examples of the drawn patients.
    """
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}.")
    rng = np.random.default_rng(seed)
    if patient_id is not None:
        _, example_unit = np.unique(np.asarray(patient_id).astype(str), return_inverse=True)
        num_units = int(example_unit.max()) + 1 if num_examples else 0
    else:
        example_unit, num_units = np.arange(num_examples), num_examples
    if chunk_size is None:
        chunk_size = max(1, min(num_resamples, _MAX_CHUNK_ELEMENTS // max(num_examples, 1)))
    done = 0
    while done < num_resamples:
        b = min(chunk_size, num_resamples - done)
        draws = rng.integers(0, num_units, size=(b, num_units))
        offsets = (np.arange(b) * num_units)[:, None]
        unit_counts = np.bincount((draws + offsets).ravel(), minlength=b * num_units)
        yield unit_counts.reshape(b, num_units)[:, example_unit]
        done += b


def counts_to_indices(counts: np.ndarray) -> np.ndarray:
    """The resampled example indices of one count row: index i repeated counts[i] times."""
    return np.repeat(np.arange(len(counts)), counts)


def percentile_ci(replicates: np.ndarray,
                  confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI over axis 0 of replicates [B, ...], ignoring NaN replicates (NaN if all)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    alpha = 1.0 - confidence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, on purpose
        lo, hi = np.nanquantile(np.asarray(replicates, float), [alpha / 2, 1 - alpha / 2], axis=0)
    return lo, hi


@dataclasses.dataclass(frozen=True)
class PairedTables:
    """Metric tables of several models on one evaluation set, with shared bootstrap resamples.

    point[name]: [M, S] values on the evaluation set; replicates[name]: [B, M, S] values on the
    B resamples (row b used the same resample for every model).
    """

    infos: tuple[metrics_lib.MetricInfo, ...]
    slices: tuple[metrics_lib.Slice, ...]
    point: Mapping[str, np.ndarray]
    replicates: Mapping[str, np.ndarray]
    unit: str  # "patient" or "example"
    num_units: int


def paired_metric_tables(eval_set: metrics_lib.EvalSet, scores: Mapping[str, np.ndarray], *,
                         num_resamples: int, seed: int,
                         config: metrics_lib.MetricConfig = metrics_lib.MetricConfig(),
                         infos: Sequence[metrics_lib.MetricInfo] | None = None,
                         slices: Sequence[metrics_lib.Slice] | None = None) -> PairedTables:
    """Point and bootstrap metric tables for every model in `scores` (name -> y_score [N, K]).

    All models are evaluated on the same resamples (paired bootstrap); patients are resampled
    when eval_set.patient_id is set, examples otherwise.
    """
    infos = tuple(infos or metrics_lib.metric_infos(eval_set, config))
    slices = tuple(slices or metrics_lib.make_slices(eval_set))
    ones = np.ones((1, eval_set.num_examples))
    point = {name: metrics_lib.metric_table(eval_set, s, infos, slices, ones, config)[0]
             for name, s in scores.items()}
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    for counts in resample_counts(eval_set.num_examples, eval_set.patient_id, num_resamples, seed):
        for name, s in scores.items():
            chunks[name].append(
                metrics_lib.metric_table(eval_set, s, infos, slices, counts, config))
    replicates = {name: np.concatenate(c, axis=0) for name, c in chunks.items()}
    if eval_set.patient_id is not None:
        unit, num_units = "patient", len(np.unique(np.asarray(eval_set.patient_id).astype(str)))
    else:
        unit, num_units = "example", eval_set.num_examples
    return PairedTables(infos, slices, point, replicates, unit, num_units)
