"""Markdown report and PNG plots from the dict of compare.evaluate_fairness (or fairness.json).

The figures are drawn by tfdpfair/fairness/plots.py (one colour per variant series in every
figure; see that module):
  subgroups.png              primary metric per group (and overall) for the reference and each
                             private variant, bars with bootstrap-CI error bars
  privacy_utility.png        ε (log axis) against the overall primary metric and against each
                             attribute's max-min gap; non-private variants as horizontal lines.
                             Not drawn when all private variants share one ε (no curve): the
                             report says so
  disparity_vs_accuracy.png  max-min gap against overall primary metric, every variant, CIs on
                             both axes, ε labels that do not overlap: compare private and
                             non-private at matched accuracy
The Markdown leads with one sentence per attribute saying whether the private model's gap is
larger than the non-private one's and whether the difference is significant.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping

from tfdpfair.fairness import plots
from tfdpfair.fairness.plots import (DISPARITY_ACCURACY_PNG, GAP, PRIVACY_UTILITY_PNG,
                                     SUBGROUPS_PNG)

_num = plots._num  # noqa: SLF001  (None -> NaN, shared with the figures)
_statistic = plots.statistic
_ordered_variants = plots.ordered_variants


def _fmt(stat: Mapping[str, Any], signed: bool = False) -> str:
    v = _num(stat["value"])
    if not math.isfinite(v):
        return "n/a"
    lo, hi = (_num(c) for c in stat["ci"])
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v)} [{f.format(lo)}, {f.format(hi)}]"


def _save(fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, dpi=plots.DPI)
    return path


def plot_subgroups(result: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Writes plots.subgroups_figure to path."""
    return _save(plots.subgroups_figure(result), pathlib.Path(path))


def plot_privacy_utility(result: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """Writes plots.privacy_utility_figure to path; None (nothing written) when it is not drawn
    (plots.privacy_utility_skip_reason)."""
    fig = plots.privacy_utility_figure(result)
    return None if fig is None else _save(fig, pathlib.Path(path))


def plot_disparity_vs_accuracy(result: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Writes plots.disparity_figure to path."""
    return _save(plots.disparity_figure(result), pathlib.Path(path))


def accuracy_sentence(result: Mapping[str, Any], comparison: Mapping[str, Any]) -> str:
    """The overall primary-metric difference behind a gap comparison, and what it implies."""
    metric, model, ref = comparison["primary_metric"], comparison["model"], comparison["reference"]
    diff = comparison["overall_difference"]
    text = (f"Overall {metric}: '{model}' {_fmt(_statistic(result, model, None))} vs "
            f"'{ref}' {_fmt(_statistic(result, ref, None))}, difference "
            f"{_fmt(diff, signed=True)}")
    if diff.get("significant"):
        return (text + " (significant). Disparities tend to grow as accuracy falls, so part of "
                "a gap difference may come from the lower accuracy rather than from privacy "
                f"itself: compare at matched accuracy ({DISPARITY_ACCURACY_PNG}).")
    return text + " (not significant): the two models are at roughly matched accuracy."


def _answer_section(result: Mapping[str, Any]) -> list[str]:
    lines = ["## Answer", ""]
    if not result["comparisons"]:
        why = ("there is no non-private variant" if result.get("reference") is None
               else "there is no private variant")
        return lines + [f"No private vs non-private comparison: {why}.", ""]
    for comp in result["comparisons"]:
        title = (f"'{comp['model']}' vs the accuracy-matched non-private '{comp['reference']}'"
                 if comp["matched_accuracy"] else f"'{comp['model']}' vs '{comp['reference']}'")
        lines += [f"**{title}**", ""]
        lines += [f"- {v['sentence']}" for v in comp["verdicts"].values()] or [
            "- No demographic attributes (group__<attribute> arrays) were given: no gaps."]
        lines += [f"- {accuracy_sentence(result, comp)}", ""]
    return lines


def _setup_section(result: Mapping[str, Any]) -> list[str]:
    boot = result["bootstrap"]
    unit = ("patients (cluster bootstrap: all examples of a drawn patient)"
            if boot["unit"] == "patient" else "examples")
    lines = ["## Setup", "",
             f"- Evaluation set: {result['num_examples']} examples"
             + (f" from {boot['num_units']} patients" if boot["unit"] == "patient" else "") + ".",
             f"- Bootstrap: {boot['num_resamples']} resamples of {unit}, seed {boot['seed']}, "
             f"{100 * result['confidence']:g}% percentile CIs; every model uses the same "
             "resamples (paired), so differences have their own CIs.",
             f"- Groups with fewer than {result['min_group_size']} examples, or where a metric "
             "needs both label classes and has one, are reported as n/a with their count."]
    if "eval_set_check" in result:
        lines.append(f"- {result['eval_set_check']}")
    return lines + [""]


def _models_section(result: Mapping[str, Any]) -> list[str]:
    metric, attrs = result["primary_metric"], list(result["attributes"])
    head = ["variant", "private (unit of privacy)", "ε", "δ", "test_accuracy (metrics.json)",
            f"{metric} [CI]"]
    head += [f"gap {a} [CI]" for a in attrs]
    lines = ["## Models", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in result["variants"].items():
        unit = v.get("privacy_unit") or "example"
        cells = [name, f"yes (one {unit})" if v["private"] else "no",
                 "" if v.get("epsilon") is None else f"{v['epsilon']:g}",
                 "" if v.get("delta") is None else f"{v['delta']:.2g}",
                 "" if v.get("test_accuracy") is None else f"{v['test_accuracy']:.3f}",
                 _fmt(_statistic(result, name, None))]
        cells += [_fmt(_statistic(result, name, a)) for a in attrs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _groups_section(result: Mapping[str, Any]) -> list[str]:
    metric = result["primary_metric"]
    names = _ordered_variants(result)
    comps = [c for c in result["comparisons"] if not c["matched_accuracy"]]
    lines = [f"## {metric} per group", "",
             "Differences are private − reference with paired-bootstrap CIs; * = significant."]
    for attr, counts in result["attributes"].items():
        head = ["group", "n"] + names + [f"{c['model']} − {c['reference']}" for c in comps]
        lines += ["", f"### {attr}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for group, n in counts.items():
            stats = [result["variants"][v]["metrics"][metric]["groups"][attr][group]
                     for v in names]
            reason = stats[0].get("reason")  # depends on the labels only: same for every model
            cells = [group if reason is None else f"{group} (n/a: {reason})", str(n)]
            cells += [_fmt(s) for s in stats]
            for c in comps:
                d = c["metrics"][metric]["groups"][attr][group]
                cells.append(_fmt(d, signed=True) + (" *" if d.get("significant") else ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", _disparity_table(result, attr)]
    return lines + [""]


def _disparity_table(result: Mapping[str, Any], attr: str) -> str:
    metric = result["primary_metric"]
    rows = ["| variant | worst group | worst value | max-min gap | max gap to overall | min/max "
            "ratio |", "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        d = v["metrics"][metric]["disparity"][attr]
        rows.append(f"| {name} | {d['worst_group'].get('group')} | {_fmt(d['worst_group'])} | "
                    f"{_fmt(d[GAP])} | {_fmt(d['max_gap_to_overall'])} | "
                    f"{_fmt(d['min_max_ratio'])} |")
    return "\n".join(rows)


def markdown(result: Mapping[str, Any], figures: Mapping[str, pathlib.Path | None]) -> str:
    """The report text; `figures` maps a caption to a PNG path (None: not drawn, which only the
    privacy-utility figure can be; the report gives plots.privacy_utility_skip_reason)."""
    lines = ["# Fairness report: private vs non-private", ""]
    lines += _answer_section(result) + _setup_section(result) + _models_section(result)
    lines += ["## Plots", ""]
    for caption, path in figures.items():
        reason = plots.privacy_utility_skip_reason(result) or "no figure"
        lines += [f"![{caption}]({path.name})" if path else f"({caption}: not drawn: {reason}.)",
                  ""]
    lines += _groups_section(result)
    lines += ["## How to read this", "",
              "A gap is the best group's value minus the worst group's (max − min); the private "
              "model's gap is significantly larger when the CI of the paired difference lies "
              "above 0. Private models are usually less accurate, and less accurate models "
              "usually have larger gaps, so a fair comparison is at matched accuracy: look at "
              f"{DISPARITY_ACCURACY_PNG}, where a private point above the non-private points of "
              "the same accuracy means privacy itself costs fairness. Every metric (per class or "
              "per task, TPR/FPR at the threshold) with CIs is in fairness.json.", ""]
    return "\n".join(lines)


def write_report(result: Mapping[str, Any], out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Write report.md and the PNG plots into out_dir; returns {file name: path}."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        f"{result['primary_metric']} per group": plot_subgroups(result, out / SUBGROUPS_PNG),
        "privacy-utility": plot_privacy_utility(result, out / PRIVACY_UTILITY_PNG),
        "disparity vs accuracy": plot_disparity_vs_accuracy(result, out / DISPARITY_ACCURACY_PNG),
    }
    report = out / "report.md"
    report.write_text(markdown(result, written))
    return {p.name: p for p in [report, *written.values()] if p is not None}
