"""Per-group metrics and disparities, checked against sklearn and fairlearn."""

import subprocess
import sys

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame, false_positive_rate, true_positive_rate
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from tfdpfair.fairness import compare
from tfdpfair.fairness import metrics as M

CHEX = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
TASKS = ["Fracture", *CHEX]  # an extra, non-evaluated task first


def _multiclass(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    sex = rng.choice(["F", "M"], n)
    race = rng.choice(["A", "B", "C"], n, p=[0.5, 0.3, 0.2])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += np.where(sex == "F", 0.8, 1.6)
    score = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return M.EvalSet("multiclass", y, ("a", "b", "c"), {"sex": sex, "race": race}), score


def _multilabel(n=1500, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(TASKS))) < 0.3).astype(float)
    sex = rng.choice(["F", "M"], n)
    age = rng.choice(["0-40", "40-80", "80+"], n, p=[0.4, 0.4, 0.2])
    sep = np.where(sex == "F", 0.7, 1.3)[:, None]
    # Rounded scores create ties, which the Mann-Whitney AUC must count as 1/2.
    score = np.round(1 / (1 + np.exp(-(rng.normal(size=y.shape) + sep * (2 * y - 1)))), 2)
    return M.EvalSet("multilabel", y, tuple(TASKS), {"sex": sex, "age": age}), score


def _table(es, score, config=M.MetricConfig(min_group_size=1)):
    infos, slices = M.metric_infos(es, config), M.make_slices(es)
    table = M.metric_table(es, score, infos, slices, np.ones((1, es.num_examples)), config)[0]
    return {(i.name, s.attribute, s.group): table[m, j]
            for m, i in enumerate(infos) for j, s in enumerate(slices)}


def test_weighted_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.4
    s = np.round(rng.normal(size=400) + y, 1)
    counts = rng.integers(0, 4, size=(3, 400))
    got = M.weighted_auc(y, s, np.vstack([np.ones(400), counts]))
    assert got[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    for b, c in enumerate(counts, start=1):
        idx = np.repeat(np.arange(400), c)  # the resample these counts stand for
        assert got[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_per_group_auc_tpr_fpr_match_sklearn_and_fairlearn():
    es, score = _multilabel()
    values = _table(es, score)
    for attr, labels in es.groups.items():
        for g in np.unique(labels):
            mask = labels == g
            aucs = [roc_auc_score(es.y_true[mask, TASKS.index(t)], score[mask, TASKS.index(t)])
                    for t in CHEX]
            for t, auc in zip(CHEX, aucs):
                assert values[(f"auc/{t}", attr, g)] == pytest.approx(auc, abs=1e-12)
            # macro AUC averages the CheXpert five only; "Fracture" is not evaluated.
            assert values[("macro_auc", attr, g)] == pytest.approx(np.mean(aucs), abs=1e-12)
            assert ("auc/Fracture", attr, g) not in values
    for t in CHEX:
        k = TASKS.index(t)
        frame = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate},
                            y_true=es.y_true[:, k], y_pred=score[:, k] >= 0.5,
                            sensitive_features=es.groups["age"])
        for g, row in frame.by_group.iterrows():
            assert values[(f"tpr/{t}", "age", g)] == pytest.approx(row["tpr"], abs=1e-12)
            assert values[(f"fpr/{t}", "age", g)] == pytest.approx(row["fpr"], abs=1e-12)
        assert values[(f"tpr/{t}", "overall", "overall")] == pytest.approx(
            frame.overall["tpr"], abs=1e-12)


def test_multiclass_accuracy_and_per_class_accuracy_match_fairlearn():
    es, score = _multiclass()
    pred = score.argmax(1)
    values = _table(es, score)
    fns = {"accuracy": accuracy_score}
    fns.update({f"accuracy/{c}": (lambda y, p, k=k: recall_score(y == k, p == k))
                for k, c in enumerate("abc")})
    for attr, labels in es.groups.items():
        frame = MetricFrame(metrics=fns, y_true=es.y_true, y_pred=pred, sensitive_features=labels)
        for name in fns:
            assert values[(name, "overall", "overall")] == pytest.approx(frame.overall[name])
            for g, v in frame.by_group[name].items():
                assert values[(name, attr, g)] == pytest.approx(v, abs=1e-12)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_disparities_match_fairlearn_metricframe(task):
    es, score = _multiclass() if task == "multiclass" else _multilabel()
    result = compare.evaluate_fairness(es, {"m": score}, num_bootstrap=20,
                                       config=M.MetricConfig(min_group_size=1))
    if task == "multiclass":
        name, fn, y_pred = "accuracy", accuracy_score, score.argmax(1)
    else:
        k = TASKS.index("Edema")
        name, fn, y_pred = "auc/Edema", roc_auc_score, score[:, k]
    y_true = es.y_true if task == "multiclass" else es.y_true[:, k]
    for attr, labels in es.groups.items():
        frame = MetricFrame(metrics=fn, y_true=y_true, y_pred=y_pred, sensitive_features=labels)
        got = result["variants"]["m"]["metrics"][name]
        for g, v in frame.by_group.items():
            assert got["groups"][attr][g]["value"] == pytest.approx(v, abs=1e-12)
        d = got["disparity"][attr]
        assert d["max_min_gap"]["value"] == pytest.approx(frame.difference(), abs=1e-12)
        assert d["max_gap_to_overall"]["value"] == pytest.approx(
            frame.difference(method="to_overall"), abs=1e-12)
        assert d["min_max_ratio"]["value"] == pytest.approx(frame.ratio(), abs=1e-12)
        assert d["worst_group"]["value"] == pytest.approx(frame.group_min(), abs=1e-12)
        assert d["worst_group"]["group"] == frame.by_group.idxmin()


def test_lower_is_better_worst_group_is_the_max():
    out = M.disparities(np.array([0.1, 0.3, 0.2]), np.array(0.2), higher_is_better=False)
    assert out["worst_group"] == pytest.approx(0.3)
    assert out["max_min_gap"] == pytest.approx(0.2)
    assert out["min_max_ratio"] == pytest.approx(1 / 3)
    assert M.worst_group_index(np.array([0.1, 0.3, np.nan]), higher_is_better=False) == 1
    assert np.isnan(M.disparities(np.array([0.5]), np.array(0.5))["max_min_gap"])


def test_tiny_and_one_class_groups_are_nan_with_count_not_a_crash():
    es, score = _multilabel(n=600)
    age = np.array(es.groups["age"], dtype=object)
    age[:5] = "tiny"  # 5 examples < min_group_size
    y = es.y_true.copy()
    onecls = np.flatnonzero(age == "80+")
    y[onecls, TASKS.index("Edema")] = 0  # Edema has no positive in the 80+ group
    es = M.EvalSet("multilabel", y, es.label_names, {"age": age.astype(str)})
    result = compare.evaluate_fairness(es, {"m": score}, num_bootstrap=30,
                                       config=M.MetricConfig(min_group_size=10))
    got = result["variants"]["m"]["metrics"]
    tiny = got["auc/Edema"]["groups"]["age"]["tiny"]
    assert np.isnan(tiny["value"]) and tiny["n"] == 5 and "too small" in tiny["reason"]
    old = got["auc/Edema"]["groups"]["age"]["80+"]
    assert np.isnan(old["value"]) and old["n"] == len(onecls) and "one label class" in old["reason"]
    assert np.isnan(got["macro_auc"]["groups"]["age"]["80+"]["value"])
    assert np.isnan(got["tpr/Edema"]["groups"]["age"]["80+"]["value"])
    assert np.isfinite(got["fpr/Edema"]["groups"]["age"]["80+"]["value"])
    assert np.isfinite(got["auc/Atelectasis"]["groups"]["age"]["80+"]["value"])
    # The disparity uses the two defined groups only.
    d = got["auc/Edema"]["disparity"]["age"]
    assert d["num_groups_defined"] == 2 and np.isfinite(d["max_min_gap"]["value"])
    a, b = (got["auc/Edema"]["groups"]["age"][g]["value"] for g in ("0-40", "40-80"))
    assert d["max_min_gap"]["value"] == pytest.approx(abs(a - b))


def test_multiclass_group_without_a_class_and_single_example_group():
    es, score = _multiclass(n=300)
    race = es.groups["race"].astype(object)
    race[0] = "solo"
    y = es.y_true.copy()
    y[race == "C"] = np.where(y[race == "C"] == 2, 0, y[race == "C"])  # no class "c" in C
    es = M.EvalSet("multiclass", y, es.label_names, {"race": race.astype(str)})
    values = _table(es, score)
    assert np.isnan(values[("accuracy/c", "race", "C")])
    assert np.isfinite(values[("accuracy", "race", "C")])
    assert values[("accuracy", "race", "solo")] in (0.0, 1.0)
    infos, slices = M.metric_infos(es), M.make_slices(es)
    solo = next(s for s in slices if s.group == "solo")
    assert "too small: 1 <" in M.undefined_reason(es, infos[0], solo, M.MetricConfig())


def test_eval_tasks_and_input_validation():
    assert M.resolve_eval_tasks(TASKS, None) == tuple(range(1, 6))
    assert M.resolve_eval_tasks(["x", "y"], None) == (0, 1)
    with pytest.raises(ValueError, match="not among"):
        M.resolve_eval_tasks(["x"], ["Edema"])
    with pytest.raises(ValueError, match="only 0 and 1"):
        M.EvalSet("multilabel", np.full((3, 1), 0.5), ("t",), {})
    with pytest.raises(ValueError, match="int"):
        M.EvalSet("multiclass", np.zeros(3), ("a",), {})
    with pytest.raises(ValueError, match="entries"):
        M.EvalSet("multiclass", np.zeros(3, int), ("a",), {"sex": np.array(["F"])})
    es, score = _multiclass(n=30)
    with pytest.raises(ValueError, match="y_score must be"):
        M.check_scores(es, score[:, :2])


def test_fairness_package_needs_neither_tensorflow_nor_fairlearn():
    code = ("import sys; import tfdpfair.fairness.compare, tfdpfair.fairness.run_io, "
            "tfdpfair.fairness.report; "
            "print(sorted(m for m in ('tensorflow', 'fairlearn', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
