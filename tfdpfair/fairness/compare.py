"""Fairness evaluation of several models on one evaluation set, and paired comparisons.

`evaluate_fairness` returns one JSON-ready dict (NaN for undefined values) with, per model and
metric: the overall value, every group's value with its count (NaN with a reason when the group
is too small or has one label class), and the disparity aggregates of metrics.disparities, all
with percentile bootstrap CIs. Each private model is compared with the non-private reference on
the same resamples (paired bootstrap): difference = private − reference, per group and per
disparity, "significant" when the CI of the difference excludes 0. Because disparities tend to
grow as accuracy falls (arXiv 2308.10888 argues to compare at matched accuracy), a private model
is also compared with the non-private model closest to it in overall primary metric, when that
is a different one, and the overall accuracy difference is reported next to every gap verdict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from tfdpfair.fairness import bootstrap as bootstrap_lib
from tfdpfair.fairness import metrics as metrics_lib
from tfdpfair.fairness.metrics import OVERALL

GAP = "max_min_gap"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model to evaluate: name (unique), privacy, and the series it belongs to in plots."""

    name: str
    private: bool
    epsilon: float | None = None
    delta: float | None = None
    test_accuracy: float | None = None
    run_dir: str | None = None
    series: str | None = None  # e.g. "private_ema": points of one series join in plots
    privacy_unit: str | None = None  # "example" or "patient" for private models


def _stat(point: float, replicates: np.ndarray, confidence: float) -> dict[str, Any]:
    """{"value", "ci": [lo, hi], "boot_valid"} for a scalar statistic and its replicates [B]."""
    lo, hi = bootstrap_lib.percentile_ci(replicates, confidence)
    valid = int(np.isfinite(replicates).sum())
    if not np.isfinite(point):
        lo = hi = float("nan")
    return {"value": float(point), "ci": [float(lo), float(hi)], "boot_valid": valid}


def _diff_stat(point: float, replicates: np.ndarray, confidence: float) -> dict[str, Any]:
    """_stat plus "significant": the CI of the difference excludes 0."""
    out = _stat(point, replicates, confidence)
    lo, hi = out["ci"]
    out["significant"] = bool(lo > 0 or hi < 0)
    return out


def _attribute_columns(slices: Sequence[metrics_lib.Slice]) -> dict[str, list[int]]:
    cols: dict[str, list[int]] = {}
    for j, sl in enumerate(slices):
        if sl.attribute != OVERALL:
            cols.setdefault(sl.attribute, []).append(j)
    return cols


def _disparity_arrays(table: np.ndarray, m: int, cols: Sequence[int],
                      higher_is_better: bool) -> dict[str, np.ndarray]:
    """metrics.disparities of metric m over group columns `cols` of table [..., M, S]."""
    return metrics_lib.disparities(table[..., m, list(cols)], table[..., m, 0], higher_is_better)


class _Context:
    """Shared pieces of one evaluation: tables, validity, attribute columns, confidence."""

    def __init__(self, eval_set: metrics_lib.EvalSet, tables: bootstrap_lib.PairedTables,
                 config: metrics_lib.MetricConfig, confidence: float):
        self.eval_set, self.tables, self.confidence = eval_set, tables, confidence
        self.reasons = [[metrics_lib.undefined_reason(eval_set, info, sl, config)
                         for sl in tables.slices] for info in tables.infos]
        self.attr_cols = _attribute_columns(tables.slices)
        self._summaries: dict[tuple[str, int], dict[str, Any]] = {}

    def summary(self, name: str, m: int) -> dict[str, Any]:
        """_model_metric(self, name, m), computed once."""
        if (name, m) not in self._summaries:
            self._summaries[(name, m)] = _model_metric(self, name, m)
        return self._summaries[(name, m)]

    def valid_cols(self, m: int, attribute: str) -> list[int]:
        return [j for j in self.attr_cols[attribute] if self.reasons[m][j] is None]


def _model_metric(ctx: _Context, name: str, m: int) -> dict[str, Any]:
    """Overall, per-group and disparity statistics of metric m for model `name`."""
    info, slices = ctx.tables.infos[m], ctx.tables.slices
    point, reps = ctx.tables.point[name], ctx.tables.replicates[name]
    out: dict[str, Any] = {"overall": _stat(point[m, 0], reps[:, m, 0], ctx.confidence),
                           "groups": {}, "disparity": {}}
    for attribute, cols in ctx.attr_cols.items():
        groups = {}
        for j in cols:
            stat = _stat(point[m, j], reps[:, m, j], ctx.confidence)
            stat.update(n=len(slices[j].index), reason=ctx.reasons[m][j])
            groups[slices[j].group] = stat
        out["groups"][attribute] = groups
        valid = ctx.valid_cols(m, attribute)
        disp_point = _disparity_arrays(point, m, valid, info.higher_is_better)
        disp_reps = _disparity_arrays(reps, m, valid, info.higher_is_better)
        disp = {k: _stat(disp_point[k], disp_reps[k], ctx.confidence) for k in disp_point}
        worst = metrics_lib.worst_group_index(point[m, valid], info.higher_is_better)
        disp["worst_group"]["group"] = slices[valid[worst]].group if worst >= 0 else None
        disp["num_groups_defined"] = len(valid)
        out["disparity"][attribute] = disp
    return out


def _pair_metric(ctx: _Context, model: str, reference: str, m: int) -> dict[str, Any]:
    """Paired differences (model − reference) of metric m: overall, per group, disparities."""
    info, slices, conf = ctx.tables.infos[m], ctx.tables.slices, ctx.confidence
    pa, pb = ctx.tables.point[reference], ctx.tables.point[model]
    ra, rb = ctx.tables.replicates[reference], ctx.tables.replicates[model]
    overall = _diff_stat(pb[m, 0] - pa[m, 0], rb[:, m, 0] - ra[:, m, 0], conf)
    out: dict[str, Any] = {"overall": overall, "groups": {}, "disparity": {}}
    for attribute, cols in ctx.attr_cols.items():
        out["groups"][attribute] = {
            slices[j].group: _diff_stat(pb[m, j] - pa[m, j], rb[:, m, j] - ra[:, m, j], conf)
            for j in cols}
        valid = ctx.valid_cols(m, attribute)
        da, db = (_disparity_arrays(t, m, valid, info.higher_is_better) for t in (pa, pb))
        rda, rdb = (_disparity_arrays(t, m, valid, info.higher_is_better) for t in (ra, rb))
        out["disparity"][attribute] = {k: _diff_stat(db[k] - da[k], rdb[k] - rda[k], conf)
                                       for k in da}
    return out


def _fmt(stat: Mapping[str, Any], signed: bool = False) -> str:
    v, (lo, hi) = stat["value"], stat["ci"]
    if not math.isfinite(v):
        return "undefined"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v)} [{f.format(lo)}, {f.format(hi)}]"


def _label(variant: Variant) -> str:
    """E.g. "the private model 'private' (ε=8)"."""
    kind = "private" if variant.private else "non-private"
    eps = f" (ε={variant.epsilon:g})" if variant.epsilon is not None else ""
    return f"the {kind} model '{variant.name}'{eps}"


def gap_verdict(model: Variant, reference: Variant, attribute: str, metric: str,
                model_gap: Mapping[str, Any], reference_gap: Mapping[str, Any],
                gap_diff: Mapping[str, Any], confidence: float) -> dict[str, Any]:
    """The plain-language answer: is the model's max-min gap larger than the reference's, and
    is the difference significant (paired-bootstrap CI of the difference excludes 0)?"""
    pct = f"{100 * confidence:g}%"
    d = gap_diff["value"]
    if not math.isfinite(d):
        sentence = (f"{attribute}: the {metric} gaps of {_label(model)} and {_label(reference)} "
                    f"cannot be compared (fewer than two {attribute} groups with a defined "
                    f"{metric}).")
        return {"gap_larger": None, "significant": None, "sentence": sentence}
    larger, significant = bool(d > 0), bool(gap_diff["significant"])
    sentence = (
        f"{attribute}: {_label(model)} {'has a larger' if larger else 'does not have a larger'} "
        f"{metric} gap between {attribute} groups than {_label(reference)} "
        f"({_fmt(model_gap)} vs {_fmt(reference_gap)}); the difference "
        f"{_fmt(gap_diff, signed=True)} {'is' if significant else 'is not'} statistically "
        f"significant ({pct} paired-bootstrap CI {'excludes' if significant else 'includes'} 0).")
    return {"gap_larger": larger, "significant": significant, "sentence": sentence}


def _comparison(ctx: _Context, variants: Mapping[str, Variant], model: str, reference: str,
                matched: bool, primary: int) -> dict[str, Any]:
    infos = ctx.tables.infos
    per_metric = {info.name: _pair_metric(ctx, model, reference, m) for m, info in enumerate(infos)}
    primary_name = infos[primary].name
    verdicts = {}
    for attribute in ctx.attr_cols:
        model_gap = ctx.summary(model, primary)["disparity"][attribute][GAP]
        ref_gap = ctx.summary(reference, primary)["disparity"][attribute][GAP]
        verdicts[attribute] = gap_verdict(
            variants[model], variants[reference], attribute, primary_name, model_gap, ref_gap,
            per_metric[primary_name]["disparity"][attribute][GAP], ctx.confidence)
    return {"model": model, "reference": reference, "matched_accuracy": matched,
            "primary_metric": primary_name,
            "overall_difference": per_metric[primary_name]["overall"],
            "verdicts": verdicts, "metrics": per_metric}


def choose_reference(variants: Mapping[str, Variant], reference: str | None = None) -> str | None:
    """The non-private reference: `reference` if given, else a variant named "non_private"
    (or ".../non_private"), else the first non-private variant; None if there is none."""
    if reference is not None:
        if reference not in variants:
            raise ValueError(f"reference {reference!r} is not one of {sorted(variants)}.")
        return reference
    public = [n for n, v in variants.items() if not v.private]
    named = [n for n in public if n.split("/")[-1] == "non_private"]
    return (named or public or [None])[0]


def matched_reference(overall: Mapping[str, float], variants: Mapping[str, Variant],
                      model: str) -> str | None:
    """The non-private variant whose overall primary metric is closest to `model`'s."""
    public = [n for n, v in variants.items() if not v.private and math.isfinite(overall[n])]
    if not public:
        return None
    return min(public, key=lambda n: abs(overall[n] - overall[model]))


def evaluate_fairness(eval_set: metrics_lib.EvalSet, scores: Mapping[str, np.ndarray],
                      variants: Mapping[str, Variant] | None = None, *,
                      reference: str | None = None, num_bootstrap: int = 1000, seed: int = 0,
                      confidence: float = 0.95,
                      config: metrics_lib.MetricConfig = metrics_lib.MetricConfig()
                      ) -> dict[str, Any]:
    """Evaluate every model in `scores` (name -> y_score) per group with bootstrap CIs, and
    compare each private variant with the non-private reference (and the accuracy-matched
    non-private variant) by paired bootstrap. Returns a JSON-ready dict (NaN = undefined)."""
    variants = dict(variants or {n: Variant(n, private=False) for n in scores})
    if set(variants) != set(scores):
        raise ValueError(f"variants {sorted(variants)} and scores {sorted(scores)} differ.")
    tables = bootstrap_lib.paired_metric_tables(eval_set, scores, num_resamples=num_bootstrap,
                                                seed=seed, config=config)
    ctx = _Context(eval_set, tables, config, confidence)
    primary = [i.name for i in tables.infos].index(metrics_lib.primary_metric(eval_set.task))
    ref = choose_reference(variants, reference)
    overall = {n: float(tables.point[n][primary, 0]) for n in scores}
    comparisons = []
    for name, variant in variants.items():
        if not variant.private or ref is None:
            continue
        comparisons.append(_comparison(ctx, variants, name, ref, False, primary))
        matched = matched_reference(overall, variants, name)
        if matched is not None and matched != ref:
            comparisons.append(_comparison(ctx, variants, name, matched, True, primary))
    return {
        "task": eval_set.task,
        "primary_metric": tables.infos[primary].name,
        "confidence": confidence,
        "num_examples": eval_set.num_examples,
        "bootstrap": {"num_resamples": num_bootstrap, "seed": seed, "unit": tables.unit,
                      "num_units": tables.num_units, "method": "percentile"},
        "min_group_size": config.min_group_size,
        "threshold": config.threshold,
        "label_names": list(eval_set.label_names),
        "attributes": {a: {tables.slices[j].group: len(tables.slices[j].index) for j in cols}
                       for a, cols in ctx.attr_cols.items()},
        "metrics": [{"name": i.name, "higher_is_better": i.higher_is_better}
                    for i in tables.infos],
        "reference": ref,
        "variants": {n: {**dataclasses.asdict(v), "metrics": {
            info.name: ctx.summary(n, m) for m, info in enumerate(tables.infos)}}
            for n, v in variants.items()},
        "comparisons": comparisons,
    }
