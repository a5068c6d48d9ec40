"""The model card written next to a serving export, and the fairness summary it includes.

The card states what was trained on what (data, model, fine-tuning), the privacy guarantee
(ε, δ, σ, T, q, accountant, unit of privacy, N, and the plain-language statement), evaluation
results, and a per-group summary when the evaluation set carries group labels. Everything in it
is either covered by the DP guarantee (the model, the plan) or computed on the evaluation set,
which DP does not protect and which is not private training data. No training-set statistic
(loss, accuracy, clip fraction: un-noised) is written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from tfdpfair.fairness import compare, metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class ModelCardInfo:
    """What the caller knows beyond the model and its privacy record (all optional).

    Attributes:
      title: heading of the card.
      model: e.g. {"architecture": "nfnet_F0", "fine-tuning": "head", "initial weights": ...}.
      data: e.g. {"training examples (N)": 60000, "evaluation examples": 10000, ...}.
      evaluation: metric name -> value on the evaluation set.
      fairness: the output of :func:`fairness_summary`, or None.
      notes: extra lines for the "Caveats" section.
    """

    title: str = "Differentially private image classifier"
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    evaluation: Mapping[str, float] = dataclasses.field(default_factory=dict)
    fairness: Mapping[str, Any] | None = None
    notes: tuple[str, ...] = ()


def fairness_summary(task: str, y_true: np.ndarray, scores: np.ndarray,
                     groups: Mapping[str, np.ndarray], label_names: tuple[str, ...], *,
                     epsilon: float | None = None, delta: float | None = None,
                     num_bootstrap: int = 200, min_group_size: int = 30) -> dict[str, Any]:
    """Per-group primary metric (accuracy / macro AUC) with bootstrap CIs, and disparities.

    Wraps fairness.compare.evaluate_fairness for the one (private) model; returns
    {"primary_metric", "num_examples", "overall", "attributes": {attribute: {"groups":
    {group: {"value", "ci", "n", "reason"}}, "max_min_gap", "worst_group"}}}.
    """
    eval_set = metrics_lib.EvalSet(task, np.asarray(y_true), tuple(label_names),
                                   {k: np.asarray(v).astype(str) for k, v in groups.items()})
    variant = compare.Variant("model", private=True, epsilon=epsilon, delta=delta)
    result = compare.evaluate_fairness(
        eval_set, {"model": np.asarray(scores)}, {"model": variant},
        num_bootstrap=num_bootstrap, config=metrics_lib.MetricConfig(min_group_size=min_group_size))
    primary = result["primary_metric"]
    stats = result["variants"]["model"]["metrics"][primary]
    attributes = {}
    for attribute, per_group in stats["groups"].items():
        disparity = stats["disparity"][attribute]
        attributes[attribute] = {
            "groups": {g: {"value": s["value"], "ci": s["ci"], "n": s["n"], "reason": s["reason"]}
                       for g, s in per_group.items()},
            "max_min_gap": {"value": disparity["max_min_gap"]["value"],
                            "ci": disparity["max_min_gap"]["ci"]},
            "worst_group": disparity["worst_group"].get("group")}
    return {"primary_metric": primary, "num_examples": result["num_examples"],
            "confidence": result["confidence"], "num_bootstrap": num_bootstrap,
            "min_group_size": min_group_size,
            "overall": {"value": stats["overall"]["value"], "ci": stats["overall"]["ci"]},
            "attributes": attributes}


def _num(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _ci(stat: Mapping[str, Any]) -> str:
    lo, hi = stat["ci"]
    return f"{_num(stat['value'])} [{_num(lo)}, {_num(hi)}]"


def _table(rows: Mapping[str, Any]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {_num(v)} |" for k, v in rows.items())]


def _privacy_section(record: Mapping[str, Any]) -> list[str]:
    rows = {"ε (epsilon)": record["epsilon"], "δ (delta)": record["delta"],
            "σ (noise multiplier)": record["noise_multiplier"],
            "T (logical steps taken)": record["steps"],
            "q (Poisson sampling rate)": record["sampling_rate"],
            "expected batch size": record["expected_batch_size"],
            "C (clipping norm)": record.get("l2_norm_clip"),
            "accountant": record["accountant"], "unit of privacy": record["unit_of_privacy"],
            "N (private units)": record["num_examples"],
            "released weights": record.get("weights", "last")}
    lines = ["## Privacy", "", *_table(rows), ""]
    if record.get("statement"):
        lines += [record["statement"], ""]
    return lines


def _fairness_section(summary: Mapping[str, Any] | None) -> list[str]:
    if not summary:
        return ["## Fairness", "", "No group labels were given with the evaluation set, so no "
                "per-group evaluation was made.", ""]
    metric = summary["primary_metric"]
    lines = ["## Fairness", "",
             f"{metric} per group on the evaluation set ({summary['num_examples']} examples), "
             f"with {summary['confidence']:.0%} percentile bootstrap intervals "
             f"({summary['num_bootstrap']} resamples); groups smaller than "
             f"{summary['min_group_size']} are not scored. Overall: {_ci(summary['overall'])}. "
             "No non-private reference model was trained in this run: compare disparities with "
             "a non-private model of similar accuracy (tfdpfair-evaluate) before "
             "attributing them to DP.", ""]
    for attribute, info in summary["attributes"].items():
        lines += [f"### {attribute}", "", "| group | n | value [CI] | note |", "|---|---|---|---|"]
        for group, stat in info["groups"].items():
            lines.append(f"| {group} | {stat['n']} | {_ci(stat)} | {stat['reason'] or ''} |")
        lines += ["", f"Largest gap between groups: {_ci(info['max_min_gap'])}; worst group: "
                  f"{info['worst_group']}.", ""]
    return lines


def render_model_card(info: ModelCardInfo, privacy_record: Mapping[str, Any],
                      signatures: Mapping[str, str]) -> str:
    """The model card in Markdown."""
    lines = [f"# {info.title}", "", "## Model", "", *_table(dict(info.model)), "",
             "Serving signatures:", ""]
    lines += [f"- `{name}`: {text}" for name, text in signatures.items()]
    lines += ["", "## Data", "", *(_table(dict(info.data)) if info.data else
                                    ["(not described by the exporter)"]), ""]
    lines += _privacy_section(privacy_record)
    lines += ["## Evaluation", ""]
    lines += _table(dict(info.evaluation)) if info.evaluation else ["(no evaluation set given)"]
    lines += [""] + _fairness_section(info.fairness)
    lines += ["## Caveats", "",
              "- Evaluation and fairness numbers come from the evaluation set, which differential "
              "privacy does not protect; training-set statistics are not published.",
              "- The guarantee does not cover hyper-parameters tuned on the private data, nor "
              "the public pre-training data.", *(f"- {note}" for note in info.notes), ""]
    return "\n".join(lines)
