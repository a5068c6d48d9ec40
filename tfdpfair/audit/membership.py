"""Loss-threshold membership inference, overall and per subgroup, with bootstrap CIs (numpy).

The attacker scores each example by s = −loss(model, example) (a low loss suggests "trained
on it", Yeom et al. 2018) and thresholds s. Over members (training examples, label 1) and
non-members (held-out examples, label 0), on weighted examples (weights w: ones for the point
estimate, bootstrap counts for a replicate; tfdpfair.fairness.metrics's convention):

  auc                ROC AUC of s (Mann-Whitney, ties ½), fairness.metrics.weighted_auc
  advantage          max_t (TPR(t) − FPR(t)), the membership advantage (≥ 0: t = +∞ included)
  tpr_at_fpr_<x>     max TPR(t) over thresholds with FPR(t) ≤ x (x = 0.1%, 1%): the low-FPR
                     regime that matters for privacy (Carlini et al. 2022). With n_out held-out
                     examples FPR moves in steps of 1/n_out; below that it is the TPR at FPR 0.

with TPR(t) = Σ w·[s ≥ t]·[member] / Σ w·[member] and FPR likewise over non-members. For an
(ε, δ)-DP training run, TPR ≤ e^ε·FPR + δ at every threshold, so advantage ≤ (e^ε − 1)/(e^ε + 1)
+ δ-ish terms; a gap between groups means one group's membership is easier to infer.
CIs: example bootstrap (or patient bootstrap with ``patient_id``) from
tfdpfair.fairness.bootstrap, percentile intervals; a group is resampled inside the joint
resample, so the group values of one replicate are comparable.

>>> import numpy as np
>>> s = np.array([3.0, 2.0, 1.0, 0.0]); m = np.array([1, 0, 1, 0])
>>> r = membership_inference(s, m, num_resamples=0)
>>> r["overall"]["auc"]["value"], r["overall"]["advantage"]["value"]
(0.75, 0.5)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from tfdpfair.fairness import bootstrap, metrics

DEFAULT_FPRS = (0.001, 0.01)


def _fpr_name(fpr: float) -> str:
    return f"tpr_at_fpr_{fpr:g}"


def metric_names(fprs: Sequence[float] = DEFAULT_FPRS) -> tuple[str, ...]:
    return ("auc", "advantage") + tuple(_fpr_name(f) for f in fprs)


def weighted_roc(scores: np.ndarray, is_member: np.ndarray, w: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR) [B, L+1] at every distinct score level (descending), starting at (0, 0)."""
    w = np.atleast_2d(np.asarray(w, float))
    order = np.argsort(-np.asarray(scores, float), kind="mergesort")
    s_sorted, member = np.asarray(scores, float)[order], np.asarray(is_member, bool)[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    w_sorted = w[:, order]
    tp = np.cumsum(np.add.reduceat(w_sorted * member, starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(w_sorted * ~member, starts, axis=1), axis=1)
    zero = np.zeros((w.shape[0], 1))
    tp, fp = np.hstack([zero, tp]), np.hstack([zero, fp])
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / tp[:, -1:], fp / fp[:, -1:]


def attack_metrics(scores: np.ndarray, is_member: np.ndarray, w: np.ndarray,
                   fprs: Sequence[float] = DEFAULT_FPRS) -> np.ndarray:
    """[B, M] metrics (order of :func:`metric_names`) for weight rows w [B, n]; NaN if a class
    (members or non-members) has no weight."""
    w = np.atleast_2d(np.asarray(w, float))
    out = np.full((w.shape[0], 2 + len(fprs)), np.nan)
    if len(scores) == 0:
        return out
    out[:, 0] = metrics.weighted_auc(np.asarray(is_member, int), scores, w)
    tpr, fpr = weighted_roc(scores, is_member, w)
    defined = np.isfinite(tpr[:, -1]) & np.isfinite(fpr[:, -1])
    out[defined, 1] = np.max(tpr[defined] - fpr[defined], axis=1)
    for i, x in enumerate(fprs):
        allowed = np.where(fpr[defined] <= x + 1e-12, tpr[defined], -np.inf)
        out[defined, 2 + i] = np.max(allowed, axis=1)
    return out


def _stats(point: np.ndarray, replicates: np.ndarray | None, names: Sequence[str],
           confidence: float) -> dict:
    result = {}
    if replicates is not None:
        lo, hi = bootstrap.percentile_ci(replicates, confidence)
    for i, name in enumerate(names):
        stat = {"value": float(point[i])}
        if replicates is not None:
            stat.update(ci_low=float(lo[i]), ci_high=float(hi[i]))
        result[name] = stat
    return result


def membership_inference(scores: np.ndarray, is_member: np.ndarray,
                         groups: Mapping[str, np.ndarray] | None = None, *,
                         num_resamples: int = 200, seed: int = 0, confidence: float = 0.95,
                         fprs: Sequence[float] = DEFAULT_FPRS,
                         patient_id: np.ndarray | None = None) -> dict:
    """Attack metrics of ``scores`` (higher = "member"), overall and per group, with CIs.

    Args:
      scores: [n] attack scores, e.g. −loss (losses.per_example_losses).
      is_member: [n] 1 for training examples, 0 for held-out ones.
      groups: attribute name -> group label per example (str [n]).
      num_resamples: bootstrap replicates (0: point estimates only).
    Returns:
      {"overall": {metric: {value, ci_low, ci_high}}, "by_group": {attr: {group: {...}}},
       "counts": {...}, "num_resamples", "confidence"}.
    """
    scores = np.asarray(scores, float)
    is_member = np.asarray(is_member).astype(bool)
    if scores.shape != is_member.shape or scores.ndim != 1:
        raise ValueError(f"scores and is_member must be 1-D of equal length, got {scores.shape} "
                         f"and {is_member.shape}.")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf (a non-finite loss?).")
    groups = dict(groups or {})
    slices = [("overall", None, np.arange(len(scores)))]
    for attr, labels in groups.items():
        labels = np.asarray(labels).astype(str)
        if len(labels) != len(scores):
            raise ValueError(f"group '{attr}' has {len(labels)} labels for {len(scores)} scores.")
        slices += [(attr, g, np.flatnonzero(labels == g)) for g in np.unique(labels)]
    names = metric_names(fprs)
    ones = np.ones((1, len(scores)))
    points = [attack_metrics(scores[i], is_member[i], ones[:, i], fprs)[0] for _, _, i in slices]
    reps: list[list[np.ndarray]] = [[] for _ in slices]
    if num_resamples > 0:
        for counts in bootstrap.resample_counts(len(scores), patient_id, num_resamples, seed):
            for k, (_, _, i) in enumerate(slices):
                reps[k].append(attack_metrics(scores[i], is_member[i], counts[:, i], fprs))
    result: dict = {"overall": None, "by_group": {a: {} for a in groups}, "counts": {},
                    "num_resamples": int(num_resamples), "confidence": confidence,
                    "metrics": list(names)}
    for k, (attr, g, index) in enumerate(slices):
        stats = _stats(points[k], np.concatenate(reps[k]) if reps[k] else None, names,
                       confidence)
        counts = {"members": int(is_member[index].sum()),
                  "non_members": int((~is_member[index]).sum())}
        if g is None:
            result["overall"], result["counts"]["overall"] = stats, counts
        else:
            result["by_group"][attr][str(g)] = stats
            result["counts"].setdefault(attr, {})[str(g)] = counts
    return result
