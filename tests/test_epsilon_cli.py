"""The tfdpfair-epsilon console script, checked against dp_accounting directly."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
from dp_reference import reference_epsilon
from dp_reference import reference_epsilon as rdp_epsilon

from tfdpfair.privacy import epsilon_cli


ISSUE_ARGS = ["--num-examples", "60000", "--batch-size", "256", "--noise-multiplier", "1.1",
              "--epochs", "60", "--delta", "1e-5", "--accountant", "rdp", "--json"]


def test_issue_example_agrees_with_dp_accounting(capsys):
    assert epsilon_cli.main(ISSUE_ARGS) == 0
    out = json.loads(capsys.readouterr().out)
    steps = -(-60 * 60000 // 256)
    assert out["steps"] == steps
    assert out["sampling_rate"] == pytest.approx(256 / 60000)
    assert out["epsilon"] == pytest.approx(rdp_epsilon(1.1, 256 / 60000, steps, 1e-5), rel=1e-9)
    assert set(out) == {"epsilon", "delta", "noise_multiplier", "steps", "sampling_rate",
                        "accountant", "target_epsilon", "target_binding", "note"}
    assert out["target_epsilon"] is None and out["target_binding"] is None and out["note"] is None


def test_target_epsilon_prints_sigma_and_statement(capsys):
    code = epsilon_cli.main(["--num-examples", "50000", "--batch-size", "4096",
                             "--target-epsilon", "1", "--steps", "875", "--delta", "1e-5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "noise multiplier σ =" in out and "Poisson sampling" in out
    sigma = float(out.split("σ = ")[1].split()[0])
    assert 0.99 <= rdp_epsilon(sigma, 4096 / 50000, 875, 1e-5) <= 1.0


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "300", "--noise-multiplier", "1", "--steps", "10"], "exceeds"),
    (["--batch-size", "10", "--noise-multiplier", "0", "--steps", "10"], "noise multiplier"),
    (["--batch-size", "10", "--noise-multiplier", "1", "--steps", "10", "--delta", "2"], "δ"),
    (["--batch-size", "50", "--target-epsilon", "1e-9", "--steps", "100000",
      "--delta", "1e-9"], "unreachable"),
    (["--batch-size", "10", "--target-epsilon", "1e9", "--steps", "10"],
     "no meaningful protection"),
    (["--batch-size", "10", "--target-epsilon", "-1", "--steps", "10"], "target ε"),
    (["--batch-size", "10", "--noise-multiplier", "1", "--steps", "-3"], "steps"),
])
def test_bad_arguments_exit_2_with_message(capsys, args, match):
    assert epsilon_cli.main(["--num-examples", "100"] + args) == 2
    assert match in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("tfdpfair-epsilon") or str(
        pathlib.Path(sys.executable).parent / "tfdpfair-epsilon")
    result = subprocess.run([exe] + ISSUE_ARGS, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["epsilon"] == pytest.approx(
        rdp_epsilon(1.1, 256 / 60000, 14063, 1e-5), rel=1e-9)


def test_default_delta_is_n_to_the_minus_1_1_without_warning(capsys):
    n, batch, steps, sigma = 60000, 256, 14063, 1.1
    assert epsilon_cli.main(["--num-examples", str(n), "--batch-size", str(batch),
                             "--noise-multiplier", str(sigma), "--steps", str(steps),
                             "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["delta"] == pytest.approx(n ** -1.1, rel=1e-12)
    assert out["epsilon"] == pytest.approx(rdp_epsilon(sigma, batch / n, steps, n ** -1.1),
                                           rel=1e-9)
    assert "warning" not in captured.err


def test_delta_of_one_over_n_is_accepted_with_a_warning(capsys):
    assert epsilon_cli.main(["--num-examples", "1000", "--batch-size", "100",
                             "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-3",
                             "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning: δ = 0.001 is >= 1/N" in captured.err
    assert json.loads(captured.out)["epsilon"] == pytest.approx(
        rdp_epsilon(1.0, 0.1, 10, 1e-3), rel=1e-9)


def test_one_example_without_delta_is_refused(capsys):
    assert epsilon_cli.main(["--num-examples", "1", "--batch-size", "1",
                             "--noise-multiplier", "1", "--steps", "1"]) == 2
    assert "at least 2 examples" in capsys.readouterr().err


NON_BINDING = ["--num-examples", "100", "--batch-size", "1", "--steps", "1", "--delta", "0.5",
               "--target-epsilon", "50"]


def test_non_binding_target_is_said_plainly(capsys):
    assert epsilon_cli.main(NON_BINDING) == 0
    out = capsys.readouterr().out
    assert out.startswith("target ε = 50 is not binding")
    assert "reaches" not in out


def test_non_binding_target_in_json(capsys):
    assert epsilon_cli.main(NON_BINDING + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target_binding"] is False and "not binding" in out["note"]
    assert out["epsilon"] == pytest.approx(rdp_epsilon(out["noise_multiplier"], 0.01, 1, 0.5),
                                           rel=1e-9)
    assert out["epsilon"] < 0.99 * 50


def test_binding_target_in_json(capsys):
    assert epsilon_cli.main(["--num-examples", "50000", "--batch-size", "4096",
                             "--target-epsilon", "1", "--steps", "875", "--delta", "1e-5",
                             "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target_binding"] is True and out["note"] is None
    assert 0.99 <= rdp_epsilon(out["noise_multiplier"], 4096 / 50000, 875, 1e-5) <= 1.0


def test_verbose_reports_calibration_progress_on_stderr(capsys):
    assert epsilon_cli.main(["--num-examples", "50000", "--batch-size", "4096",
                             "--target-epsilon", "1", "--steps", "875", "--delta", "1e-5",
                             "--accountant", "pld", "--json", "--verbose"]) == 0
    captured = capsys.readouterr()
    sigma = json.loads(captured.out)["noise_multiplier"]
    lines = [line for line in captured.err.splitlines() if line.startswith("progress:")]
    assert any("(rdp)" in line for line in lines) and any("(pld)" in line for line in lines)
    assert f"σ = {sigma:.6g} ->" in [line for line in lines if "(pld)" in line][-1]
    assert 0.99 <= reference_epsilon(sigma, 4096 / 50000, 875, 1e-5, "pld") <= 1.0


@pytest.mark.parametrize("delay,shown", [(0.0, True), (1e9, False)])
def test_progress_is_shown_only_after_the_delay(capsys, monkeypatch, delay, shown):
    monkeypatch.setattr(epsilon_cli, "PROGRESS_AFTER_SECONDS", delay)
    assert epsilon_cli.main(["--num-examples", "50000", "--batch-size", "4096",
                             "--target-epsilon", "1", "--steps", "875", "--delta", "1e-5"]) == 0
    assert ("progress: calibrating σ (rdp)" in capsys.readouterr().err) == shown
