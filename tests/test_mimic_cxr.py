"""MIMIC-CXR-JPG reader: official splits, view filter, labels, MIMIC-IV demographics, bad input.

The test writes a tiny MIMIC-CXR-JPG + MIMIC-IV directory (published column layouts, .csv and
.csv.gz) and checks the reader's output against the hand-written tables below.
"""

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tfdpfair.data import demographics, mimic_cxr
from tfdpfair.data.sources import ImageConfig

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
          "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
          "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
META_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"]
# dicom_id, subject_id, study_id, ViewPosition, StudyDate, split, gray level of the image
IMAGES = [
    ("d1a-01", 10000032, 50414267, "PA", 21800506, "train", 30),
    ("d2b-02", 10000032, 50414267, "LATERAL", 21800506, "train", 40),
    ("d3c-03", 10000032, 53189527, "AP", 21820626, "train", 50),
    ("d4d-04", 10000764, 57375967, "AP", 21321014, "validate", 60),
    ("d5e-05", 11000011, 51111111, "PA", 21530101, "train", 70),
    ("d6f-06", 19999987, 52222222, "PA", 21450303, "test", 80),
    ("d7a-07", 12000000, 53333333, "AP", 21600101, "train", 90),
    ("d8b-08", 11000011, 51111111, None, 21530101, "train", 100),
]
STUDY_LABELS = {  # study -> raw values that are not blank
    50414267: {"Atelectasis": 1, "Edema": -1, "Support Devices": 0},
    53189527: {"Pleural Effusion": -1, "Cardiomegaly": 1},
    57375967: {"No Finding": 1},
    51111111: {"Pneumonia": -1, "Lung Opacity": 1},
    52222222: {"Fracture": 1},
    53333333: {},
}
PATIENTS = [(10000032, "F", 52, 2180), (10000764, "M", 86, 2132), (11000011, "F", 17, 2150),
            (19999987, "M", 35, 2145)]  # 12000000 is deliberately absent
ADMISSIONS = [  # subject, admittime, race, insurance
    (10000032, "2180-05-06 22:23:00", "WHITE", "Medicare"),
    (10000032, "2180-06-26 18:27:00", "WHITE", None),
    (10000032, "2181-01-01 10:00:00", "BLACK/AFRICAN AMERICAN", "Medicaid"),
    (10000764, "2132-10-14 23:31:00", "UNKNOWN", "Medicare"),
    (10000764, "2133-01-01 08:00:00", "HISPANIC/LATINO - PUERTO RICAN", "Medicare"),
    (11000011, "2150-01-01 12:00:00", "ASIAN - CHINESE", "Private"),
    (11000011, "2152-01-01 12:00:00", "PATIENT DECLINED TO ANSWER", "Medicaid"),
]

# Expected train split (metadata order, lateral d2 and blank-view d8 removed), by hand:
TRAIN_DICOMS = ["d1a-01", "d3c-03", "d5e-05", "d7a-07"]
TRAIN_ZEROS = [{"Atelectasis": 1}, {"Cardiomegaly": 1}, {"Lung Opacity": 1}, {}]
TRAIN_ONES = [{"Atelectasis": 1, "Edema": 1}, {"Cardiomegaly": 1, "Pleural Effusion": 1},
              {"Lung Opacity": 1, "Pneumonia": 1}, {}]
TRAIN_SEX = ["Female", "Female", "Female", "Unknown"]
TRAIN_AGE = [52, 54, 20, np.nan]  # anchor_age + study year - anchor_year
TRAIN_AGE_BIN = ["40-60", "40-60", "20-40", "Unknown"]
TRAIN_RACE = ["White", "White", "Asian", "Unknown"]  # White 2 : Black 1; "declined" ignored
TRAIN_INSURANCE = ["Medicaid", "Medicaid", "Medicaid", "Unknown"]  # 1:1 ties -> latest


def _dense(sparse):
    return np.array([sparse.get(name, 0.0) for name in LABELS], np.float32)


@pytest.fixture(scope="module")
def mimic_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mimic")
    root, iv = base / "mimic-cxr-jpg", base / "mimiciv"
    meta, split = [], []
    for dicom, subject, study, view, date, part, gray in IMAGES:
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
        os.makedirs(folder, exist_ok=True)
        Image.new("L", (24, 30), color=gray).save(folder / f"{dicom}.jpg")
        meta.append((dicom, subject, study, "CHEST (PA AND LAT)", view, 30, 24, date,
                     120000.0, "CHEST (PA AND LAT)", "postero-anterior", "Erect"))
        split.append((dicom, study, subject, part))
    pd.DataFrame(meta, columns=META_COLUMNS).to_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    pd.DataFrame(split, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    subjects = {study: subject for _, subject, study, *_ in IMAGES}
    pd.DataFrame([{"subject_id": subjects[s], "study_id": s,
                   **{n: v.get(n, np.nan) for n in LABELS}} for s, v in STUDY_LABELS.items()],
                 columns=["subject_id", "study_id"] + LABELS).to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    os.makedirs(iv / "hosp")
    pd.DataFrame([(s, g, a, y, "2017 - 2019", None) for s, g, a, y in PATIENTS],
                 columns=["subject_id", "gender", "anchor_age", "anchor_year",
                          "anchor_year_group", "dod"]).to_csv(
        iv / "hosp" / "patients.csv.gz", index=False)
    pd.DataFrame([(s, 20000000 + i, t, t, None, "EW EMER.", "P1", "EMERGENCY ROOM", "HOME",
                   ins, "ENGLISH", "SINGLE", race, None, None, 0)
                  for i, (s, t, race, ins) in enumerate(ADMISSIONS)],
                 columns=["subject_id", "hadm_id", "admittime", "dischtime", "deathtime",
                          "admission_type", "admit_provider_id", "admission_location",
                          "discharge_location", "insurance", "language", "marital_status",
                          "race", "edregtime", "edouttime", "hospital_expire_flag"]).to_csv(
        iv / "hosp" / "admissions.csv.gz", index=False)
    return str(root), str(iv)


def _names(source, group):
    return [source.group_names[group][c] for c in source.groups[group]]


def test_train_split_labels_views_and_paths(mimic_dirs):
    root, iv = mimic_dirs
    source = mimic_cxr.load_mimic_cxr(root, "train", mimic_iv_dir=iv)
    assert [os.path.basename(p)[:-4] for p in source.paths] == TRAIN_DICOMS
    assert source.paths[0] == os.path.join(root, "files/p10/p10000032/s50414267/d1a-01.jpg")
    np.testing.assert_allclose(source.labels, np.stack([_dense(d) for d in TRAIN_ZEROS]))
    assert source.report.removed == {"view not in ['AP', 'PA']": 2}
    ones = mimic_cxr.load_mimic_cxr(root, "train", policy="ones")
    np.testing.assert_allclose(ones.labels, np.stack([_dense(d) for d in TRAIN_ONES]))
    assert "race" not in ones.groups  # no MIMIC-IV directory given
    everything = mimic_cxr.load_mimic_cxr(root, "train", views=None)
    assert len(everything) == 6


def test_demographics_multi_admission_rule(mimic_dirs):
    root, iv = mimic_dirs
    source = mimic_cxr.load_mimic_cxr(root, "train", mimic_iv_dir=iv)
    assert _names(source, "sex") == TRAIN_SEX
    assert _names(source, "age_bin") == TRAIN_AGE_BIN
    assert _names(source, "race") == TRAIN_RACE
    assert _names(source, "insurance") == TRAIN_INSURANCE
    np.testing.assert_allclose(source.values["age"], TRAIN_AGE)
    anchor = mimic_cxr.load_mimic_cxr(root, "train", mimic_iv_dir=iv, age_at_study=False)
    assert _names(anchor, "age_bin") == ["40-60", "40-60", "0-20", "Unknown"]


def test_official_validate_and_test_splits(mimic_dirs):
    root, iv = mimic_dirs
    valid = mimic_cxr.load_mimic_cxr(root, "validate", mimic_iv_dir=iv)
    test = mimic_cxr.load_mimic_cxr(root, "test", mimic_iv_dir=iv)
    assert [os.path.basename(p) for p in valid.paths] == ["d4d-04.jpg"]
    assert [os.path.basename(p) for p in test.paths] == ["d6f-06.jpg"]
    assert (_names(valid, "race"), _names(valid, "insurance")) == (["Hispanic"], ["Medicare"])
    assert _names(valid, "age_bin") == ["80+"] and _names(valid, "sex") == ["Male"]
    assert (_names(test, "race"), _names(test, "insurance")) == (["Unknown"], ["Unknown"])
    np.testing.assert_allclose(valid.labels[0], _dense({"No Finding": 1}))


def test_examples_by_index(mimic_dirs):
    root, iv = mimic_dirs
    config = ImageConfig(image_size=(10, 8), channels=1, normalization="zero_one")
    source = mimic_cxr.load_mimic_cxr(root, "train", mimic_iv_dir=iv, image_config=config)
    batch = next(iter(source.batches([np.array([2, 0])])))
    np.testing.assert_allclose(batch["image"].numpy().mean(axis=(1, 2, 3)),
                               [70 / 255, 30 / 255], atol=2 / 255)
    np.testing.assert_allclose(batch["label"].numpy(),
                               np.stack([_dense(TRAIN_ZEROS[2]), _dense(TRAIN_ZEROS[0])]))
    assert [source.group_names["insurance"][c] for c in batch["insurance"].numpy()] == [
        "Medicaid", "Medicaid"]


@pytest.mark.parametrize("value,expected", [
    ("Medicare", "Medicare"), ("Medicaid", "Medicaid"), ("Private", "Other"),
    ("Other", "Other"), ("No charge", "Other"), (None, "Unknown"), ("", "Unknown")])
def test_insurance_binning_table(value, expected):
    assert demographics.bin_insurance(value) == expected


def _copy(mimic_dirs, tmp_path):
    root = shutil.copytree(mimic_dirs[0], tmp_path / "cxr")
    iv = shutil.copytree(mimic_dirs[1], tmp_path / "iv")
    return str(root), str(iv)


def _edit_csv(path, edit):
    frame = pd.read_csv(path)
    edit(frame).to_csv(path, index=False)


def test_bad_label_value_and_missing_columns(mimic_dirs, tmp_path):
    root, iv = _copy(mimic_dirs, tmp_path)
    labels_csv = os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv")
    _edit_csv(labels_csv, lambda f: f.astype({"Edema": object}).assign(
        Edema=["maybe"] + [np.nan] * (len(f) - 1)))
    with pytest.raises(ValueError, match=r"chexpert.csv line 2 column 'Edema': value 'maybe'"):
        mimic_cxr.load_mimic_cxr(root, "train")
    skipped = mimic_cxr.load_mimic_cxr(root, "train", on_bad="skip")
    assert skipped.report.removed["unknown label value"] == 1
    assert skipped.report.removed["study without labels in chexpert.csv"] == 1  # d1a-01
    assert len(skipped) == 3
    _edit_csv(labels_csv, lambda f: f.drop(columns=["Fracture"]))
    with pytest.raises(ValueError, match=r"chexpert.csv lacks required column\(s\) \['Fracture"):
        mimic_cxr.load_mimic_cxr(root, "train")
    patients = os.path.join(iv, "hosp", "patients.csv.gz")
    _edit_csv(patients, lambda f: f.drop(columns=["gender"]))
    with pytest.raises(ValueError, match=r"patients.csv.gz lacks required column"):
        mimic_cxr.read_mimic_iv_demographics(iv)


def test_missing_files_and_labels(mimic_dirs, tmp_path):
    root, _ = _copy(mimic_dirs, tmp_path)
    os.remove(os.path.join(root, "files/p11/p11000011/s51111111/d5e-05.jpg"))
    with pytest.raises(ValueError, match="p11000011/s51111111/d5e-05.jpg"):
        mimic_cxr.load_mimic_cxr(root, "train")
    assert mimic_cxr.load_mimic_cxr(root, "train", on_bad="skip").report.removed[
        "missing image file"] == 1
    _edit_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"),
              lambda f: f[f["study_id"] != 53333333])
    with pytest.raises(ValueError, match="study 53333333 .*has no row in"):
        mimic_cxr.load_mimic_cxr(root, "train", check_files=False)
    os.remove(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"))
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv"):
        mimic_cxr.load_mimic_cxr(root, "train")
    with pytest.raises(ValueError, match="MIMIC-CXR's paper policy is 'zeros'"):
        mimic_cxr.load_mimic_cxr(root, "train", policy="paper")
    with pytest.raises(ValueError, match="unknown MIMIC-CXR split"):
        mimic_cxr.load_mimic_cxr(root, "valid")


def test_corrupt_image_is_named(mimic_dirs, tmp_path):
    root, _ = _copy(mimic_dirs, tmp_path)
    bad = os.path.join(root, "files/p10/p10000032/s53189527/d3c-03.jpg")
    with open(bad, "wb") as f:
        f.write(b"")
    with pytest.raises(ValueError, match="corrupt image file.*d3c-03.jpg"):
        mimic_cxr.load_mimic_cxr(root, "train", verify_images=True)
    source = mimic_cxr.load_mimic_cxr(root, "train", verify_images=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="d3c-03.jpg"):
        source.get(tf.constant(1, tf.int64))
