"""What a finished run writes: per-variant predictions and metrics, metrics.json, report.md.

Variants: "private" (last DP weights), "private_ema", "private_polyak" (averages, when kept),
"non_private" (the baseline), all on the same test split, in the run_io layout
(fairness/run_io.py) that tfdpfair-evaluate (cli/evaluate.py) reads for the subgroup report.
Multiclass: accuracy. Multilabel: macro AUC over the evaluation tasks (tasks whose test labels
hold a single class are left out and listed), plus per-label accuracy at 0.5.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from tfdpfair.fairness import run_io
from tfdpfair.privacy.statement import privacy_statement
from tfdpfair.privacy.tf_privacy_compat import tf_privacy_statement
from tfdpfair.trainer.task_data import EvalSplit, TaskData


def scores_from_logits(task: str, logits: np.ndarray) -> np.ndarray:
    """Softmax probabilities (multiclass) or per-task sigmoids (multilabel)."""
    logits = np.asarray(logits, np.float64)
    if task == "multiclass":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def score_metrics(data: TaskData, y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """{"accuracy": ..} (multiclass) or {"accuracy", "macro_auc"} (multilabel)."""
    if data.task == "multiclass":
        return {"accuracy": float(np.mean(scores.argmax(axis=1) == y_true))}
    y_true = (np.asarray(y_true) >= 0.5).astype(np.float32)
    tasks = data.eval_tasks or data.class_names
    aucs = [roc_auc_score(y_true[:, data.class_names.index(t)],
                          scores[:, data.class_names.index(t)])
            for t in tasks if len(np.unique(y_true[:, data.class_names.index(t)])) == 2]
    return {"accuracy": float(np.mean((scores >= 0.5) == (y_true >= 0.5))),
            "macro_auc": float(np.mean(aucs)) if aucs else float("nan")}


def write_variant(workdir: pathlib.Path, name: str, data: TaskData, split: EvalSplit,
                  y_true: np.ndarray, scores: np.ndarray, private: bool,
                  plan_info: dict[str, Any] | None) -> dict[str, float]:
    """Writes predictions/<name>.npz and the metrics.json entry; returns the metrics."""
    results = score_metrics(data, y_true, scores)
    extra = {f"test_{k}": v for k, v in results.items() if k != "accuracy"}
    info = dict(plan_info or {})
    run_io.write_variant(
        workdir, name, task=data.task, class_names=list(data.class_names), private=private,
        epsilon=info.pop("epsilon", None), delta=info.pop("delta", None),
        test_accuracy=results["accuracy"], y_true=y_true, y_score=scores,
        groups=split.groups, patient_id=split.patient_ids,
        task_names=list(data.class_names) if data.task == "multilabel" else None,
        **extra, **info)
    return results


def render_report(config: Any, summary: dict, dp_model: Any | None) -> str:
    """Markdown summary of the run: what was run, the numbers, the privacy statement."""
    lines = ["# tfdpfair run report", "",
             f"Data: {config.data.name}; model: {config.model.name} "
             f"{config.model.get('variant', '')} (trained: {config.model.train}; initial "
             f"weights: {summary.get('initial_weights', '?')}).", "",
             "| model | test metrics |", "|---|---|"]
    for name, results in summary.get("variants", {}).items():
        label = name
        if name.startswith("private") and "epsilon" in summary:
            label += f" (ε = {summary['epsilon']:.3f}, δ = {summary['delta']:.3g})"
        lines.append(f"| {label} | " + ", ".join(f"{k} {v:.4f}" for k, v in results.items())
                     + " |")
    if dp_model is not None and dp_model.plan is not None:
        plan, steps = dp_model.plan, dp_model.logical_steps_done
        lines += ["", "## Privacy", "", privacy_statement(plan, steps), "",
                  "EMA and Polyak averages are computed from the released weights only "
                  "(post-processing): they carry the same guarantee.", "",
                  "### Cross-check: TensorFlow Privacy's statement", "",
                  "TF Privacy computes the same mechanism independently (RDP). Our sampler does "
                  "real Poisson sampling, so its \"assuming Poisson sampling\" line is the one "
                  "that applies (it matches ours when we also use RDP).", "", "```",
                  tf_privacy_statement(plan.num_examples, int(round(plan.expected_batch_size)),
                                       steps * plan.expected_batch_size / plan.num_examples,
                                       plan.noise_multiplier, plan.delta), "```"]
    return "\n".join(lines) + "\n"
