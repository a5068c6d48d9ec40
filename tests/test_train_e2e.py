"""End to end: the main job and the fairness evaluation, as `make demo` runs them (shortened)."""

import json
import subprocess
import sys

import pytest
from dp_reference import reference_epsilon as rdp_epsilon

pytestmark = [pytest.mark.slow, pytest.mark.ci]


def test_train_then_evaluate(tmp_path):
    workdir = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
         "--config.pretrain.epochs=6", "--config.dp.epochs=3", "--config.dp.target_epsilon=2",
         "--config.dp.expected_batch_size=128"],
        check=True, timeout=900)
    metrics = json.loads((workdir / "metrics.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "steps", "sampling_rate",
                "private_test_accuracy", "non_private_test_accuracy"):
        assert key in metrics, key
    assert metrics["epsilon"] <= 2.0
    assert metrics["sampling_rate"] == pytest.approx(128 / metrics["num_private_examples"])
    assert metrics["delta"] == pytest.approx(1 / metrics["num_private_examples"])
    assert metrics["epsilon"] == pytest.approx(rdp_epsilon(
        metrics["noise_multiplier"], metrics["sampling_rate"], metrics["steps"],
        metrics["delta"]), rel=1e-9)
    assert metrics["steps"] == -(-3 * metrics["num_private_examples"] // 128)
    assert 0.0 <= metrics["private_test_accuracy"] <= 1.0
    report = (workdir / "report.md").read_text()
    assert "differential privacy" in report and "TensorFlow Privacy" in report

    out = workdir / "fairness"
    subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--run_dirs={workdir}",
                    f"--out_dir={out}", "--num_bootstrap=100"], check=True, timeout=600)
    fairness = json.loads((out / "fairness.json").read_text())
    assert fairness
    assert (out / "report.md").exists()
    assert list(out.glob("*.png"))
