"""Per-subgroup classification metrics and disparity aggregates (numpy only).

Every metric here is computed from *weighted* examples. A weight matrix ``w`` of shape
``[B, n]`` evaluates the metric B times at once: one row of ones gives the ordinary estimate,
and a row of bootstrap counts (example i drawn c_i times) gives one bootstrap replicate, because
a resample that repeats example i c_i times is the same data set as example i with weight c_i.
So the point estimate and the bootstrap share one implementation.

Metrics (``y`` labels, ``s`` scores, ``w`` weights, sums over the examples of one slice):
  multiclass  accuracy           sum(w·[argmax s = y]) / sum(w)
              accuracy/<class>   sum(w·[argmax s = y]·[y = c]) / sum(w·[y = c])  (per-class
                                 accuracy, i.e. recall of class c)
  multilabel  auc/<task>         P(s_pos > s_neg) + ½·P(s_pos = s_neg) over weighted
                                 positive-negative pairs (Mann-Whitney; equals ROC AUC)
              macro_auc          mean of auc/<task> over the evaluation tasks (the CheXpert five
                                 when present); NaN if any of them is undefined
              tpr/<task>         sum(w·[s ≥ t]·[y = 1]) / sum(w·[y = 1])
              fpr/<task>         sum(w·[s ≥ t]·[y = 0]) / sum(w·[y = 0])
A metric is NaN (never an exception) on a slice smaller than ``min_group_size`` or where its
denominator is empty (one label class, no example of the class); ``undefined_reason`` says why.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

MULTICLASS = "multiclass"
MULTILABEL = "multilabel"
OVERALL = "overall"
CHEXPERT_EVAL_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
DISPARITIES = ("worst_group", "max_min_gap", "max_gap_to_overall", "min_max_ratio")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """The evaluation set shared by all compared models.

    Attributes:
      task: "multiclass" (y_true int [N]) or "multilabel" (y_true 0/1 [N, T]).
      y_true: labels.
      label_names: class names (multiclass, length C) or task names (multilabel, length T).
      groups: demographic attribute name -> group label per example (str [N]).
      patient_id: optional patient id per example (str [N]); enables the cluster bootstrap.
    """

    task: str
    y_true: np.ndarray
    label_names: tuple[str, ...]
    groups: Mapping[str, np.ndarray]
    patient_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.task not in (MULTICLASS, MULTILABEL):
            raise ValueError(f"task must be '{MULTICLASS}' or '{MULTILABEL}', got {self.task!r}.")
        n = len(self.y_true)
        if self.task == MULTILABEL:
            if self.y_true.ndim != 2 or self.y_true.shape[1] != len(self.label_names):
                raise ValueError(
                    f"multilabel y_true must be [N, T] with T = {len(self.label_names)} task "
                    f"names; got shape {self.y_true.shape}.")
            if not np.isin(self.y_true, (0, 1)).all():
                raise ValueError("multilabel y_true must contain only 0 and 1 (map uncertain or "
                                 "missing labels before evaluation).")
        elif self.y_true.ndim != 1 or not np.issubdtype(self.y_true.dtype, np.integer):
            raise ValueError(f"multiclass y_true must be int [N]; got {self.y_true.dtype} "
                             f"{self.y_true.shape}.")
        for name, values in {**self.groups, "patient_id": self.patient_id}.items():
            if values is not None and len(values) != n:
                raise ValueError(f"'{name}' has {len(values)} entries but y_true has {n}.")

    @property
    def num_examples(self) -> int:
        return len(self.y_true)


@dataclasses.dataclass(frozen=True)
class MetricConfig:
    """Options: decision threshold for TPR/FPR, multilabel evaluation tasks, minimum group size."""

    threshold: float = 0.5
    eval_tasks: tuple[str, ...] | None = None
    min_group_size: int = 30


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """One metric: its name, kind, the label (task/class) indices it uses, and its direction."""

    name: str
    kind: str  # accuracy | class_accuracy | auc | macro_auc | tpr | fpr
    labels: tuple[int, ...] = ()
    higher_is_better: bool = True


@dataclasses.dataclass(frozen=True)
class Slice:
    """A subset of the evaluation set: the whole set (attribute "overall") or one group."""

    attribute: str
    group: str
    index: np.ndarray


def primary_metric(task: str) -> str:
    """The headline metric: accuracy (multiclass) or macro AUC (multilabel)."""
    return "accuracy" if task == MULTICLASS else "macro_auc"


def resolve_eval_tasks(label_names: Sequence[str],
                       eval_tasks: Sequence[str] | None) -> tuple[int, ...]:
    """Indices of the tasks averaged by macro_auc: `eval_tasks`, else the CheXpert five if all
    are present, else every task."""
    names = list(label_names)
    if eval_tasks is None:
        eval_tasks = CHEXPERT_EVAL_TASKS if set(CHEXPERT_EVAL_TASKS) <= set(names) else names
    missing = [t for t in eval_tasks if t not in names]
    if missing:
        raise ValueError(f"eval tasks {missing} are not among the task names {names}.")
    return tuple(names.index(t) for t in eval_tasks)


def metric_infos(eval_set: EvalSet,
                 config: MetricConfig = MetricConfig()) -> tuple[MetricInfo, ...]:
    """The metrics evaluated for this task, primary metric first."""
    if eval_set.task == MULTICLASS:
        per_class = [MetricInfo(f"accuracy/{c}", "class_accuracy", (i,))
                     for i, c in enumerate(eval_set.label_names)]
        return (MetricInfo("accuracy", "accuracy"), *per_class)
    tasks = resolve_eval_tasks(eval_set.label_names, config.eval_tasks)
    infos = [MetricInfo("macro_auc", "macro_auc", tasks)]
    for kind in ("auc", "tpr", "fpr"):
        infos += [MetricInfo(f"{kind}/{eval_set.label_names[t]}", kind, (t,), kind != "fpr")
                  for t in tasks]
    return tuple(infos)


def make_slices(eval_set: EvalSet) -> tuple[Slice, ...]:
    """The overall slice first, then one slice per (attribute, group), groups sorted by name."""
    slices = [Slice(OVERALL, OVERALL, np.arange(eval_set.num_examples))]
    for attribute, labels in eval_set.groups.items():
        labels = np.asarray(labels).astype(str)
        for group in np.unique(labels):
            slices.append(Slice(attribute, str(group), np.flatnonzero(labels == group)))
    return tuple(slices)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def weighted_rate(hit: np.ndarray, cond: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P_w(hit | cond) = sum(w·hit·cond) / sum(w·cond) for each row of w [B, n]; NaN if empty."""
    cond = np.asarray(cond, float)
    return _safe_divide(w @ (np.asarray(hit, float) * cond), w @ cond)


def weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted ROC AUC (Mann-Whitney) per row of w [B, n]; NaN without both label classes.

    With scores sorted into distinct levels k, P_k and N_k the positive and negative weight at
    level k: AUC = sum_k P_k·(sum_{j<k} N_j + ½·N_k) / (sum P · sum N).
    """
    w = np.atleast_2d(np.asarray(w, float))
    if len(y) == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = np.asarray(s)[order], np.asarray(y)[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    w_sorted = w[:, order]
    pos = np.add.reduceat(w_sorted * y_sorted, starts, axis=1)
    neg = np.add.reduceat(w_sorted * ~y_sorted, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return _safe_divide(num, pos.sum(axis=1) * neg.sum(axis=1))


def _slice_values(eval_set: EvalSet, y_score: np.ndarray, infos: Sequence[MetricInfo],
                  index: np.ndarray, w: np.ndarray, threshold: float) -> np.ndarray:
    """All metrics on one slice: array [B, M] for slice weights w [B, n_slice]."""
    y, s = eval_set.y_true[index], y_score[index]
    out = np.full((w.shape[0], len(infos)), np.nan)
    auc_cache: dict[int, np.ndarray] = {}

    def auc(t: int) -> np.ndarray:
        if t not in auc_cache:
            auc_cache[t] = weighted_auc(y[:, t], s[:, t], w)
        return auc_cache[t]

    if eval_set.task == MULTICLASS:
        correct = np.argmax(s, axis=1) == y if len(y) else np.zeros(0, bool)
    for m, info in enumerate(infos):
        if info.kind == "accuracy":
            out[:, m] = weighted_rate(correct, np.ones_like(correct), w)
        elif info.kind == "class_accuracy":
            out[:, m] = weighted_rate(correct, y == info.labels[0], w)
        elif info.kind == "auc":
            out[:, m] = auc(info.labels[0])
        elif info.kind == "macro_auc":
            out[:, m] = np.mean([auc(t) for t in info.labels], axis=0)
        elif info.kind in ("tpr", "fpr"):
            t = info.labels[0]
            label = 1 if info.kind == "tpr" else 0
            out[:, m] = weighted_rate(s[:, t] >= threshold, y[:, t] == label, w)
        else:
            raise ValueError(f"unknown metric kind {info.kind!r}")
    return out


def metric_table(eval_set: EvalSet, y_score: np.ndarray, infos: Sequence[MetricInfo],
                 slices: Sequence[Slice], weights: np.ndarray,
                 config: MetricConfig = MetricConfig()) -> np.ndarray:
    """Metric values [B, M, S] for example weights [B, N] (ones for the point estimate).

    Slices with fewer than ``config.min_group_size`` examples are NaN (the overall slice is
    always evaluated).
    """
    check_scores(eval_set, y_score)
    weights = np.atleast_2d(np.asarray(weights, float))
    table = np.full((weights.shape[0], len(infos), len(slices)), np.nan)
    for j, sl in enumerate(slices):
        if sl.attribute != OVERALL and len(sl.index) < config.min_group_size:
            continue
        table[:, :, j] = _slice_values(eval_set, y_score, infos, sl.index,
                                       weights[:, sl.index], config.threshold)
    return table


def check_scores(eval_set: EvalSet, y_score: np.ndarray) -> None:
    """Raise a clear error if y_score does not fit the evaluation set."""
    n, k = eval_set.num_examples, len(eval_set.label_names)
    if y_score.shape != (n, k):
        what = "class probabilities" if eval_set.task == MULTICLASS else "per-task scores"
        raise ValueError(f"y_score must be [N, {k}] {what} for N = {n}; got {y_score.shape}.")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score contains NaN or infinite values.")


def undefined_reason(eval_set: EvalSet, info: MetricInfo, sl: Slice,
                     config: MetricConfig = MetricConfig()) -> str | None:
    """Why `info` is NaN on slice `sl` (None if it is defined)."""
    n = len(sl.index)
    if sl.attribute != OVERALL and n < config.min_group_size:
        return f"group too small: {n} < min_group_size={config.min_group_size} examples"
    y = eval_set.y_true[sl.index]
    if info.kind == "accuracy":
        return None if n else "no examples"
    if info.kind == "class_accuracy":
        c = info.labels[0]
        return None if (y == c).any() else f"no examples of class {eval_set.label_names[c]!r}"
    for t in info.labels:
        n_pos = int(y[:, t].sum())
        n_neg = n - n_pos
        name = eval_set.label_names[t]
        if info.kind == "tpr" and n_pos == 0:
            return f"no positives for {name!r}"
        if info.kind == "fpr" and n_neg == 0:
            return f"no negatives for {name!r}"
        if info.kind in ("auc", "macro_auc") and min(n_pos, n_neg) == 0:
            return f"one label class for {name!r} (positives={n_pos}, negatives={n_neg})"
    return None


def disparities(group_values: np.ndarray, overall: np.ndarray,
                higher_is_better: bool = True) -> dict[str, np.ndarray]:
    """Disparity aggregates over groups (last axis of group_values [..., G]; overall [...]).

      worst_group         min_g v_g (max_g for a lower-is-better metric such as FPR)
      max_min_gap         max_g v_g − min_g v_g
      max_gap_to_overall  max_g |v_g − v_overall|
      min_max_ratio       min_g v_g / max_g v_g
    Pass only the groups that are defined; any NaN among them (e.g. in a bootstrap resample)
    makes the aggregate NaN. Fewer than two groups gives NaN.
    """
    v = np.asarray(group_values, float)
    shape = v.shape[:-1]
    if v.shape[-1] < 2:
        return {name: np.full(shape, np.nan) for name in DISPARITIES}
    lo, hi = v.min(axis=-1), v.max(axis=-1)
    return {
        "worst_group": lo if higher_is_better else hi,
        "max_min_gap": hi - lo,
        "max_gap_to_overall": np.abs(v - np.asarray(overall, float)[..., None]).max(axis=-1),
        "min_max_ratio": _safe_divide(lo, hi),
    }


def worst_group_index(group_values: np.ndarray, higher_is_better: bool = True) -> int:
    """Index of the worst group among point values [G] (NaN groups are ignored; -1 if none)."""
    v = np.asarray(group_values, float)
    if np.isnan(v).all():
        return -1
    return int(np.nanargmin(v) if higher_is_better else np.nanargmax(v))
