"""The fairness report's figures (matplotlib Figures on an Agg canvas, no pyplot state).

Colours: every figure takes a variant's colour from ``result_colors``, so one variant keeps ONE
colour everywhere. The key is the variant's series ("private_ema" for "eps1/private_ema" and
"eps8/private_ema" alike, see compare.Variant.series); the known kinds have fixed colours in
every run (``KIND_COLORS``: DP last weights blue, DP EMA orange, DP Polyak green, non-private
black, pre-trained brown), other series take the remaining colours in sorted order.
Variants that share a series (one per ε) are told apart by hatching (bars), line style
(horizontal lines) or their ε label (points).

  subgroups_figure            primary metric per group and overall, bars with bootstrap CIs
  privacy_utility_figure      ε (log axis) against the overall metric and each attribute's
                              max-min gap; None when fewer than two ε values exist (one ε
                              makes no curve: ``privacy_utility_skip_reason`` says why)
  disparity_figure            max-min gap against the overall metric, CIs on both axes; private
                              points labelled "ε=4.0" (2 significant digits), placed so that
                              no two texts of the figure overlap
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tfdpfair.fairness import plot_labels

GAP = "max_min_gap"
SUBGROUPS_PNG = "subgroups.png"
PRIVACY_UTILITY_PNG = "privacy_utility.png"
DISPARITY_ACCURACY_PNG = "disparity_vs_accuracy.png"
DPI = 110
_MAX_BARS = 6
KIND_COLORS = {"dp_last": "#1f77b4", "dp_ema": "#ff7f0e", "dp_polyak": "#2ca02c",
               "non_private": "#000000", "pretrained": "#8c564b"}
OTHER_COLORS = ["#d62728", "#9467bd", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f"]
_HATCHES = ["", "//", "..", "xx", "\\\\", "++"]
_LINESTYLES = ["--", ":", "-."]


def variant_kind(name: str) -> str | None:
    """"dp_last", "dp_ema", "dp_polyak", "non_private", "pretrained" or None, from a name such
    as "private_ema", "non-private", "release_polyak" or "dp (ε = 3.99)"."""
    tokens = set(re.split(r"[^a-z0-9]+", name.lower()))
    joined = "_".join(sorted(tokens))
    if "pretrained" in tokens or ("pre" in tokens and "trained" in tokens):
        return "pretrained"
    if tokens & {"nonprivate", "baseline", "public"} or ("non" in tokens and (
            tokens & {"private", "dp"})) or "nondp" in joined:
        return "non_private"
    if "ema" in tokens:
        return "dp_ema"
    if "polyak" in tokens:
        return "dp_polyak"
    if tokens & {"private", "dp", "release", "last"}:
        return "dp_last"
    return None


def variant_colors(names: Iterable[str]) -> dict[str, str]:
    """name -> hex colour: a known kind's fixed colour (first name of that kind in sorted
    order), the other names the remaining colours in sorted order (cycling if exhausted)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    unique = sorted(set(names))
    for name in unique:
        color = KIND_COLORS.get(variant_kind(name) or "")
        if color and color not in used:
            out[name] = color
            used.add(color)
    spare = [c for c in [*OTHER_COLORS, *KIND_COLORS.values()] if c not in used] or OTHER_COLORS
    for i, name in enumerate(n for n in unique if n not in out):
        out[name] = spare[i % len(spare)]
    return out


def series_of(result: Mapping[str, Any], name: str) -> str:
    return result["variants"][name].get("series") or name


def result_colors(result: Mapping[str, Any]) -> dict[str, str]:
    """Variant name -> colour of its series (the one mapping every figure uses)."""
    by_series = variant_colors(series_of(result, n) for n in result["variants"])
    return {n: by_series[series_of(result, n)] for n in result["variants"]}


def _within_series_index(result: Mapping[str, Any]) -> dict[str, int]:
    """Position of each variant within its series, by ε (for hatches and line styles)."""
    groups: dict[str, list[str]] = {}
    for name in result["variants"]:
        groups.setdefault(series_of(result, name), []).append(name)
    key = lambda n: (result["variants"][n].get("epsilon") is None,
                     result["variants"][n].get("epsilon") or 0.0, n)
    return {n: i for names in groups.values() for i, n in enumerate(sorted(names, key=key))}


def eps_text(eps: float) -> str:
    """ε to 2 significant digits for labels: 3.99059 -> "4.0", 0.5 -> "0.5", 12.3 -> "12"."""
    if not math.isfinite(eps):
        return f"{eps}"
    if eps >= 100:
        return f"{eps:.0f}"
    text = f"{eps:.2g}"
    if eps < 10 and "." not in text and "e" not in text:
        text += ".0"
    return text


def variant_label(result: Mapping[str, Any], name: str) -> str:
    """The legend label: the name, plus " (ε=x)" for a private variant with an ε."""
    eps = result["variants"][name].get("epsilon")
    return name if eps is None or not result["variants"][name]["private"] else (
        f"{name} (ε={eps_text(eps)})")


def _num(x: Any) -> float:
    """None (JSON null) -> NaN."""
    return float("nan") if x is None else float(x)


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


def statistic(result: Mapping[str, Any], name: str, attr: str | None) -> Mapping[str, Any]:
    """The overall primary metric (attr None) or attr's max-min gap of one variant."""
    m = result["variants"][name]["metrics"][result["primary_metric"]]
    return m["overall"] if attr is None else m["disparity"][attr][GAP]


def _new_figure(ncols: int, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _legend(fig: Figure, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend for the figure, above the panels (outside the data)."""
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 4),
               fontsize=8)


def ordered_variants(result: Mapping[str, Any]) -> list[str]:
    """Reference first, then private variants, then the other non-private ones."""
    ref = result.get("reference")
    names = ([ref] if ref else []) + [n for n, v in result["variants"].items() if v["private"]]
    return names + [n for n in result["variants"] if n not in names]


def subgroups_figure(result: Mapping[str, Any]) -> Figure:
    """Bars of the primary metric per group (with CIs), one panel per attribute."""
    metric, attrs = result["primary_metric"], list(result["attributes"])
    names = ordered_variants(result)[:_MAX_BARS]  # more bars would be unreadable
    colors, within = result_colors(result), _within_series_index(result)
    fig, axes = _new_figure(max(len(attrs), 1), width=max(4.0, 1.2 * len(names) + 2))
    for ax, attr in zip(axes, attrs):
        groups = list(result["attributes"][attr])
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            m = result["variants"][name]["metrics"][metric]
            vals, err = _yerr([m["overall"]] + [m["groups"][attr][g] for g in groups])
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(vals))]
            ax.bar(xs, vals, width, yerr=err, capsize=3, label=variant_label(result, name),
                   color=colors[name], hatch=_HATCHES[within[name] % len(_HATCHES)],
                   edgecolor="white", linewidth=0.5,
                   error_kw={"ecolor": "0.45"})  # visible on the black non-private bars
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
    _legend(fig, *axes[0].get_legend_handles_labels())
    return fig


def _set_bar_ylim(ax: Any) -> None:
    """Zoom the y axis on the bar tops (bars of accuracy/AUC are otherwise all ~full height)."""
    tops = [p.get_height() for p in ax.patches if math.isfinite(p.get_height())]
    if tops:
        lo = max(0.0, min(tops) - 0.15)
        ax.set_ylim(lo, min(1.05, max(tops) + 0.05))


def private_series(result: Mapping[str, Any]) -> dict[str, list[str]]:
    """Private variants with an ε, grouped by series and sorted by ε."""
    out: dict[str, list[str]] = {}
    for name, v in result["variants"].items():
        if v["private"] and v.get("epsilon") is not None:
            out.setdefault(series_of(result, name), []).append(name)
    return {s: sorted(ns, key=lambda n: result["variants"][n]["epsilon"]) for s, ns in out.items()}


def privacy_utility_skip_reason(result: Mapping[str, Any]) -> str | None:
    """Why the privacy-utility figure is not drawn (None: it is)."""
    eps = {result["variants"][n]["epsilon"] for ns in private_series(result).values()
           for n in ns}
    if not eps:
        return "no private variant with an ε"
    if len(eps) == 1:
        return (f"every private variant has the same ε ({eps_text(next(iter(eps)))}); a "
                "privacy-utility curve needs runs at two or more values of ε")
    return None


def privacy_utility_figure(result: Mapping[str, Any]) -> Figure | None:
    """ε against the overall primary metric, and against each attribute's max-min gap; None
    when ``privacy_utility_skip_reason`` gives a reason (fewer than two ε: no curve)."""
    if privacy_utility_skip_reason(result) is not None:
        return None
    series = private_series(result)
    metric, attrs = result["primary_metric"], list(result["attributes"])
    colors, within = result_colors(result), _within_series_index(result)
    fig, axes = _new_figure(1 + len(attrs))
    public = [n for n, v in result["variants"].items() if not v["private"]]
    ticks = sorted({result["variants"][n]["epsilon"] for ns in series.values() for n in ns})
    for ax, attr in zip(axes, [None] + attrs):
        for label, names in series.items():
            eps = [result["variants"][n]["epsilon"] for n in names]
            vals, err = _yerr([statistic(result, n, attr) for n in names])
            ax.errorbar(eps, vals, yerr=err, marker="o", capsize=3, label=label,
                        color=colors[names[0]])
        for name in public:
            stat = statistic(result, name, attr)
            v, (lo, hi) = _num(stat["value"]), (_num(c) for c in stat["ci"])
            style = _LINESTYLES[within[name] % len(_LINESTYLES)]
            ax.axhline(v, color=colors[name], linestyle=style, label=f"{name} (non-private)")
            if math.isfinite(lo) and math.isfinite(hi):
                ax.axhspan(lo, hi, color=colors[name], alpha=0.12)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [eps_text(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("ε")
        ax.set_ylabel(metric if attr is None else f"{metric} max-min gap")
        ax.set_title(f"overall {metric}" if attr is None else f"{metric} gap across {attr}")
    _legend(fig, *axes[0].get_legend_handles_labels())
    renderer = plot_labels.freeze_layout(fig)
    for ax in axes:
        _thin_tick_labels(ax, renderer)
    return fig


def _thin_tick_labels(ax: Any, renderer: Any) -> None:
    """Blank the x tick labels (ε values) that would overlap the previous one kept."""
    kept = None
    for tick in sorted(ax.xaxis.get_major_ticks(), key=lambda t: t.get_loc()):
        box = tick.label1.get_window_extent(renderer).padded(2.0)
        if kept is not None and box.overlaps(kept):
            tick.label1.set_visible(False)
        else:
            kept = box


def disparity_figure(result: Mapping[str, Any]) -> Figure:
    """Max-min gap against the overall primary metric, CIs on both axes, one panel per
    attribute; one colour per series, ε labels on private points, a legend per series."""
    metric, attrs = result["primary_metric"], list(result["attributes"])
    colors = result_colors(result)
    fig, axes = _new_figure(max(len(attrs), 1), width=5.5, height=4.5)
    legend: dict[str, Any] = {}
    to_label: list[tuple[Any, ...]] = []
    for ax, attr in zip(axes, attrs):
        points, labels, others, label_colors = [], [], [], []
        for name, v in result["variants"].items():
            (x,), xerr = _yerr([statistic(result, name, None)])
            (y,), yerr = _yerr([statistic(result, name, attr)])
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, capsize=3, color=colors[name],
                        marker="o" if v["private"] else "s", linestyle="none",
                        label=variant_label(result, name))
            series = series_of(result, name)
            public = not v["private"] and variant_kind(series) != "non_private"
            legend.setdefault(series + (" (non-private)" if public else ""), Line2D(
                [], [], color=colors[name], marker="o" if v["private"] else "s",
                linestyle="none"))
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            if v["private"] and v.get("epsilon") is not None:
                points.append((x, y))
                labels.append(f"ε={eps_text(v['epsilon'])}")
                label_colors.append(colors[name])
            else:
                others.append((x, y))
        for names in private_series(result).values():  # join one series' points by ε
            xy = [(_num(statistic(result, n, None)["value"]),
                   _num(statistic(result, n, attr)["value"])) for n in names]
            if len(xy) > 1:
                ax.plot(*zip(*xy), color=colors[names[0]], linewidth=0.8, alpha=0.5)
        ax.set_xlabel(f"overall {metric}")
        ax.set_ylabel(f"{metric} max-min gap across {attr}")
        ax.set_title(f"disparity vs {metric} ({attr})")
        ax.margins(0.15)
        to_label.append((ax, points, labels, others, label_colors))
    _legend(fig, list(legend.values()), list(legend))
    plot_labels.freeze_layout(fig)
    for ax, points, labels, others, label_colors in to_label:
        plot_labels.place_point_labels(fig, ax, points, labels, others, label_colors)
    return fig


def figures(result: Mapping[str, Any]) -> dict[str, Figure | None]:
    """Every figure of the report by file name (None: not drawn)."""
    return {SUBGROUPS_PNG: subgroups_figure(result),
            PRIVACY_UTILITY_PNG: privacy_utility_figure(result),
            DISPARITY_ACCURACY_PNG: disparity_figure(result)}
