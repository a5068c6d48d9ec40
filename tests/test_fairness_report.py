"""Markdown report and PNG plots."""

import json

import numpy as np
import pytest

from tfdpfair.fairness import compare, report, run_io
from tfdpfair.fairness import metrics as M

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(private_f_acc=0.6, with_private=True, n=600):
    """Non-private 90% correct in both sexes; private `private_f_acc` for F, 88% for M."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    sex = np.array(["F", "M"] * (n // 2))
    age = np.where(np.arange(n) < 10, "90+", "adult")  # a tiny group
    base = rng.random(n)
    scores, variants = {}, {}
    specs = [("non_private", False, None, 0.9, 0.9)]
    if with_private:
        specs += [("private", True, 1.0, private_f_acc, 0.88), ("private", True, 8.0, 0.85, 0.9)]
    for name, private, eps, acc_f, acc_m in specs:
        key = name if eps is None else f"eps{eps:g}/{name}"
        pred = np.where(base < np.where(sex == "F", acc_f, acc_m), y, 1 - y)
        s = np.full((n, 2), 0.2)
        s[np.arange(n), pred] = 0.8
        scores[key] = s
        variants[key] = compare.Variant(key, private, eps, 1e-5 if private else None,
                                        series=name)
    es = M.EvalSet("multiclass", y, ("neg", "pos"), {"sex": sex, "age": age})
    return compare.evaluate_fairness(es, scores, variants, num_bootstrap=100)


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_report_files_and_answer_sentence(tmp_path):
    result = _result()
    written = report.write_report(result, tmp_path)
    assert set(written) == {"report.md", report.SUBGROUPS_PNG, report.PRIVACY_UTILITY_PNG,
                            report.DISPARITY_ACCURACY_PNG}
    for name in written:
        if name.endswith(".png"):
            _check_png(written[name])
    text = (tmp_path / "report.md").read_text()
    answer = text.split("## Setup")[0]
    # eps=1 private: F at 60% vs M at 88%: clearly larger gap.
    assert ("sex: the private model 'eps1/private' (ε=1) has a larger accuracy gap" in answer)
    assert "is statistically significant" in answer
    assert "Overall accuracy: 'eps1/private'" in answer and "(significant)" in answer
    for png in written:
        if png.endswith(".png"):
            assert f"]({png})" in text
    # The tiny group is reported as n/a with its count and the reason.
    assert "| 90+ (n/a: group too small: 10 < min_group_size=30 examples) | 10 | n/a |" in text
    assert "| eps1/private | yes (one example) | 1 | 1e-05 |" in text


def test_report_from_json_round_trip(tmp_path):
    result = _result()
    run_io.write_json(tmp_path / "fairness.json", result)
    loaded = json.loads((tmp_path / "fairness.json").read_text())  # NaN became null
    assert loaded["variants"]["non_private"]["metrics"]["accuracy"]["groups"]["age"]["90+"][
        "value"] is None
    written = report.write_report(loaded, tmp_path / "again")  # plots cope with nulls
    plots = {"p": written[report.SUBGROUPS_PNG]}
    assert report.markdown(loaded, plots) == report.markdown(result, plots)


def test_report_without_private_variant(tmp_path):
    result = _result(with_private=False)
    written = report.write_report(result, tmp_path)
    assert report.PRIVACY_UTILITY_PNG not in written
    text = written["report.md"].read_text()
    assert "No private vs non-private comparison: there is no private variant." in text
    assert "not drawn" in text


@pytest.mark.parametrize("significant,phrase", [(True, "compare at matched accuracy"),
                                                (False, "roughly matched accuracy")])
def test_accuracy_sentence(significant, phrase):
    result = _result()
    comp = dict(result["comparisons"][0])
    comp["overall_difference"] = {"value": -0.1, "ci": [-0.2, -0.05] if significant else
                                  [-0.2, 0.05], "significant": significant}
    assert phrase in report.accuracy_sentence(result, comp)
