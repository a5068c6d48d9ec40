"""The experiment trainer (tfdpfair/trainer/runner.py) and every experiment config.

Runs ``train_and_evaluate`` in-process on each config's ``runlocal`` variant with tiny data in
the real formats: CheXpert and MIMIC-CXR directories written here, TFDS through
``tfds.testing.mock_data`` (random access via TFDS data_source), the digits demo.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

import trainer_fixtures
from dp_reference import reference_epsilon
from tfdpfair.fairness import run_io
from tfdpfair.trainer import runner as trainer
from tfdpfair.trainer import workdir as trainer_workdir

CONFIGS = ("demo", "chexpert_nfnet_f0", "mimic_cxr_nfnet_f0", "imagenet_nfnet_f3",
           "places365_nfnet", "cifar10_wrn_16_4", "cifar100_wrn_28_10_finetune")
TFDS_CONFIGS = {"imagenet_nfnet_f3", "places365_nfnet", "cifar10_wrn_16_4",
                "cifar100_wrn_28_10_finetune"}


def get_config(name: str, arg: str | None = None):
    return importlib.import_module(f"tfdpfair.configs.{name}").get_config(arg)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    chexpert_root = trainer_fixtures.write_chexpert(base / "chexpert")
    mimic_root, mimic_iv = trainer_fixtures.write_mimic(base / "mimic")
    return {"chexpert": chexpert_root, "mimic": (mimic_root, mimic_iv)}


def runlocal_config(name: str, data_dirs: dict):
    """The runlocal config, pointed at the generated data, with fixed (test-only) seeds."""
    config = get_config(name, "runlocal=True")
    if name == "chexpert_nfnet_f0":
        config.data.root = data_dirs["chexpert"]
    if name == "mimic_cxr_nfnet_f0":
        config.data.root, config.data.mimic_iv_dir = data_dirs["mimic"]
    config.dp.noise_seed, config.dp.sampling_seed = 11, 12
    return config


def run(name: str, config, workdir: pathlib.Path) -> dict:
    if name in TFDS_CONFIGS:
        with tfds.testing.mock_data(num_examples=12):
            return trainer.train_and_evaluate(config, workdir)
    return trainer.train_and_evaluate(config, workdir)


# ---- configs: published values, runlocal, structure (fast) -------------------------------

PUBLISHED = {  # REFERENCES.md, "Hyper-parameters in the authors' released configs"
    "cifar10_wrn_16_4": dict(lr=2.0, batch=4096, steps=875, clip=1.0, sigma=10.0, delta=1e-5,
                             augmult=16, ema=0.999),
    "cifar100_wrn_28_10_finetune": dict(lr=1.0, batch=16384, steps=250, clip=1.0, sigma=21.1,
                                        delta=1e-5, augmult=16, ema=0.9),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_full_and_runlocal(name):
    for arg in (None, "runlocal=True"):
        config = get_config(name, arg)
        dp_config = trainer.dp_config_from(config.dp, 10_000)  # rejects unknown keys
        assert dp_config.rescale_to_unit_norm
        assert config.optimizer.name in ("sgd", "adam") and config.schedule.name == "constant"
        assert config.model.train == "all" or arg or name == "demo"
    small = get_config(name, "runlocal=True")
    assert small.dp.steps == 2 and small.dp.expected_batch_size <= 64
    with pytest.raises(ValueError, match="unknown config argument"):
        get_config(name, "runlocall=True")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_hyper_parameters(name):
    config, want = get_config(name), PUBLISHED[name]
    assert config.optimizer.learning_rate == want["lr"] and config.optimizer.momentum == 0.0
    assert (config.dp.expected_batch_size, config.dp.steps) == (want["batch"], want["steps"])
    assert (config.dp.l2_norm_clip, config.dp.noise_multiplier) == (want["clip"], want["sigma"])
    assert (config.dp.delta, config.dp.augmult) == (want["delta"], want["augmult"])
    assert config.dp.ema_decay == want["ema"]
    # Their ε (≈ 1, RDP, N = 50,000) is within the configured target, so T is not capped.
    assert reference_epsilon(want["sigma"], want["batch"] / 50_000, want["steps"],
                             want["delta"]) <= config.dp.target_epsilon


def test_medical_configs_use_published_clip_and_delta():
    for name in ("chexpert_nfnet_f0", "mimic_cxr_nfnet_f0"):
        config = get_config(name)
        assert config.dp.l2_norm_clip == 1e-3 and config.dp.delta_policy == "1/N"
        assert trainer.dp_config_from(config.dp, 2000).delta == pytest.approx(1 / 2000)
    assert get_config("chexpert_nfnet_f0").data.train_label_smoothing == (0.8, 0.2)
    assert get_config("mimic_cxr_nfnet_f0").data.uncertain_policy == "zeros"


def test_dp_config_refuses_unknown_keys():
    config = get_config("demo")
    config.dp.clipping_methd = "ghost"
    with pytest.raises(ValueError, match="clipping_methd"):
        trainer.dp_config_from(config.dp, 1000)


# ---- the workdir: refusing another config's run (fast) ------------------------------------

def test_refuses_workdir_of_a_different_config(tmp_path):
    config = get_config("demo", "runlocal=True")
    assert trainer_workdir.claim_workdir(tmp_path, config) is False
    config.train.log_every_steps = 7  # runtime-only: still the same run
    assert trainer_workdir.claim_workdir(tmp_path, config) is True
    config.dp.target_epsilon = 3.0  # nothing written yet (e.g. a wrong data path): reused
    assert trainer_workdir.claim_workdir(tmp_path, config) is True
    config.dp.target_epsilon = 4.0
    trainer_workdir.claim_workdir(tmp_path, config)
    (tmp_path / trainer_workdir.CHECKPOINT_DIR).mkdir()  # the run has started
    config.dp.target_epsilon = 2.0
    with pytest.raises(trainer_workdir.WorkdirConfigMismatchError,
                       match=r"dp.target_epsilon: 4.0 -> 2.0.*new --workdir"):
        trainer.train_and_evaluate(config, tmp_path)


def test_bad_input_fails_before_any_budget_is_spent(tmp_path, data_dirs):
    config = runlocal_config("chexpert_nfnet_f0", data_dirs)
    config.data.root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        trainer.train_and_evaluate(config, tmp_path / "a")
    config = runlocal_config("demo", data_dirs)
    config.dp.noise_multiplier, config.dp.target_epsilon = 0.5, 0.01  # one step exceeds it
    with pytest.raises(ValueError, match="already spends ε"):
        trainer.train_and_evaluate(config, tmp_path / "b")
    assert not (tmp_path / "b" / trainer_workdir.CHECKPOINT_DIR).exists()
    config = runlocal_config("chexpert_nfnet_f0", data_dirs)
    config.model.from_scratch = False
    with pytest.raises(ValueError, match="model.init"):
        trainer.train_and_evaluate(config, tmp_path / "c")


# ---- two logical steps of every config, in-process ---------------------------------------

def _check_run(name: str, config, workdir: pathlib.Path, summary: dict) -> None:
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert summary["steps"] == metrics["steps"] == 2
    assert metrics["epsilon"] == pytest.approx(reference_epsilon(
        metrics["noise_multiplier"], metrics["sampling_rate"], 2, metrics["delta"]), rel=1e-9)
    assert metrics["epsilon"] <= config.dp.target_epsilon
    expected = {"private"} | {f"private_{a}" for a in ("ema", "polyak")
                              if (a == "ema" and config.dp.ema_decay) or
                              (a == "polyak" and config.dp.polyak)}
    if config.non_private.enabled:
        expected.add("non_private")
    assert set(metrics["variants"]) == expected
    run = run_io.read_run_dir(workdir)
    if name in ("chexpert_nfnet_f0", "mimic_cxr_nfnet_f0"):
        pred = run.predictions["private"]
        assert {"sex", "age_bin", "race"} <= set(pred.groups)
        assert pred.patient_id is not None and len(pred.patient_id) == len(pred.y_true)
        assert set(np.unique(pred.y_true)) <= {0.0, 1.0}  # evaluation labels unsmoothed
    assert "differential privacy" in (workdir / "report.md").read_text()
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("nonprivate/loss" in x for x in lines)
    assert all("loss" not in k or k.startswith("nonprivate/") for x in lines for k in x)


FAST = ("chexpert_nfnet_f0",)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in CONFIGS])
def test_runlocal_two_logical_steps(name, data_dirs, tmp_path):
    config = runlocal_config(name, data_dirs)
    summary = run(name, config, tmp_path)
    _check_run(name, config, tmp_path, summary)
    if name not in FAST:  # same command on a finished run: re-evaluates only
        again = run(name, config, tmp_path)
        assert again["steps"] == 2 and again["epsilon"] == summary["epsilon"]


def test_non_private_baseline(tmp_path, data_dirs):
    config = runlocal_config("demo", data_dirs)
    config.dp.enabled = False
    config.model.init, config.model.from_scratch = None, True
    summary = trainer.train_and_evaluate(config, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"non_private"} and "epsilon" not in metrics
    assert metrics["variants"]["non_private"]["private"] is False
    assert not (tmp_path / trainer_workdir.CHECKPOINT_DIR).exists()
    probs = run_io.read_run_dir(tmp_path).predictions["non_private"]
    acc = float(np.mean(probs.y_score.argmax(1) == probs.y_true))
    assert summary["non_private_test_accuracy"] == pytest.approx(acc)


def test_patient_level_chexpert_variant_accounts_over_patients(data_dirs, tmp_path):
    """`:unit=patient`: N counts patients, δ = 1/N of patients, the report says so."""
    config = get_config("chexpert_nfnet_f0", "runlocal=True,unit=patient")
    config.data.root = data_dirs["chexpert"]
    config.dp.noise_seed, config.dp.sampling_seed = 11, 12
    assert config.dp.privacy_unit == "patient" and config.dp.max_examples_per_patient == 4
    summary = trainer.train_and_evaluate(config, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    train = trainer.load_task_data(config.data, config.seed).train
    patients = len(set(train.patient_ids))
    assert patients < len(train)  # the fixture has patients with several images
    assert metrics["num_private_examples"] == patients and summary["privacy_unit"] == "patient"
    assert metrics["delta"] == pytest.approx(1 / patients)
    assert metrics["variants"]["private"]["privacy_unit"] == "patient"
    assert "one patient (all their" in (tmp_path / "report.md").read_text()


def test_binary_exports_release_and_serving_model(tmp_path, data_dirs):
    """A DP run writes seed-free release exports, and with export_dir a serving SavedModel
    whose image signature gives the released (EMA) model's probabilities."""
    import keras
    import tensorflow as tf

    from tfdpfair.data.demo import load_demo_data
    config = runlocal_config("demo", data_dirs)
    config.non_private.enabled = False
    trainer.train_and_evaluate(config, tmp_path / "run", export_dir=tmp_path / "serving")
    for name in ("release", "release_ema", "release_polyak"):
        assert (tmp_path / "run" / name / "model.keras").exists()
    released = keras.models.load_model(tmp_path / "run" / "release_ema" / "model.keras")
    served = tf.saved_model.load(str(tmp_path / "serving"))
    assert {"serving_default", "serving_images"} <= set(served.signatures)
    images = load_demo_data(image_size=config.data.image_size).test.images[:5]
    fn = served.signatures["serving_images"]
    argument = next(iter(fn.structured_input_signature[1]))
    got = next(iter(fn(**{argument: tf.constant(images)}).values())).numpy()
    np.testing.assert_allclose(got, tf.nn.softmax(released(images)).numpy(), atol=1e-5)
    assert (tmp_path / "serving" / "privacy_statement.json").exists()
