"""The audit's report section (markdown) and plots (matplotlib, Agg canvas; no TensorFlow)."""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import numpy as np
from matplotlib.figure import Figure


def _fmt(stat: Mapping[str, Any]) -> str:
    text = f"{stat['value']:.3f}"
    if "ci_low" in stat:
        text += f" [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]"
    return text


def plot_canary_scores(scores: np.ndarray, included: np.ndarray, k: int,
                       path: str | pathlib.Path) -> pathlib.Path:
    """Histogram of canary scores, included vs excluded, with the top-k / bottom-k cut-offs."""
    path = pathlib.Path(path)
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bins = np.linspace(scores.min(), scores.max(), 40) if np.ptp(scores) > 0 else 10
    ax.hist(scores[included], bins=bins, alpha=0.6, label="included canaries")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label="excluded canaries")
    ordered = np.sort(scores)
    if 0 < k <= len(scores) // 2:
        for cut in (ordered[k - 1], ordered[len(scores) - k]):
            ax.axvline(cut, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("canary score (higher: guessed 'in')")
    ax.set_ylabel("canaries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_membership(results: Mapping[str, Mapping[str, Any]], attribute: str,
                    path: str | pathlib.Path, metric: str = "auc") -> pathlib.Path:
    """Bar chart of one attack metric per subgroup (with CIs) for every model variant."""
    path = pathlib.Path(path)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    variants = list(results)
    for i, name in enumerate(variants):
        res = results[name]
        labels = ["overall"] + list(res["by_group"].get(attribute, {}))
        stats = [res["overall"][metric]] + [res["by_group"][attribute][g][metric]
                                            for g in labels[1:]]
        x = np.arange(len(labels)) + (i - (len(variants) - 1) / 2) * 0.8 / len(variants)
        values = np.array([s["value"] for s in stats])
        err = None
        if all("ci_low" in s for s in stats):
            err = np.abs(np.array([[s["ci_low"] for s in stats], [s["ci_high"] for s in stats]])
                         - values)
        ax.bar(x, values, width=0.8 / len(variants), yerr=err, capsize=3, label=name)
        ax.set_xticks(np.arange(len(labels)), labels)
    if metric == "auc":
        ax.axhline(0.5, color="k", linewidth=1, linestyle=":")
        ax.set_ylim(0.4, None)
    ax.set_ylabel(f"membership inference {metric}")
    ax.set_xlabel(attribute)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def canary_section(audit: Mapping[str, Any]) -> list[str]:
    kind = "white-box gradient" if audit["mode"] == "gradient_canaries" else "black-box input"
    return [
        f"One-run audit (Steinke, Nasr & Jagielski 2023) with {audit['m']} {kind} canaries, "
        f"each included with probability 1/2 ({audit['num_included']} included), score "
        f"'{audit['score']}'. Guessing 'in' for the top k and 'out' for the bottom k scores "
        f"(k tried: {audit['ks_tried']}, Bonferroni-corrected), the best k = {audit['k']} made "
        f"r = {audit['r']} guesses, v = {audit['v']} correct.", "",
        "| ε lower bound (95%) | accountant ε | σ | q | steps | δ |",
        "|---|---|---|---|---|---|",
        f"| {audit['epsilon_lower_bound']:.3f} | {audit['accountant_epsilon']:.3f} | "
        f"{audit['noise_multiplier']:.4g} | {audit['sampling_rate']:.4g} | {audit['steps']} | "
        f"{audit['delta']:.3g} |", "",
        "A lower bound above the accountant's ε would mean a bug in clipping, noise or "
        "accounting; a bound far below it is expected (the audit sees one run and, without "
        "tailored canaries, is loose).", ""]


def membership_section(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["Loss-threshold membership inference (score −loss), training set (members) vs "
             "held-out test set (non-members); 95% bootstrap CIs.", ""]
    for name, res in results.items():
        names = res["metrics"]
        lines += [f"**{name}**", "", "| slice | members / non-members | " + " | ".join(names)
                  + " |", "|---" * (len(names) + 2) + "|"]
        rows = [("overall", res["overall"], res["counts"]["overall"])]
        for attr, groups in res["by_group"].items():
            rows += [(f"{attr}={g}", s, res["counts"][attr][g]) for g, s in groups.items()]
        for label, stats, counts in rows:
            lines.append(f"| {label} | {counts['members']} / {counts['non_members']} | "
                         + " | ".join(_fmt(stats[n]) for n in names) + " |")
        lines.append("")
    return lines


def markdown(audit: Mapping[str, Any], plots: Mapping[str, pathlib.Path]) -> str:
    """audit.md: a "Privacy audit" section a run's report can include as it is."""
    lines = ["## Privacy audit", ""]
    if "canaries" in audit:
        lines += canary_section(audit["canaries"])
    if "membership" in audit:
        lines += membership_section(audit["membership"])
    for name, path in plots.items():
        lines += [f"![{name}]({pathlib.Path(path).name})", ""]
    return "\n".join(lines)
