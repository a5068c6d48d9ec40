"""The audit's report section (markdown), audit.json and plots (matplotlib, Agg; no TensorFlow).

Membership inference on the private training set computes its statistics (AUC, advantage, TPR
at low FPR, member counts per subgroup) from the private examples' losses WITHOUT noise: the
run's (ε, δ) guarantee does not cover them. Its markdown section, its plot and audit.json are
marked "not for release" (``release_marking``): only the data custodian and people already
allowed to see the private training data may see them. A canary audit's numbers come from the
audited DP run's outputs and the auditor's own canaries, and are marked as such.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import numpy as np
from matplotlib.figure import Figure

from tfdpfair.fairness import run_io


NOT_FOR_RELEASE = "Not for release: un-noised statistics of the private training data"
WHO_MAY_SEE = ("the data custodian and people already allowed to see the private training data; "
               "remove this section, audit.json and the membership plot before publishing the "
               "run's report or model")
_MEMBERSHIP_WHY = ("computed from the losses of the private training examples (members) and "
                   "their per-subgroup counts, without noise: the run's (ε, δ) guarantee does not "
                   "cover these statistics")
_CANARY_WHY = ("computed from the audited DP run's released updates or model and the auditor's "
               "own canaries (post-processing of the DP run); the audit run itself contains "
               "canaries and is not a release")


def release_marking(audit: Mapping[str, Any]) -> dict[str, Any]:
    """audit.json's "release" field: whether the file holds un-noised private statistics."""
    if "membership" in audit:
        return {"not_for_release": True, "contains_unnoised_private_statistics": True,
                "label": NOT_FOR_RELEASE, "who_may_see": WHO_MAY_SEE, "why": _MEMBERSHIP_WHY}
    return {"not_for_release": False, "contains_unnoised_private_statistics": False,
            "why": _CANARY_WHY}


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
    """Bar chart of one attack metric per subgroup (with CIs) for every model variant, titled
    NOT_FOR_RELEASE (the values are un-noised statistics of the private training data)."""
    from tfdpfair.fairness.plots import variant_colors
    path = pathlib.Path(path)
    fig = Figure(figsize=(6, 4.4))
    fig.suptitle(NOT_FOR_RELEASE, fontsize=9, color="darkred")
    ax = fig.subplots()
    colors = variant_colors(results)
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
        ax.bar(x, values, width=0.8 / len(variants), yerr=err, capsize=3, label=name,
               color=colors[name], error_kw={"ecolor": "0.45"})  # visible on black too
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


def _fdp_cell(audit: Mapping[str, Any]) -> str:
    if "epsilon_lower_bound_fdp" not in audit:
        return "—"
    return (f"{audit['epsilon_lower_bound_fdp']:.3f} (μ ≥ {audit['mu_lower_bound_fdp']:.3f}; "
            f"k = {audit['k_fdp']}, v = {audit['v_fdp']} of {audit['r_fdp']})")


def _fdp_eps_delta_cell(audit: Mapping[str, Any]) -> str:
    if "epsilon_lower_bound_fdp_eps_delta" not in audit:
        return "—"
    return (f"{audit['epsilon_lower_bound_fdp_eps_delta']:.3f} (k = "
            f"{audit['k_fdp_eps_delta']}, v = {audit['v_fdp_eps_delta']} of "
            f"{audit['r_fdp_eps_delta']})")


def canary_section(audit: Mapping[str, Any]) -> list[str]:
    kind = "white-box gradient" if audit["mode"] == "gradient_canaries" else "black-box input"
    return [
        f"One-run audit with {audit['m']} {kind} canaries, each included with probability 1/2 "
        f"({audit['num_included']} included), score '{audit['score']}'. Guessing 'in' for the "
        f"top k and 'out' for the bottom k scores (k tried: {audit['ks_tried']}, "
        f"Bonferroni-corrected), the best k = {audit['k']} for the Steinke, Nasr & Jagielski "
        f"(2023) bound made r = {audit['r']} guesses, v = {audit['v']} correct.", "",
        "| ε lower bound (95%), Steinke et al. | ε lower bound (95%), f-DP, Gaussian curve "
        "| ε lower bound (95%), f-DP, (ε, δ) curve | accountant ε | σ | q | steps | δ |",
        "|---|---|---|---|---|---|---|---|",
        f"| {audit['epsilon_lower_bound']:.3f} | {_fdp_cell(audit)} | "
        f"{_fdp_eps_delta_cell(audit)} | "
        f"{audit['accountant_epsilon']:.3f} | {audit['noise_multiplier']:.4g} | "
        f"{audit['sampling_rate']:.4g} | {audit['steps']} | {audit['delta']:.3g} |", "",
        "Each bound is a 95% bound on its own (the largest of the three holds at 85%). Steinke "
        "et al. and the f-DP test with the (ε, δ) curve (Mahloujifar, Melis & Chaudhuri 2025) "
        "assume only that the run is (ε, δ)-DP: either one above the accountant's ε proves a bug "
        "in clipping, noise or accounting (at 95%). The Gaussian-curve f-DP bound rejects 'the "
        "run is μ-GDP' for μ below μ_LB and reports the ε of that Gaussian trade-off curve at "
        "δ, a bound on the run's ε only when its curve is Gaussian (DP-SGD with many steps is "
        "close to one); it is the highest when many guesses are right, and above the "
        "accountant's ε it means a bug or a trade-off curve far from Gaussian.", "",
        "A bound far below the accountant's ε is expected (the audit sees one run and, without "
        "tailored canaries, is loose).", ""]


def membership_setup_text(setup: Mapping[str, Any] | None) -> str:
    """What the attack compared: data, members, non-members (which held-out split), loss, CIs."""
    if not setup:
        return ("Loss-threshold membership inference (score −loss), training set (members) vs "
                "held-out test set (non-members); 95% bootstrap CIs.")
    return (f"Loss-threshold membership inference (score −loss; loss: {setup['loss']}) on "
            f"{setup['data']}: members = the {setup['members']}, non-members = the held-out "
            f"{setup['non_members']}; 95% bootstrap CIs, resampling by {setup['bootstrap']}.")


def membership_section(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [f"### Membership inference — {NOT_FOR_RELEASE}", "",
             f"> **{NOT_FOR_RELEASE}.** These numbers are {_MEMBERSHIP_WHY}. Who may see them: "
             f"{WHO_MAY_SEE}.", "",
             membership_setup_text(next(iter(results.values()), {}).get("setup")), ""]
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
    """audit.md: a "Privacy audit" section a run's report can include as it is (a membership
    audit's subsection is headed NOT_FOR_RELEASE, and so are its plots' captions)."""
    lines = ["## Privacy audit", ""]
    if "canaries" in audit:
        lines += canary_section(audit["canaries"])
    if "membership" in audit:
        lines += membership_section(audit["membership"])
    for name, path in plots.items():
        caption = f"{name} ({NOT_FOR_RELEASE.lower()})" if "membership" in audit else name
        lines += [f"![{caption}]({pathlib.Path(path).name})", ""]
    return "\n".join(lines)


def write_audit(workdir: str | pathlib.Path, audit: Mapping[str, Any],
                plots: Mapping[str, pathlib.Path]) -> tuple[pathlib.Path, pathlib.Path, str]:
    """Writes audit.json (with the "release" marking first) and audit.md into workdir.

    Returns (audit.json path, audit.md path, the markdown section).
    """
    workdir = pathlib.Path(workdir)
    record = {"release": release_marking(audit), **audit}
    json_path, md_path = workdir / "audit.json", workdir / "audit.md"
    run_io.write_json(json_path, record)
    section = markdown(audit, plots)
    md_path.write_text(section)
    return json_path, md_path, section


def add_to_run_report(report_path: str | pathlib.Path, section: str) -> bool:
    """Puts the audit section into the run's report.md (replacing an earlier one); False when
    there is no report.md. The section keeps its NOT_FOR_RELEASE heading and notice."""
    report_path = pathlib.Path(report_path)
    if not report_path.exists():
        return False
    text = report_path.read_text()
    head = text.split("\n## Privacy audit\n", 1)[0].rstrip("\n")
    report_path.write_text(head + "\n\n" + section.rstrip("\n") + "\n")
    return True
