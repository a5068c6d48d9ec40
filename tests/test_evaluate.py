"""tfdpfair/cli/evaluate.py (tfdpfair-evaluate) end to end on run directories written with run_io."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame
from sklearn.metrics import accuracy_score, roc_auc_score

from tfdpfair.cli import evaluate
from tfdpfair.fairness import run_io

CLASSES = ["cat", "dog", "fox"]
CHEX = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
N = 1200
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_set(seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, N)
    sex = np.array(["F", "M"] * (N // 2))
    age = rng.choice(["18-40", "40-60", "60-80", "80+"], N, p=[0.3, 0.35, 0.34, 0.01])
    return y, {"sex": sex, "age_bin": age}, rng.random(N)


def _scores(y, sex, u, acc_f, acc_m):
    """Class probabilities whose argmax is right exactly where u < the group's accuracy."""
    pred = np.where(u < np.where(sex == "F", acc_f, acc_m), y, (y + 1) % 3)
    s = np.full((N, 3), 0.15)
    s[np.arange(N), pred] = 0.7
    return s


def _write_runs(tmp_path, private_accs, public_accs=(0.92, 0.92)):
    """One run dir per ε, each with the same non-private baseline and one private model."""
    y, groups, u = _eval_set()
    dirs = []
    for eps, (acc_f, acc_m) in private_accs.items():
        d = tmp_path / f"eps{eps:g}"
        for name, private, accs in [("non_private", False, public_accs),
                                    ("private", True, (acc_f, acc_m))]:
            run_io.write_variant(
                d, name, task="multiclass", class_names=CLASSES, private=private,
                epsilon=eps if private else None, delta=1e-5 if private else None,
                test_accuracy=0.0, y_true=y, y_score=_scores(y, groups["sex"], u, *accs),
                groups=groups)
        dirs.append(str(d))
    return dirs, y, groups, u


def test_run_dir_round_trip_and_metrics_merge(tmp_path):
    y, groups, u = _eval_set()
    s = _scores(y, groups["sex"], u, 0.9, 0.9)
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"lr": 2.0}}))
    run_io.write_variant(tmp_path, "private_ema", task="multiclass", class_names=CLASSES,
                         private=True, epsilon=1.0, delta=1e-5, test_accuracy=0.5,
                         y_true=y, y_score=s, groups=groups, patient_id=[f"p{i}" for i in y],
                         steps=10)
    run = run_io.read_run_dir(tmp_path)
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert meta["config"] == {"lr": 2.0} and meta["variants"]["private_ema"]["steps"] == 10
    pred = run.predictions["private_ema"]
    assert np.array_equal(pred.y_true, y) and np.allclose(pred.y_score, s)
    assert np.array_equal(pred.groups["age_bin"], groups["age_bin"])
    assert pred.patient_id[0] == f"p{y[0]}"
    with pytest.raises(ValueError, match="must use only"):
        run_io.write_predictions(tmp_path, "bad name", y_true=y, y_score=s, groups={})
    with pytest.raises(ValueError, match="task="):
        run_io.record_variant(tmp_path, "x", task="multilabel", class_names=CLASSES,
                              private=False, epsilon=None, delta=None, test_accuracy=0.0)


def test_private_gap_clearly_larger(tmp_path):
    dirs, y, groups, u = _write_runs(tmp_path, {1.0: (0.60, 0.85), 8.0: (0.80, 0.88)})
    result = evaluate.evaluate(dirs, tmp_path / "out", num_bootstrap=200, seed=1,
                               min_group_size=30)
    out = json.loads((tmp_path / "out" / "fairness.json").read_text())
    assert out["reference"] == "eps1/non_private" and out["bootstrap"]["unit"] == "example"
    for name, (acc_f, acc_m) in {"eps1/private": (0.6, 0.85),
                                 "eps1/non_private": (0.92, 0.92)}.items():
        pred = _scores(y, groups["sex"], u, acc_f, acc_m).argmax(1)
        got = out["variants"][name]["metrics"]["accuracy"]
        assert got["overall"]["value"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        for attr in ("sex", "age_bin"):
            frame = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred,
                                sensitive_features=groups[attr])
            for g, v in frame.by_group.items():
                cell = got["groups"][attr][g]
                if g == "80+":  # 1% of 1200 < 30: null in JSON, with its count
                    assert cell["value"] is None and cell["n"] == int((groups[attr] == g).sum())
                else:
                    assert cell["value"] == pytest.approx(v, abs=1e-12)
        sex_frame = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred,
                                sensitive_features=groups["sex"])
        assert got["disparity"]["sex"]["max_min_gap"]["value"] == pytest.approx(
            sex_frame.difference(), abs=1e-12)
    verdict = out["comparisons"][0]["verdicts"]["sex"]
    assert verdict == result["comparisons"][0]["verdicts"]["sex"]
    assert verdict["gap_larger"] and verdict["significant"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert ("sex: the private model 'eps1/private' (ε=1) has a larger accuracy gap between sex "
            "groups than the non-private model 'eps1/non_private'") in text
    assert "is statistically significant (95% paired-bootstrap CI excludes 0)" in text
    assert "evaluated on the same 1200 examples" in text
    for png in ("subgroups.png", "privacy_utility.png", "disparity_vs_accuracy.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000


def test_private_gap_not_larger(tmp_path):
    # Non-private: 95% (F) vs 80% (M); private: 80% in both sexes, so a smaller gap.
    dirs, *_ = _write_runs(tmp_path, {1.0: (0.80, 0.80)}, public_accs=(0.95, 0.80))
    evaluate.evaluate(dirs, tmp_path / "out", num_bootstrap=200, seed=2, min_group_size=30)
    out = json.loads((tmp_path / "out" / "fairness.json").read_text())
    verdict = out["comparisons"][0]["verdicts"]["sex"]
    assert verdict["gap_larger"] is False and verdict["significant"] is True
    gap = out["comparisons"][0]["metrics"]["accuracy"]["disparity"]["sex"]["max_min_gap"]
    assert gap["ci"][1] < 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert ("sex: the private model 'private' (ε=1) does not have a larger accuracy gap") in text
    (sex_line,) = [ln for ln in text.splitlines() if ln.startswith("- sex:")]
    assert "has a larger" not in sex_line and "is statistically significant" in sex_line


def test_different_eval_sets_are_refused(tmp_path):
    dirs, y, groups, u = _write_runs(tmp_path, {1.0: (0.8, 0.8)})
    y2 = y.copy()
    y2[:3] = (y2[:3] + 1) % 3
    run_io.write_variant(tmp_path / "other", "private", task="multiclass", class_names=CLASSES,
                         private=True, epsilon=8.0, delta=1e-5, test_accuracy=0.0, y_true=y2,
                         y_score=_scores(y2, groups["sex"], u, 0.8, 0.8), groups=groups)
    with pytest.raises(ValueError, match="not evaluated on the same examples.*y_true differs "
                                         "in 3 of 1200"):
        evaluate.evaluate(dirs + [str(tmp_path / "other")], tmp_path / "out", num_bootstrap=10)


def test_multilabel_with_patients_via_command_line(tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    y = (rng.random((n, 5)) < 0.3).astype(np.float32)
    sex = rng.choice(["F", "M"], n)
    pid = np.repeat([f"patient{i:04d}" for i in range(n // 3)], 3)
    for name, private, sep in [("non_private", False, 1.5), ("private", True, 0.8)]:
        score = 1 / (1 + np.exp(-(rng.normal(size=(n, 5)) + sep * (2 * y - 1))))
        run_io.write_variant(tmp_path / "run", name, task="multilabel", class_names=CHEX,
                             private=private, epsilon=2.0 if private else None,
                             delta=1e-5 if private else None, test_accuracy=0.0, y_true=y,
                             y_score=score, groups={"sex": sex}, patient_id=pid, task_names=CHEX)
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--run_dirs={tmp_path / 'run'}",
           f"--out_dir={tmp_path / 'out'}", "--num_bootstrap=100", "--seed=0",
           "--min_group_size=20"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sex: the private model 'private' (ε=2)" in proc.stdout
    out = json.loads((tmp_path / "out" / "fairness.json").read_text())
    assert out["primary_metric"] == "macro_auc"
    assert out["bootstrap"] == {"num_resamples": 100, "seed": 0, "unit": "patient",
                                "num_units": n // 3, "method": "percentile"}
    pred = run_io.read_predictions(tmp_path / "run" / "predictions" / "private.npz")
    for g in ("F", "M"):
        m = sex == g
        want = np.mean([roc_auc_score(y[m, t], pred.y_score[m, t]) for t in range(5)])
        got = out["variants"]["private"]["metrics"]["macro_auc"]["groups"]["sex"][g]
        assert got["value"] == pytest.approx(want, abs=1e-9)
        assert got["ci"][0] <= got["value"] <= got["ci"][1]
    assert (tmp_path / "out" / "report.md").exists()


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_predictions_file_is_named(tmp_path):
    dirs, *_ = _write_runs(tmp_path, {1.0: (0.8, 0.8)})
    npz = tmp_path / "eps1" / "predictions" / "private.npz"
    _truncate(npz)
    with pytest.raises(run_io.RunDirError, match="cannot read predictions file") as info:
        evaluate.evaluate(dirs, tmp_path / "out", num_bootstrap=10)
    message = str(info.value)
    assert str(npz) in message and "BadZipFile" in message
    assert f"tfdpfair-train --workdir={tmp_path / 'eps1'}" in message
    with pytest.raises(run_io.RunDirError, match="truncated or corrupt"):
        run_io.read_predictions(npz)


@pytest.mark.parametrize("arrays, match", [
    ({"y_score": np.zeros((4, 3))}, r"lacks \['y_true'\]"),
    ({"y_true": np.zeros(4, int), "y_score": np.zeros((3, 3))}, r"y_score has shape \(3, 3\)"),
    ({"y_true": np.zeros(4, int), "y_score": np.zeros((4, 3)), "group__sex": np.array(["F"])},
     r"group__sex has shape \(1,\)"),
    ({"y_true": np.zeros(4, int), "y_score": np.zeros((4, 2))}, r"y_score \(4, 2\).*implies "
                                                                 r"multiclass.*\[N, 3\]"),
])
def test_inconsistent_predictions_file_is_named(tmp_path, arrays, match):
    run_io.record_variant(tmp_path, "private", task="multiclass", class_names=CLASSES,
                          private=True, epsilon=1.0, delta=1e-5, test_accuracy=0.0)
    npz = tmp_path / "predictions" / "private.npz"
    npz.parent.mkdir()
    np.savez(npz, **arrays)
    with pytest.raises(run_io.RunDirError, match=match) as info:
        run_io.read_run_dir(tmp_path)
    assert str(npz) in str(info.value) and "re-run" in str(info.value)


def test_missing_run_files_are_named(tmp_path):
    dirs, *_ = _write_runs(tmp_path, {1.0: (0.8, 0.8), 8.0: (0.8, 0.8)})
    # The parent of the run directories instead of the run directories themselves.
    with pytest.raises(run_io.MissingRunFileError, match="contains run directories") as info:
        run_io.read_run_dir(tmp_path)
    assert all(d in str(info.value) for d in dirs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_io.read_run_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished training run directory"):
        run_io.read_run_dir(tmp_path / "empty")
    metrics = tmp_path / "eps8" / "metrics.json"
    metrics.write_text(metrics.read_text()[:40])
    with pytest.raises(run_io.RunDirError, match=f"{metrics} is not valid JSON.*re-run"):
        run_io.read_run_dir(tmp_path / "eps8")
    for npz in (tmp_path / "eps1" / "predictions").glob("*.npz"):
        npz.unlink()
    (tmp_path / "eps1" / "predictions").rmdir()
    with pytest.raises(run_io.MissingRunFileError,
                       match="has no predictions/ directory.*--workdir=") as info:
        evaluate.evaluate(dirs, tmp_path / "out", num_bootstrap=10)
    assert str(tmp_path / "eps1" / "predictions" / "non_private.npz") in str(info.value)


def test_command_line_reports_a_bad_file_without_traceback(tmp_path):
    dirs, *_ = _write_runs(tmp_path, {1.0: (0.8, 0.8)})
    npz = tmp_path / "eps1" / "predictions" / "non_private.npz"
    _truncate(npz, keep=0.9)
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--run_dirs={dirs[0]},",
           f"--out_dir={tmp_path / 'out'}", "--num_bootstrap=10"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"tfdpfair-evaluate: error: cannot read predictions file {npz}" in proc.stderr
