"""The tfdpfair-epsilon console script, checked against dp_accounting directly."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
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
                        "accountant"}


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
