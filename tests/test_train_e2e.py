"""End to end: the main job and the fairness evaluation, as `make demo` runs them (shortened)."""

import json
import pathlib
import subprocess
import sys

import pytest
from dp_reference import reference_epsilon as rdp_epsilon

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_default_config_is_found_outside_the_repository(tmp_path):
    """`tfdpfair-train` without --config, run from another directory, parses its
    flags and loads the packaged demo config (the default used to be a cwd-relative path)."""
    code = ("import sys; from absl import flags; from tfdpfair.cli import train; "
            "flags.FLAGS(sys.argv); c = train._CONFIG.value; "
            "print('config:', flags.FLAGS['config'].config_filename, c.data.name, "
            "c.dp.target_epsilon)")
    proc = subprocess.run([sys.executable, "-c", code, "--config.dp.target_epsilon=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    demo = REPO / "tfdpfair" / "configs" / "demo.py"
    assert f"config: {demo} digits 2.0" in proc.stdout


@pytest.mark.slow
@pytest.mark.ci
def test_train_then_evaluate(tmp_path):
    workdir = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
         "--config.pretrain.epochs=6", "--config.dp.epochs=3", "--config.dp.target_epsilon=2",
         "--config.dp.expected_batch_size=128"],
        check=True, timeout=900)
    metrics = json.loads((workdir / "metrics.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "steps", "sampling_rate",
                "private_test_accuracy", "private_ema_test_accuracy",
                "private_polyak_test_accuracy", "non_private_test_accuracy"):
        assert key in metrics, key
    assert metrics["epsilon"] <= 2.0
    assert metrics["sampling_rate"] == pytest.approx(128 / metrics["num_private_examples"])
    assert metrics["delta"] == pytest.approx(metrics["num_private_examples"] ** -1.1)  # default
    assert metrics["epsilon"] == pytest.approx(rdp_epsilon(
        metrics["noise_multiplier"], metrics["sampling_rate"], metrics["steps"],
        metrics["delta"]), rel=1e-9)
    assert metrics["steps"] == -(-3 * metrics["num_private_examples"] // 128)
    assert 0.0 <= metrics["private_test_accuracy"] <= 1.0
    assert set(metrics["variants"]) == {"private", "private_ema", "private_polyak",
                                        "non_private"}
    report = (workdir / "report.md").read_text()
    assert "differential privacy" in report and "TensorFlow Privacy" in report

    out = workdir / "fairness"
    subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--run_dirs={workdir}",
                    f"--out_dir={out}", "--num_bootstrap=100"], check=True, timeout=600)
    fairness = json.loads((out / "fairness.json").read_text())
    assert fairness
    assert (out / "report.md").exists()
    assert list(out.glob("*.png"))
