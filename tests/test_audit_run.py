"""tfdpfair-audit --mode=membership --run_dir on a CheXpert-layout run (issue 24 item 3).

A tiny patient-level DP run is trained in-process on a CheXpert directory in the published
layout (the trainer's code path, as tfdpfair-train runs it); the binary then audits its release
exports. The test recomputes every released model's per-example losses itself (images read
with the CheXpert reader, logits from the model, binary cross-entropy written out in numpy,
members and non-members from the patient-level split) and checks the audit's AUC overall and
per subgroup against sklearn.metrics.roc_auc_score. The refusals (data missing, unsupported
data, no held-out split, data that is not the run's) are checked too.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import trainer_fixtures
from tfdpfair.audit import run_membership
from tfdpfair.configs import chexpert_nfnet_f0, demo
from tfdpfair.data import chexpert
from tfdpfair.data.sources import ImageConfig
from tfdpfair.trainer import registries, runner

REPO = pathlib.Path(__file__).resolve().parents[1]


def audit(*flags):
    return subprocess.run([sys.executable, "-m", "tfdpfair.cli.audit", "--mode=membership",
                           "--num_resamples=20", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def runlocal_config(root: str, unit: str = "example"):
    """The CheXpert runlocal config (16 px, nano NFNet, 2 steps) on the fixture data."""
    config = chexpert_nfnet_f0.get_config(f"runlocal=True,unit={unit}")
    config.data.root = root
    config.dp.noise_seed, config.dp.sampling_seed = 11, 12
    return config


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
    return trainer_fixtures.write_chexpert(tmp_path_factory.mktemp("chexpert_audit"),
                                           patients=40)


@pytest.fixture(scope="module")
def chexpert_run(chexpert_root, tmp_path_factory):
    """A 2-step patient-level DP run on the fixture, trained as tfdpfair-train trains."""
    run = tmp_path_factory.mktemp("chexpert_audit_run")
    runner.train_and_evaluate(runlocal_config(chexpert_root, "patient"), run)
    return run


def bce_losses(model, source) -> np.ndarray:
    """Mean over the 14 labels of −[y log σ(z) + (1 − y) log(1 − σ(z))], float64, in numpy."""
    out = []
    for batch in source.sequential(16):
        z = np.asarray(model(batch["image"], training=False), np.float64)
        y = np.asarray(batch["label"], np.float64)
        log_p, log_1mp = -np.logaddexp(0, -z), -np.logaddexp(0, z)
        out.append(-(y * log_p + (1 - y) * log_1mp).mean(axis=1))
    return np.concatenate(out)


def check_against_sklearn(result: dict, model, root: str) -> int:
    """Asserts the audit's AUC overall and per subgroup equals roc_auc_score on losses
    recomputed here; returns the number of subgroups compared."""
    # The patient-level split, un-smoothed paper-policy labels, 16 px ImageNet-normalised input.
    splits = chexpert.load_chexpert_splits(root, image_config=ImageConfig((16, 16), 3),
                                           policy="paper", seed=0, with_official_valid=False)
    members, held_out = splits["train"], splits["test"]
    assert not set(members.patient_ids) & set(held_out.patient_ids)
    is_member = np.r_[np.ones(len(members)), np.zeros(len(held_out))]
    groups = {g: np.r_[np.asarray(members.group_names[g])[members.groups[g]],
                       np.asarray(held_out.group_names[g])[held_out.groups[g]]]
              for g in ("sex", "age_bin", "race")}
    score = -np.r_[bce_losses(model, members), bce_losses(model, held_out)]
    assert result["setup"]["held_out_split"] == "test"
    assert result["setup"]["bootstrap"].startswith("patient")
    assert result["counts"]["overall"] == {"members": len(members),
                                           "non_members": len(held_out)}
    assert result["overall"]["auc"]["value"] == pytest.approx(
        roc_auc_score(is_member, score), abs=1e-9)
    assert set(result["by_group"]) == set(groups)
    compared = 0
    for attr, labels in groups.items():
        assert set(result["by_group"][attr]) == set(labels)
        for g in set(labels):
            inside = labels == g
            got = result["by_group"][attr][g]["auc"]["value"]
            if len(set(is_member[inside])) < 2:  # no AUC without both classes (JSON: null)
                assert got is None or np.isnan(got)
                continue
            assert got == pytest.approx(roc_auc_score(is_member[inside], score[inside]),
                                        abs=1e-9)
            compared += 1
    return compared


def test_membership_of_a_chexpert_model_matches_sklearn(chexpert_root, tmp_path):
    """Fast: the library path on a random nano NFNet (the audit needs no trained model), here
    as a run's non-private baseline (config.model + non_private.weights.h5)."""
    config = runlocal_config(chexpert_root)
    data = run_membership.load_membership_data(config)
    assert run_membership.non_private_baseline(config, data, tmp_path) is None
    model = registries.build_model(config.model, (16, 16, 3), 14)
    model.save_weights(tmp_path / "non_private.weights.h5")
    baseline = run_membership.non_private_baseline(config, data, tmp_path)
    for got, want in zip(baseline.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    result = run_membership.membership_of(baseline, data, num_resamples=10)
    assert check_against_sklearn(result, model, chexpert_root) >= 5
    assert result["overall"]["auc"]["ci_low"] <= result["overall"]["auc"]["ci_high"]


@pytest.mark.slow
def test_binary_audits_a_trained_chexpert_run(chexpert_run, chexpert_root):
    """tfdpfair-audit --mode=membership --run_dir on a run the trainer wrote (~2.5 min)."""
    run = chexpert_run
    proc = audit(f"--run_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-members = test split" in proc.stdout
    record = json.loads((run / "audit.json").read_text())
    assert record["release"]["not_for_release"] is True
    section = (run / "audit.md").read_text()
    assert "### Membership inference — Not for release" in section
    assert "held-out test split" in section and "### Membership inference" in (
        run / "report.md").read_text()
    exports = sorted(p.parent.name for p in run.glob("*/model.keras"))
    assert exports == ["release", "release_ema", "release_polyak"]
    assert set(record["membership"]) == set(exports)
    for name in exports:
        model = keras.models.load_model(run / name / "model.keras")
        assert check_against_sklearn(record["membership"][name], model, chexpert_root) >= 5


def test_mimic_and_tfds_runs_read_their_members_and_held_out_split(tmp_path):
    """MIMIC-CXR: official train vs test (or validate), four attributes, patient bootstrap;
    TFDS: train_split vs eval_split, no subgroups, labels read from the source."""
    import tensorflow_datasets as tfds

    from tfdpfair.configs import cifar10_wrn_16_4, mimic_cxr_nfnet_f0
    from tfdpfair.data import mimic_cxr
    config = mimic_cxr_nfnet_f0.get_config("runlocal=True")
    config.data.root, config.data.mimic_iv_dir = trainer_fixtures.write_mimic(tmp_path)
    data = run_membership.load_membership_data(config, held_out="validation")
    kwargs = dict(mimic_iv_dir=config.data.mimic_iv_dir, policy="zeros")
    validate = mimic_cxr.load_mimic_cxr(config.data.root, "validate", **kwargs)
    assert len(data.non_members) == len(validate) and data.non_members.name == "validation"
    assert len(data.members) == len(mimic_cxr.load_mimic_cxr(config.data.root, "train",
                                                             **kwargs))
    assert set(data.groups) == {"sex", "age_bin", "race", "insurance"}
    assert data.setup()["bootstrap"].startswith("patient")
    config = cifar10_wrn_16_4.get_config("runlocal=True")
    with tfds.testing.mock_data(num_examples=12):
        data = run_membership.load_membership_data(config)
        model = registries.build_model(config.model, (32, 32, 3), 10)
        result = run_membership.membership_of(model, data, num_resamples=0)
        losses = [softmax_cross_entropy(model, split.data) for split in (data.members,
                                                                         data.non_members)]
    assert result["by_group"] == {} and result["setup"]["bootstrap"] == "example"
    assert result["setup"]["non_members"] == "test split (12 examples)"
    is_member = np.r_[np.ones(len(losses[0])), np.zeros(len(losses[1]))]
    assert result["overall"]["auc"]["value"] == pytest.approx(
        roc_auc_score(is_member, -np.concatenate(losses)), abs=1e-9)


def softmax_cross_entropy(model, source) -> np.ndarray:
    """−log softmax(z)_y per example of an IndexedSource, in numpy."""
    out = []
    for batch in source.sequential(8):
        z = np.asarray(model(batch["image"], training=False), np.float64)
        log_softmax = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        out.append(-log_softmax[np.arange(len(z)), np.asarray(batch["label"], int)])
    return np.concatenate(out)


def test_data_override_points_at_moved_data(chexpert_root, tmp_path):
    """A run whose data moved: refused (naming the path and the flag), found with the flag."""
    config = runlocal_config(str(tmp_path / "elsewhere" / "CheXpert-v1.0-small"))
    with pytest.raises(run_membership.AuditDataError,
                       match=r"not where its config.json says.*elsewhere.*--data_override"):
        run_membership.load_membership_data(config)
    moved = run_membership.with_overrides(config, [f"root={chexpert_root}"])
    assert config.data.root != chexpert_root  # the run's config is left as it was
    assert len(run_membership.load_membership_data(moved).members) > 0


def test_unsupported_data_and_overrides_are_refused():
    config = demo.get_config()
    config.data.name = "svhn"
    with pytest.raises(run_membership.AuditDataError, match=r"data.name='svhn' is not supp"):
        run_membership.load_membership_data(config)
    with pytest.raises(run_membership.AuditDataError, match="cannot be overridden"):
        run_membership.with_overrides(config, ["image_size=32"])


def test_a_run_without_held_out_split_is_refused():
    config = demo.get_config()
    config.data.name, config.data.train_split, config.data.eval_split = (
        "cifar10", "train", "train")
    with pytest.raises(run_membership.AuditDataError, match="no held-out split"):
        run_membership.load_membership_data(config)
    config = demo.get_config()  # digits: there is a test split but no validation split
    with pytest.raises(run_membership.AuditDataError, match=r"no validation split.*--held_out"):
        run_membership.load_membership_data(config, held_out="validation")


def test_data_that_is_not_the_runs_is_refused(tmp_path):
    data = run_membership.load_membership_data(demo.get_config())
    (tmp_path / "metrics.json").write_text(json.dumps({"num_private_examples": 999}))
    with pytest.raises(run_membership.AuditDataError, match=r"has 1168 training examples but "
                                                           r"the run trained on 999"):
        run_membership.check_matches_run(tmp_path, data)
    (tmp_path / "metrics.json").write_text(json.dumps({"num_private_examples": 1168}))
    run_membership.check_matches_run(tmp_path, data)
