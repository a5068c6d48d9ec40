"""Markdown report and PNG plots from the dict of compare.evaluate_fairness (or fairness.json).

Plots (matplotlib Agg canvases, no pyplot state):
  subgroups.png              primary metric per group (and overall) for the reference and each
                             private variant, bars with bootstrap-CI error bars
  privacy_utility.png        ε (log axis) against the overall primary metric and against each
                             attribute's max-min gap; non-private variants as horizontal lines
  disparity_vs_accuracy.png  max-min gap against overall primary metric, every variant, CIs on
                             both axes: compare private and non-private at matched accuracy
The Markdown leads with one sentence per attribute saying whether the private model's gap is
larger than the non-private one's and whether the difference is significant.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

GAP = "max_min_gap"
SUBGROUPS_PNG = "subgroups.png"
PRIVACY_UTILITY_PNG = "privacy_utility.png"
DISPARITY_ACCURACY_PNG = "disparity_vs_accuracy.png"
_MAX_BARS = 6


def _num(x: Any) -> float:
    """None (JSON null) -> NaN."""
    return float("nan") if x is None else float(x)


def _fmt(stat: Mapping[str, Any], signed: bool = False) -> str:
    v = _num(stat["value"])
    if not math.isfinite(v):
        return "n/a"
    lo, hi = (_num(c) for c in stat["ci"])
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v)} [{f.format(lo)}, {f.format(hi)}]"


def _yerr(stats: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Values and asymmetric error-bar lengths [[below...], [above...]] (0 where undefined)."""
    vals = [_num(s["value"]) for s in stats]
    below, above = [], []
    for v, s in zip(vals, stats):
        lo, hi = (_num(c) for c in s["ci"])
        ok = all(math.isfinite(x) for x in (v, lo, hi))
        below.append(max(v - lo, 0.0) if ok else 0.0)
        above.append(max(hi - v, 0.0) if ok else 0.0)
    return vals, [below, above]


def _new_figure(ncols: int, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _legend(fig: Figure, ax: Any) -> None:
    """One legend for the figure, above the panels (outside the data)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 4),
               fontsize=8)


def _ordered_variants(result: Mapping[str, Any]) -> list[str]:
    """Reference first, then private variants, then the other non-private ones."""
    ref = result.get("reference")
    names = ([ref] if ref else []) + [n for n, v in result["variants"].items() if v["private"]]
    return names + [n for n in result["variants"] if n not in names]


def plot_subgroups(result: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Bars of the primary metric per group (with CIs), one panel per attribute."""
    metric, attrs = result["primary_metric"], list(result["attributes"])
    names = _ordered_variants(result)[:_MAX_BARS]  # more bars would be unreadable
    fig, axes = _new_figure(max(len(attrs), 1), width=max(4.0, 1.2 * len(names) + 2))
    for ax, attr in zip(axes, attrs):
        groups = list(result["attributes"][attr])
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            m = result["variants"][name]["metrics"][metric]
            stats = [m["overall"]] + [m["groups"][attr][g] for g in groups]
            vals, err = _yerr(stats)
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(stats))]
            ax.bar(xs, vals, width, yerr=err, capsize=3, label=name)
            for x, v in zip(xs, vals):
                if not math.isfinite(v):
                    ax.annotate("n/a", (x, 0), xycoords=("data", "axes fraction"),
                                ha="center", va="bottom", fontsize=7, rotation=90)
        counts = result["attributes"][attr]
        ax.set_xticks(range(len(groups) + 1),
                      ["overall"] + [f"{g}\nn={counts[g]}" for g in groups], fontsize=8)
        ax.set_title(f"{metric} by {attr}")
        ax.set_ylabel(metric)
        _set_bar_ylim(ax)
    _legend(fig, axes[0])
    fig.savefig(path, dpi=110)
    return path


def _set_bar_ylim(ax: Any) -> None:
    """Zoom the y axis on the bar tops (bars of accuracy/AUC are otherwise all ~full height)."""
    tops = [p.get_height() for p in ax.patches if math.isfinite(p.get_height())]
    if tops:
        lo = max(0.0, min(tops) - 0.15)
        ax.set_ylim(lo, min(1.05, max(tops) + 0.05))


def _series(result: Mapping[str, Any]) -> dict[str, list[str]]:
    """Private variants with an ε, grouped by series and sorted by ε."""
    out: dict[str, list[str]] = {}
    for name, v in result["variants"].items():
        if v["private"] and v.get("epsilon") is not None:
            out.setdefault(v.get("series") or name, []).append(name)
    return {s: sorted(ns, key=lambda n: result["variants"][n]["epsilon"]) for s, ns in out.items()}


def _statistic(result: Mapping[str, Any], name: str, attr: str | None) -> Mapping[str, Any]:
    m = result["variants"][name]["metrics"][result["primary_metric"]]
    return m["overall"] if attr is None else m["disparity"][attr][GAP]


def plot_privacy_utility(result: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """ε against the overall primary metric, and against each attribute's max-min gap."""
    series = _series(result)
    if not series:
        return None
    metric, attrs = result["primary_metric"], list(result["attributes"])
    fig, axes = _new_figure(1 + len(attrs))
    public = [n for n, v in result["variants"].items() if not v["private"]]
    for ax, attr in zip(axes, [None] + attrs):
        for label, names in series.items():
            eps = [result["variants"][n]["epsilon"] for n in names]
            vals, err = _yerr([_statistic(result, n, attr) for n in names])
            ax.errorbar(eps, vals, yerr=err, marker="o", capsize=3, label=label)
        for k, name in enumerate(public):
            stat = _statistic(result, name, attr)
            v, (lo, hi) = _num(stat["value"]), (_num(c) for c in stat["ci"])
            color = f"C{len(series) + k}"
            ax.axhline(v, color=color, linestyle="--", label=f"{name} (non-private)")
            if math.isfinite(lo) and math.isfinite(hi):
                ax.axhspan(lo, hi, color=color, alpha=0.12)
        ax.set_xscale("log")
        ticks = sorted({result["variants"][n]["epsilon"] for ns in series.values() for n in ns})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("ε")
        ax.set_ylabel(metric if attr is None else f"{metric} max-min gap")
        ax.set_title(f"overall {metric}" if attr is None else f"{metric} gap across {attr}")
    _legend(fig, axes[0])
    fig.savefig(path, dpi=110)
    return path


def plot_disparity_vs_accuracy(result: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Max-min gap against overall primary metric, CIs on both axes, one panel per attribute."""
    metric, attrs = result["primary_metric"], list(result["attributes"])
    fig, axes = _new_figure(max(len(attrs), 1))
    for ax, attr in zip(axes, attrs):
        for k, (name, v) in enumerate(result["variants"].items()):
            (x,), xerr = _yerr([_statistic(result, name, None)])
            (y,), yerr = _yerr([_statistic(result, name, attr)])
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, capsize=3, color=f"C{k % 10}",
                        marker="o" if v["private"] else "s", linestyle="none", label=name)
            eps = v.get("epsilon")
            if math.isfinite(x) and math.isfinite(y):
                ax.annotate("non-private" if not v["private"] else
                            (f"ε={eps:g}" if eps is not None else "private"), (x, y),
                            textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(f"overall {metric}")
        ax.set_ylabel(f"{metric} max-min gap across {attr}")
        ax.set_title(f"disparity vs {metric} ({attr})")
    _legend(fig, axes[0])
    fig.savefig(path, dpi=110)
    return path


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


def markdown(result: Mapping[str, Any], plots: Mapping[str, pathlib.Path | None]) -> str:
    """The report text; `plots` maps a caption to a PNG path (None: not drawn)."""
    lines = ["# Fairness report: private vs non-private", ""]
    lines += _answer_section(result) + _setup_section(result) + _models_section(result)
    lines += ["## Plots", ""]
    for caption, path in plots.items():
        lines += [f"![{caption}]({path.name})" if path else f"({caption}: not drawn, no private "
                  "variant with an ε)", ""]
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
    plots = {
        f"{result['primary_metric']} per group": plot_subgroups(result, out / SUBGROUPS_PNG),
        "privacy-utility": plot_privacy_utility(result, out / PRIVACY_UTILITY_PNG),
        "disparity vs accuracy": plot_disparity_vs_accuracy(result, out / DISPARITY_ACCURACY_PNG),
    }
    report = out / "report.md"
    report.write_text(markdown(result, plots))
    return {p.name: p for p in [report, *plots.values()] if p is not None}
