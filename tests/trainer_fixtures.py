"""Tiny CheXpert and MIMIC-CXR(-JPG + MIMIC-IV) directories in the published layouts, for the
trainer tests (the readers' own tests, test_chexpert.py / test_mimic_cxr.py, check the parsing)."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pandas as pd
from PIL import Image

CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                   "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                   "Support Devices"]
MIMIC_LABELS = sorted(CHEXPERT_LABELS)


def _image(path: pathlib.Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8), "L").save(path)


def _labels(rng: np.random.Generator) -> list:
    return [rng.choice([1.0, 0.0, -1.0, np.nan]) for _ in CHEXPERT_LABELS]


def write_chexpert(parent: pathlib.Path, patients: int = 30, seed: int = 0) -> str:
    """<parent>/CheXpert-v1.0-small with train.csv, valid.csv, images, CHEXPERT DEMO.xlsx."""
    rng = np.random.default_rng(seed)
    root = parent / "CheXpert-v1.0-small"
    rows, demo = [], []
    for p in range(1, patients + 1):
        pid = f"patient{p:05d}"
        for view in range(2):
            rel = f"train/{pid}/study1/view{view + 1}_{'frontal' if view == 0 else 'lateral'}.jpg"
            _image(root / rel, rng)
            rows.append([f"CheXpert-v1.0-small/{rel}", ["Female", "Male"][p % 2],
                         int(rng.integers(18, 90)), "Frontal" if view == 0 else "Lateral",
                         "AP" if view == 0 else "", *_labels(rng)])
        demo.append([pid, "F", 50, ["White", "Black or African American", "Asian"][p % 3],
                     "Non-Hispanic/Non-Latino"])
    columns = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    pd.DataFrame(rows, columns=columns).to_csv(root / "train.csv", index=False)
    valid_rel = "valid/patient64541/study1/view1_frontal.jpg"
    _image(root / valid_rel, rng)
    pd.DataFrame([[f"CheXpert-v1.0-small/{valid_rel}", "Male", 50, "Frontal", "AP",
                   *[0.0] * 14]], columns=columns).to_csv(root / "valid.csv", index=False)
    pd.DataFrame(demo, columns=["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE",
                                "ETHNICITY"]).to_excel(parent / "CHEXPERT DEMO.xlsx", index=False)
    return str(root)


def write_mimic(base: pathlib.Path, subjects: int = 30, seed: int = 0) -> tuple[str, str]:
    """(MIMIC-CXR-JPG root, MIMIC-IV dir) with every split populated."""
    rng = np.random.default_rng(seed)
    root, iv = base / "mimic-cxr-jpg", base / "mimiciv"
    meta, split, labels, patients, admissions = [], [], [], [], []
    for i in range(subjects):
        subject, study = 10000000 + i * 7919, 50000000 + i
        part = "train" if i % 5 < 3 else ("validate" if i % 5 == 3 else "test")
        for j, view in enumerate(["PA", "LATERAL"]):
            dicom = f"d{i:03d}-{j}"
            _image(root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
                   / f"{dicom}.jpg", rng)
            meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 20, 24, 21800506,
                         120000.0])
            split.append([dicom, study, subject, part])
        labels.append([subject, study, *_labels(rng)])
        patients.append([subject, ["F", "M"][i % 2], int(rng.integers(18, 90)), 2180])
        admissions.append([subject, 20000000 + i, "2180-05-06 22:23:00",
                           ["Medicare", "Medicaid", "Other"][i % 3],
                           ["WHITE", "BLACK/AFRICAN AMERICAN", "ASIAN"][i % 3]])
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(meta, columns=["dicom_id", "subject_id", "study_id",
                                "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                                "Columns", "StudyDate", "StudyTime"]).to_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    pd.DataFrame(split, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    pd.DataFrame(labels, columns=["subject_id", "study_id", *MIMIC_LABELS]).to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    os.makedirs(iv / "hosp", exist_ok=True)
    pd.DataFrame(patients, columns=["subject_id", "gender", "anchor_age", "anchor_year"]).to_csv(
        iv / "hosp" / "patients.csv.gz", index=False)
    pd.DataFrame(admissions, columns=["subject_id", "hadm_id", "admittime", "insurance",
                                      "race"]).to_csv(iv / "hosp" / "admissions.csv.gz",
                                                      index=False)
    return str(root), str(iv)
