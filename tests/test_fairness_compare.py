"""Bootstrap CIs (coverage, cluster resampling) and paired model comparisons."""

import math

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame
from sklearn.metrics import accuracy_score, roc_auc_score

from tfdpfair.fairness import bootstrap as B
from tfdpfair.fairness import compare
from tfdpfair.fairness import metrics as M


def _onehot_scores(pred, k=2):
    s = np.full((len(pred), k), 0.1)
    s[np.arange(len(pred)), pred] = 0.9
    return s


def _accuracy_ci(correct, patient_id, num_resamples=200, seed=0):
    """95% bootstrap CI of accuracy for a 0/1 correctness vector (labels all 0)."""
    es = M.EvalSet("multiclass", np.zeros(len(correct), int), ("a", "b"), {}, patient_id)
    tables = B.paired_metric_tables(es, {"m": _onehot_scores(1 - correct.astype(int))},
                                    num_resamples=num_resamples, seed=seed)
    lo, hi = B.percentile_ci(tables.replicates["m"][:, 0, 0])
    return float(lo), float(hi)


def test_example_counts_are_seeded_resamples_of_size_n():
    a = np.concatenate(list(B.resample_counts(50, None, 30, seed=3, chunk_size=7)))
    b = np.concatenate(list(B.resample_counts(50, None, 30, seed=3, chunk_size=7)))
    c = np.concatenate(list(B.resample_counts(50, None, 30, seed=4, chunk_size=7)))
    assert a.shape == (30, 50) and (a.sum(1) == 50).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.bincount(B.counts_to_indices(a[0]), minlength=50), a[0])


def test_cluster_bootstrap_resamples_whole_patients():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, size=40)  # patients with 1..5 examples each
    pid = np.repeat([f"p{i:02d}" for i in range(40)], sizes)
    perm = rng.permutation(len(pid))  # examples of a patient need not be contiguous
    pid = pid[perm]
    counts = np.concatenate(list(B.resample_counts(len(pid), pid, 200, seed=1)))
    for row in counts:
        per_patient = {}
        for p, c in zip(pid, row):
            per_patient.setdefault(p, set()).add(int(c))
        # Every example of a patient is drawn the same number of times...
        assert all(len(v) == 1 for v in per_patient.values())
        # ...and 40 patients are drawn in total.
        assert sum(v.pop() for v in per_patient.values()) == 40
    # Resampled examples = the examples of the drawn patients.
    idx = B.counts_to_indices(counts[0])
    drawn = {p: int(c) for p, c in zip(pid, counts[0])}
    assert len(idx) == sum(drawn[p] * int((pid == p).sum()) for p in drawn)


def test_bootstrap_ci_covers_known_accuracy():
    p, n, hits = 0.8, 300, 0
    for r in range(60):
        correct = np.random.default_rng(100 + r).random(n) < p
        lo, hi = _accuracy_ci(correct, None, seed=r)
        hits += lo <= p <= hi
    assert hits / 60 >= 0.85


def test_bootstrap_ci_covers_known_auc():
    d, n, hits = 1.0, 300, 0
    true_auc = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt(2)) for N(d,1) vs N(0,1) scores
    for r in range(60):
        rng = np.random.default_rng(200 + r)
        y = (np.arange(n) % 2).astype(float)[:, None]
        s = rng.normal(size=(n, 1)) + d * y
        es = M.EvalSet("multilabel", y, ("t",), {})
        t = B.paired_metric_tables(es, {"m": s}, num_resamples=200, seed=r)
        lo, hi = B.percentile_ci(t.replicates["m"][:, 0, 0])
        hits += lo <= true_auc <= hi
    assert hits / 60 >= 0.85


def test_cluster_bootstrap_covers_where_example_bootstrap_does_not():
    """Each patient's 5 images are all right or all wrong: only the cluster CI is wide enough."""
    p, patients, m = 0.7, 80, 5
    pid = np.repeat(np.arange(patients).astype(str), m)
    cluster_hits = example_hits = 0
    for r in range(60):
        correct = np.repeat(np.random.default_rng(300 + r).random(patients) < p, m)
        lo, hi = _accuracy_ci(correct, pid, seed=r)
        cluster_hits += lo <= p <= hi
        lo, hi = _accuracy_ci(correct, None, seed=r)
        example_hits += lo <= p <= hi
    assert cluster_hits / 60 >= 0.85
    assert example_hits / 60 <= 0.8


def _two_models(n=800, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    sex = rng.choice(["F", "M"], n)
    base = rng.random(n)
    pred_a = np.where(base < 0.9, y, 1 - y)  # 90% correct everywhere
    pred_b = np.where(base < np.where(sex == "F", 0.7, 0.88), y, 1 - y)  # worse, mostly on F
    es = M.EvalSet("multiclass", y, ("a", "b"), {"sex": sex})
    return es, {"np": _onehot_scores(pred_a), "p": _onehot_scores(pred_b)}


def test_paired_replicates_use_the_same_resample_for_both_models():
    es, scores = _two_models(n=300)
    tables = B.paired_metric_tables(es, scores, num_resamples=20, seed=5)
    counts = np.concatenate(list(B.resample_counts(es.num_examples, None, 20, seed=5)))
    for b in (0, 7, 19):
        idx = B.counts_to_indices(counts[b])
        for name, s in scores.items():
            want = accuracy_score(es.y_true[idx], s[idx].argmax(1))
            assert tables.replicates[name][b, 0, 0] == pytest.approx(want, abs=1e-12)


def test_paired_differences_match_fairlearn_and_are_significant():
    es, scores = _two_models()
    variants = {"np": compare.Variant("np", False), "p": compare.Variant("p", True, 8.0, 1e-5)}
    result = compare.evaluate_fairness(es, scores, variants, num_bootstrap=300, seed=0,
                                       config=M.MetricConfig(min_group_size=1))
    (comp,) = result["comparisons"]
    assert (comp["model"], comp["reference"], comp["matched_accuracy"]) == ("p", "np", False)
    frames = {k: MetricFrame(metrics=accuracy_score, y_true=es.y_true, y_pred=s.argmax(1),
                             sensitive_features=es.groups["sex"]) for k, s in scores.items()}
    acc = comp["metrics"]["accuracy"]
    for g in ("F", "M"):
        want = frames["p"].by_group[g] - frames["np"].by_group[g]
        assert acc["groups"]["sex"][g]["value"] == pytest.approx(want, abs=1e-12)
    gap = acc["disparity"]["sex"]["max_min_gap"]
    assert gap["value"] == pytest.approx(
        frames["p"].difference() - frames["np"].difference(), abs=1e-12)
    assert gap["significant"] and gap["ci"][0] > 0
    ratio = acc["disparity"]["sex"]["min_max_ratio"]
    assert ratio["value"] == pytest.approx(frames["p"].ratio() - frames["np"].ratio(), abs=1e-12)
    verdict = comp["verdicts"]["sex"]
    assert verdict["gap_larger"] and verdict["significant"]
    assert "has a larger accuracy gap" in verdict["sentence"]
    assert "is statistically significant" in verdict["sentence"]


def test_paired_ci_is_zero_for_identical_models_and_narrower_than_unpaired():
    es, scores = _two_models()
    scores = {"np": scores["np"], "same": scores["np"], "p": scores["p"]}
    variants = {"np": compare.Variant("np", False), "same": compare.Variant("same", True, 1.0),
                "p": compare.Variant("p", True, 8.0)}
    result = compare.evaluate_fairness(es, scores, variants, num_bootstrap=200)
    same = result["comparisons"][0]["metrics"]["accuracy"]["overall"]
    assert same["value"] == 0 and same["ci"] == [0, 0] and not same["significant"]
    diff = result["comparisons"][1]["metrics"]["accuracy"]["overall"]
    width = lambda s: s["ci"][1] - s["ci"][0]  # noqa: E731
    singles = [result["variants"][k]["metrics"]["accuracy"]["overall"] for k in ("np", "p")]
    # Paired CI is narrower than sqrt(w_a^2 + w_b^2) (what independent resampling would give).
    assert width(diff) < 0.8 * math.hypot(*(width(s) for s in singles))


def test_matched_accuracy_reference_is_added_when_closer():
    es, scores = _two_models()
    scores["np_early"] = scores["p"].copy()  # a non-private model as accurate as the private one
    variants = {"np": compare.Variant("np", False), "p": compare.Variant("p", True, 8.0),
                "np_early": compare.Variant("np_early", False)}
    result = compare.evaluate_fairness(es, scores, variants, num_bootstrap=50)
    pairs = [(c["model"], c["reference"], c["matched_accuracy"]) for c in result["comparisons"]]
    assert pairs == [("p", "np", False), ("p", "np_early", True)]
    matched = result["comparisons"][1]["verdicts"]["sex"]
    assert not matched["gap_larger"] and not matched["significant"]


def test_choose_reference():
    v = {n: compare.Variant(n, p) for n, p in [("a/private", True), ("b", False),
                                              ("a/non_private", False)]}
    assert compare.choose_reference(v) == "a/non_private"
    assert compare.choose_reference(v, "b") == "b"
    assert compare.choose_reference({"x": compare.Variant("x", True)}) is None
    with pytest.raises(ValueError, match="not one of"):
        compare.choose_reference(v, "zzz")


@pytest.mark.parametrize("d,lo,hi,larger,sig,phrases", [
    (0.10, 0.05, 0.15, True, True, ("has a larger", "is statistically", "excludes 0")),
    (0.02, -0.01, 0.05, True, False, ("has a larger", "is not statistically", "includes 0")),
    (-0.10, -0.15, -0.05, False, True, ("does not have a larger", "is statistically")),
    (-0.01, -0.03, 0.02, False, False, ("does not have a larger", "is not statistically")),
])
def test_gap_verdict_sentence(d, lo, hi, larger, sig, phrases):
    stat = lambda v: {"value": v, "ci": [v - 0.01, v + 0.01]}  # noqa: E731
    diff = {"value": d, "ci": [lo, hi], "significant": lo > 0 or hi < 0}
    out = compare.gap_verdict(compare.Variant("p", True, 1.0), compare.Variant("np", False),
                              "sex", "accuracy", stat(0.2), stat(0.2 - d), diff, 0.95)
    assert (out["gap_larger"], out["significant"]) == (larger, sig)
    for phrase in phrases:
        assert phrase in out["sentence"]
    assert "private model 'p' (ε=1)" in out["sentence"]
    nan = compare.gap_verdict(compare.Variant("p", True), compare.Variant("np", False), "sex",
                              "accuracy", stat(np.nan), stat(0.1),
                              {"value": np.nan, "ci": [np.nan] * 2, "significant": False}, 0.95)
    assert nan["gap_larger"] is None and "cannot be compared" in nan["sentence"]


def test_auc_replicates_match_sklearn_on_the_resampled_patients():
    rng = np.random.default_rng(9)
    pid = np.repeat(np.arange(100).astype(str), 3)
    y = (rng.random((300, 1)) < 0.4).astype(float)
    s = rng.normal(size=(300, 1)) + y
    es = M.EvalSet("multilabel", y, ("t",), {}, pid)
    tables = B.paired_metric_tables(es, {"m": s}, num_resamples=10, seed=2)
    counts = np.concatenate(list(B.resample_counts(300, pid, 10, seed=2)))
    for b in range(10):
        idx = B.counts_to_indices(counts[b])
        assert tables.replicates["m"][b, 0, 0] == pytest.approx(
            roc_auc_score(y[idx, 0], s[idx, 0]), abs=1e-12)
    assert tables.unit == "patient" and tables.num_units == 100
