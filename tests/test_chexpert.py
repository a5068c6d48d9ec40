"""CheXpert reader: labels under each uncertainty policy, demographics, splits, bad input.

The test writes a tiny CheXpert-v1.0-small directory (CSV columns in the published order,
grayscale JPEG/PNG images, a CHEXPERT DEMO.xlsx) and checks what the reader returns against the
hand-written tables below.
"""

import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tfdpfair.data import chexpert, demographics
from tfdpfair.data.sources import ImageConfig
from tfdpfair.data.tables import patient_split

LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
          "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
          "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + LABELS

# (patient, file, sex, age, frontal/lateral, AP/PA, raw labels that are not blank)
ROWS = [
    ("patient00001", "study1/view1_frontal.jpg", "Female", 15, "Frontal", "AP",
     {"Atelectasis": -1, "Cardiomegaly": -1, "Edema": 1, "No Finding": 0}),
    ("patient00001", "study1/view2_lateral.jpg", "Female", 15, "Lateral", "",
     {"Edema": 1}),
    ("patient00002", "study1/view1_frontal.jpg", "Male", 20, "Frontal", "PA",
     {"Pleural Effusion": -1, "Consolidation": -1, "Support Devices": 1}),
    ("patient00003", "study1/view1_frontal.png", "Male", 59, "Frontal", "AP",
     {"No Finding": 1}),
    ("patient00004", "study1/view1_frontal.jpg", "Female", 60, "Frontal", "AP",
     {"Lung Opacity": -1, "Pneumonia": -1, "Fracture": 0}),
    ("patient00005", "study2/view1_frontal.jpg", "Unknown", 85, "Frontal", "AP",
     {"Edema": -1, "Pleural Other": 1}),
    ("patient00006", "study1/view1_frontal.jpg", "Male", None, "Frontal", "PA",
     {"Enlarged Cardiomediastinum": -1, "Lung Lesion": -1, "Pneumothorax": 0}),
    ("patient00007", "study1/view1_frontal.jpg", "Female", 45, "Frontal", "AP",
     {"Atelectasis": 1}),
    ("patient00008", "study1/view1_frontal.jpg", "Male", 70, "Frontal", "PA",
     {"Atelectasis": 0, "Pleural Effusion": -1}),
]

# Expected non-zero targets per row, worked out by hand from the policies' definitions.
EXPECTED = {
    "paper": [{"Atelectasis": 1, "Edema": 1}, {"Edema": 1},
              {"Pleural Effusion": 1, "Support Devices": 1}, {"No Finding": 1}, {},
              {"Edema": 1, "Pleural Other": 1}, {}, {"Atelectasis": 1},
              {"Pleural Effusion": 1}],
    "ones": [{"Atelectasis": 1, "Cardiomegaly": 1, "Edema": 1}, {"Edema": 1},
             {"Pleural Effusion": 1, "Consolidation": 1, "Support Devices": 1},
             {"No Finding": 1}, {"Lung Opacity": 1, "Pneumonia": 1},
             {"Edema": 1, "Pleural Other": 1},
             {"Enlarged Cardiomediastinum": 1, "Lung Lesion": 1}, {"Atelectasis": 1},
             {"Pleural Effusion": 1}],
    "zeros": [{"Edema": 1}, {"Edema": 1}, {"Support Devices": 1}, {"No Finding": 1}, {},
              {"Pleural Other": 1}, {}, {"Atelectasis": 1}, {}],
    "paper_smoothed": [{"Atelectasis": 0.8, "Cardiomegaly": 0.2, "Edema": 1}, {"Edema": 1},
                       {"Pleural Effusion": 0.8, "Consolidation": 0.2, "Support Devices": 1},
                       {"No Finding": 1}, {"Lung Opacity": 0.2, "Pneumonia": 0.2},
                       {"Edema": 0.8, "Pleural Other": 1},
                       {"Enlarged Cardiomediastinum": 0.2, "Lung Lesion": 0.2},
                       {"Atelectasis": 1}, {"Pleural Effusion": 0.8}],
}
EXPECTED_SEX = ["Female", "Female", "Male", "Male", "Female", "Unknown", "Male", "Female", "Male"]
EXPECTED_AGE_BIN = ["0-20", "0-20", "20-40", "40-60", "60-80", "80+", "Unknown", "40-60",
                    "60-80"]
DEMO = [  # PATIENT, PRIMARY_RACE, ETHNICITY, expected bin
    ("patient00001", "White, non-Hispanic", "Non-Hispanic/Non-Latino", "White"),
    ("patient00002", "Black or African American", "Non-Hispanic/Non-Latino", "Black"),
    ("patient00003", "Other", "Hispanic/Latino", "Hispanic"),
    ("patient00004", "Asian, non-Hispanic", "Non-Hispanic/Non-Latino", "Asian"),
    ("patient00005", "White or Caucasian", "Unknown", "White"),
    ("patient00007", "American Indian or Alaska Native", "Non-Hispanic/Non-Latino",
     "American Indian"),
    ("patient00008", "Native Hawaiian or Other Pacific Islander", "Non-Hispanic/Non-Latino",
     "Other"),
]
EXPECTED_RACE = ["White", "White", "Black", "Hispanic", "Asian", "White", "Unknown",
                 "American Indian", "Other"]  # patient00006 is absent from the demo file
GRAY = [20 * (i + 1) for i in range(len(ROWS))]  # constant pixel value of row i's image


def _dense(sparse):
    return np.array([sparse.get(name, 0.0) for name in LABELS], np.float32)


def _write_image(path, gray, size=(32, 40)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", size, color=gray).save(path)


def _csv_frame(rows, folder="train"):
    records = []
    for patient, file, sex, age, fl, appa, labels in rows:
        rec = {"Path": f"CheXpert-v1.0-small/{folder}/{patient}/{file}", "Sex": sex, "Age": age,
               "Frontal/Lateral": fl, "AP/PA": appa}
        rec.update({name: labels.get(name, np.nan) for name in LABELS})
        records.append(rec)
    return pd.DataFrame(records, columns=COLUMNS)


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
    parent = tmp_path_factory.mktemp("chexpert")
    root = parent / "CheXpert-v1.0-small"
    for (patient, file, *_), gray in zip(ROWS, GRAY):
        _write_image(str(root / "train" / patient / file), gray)
    _csv_frame(ROWS).to_csv(root / "train.csv", index=False)
    valid_rows = [("patient64541", "study1/view1_frontal.jpg", "Male", 50, "Frontal", "AP",
                   {name: 0 for name in LABELS} | {"Edema": 1}),
                  ("patient64542", "study1/view1_frontal.jpg", "Female", 30, "Frontal", "PA",
                   {name: 0 for name in LABELS})]
    for patient, file, *_ in valid_rows:
        _write_image(str(root / "valid" / patient / file), 128)
    _csv_frame(valid_rows, "valid").to_csv(root / "valid.csv", index=False)
    pd.DataFrame([(p, "F", 50, r, e) for p, r, e, _ in DEMO],
                 columns=["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]
                 ).to_excel(parent / "CHEXPERT DEMO.xlsx", index=False)
    return str(root)


def _names(source, group):
    return [source.group_names[group][c] for c in source.groups[group]]


@pytest.mark.parametrize("policy,smoothing,key", [
    ("paper", None, "paper"), ("ones", None, "ones"), ("zeros", None, "zeros"),
    ("paper", (0.8, 0.2), "paper_smoothed")])
def test_labels_under_each_policy(chexpert_root, policy, smoothing, key):
    source = chexpert.load_chexpert(chexpert_root, "train_all", policy=policy,
                                    smoothing=smoothing)
    assert len(source) == len(ROWS)
    expected = np.stack([_dense(row) for row in EXPECTED[key]])
    np.testing.assert_allclose(source.labels, expected, atol=1e-6)


def test_demographics_and_images_by_index(chexpert_root):
    config = ImageConfig(image_size=(16, 12), channels=1, normalization="zero_one")
    source = chexpert.load_chexpert(chexpert_root, "train_all", image_config=config)
    assert _names(source, "sex") == EXPECTED_SEX
    assert _names(source, "age_bin") == EXPECTED_AGE_BIN
    assert _names(source, "race") == EXPECTED_RACE
    assert list(source.patient_ids) == [r[0] for r in ROWS]
    for i in (0, 3, 8):  # a JPEG, the PNG, another JPEG
        example = source.get(tf.constant(i, tf.int64))
        assert example["image"].shape == (16, 12, 1)
        np.testing.assert_allclose(example["image"].numpy(), GRAY[i] / 255.0, atol=2 / 255)
        np.testing.assert_allclose(example["label"].numpy(), _dense(EXPECTED["paper"][i]))
        assert int(example["index"]) == i
    age = source.get(tf.constant(6, tf.int64))["age"].numpy()
    assert np.isnan(age)


def test_index_batches_map_to_examples(chexpert_root):
    config = ImageConfig(image_size=(8, 8), channels=3, normalization="zero_one")
    source = chexpert.load_chexpert(chexpert_root, "train_all", image_config=config)
    index_batches = [np.array([4, 0, 0]), np.array([7, 2, 8])]  # padding slots hold index 0
    batches = list(source.batches(index_batches))
    assert len(batches) == 2
    for want, got in zip(index_batches, batches):
        assert got["image"].shape == (3, 8, 8, 3)
        np.testing.assert_array_equal(got["index"].numpy(), want)
        np.testing.assert_allclose(got["label"].numpy(),
                                   np.stack([_dense(EXPECTED["paper"][i]) for i in want]))
        np.testing.assert_allclose(got["image"].numpy().mean(axis=(1, 2, 3)),
                                   [GRAY[i] / 255 for i in want], atol=2 / 255)
        assert [EXPECTED_RACE[i] for i in want] == [
            source.group_names["race"][c] for c in got["race"].numpy()]
    ragged = list(source.batches([np.array([1]), np.array([], np.int64), np.array([3, 5])]))
    assert [b["image"].shape[0] for b in ragged] == [1, 0, 2]  # one batch per index vector
    np.testing.assert_array_equal(ragged[2]["index"].numpy(), [3, 5])
    seq = list(source.sequential(batch_size=4))
    assert [b["index"].shape[0] for b in seq] == [4, 4, 1]


def test_frontal_only_counts_removed_laterals(chexpert_root):
    source = chexpert.load_chexpert(chexpert_root, "train_all", frontal_only=True)
    assert len(source) == len(ROWS) - 1
    assert "view2_lateral" not in " ".join(source.paths)
    assert source.report.removed == {"lateral view (frontal_only)": 1}


def test_official_valid_split_and_no_demo_file(chexpert_root):
    source = chexpert.load_chexpert(chexpert_root, "valid", demo_path=None)
    assert len(source) == 2 and "race" not in source.groups
    np.testing.assert_allclose(source.labels[0], _dense({"Edema": 1}))
    assert _names(source, "sex") == ["Male", "Female"]


def test_patient_level_splits_are_disjoint_and_deterministic(chexpert_root):
    splits = chexpert.load_chexpert_splits(chexpert_root, seed=3, check_files=False)
    again = chexpert.load_chexpert_splits(chexpert_root, seed=3, check_files=False)
    patients = {k: set(v.patient_ids) for k, v in splits.items()}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    assert sum(len(splits[k]) for k in ("train", "validation", "test")) == len(ROWS)
    assert {k: list(v.paths) for k, v in splits.items()} == {
        k: list(v.paths) for k, v in again.items()}
    assert len(splits["valid"]) == 2
    frontal = chexpert.load_chexpert_splits(chexpert_root, seed=3, frontal_only=True)
    for name in ("train", "validation", "test"):  # filtering never moves a patient
        assert set(frontal[name].patient_ids) <= patients[name]


def test_patient_split_fractions_and_seed():
    rng = np.random.default_rng(0)
    ids = np.repeat([f"patient{i:05d}" for i in range(1000)], rng.integers(1, 5, 1000))
    parts = patient_split(ids, (0.8, 0.1, 0.1), seed=1)
    sets = [set(ids[p]) for p in parts]
    assert [len(s) for s in sets] == [800, 100, 100]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ids)))
    same = patient_split(ids, (0.8, 0.1, 0.1), seed=1)
    other = patient_split(ids, (0.8, 0.1, 0.1), seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    assert not np.array_equal(parts[1], other[1])


@pytest.mark.parametrize("race,ethnicity,expected", [
    ("White", "Non-Hispanic/Non-Latino", "White"), ("White, Hispanic", None, "Hispanic"),
    ("Other, Hispanic", "Hispanic/Latino", "Hispanic"), ("Patient Refused", None, "Unknown"),
    ("Race and Ethnicity Unknown", "Unknown", "Unknown"), ("Asian - Indian", None, "Asian"),
    ("White or Caucasian", None, "White"), (None, None, "Unknown"),
    ("Black, non-Hispanic", None, "Black"), ("Native American, non-Hispanic", None, "Other"),
])
def test_race_binning_table(race, ethnicity, expected):
    assert demographics.bin_race(race, ethnicity) == expected


def _copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_unknown_label_value_names_line_or_is_skipped(chexpert_root, tmp_path):
    root = _copy_dir(chexpert_root, tmp_path / "cx")
    frame = pd.read_csv(os.path.join(root, "train.csv"))
    frame.loc[3, "Edema"] = 2.0
    frame.to_csv(os.path.join(root, "train.csv"), index=False)
    with pytest.raises(ValueError, match=r"train.csv line 5 column 'Edema': value '2.0'"):
        chexpert.load_chexpert(root, "train_all")
    source = chexpert.load_chexpert(root, "train_all", on_bad="skip")
    assert len(source) == len(ROWS) - 1
    assert source.report.removed == {"unknown label value": 1}


def test_missing_column_and_missing_csv(chexpert_root, tmp_path):
    root = _copy_dir(chexpert_root, tmp_path / "cx")
    frame = pd.read_csv(os.path.join(root, "train.csv")).drop(columns=["Pleural Effusion"])
    frame.to_csv(os.path.join(root, "train.csv"), index=False)
    with pytest.raises(ValueError, match=r"train.csv lacks required column\(s\) \['Pleural"):
        chexpert.load_chexpert(root, "train_all")
    with pytest.raises(FileNotFoundError, match="nowhere/train.csv"):
        chexpert.load_chexpert(str(tmp_path / "nowhere"), "train_all")
    with pytest.raises(ValueError, match="unknown CheXpert split"):
        chexpert.load_chexpert(root, "dev")


def test_missing_image_names_file_or_is_skipped(chexpert_root, tmp_path):
    root = _copy_dir(chexpert_root, tmp_path / "cx")
    os.remove(os.path.join(root, "train/patient00004/study1/view1_frontal.jpg"))
    with pytest.raises(ValueError, match="patient00004/study1/view1_frontal.jpg"):
        chexpert.load_chexpert(root, "train_all")
    source = chexpert.load_chexpert(root, "train_all", on_bad="skip")
    assert len(source) == len(ROWS) - 1
    assert source.report.removed == {"missing image file": 1}


def test_corrupt_image_names_file_or_is_skipped(chexpert_root, tmp_path):
    root = _copy_dir(chexpert_root, tmp_path / "cx")
    corrupt = os.path.join(root, "train/patient00007/study1/view1_frontal.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"this is not a jpeg")
    with pytest.raises(ValueError, match="corrupt image file.*patient00007"):
        chexpert.load_chexpert(root, "train_all", verify_images=True)
    skipped = chexpert.load_chexpert(root, "train_all", on_bad="skip", verify_images=True)
    assert len(skipped) == len(ROWS) - 1
    assert skipped.report.removed == {"corrupt image file": 1}
    # Without verification the pipeline itself refuses the file and names it.
    unverified = chexpert.load_chexpert(root, "train_all", verify_images=False)
    row = list(unverified.paths).index(corrupt)
    with pytest.raises(tf.errors.InvalidArgumentError, match="patient00007"):
        unverified.get(tf.constant(row, tf.int64))


def test_bad_sex_value_and_bad_path(chexpert_root, tmp_path):
    root = _copy_dir(chexpert_root, tmp_path / "cx")
    csv = os.path.join(root, "train.csv")
    frame = pd.read_csv(csv)
    frame.loc[1, "Sex"] = "X"
    frame.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"train.csv line 3: Sex 'X' is not Female/Male"):
        chexpert.load_chexpert(root, "train_all")
    skipped = chexpert.load_chexpert(root, "train_all", on_bad="skip")
    assert skipped.report.removed == {"unknown Sex value": 1} and len(skipped) == len(ROWS) - 1
    frame.loc[1, "Sex"] = "Female"
    frame.loc[4, "Path"] = "CheXpert-v1.0-small/train/someone/study1/view1_frontal.jpg"
    frame.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"train.csv line 6: no 'patientNNNNN' component"):
        chexpert.load_chexpert(root, "train_all")
