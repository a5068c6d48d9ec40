"""The membership audit's outputs are marked as un-noised statistics of the private training
data (audit.json, audit.md, the run report's section, the plot); a canary audit's are not."""

import json

import numpy as np
import pytest
from fdp_reference import reference_eps_delta_bound, reference_epsilon, reference_mu

from tfdpfair.audit import epsilon_lower_bound, fdp_lower_bound, membership, report


def _membership_results():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.3, 1, 200), rng.normal(0, 1, 200)]
    is_member = np.r_[np.ones(200), np.zeros(200)].astype(int)
    groups = {"ink": np.array(["light", "heavy"] * 200)}
    res = membership.membership_inference(scores, is_member, groups, num_resamples=20, seed=0)
    return {"dp (ε = 3.99)": res, "non-private": res}


def _canary_audit():
    return {"mode": "gradient_canaries", "m": 100, "num_included": 50, "score": "llr",
            "ks_tried": [5, 10], "k": 10, "r": 20, "v": 12, "epsilon_lower_bound": 0.1,
            "accountant_epsilon": 4.0, "noise_multiplier": 1.0, "sampling_rate": 0.01,
            "steps": 10, "delta": 1e-5}


def test_membership_audit_json_and_markdown_are_marked_not_for_release(tmp_path):
    results = _membership_results()
    plot = report.plot_membership(results, "ink", tmp_path / "membership_auc.png")
    json_path, md_path, section = report.write_audit(
        tmp_path, {"membership": results}, {"membership AUC by subgroup": plot})
    record = json.loads(json_path.read_text())
    assert list(record)[0] == "release"  # the first thing a reader of the file sees
    assert record["release"]["not_for_release"] is True
    assert record["release"]["contains_unnoised_private_statistics"] is True
    assert "data custodian" in record["release"]["who_may_see"]
    assert "without noise" in record["release"]["why"]
    assert set(record["membership"]) == set(results)

    text = md_path.read_text()
    assert text == section
    label = "Not for release: un-noised statistics of the private training data"
    heading = [line for line in text.splitlines() if line.startswith("### Membership")]
    assert heading == [f"### Membership inference — {label}"]
    # The notice comes before any number of the membership section.
    assert text.index(label) < text.index("| overall |")
    assert "data custodian" in text and "people already allowed to see" in text
    assert "not for release" in text.split("![")[1].lower()  # the plot's caption


def test_run_report_section_keeps_the_marking_and_replaces_an_old_one(tmp_path):
    run_report = tmp_path / "report.md"
    run_report.write_text("# Run\n\n## Privacy\n\nGuarantee: ...\n\n## Privacy audit\n\nold\n")
    section = report.markdown({"membership": _membership_results()}, {})
    assert report.add_to_run_report(run_report, section)
    text = run_report.read_text()
    assert text.count("## Privacy audit") == 1 and "\nold\n" not in text
    privacy, audit = text.split("## Privacy audit")
    assert "Guarantee" in privacy and "Not for release" not in privacy
    assert "Not for release: un-noised statistics of the private training data" in audit
    assert not report.add_to_run_report(tmp_path / "missing.md", section)


def test_membership_plot_is_titled_not_for_release(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: seen.append(self))
    report.plot_membership(_membership_results(), "ink", tmp_path / "p.png")
    assert "Not for release" in seen[0]._suptitle.get_text()  # noqa: SLF001


def test_canary_audit_is_not_marked_as_private_statistics(tmp_path):
    json_path, _, section = report.write_audit(tmp_path, {"canaries": _canary_audit()}, {})
    release = json.loads(json_path.read_text())["release"]
    assert release["not_for_release"] is False
    assert release["contains_unnoised_private_statistics"] is False
    assert "Not for release" not in section


def test_canary_audit_reports_all_bounds(tmp_path):
    """audit.json and audit.md carry the Steinke et al. and the two f-DP bounds side by side;
    the f-DP numbers match the paper's recursion (brentq) and dp_accounting's Gaussian ε."""
    rng = np.random.default_rng(1)
    included = rng.random(200) < 0.5
    scores = 2.0 * included + rng.normal(size=200)
    steinke = epsilon_lower_bound.audit_from_scores(scores, included, 20, 1e-5)
    fdp = fdp_lower_bound.fdp_audit_from_scores(scores, included, 20, 1e-5)
    audit = {**_canary_audit(), "m": 200, "k": 20, "r": steinke.r, "v": steinke.v,
             "epsilon_lower_bound": steinke.epsilon, **fdp.report_fields()}
    json_path, _, section = report.write_audit(tmp_path, {"canaries": audit}, {})
    record = json.loads(json_path.read_text())["canaries"]
    mu = reference_mu(200, record["r_fdp"], record["v_fdp"])
    assert record["mu_lower_bound_fdp"] == pytest.approx(mu, abs=1e-7) and mu > 0
    assert record["epsilon_lower_bound_fdp"] == pytest.approx(reference_epsilon(mu, 1e-5),
                                                              abs=2e-3)
    assert record["epsilon_lower_bound"] == steinke.epsilon
    assert "Steinke et al. | ε lower bound (95%), f-DP, Gaussian curve |" in section
    assert f"| {steinke.epsilon:.3f} | {fdp.epsilon:.3f} (μ ≥ {fdp.mu:.3f};" in section
    eps_delta = reference_eps_delta_bound(200, record["r_fdp_eps_delta"],
                                          record["v_fdp_eps_delta"], 1e-5)
    assert record["epsilon_lower_bound_fdp_eps_delta"] == pytest.approx(eps_delta, abs=1e-7)
    assert 0 < eps_delta < record["epsilon_lower_bound_fdp"]
    assert (f"| {eps_delta:.3f} (k = {record['k_fdp_eps_delta']}, v = "
            f"{record['v_fdp_eps_delta']} of {record['r_fdp_eps_delta']}) | 4.000 |") in section
    old = report.markdown({"canaries": _canary_audit()}, {})  # an audit.json without f-DP
    assert "| 0.100 | — | — |" in old
