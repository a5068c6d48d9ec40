"""tfdpfair-audit --mode=membership --run_dir reads the run's own config (issue 20 item 12): a
CheXpert run used to be audited on the digits and fail on shapes; now it is refused, before
any model is loaded, with a message that names the run's data and what to do instead."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def audit(*flags):
    return subprocess.run([sys.executable, "-m", "tfdpfair.cli.audit", "--mode=membership",
                           *flags], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_chexpert_run_is_refused_with_the_reason(tmp_path):
    run = tmp_path / "chexpert_run"
    (run / "release").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": 0, "data": {"name": "chexpert"}}))
    (run / "release" / "model.keras").write_bytes(b"not a model")  # must not be read
    proc = audit(f"--run_dir={run}")
    assert proc.returncode != 0
    assert "data.name='chexpert'" in proc.stderr and "digits runs only" in proc.stderr
    assert "membership_inference" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_dir_without_config_is_refused(tmp_path):
    proc = audit(f"--run_dir={tmp_path}")
    assert proc.returncode != 0 and "config.json is missing" in proc.stderr
