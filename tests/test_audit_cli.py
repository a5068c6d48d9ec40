"""tfdpfair-audit refusals, through the binary: --mode=membership --run_dir reads the run's own
config (issue 20 item 12, issue 24 item 3) and refuses a run whose data is not where its
config.json says before any model is loaded, naming the path and what to do; --mode=canaries
trains its own run on the digits only and refuses other data, saying so."""

import json
import pathlib
import subprocess
import sys

from tfdpfair.configs import chexpert_nfnet_f0
from tfdpfair.trainer import workdir as trainer_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]


def audit(*flags, mode="membership"):
    return subprocess.run([sys.executable, "-m", "tfdpfair.cli.audit", f"--mode={mode}",
                           *flags], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_chexpert_run_without_its_data_is_refused_before_models_load(tmp_path):
    run = tmp_path / "chexpert_run"
    (run / "release").mkdir(parents=True)
    (run / "release" / "model.keras").write_bytes(b"not a model")  # must not be read
    config = chexpert_nfnet_f0.get_config("runlocal=True")
    config.data.root = str(tmp_path / "elsewhere" / "CheXpert-v1.0-small")
    (run / "config.json").write_text(json.dumps(trainer_workdir.config_as_dict(config)))
    proc = audit(f"--run_dir={run}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "the run's data (chexpert) is not where its config.json says" in proc.stderr
    assert "elsewhere" in proc.stderr and "--data_override=KEY=PATH" in proc.stderr
    assert "scoring" not in proc.stdout


def test_a_run_dir_without_config_is_refused(tmp_path):
    proc = audit(f"--run_dir={tmp_path}")
    assert proc.returncode != 0 and "config.json is missing" in proc.stderr


def test_a_canary_audit_on_chest_xray_data_is_refused():
    proc = audit("--config=chexpert_nfnet_f0", mode="canaries")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data.name='chexpert'" in proc.stderr and "out of scope" in proc.stderr
