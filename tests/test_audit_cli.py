"""tfdpfair-audit refusals, through the binary: --mode=membership --run_dir reads the run's own
config (issue 20 item 12, issue 24 item 3) and refuses a run whose data is not where its
config.json says before any model is loaded, naming the path and what to do; --mode=canaries
trains its own run on the digits only and refuses other data, saying so."""

import json
import pathlib
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("model", ["mlp", pytest.param("config", marks=pytest.mark.slow)])
def test_a_canary_audit_takes_data_model_and_epsilon_from_the_config(tmp_path, model):
    """--mode=canaries --config=demo.py:runlocal=True: the demo's digits, its DP settings with
    the overridden ε, and with --canary_model=config its NFNet-nano recipe (public
    pre-training, last stage trained; ~100 s, slow) instead of the binary's MLP (~25 s)."""
    from dp_reference import reference_epsilon
    from tfdpfair.data.demo import load_demo_data

    m = 40
    proc = audit("--config=demo.py:runlocal=True", "--config.dp.target_epsilon=2",
                 f"--canary_model={model}", f"--num_canaries={m}", f"--workdir={tmp_path}",
                 mode="canaries")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_config = "audit model: config.model nfnet nano, trained: last_stages:1"
    assert (from_config in proc.stdout) == (model == "config")
    # the demo's public pre-training, cached in the workdir
    assert (tmp_path / "pretrained.weights.h5").exists() == (model == "config")
    result = json.loads((tmp_path / "audit.json").read_text())["canaries"]
    n = len(load_demo_data(public_fraction=0.15, test_fraction=0.2, image_size=8,
                           seed=0).private) + m  # the plan counts the canaries as units
    assert result["steps"] == 2 and result["sampling_rate"] == pytest.approx(64 / n)
    assert result["delta"] == pytest.approx(n ** -1.1)
    reference = reference_epsilon(result["noise_multiplier"], 64 / n, 2, result["delta"])
    assert result["accountant_epsilon"] == pytest.approx(reference, rel=1e-6)
    assert 1.9 < reference <= 2.0  # σ calibrated to the overridden target
