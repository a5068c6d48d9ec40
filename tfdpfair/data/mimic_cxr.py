"""MIMIC-CXR-JPG v2.0.0 joined with MIMIC-IV demographics (sex, age, race, insurance).

Layout: ``root`` holds ``mimic-cxr-2.0.0-metadata.csv``, ``mimic-cxr-2.0.0-chexpert.csv`` and
``mimic-cxr-2.0.0-split.csv`` (each may be ``.csv.gz``) and the images
``files/p<first 2 digits of subject>/p<subject_id>/s<study_id>/<dicom_id>.jpg``.
``mimic_iv_dir`` (optional) holds ``hosp/patients.csv(.gz)`` and ``hosp/admissions.csv(.gz)``
(or the two files directly).

Join: metadata (one row per image) -> split.csv on dicom_id (the official ``split`` column,
"train" / "validate" / "test", is used as is) -> chexpert.csv on (subject_id, study_id) ->
patients on subject_id -> admissions on subject_id. Only images whose ViewPosition is in
``views`` (default PA and AP) are kept; the others are counted in the report.

Labels: the 14 CheXpert observations (alphabetical in this CSV). The paper's policy for MIMIC is
"zeros": uncertain (-1) and blank -> 0; "ones" (uncertain -> 1) is also available.

Demographics:
- sex from patients.gender (F/M); age = anchor_age + (year of StudyDate - anchor_year), i.e.
  the age at the study (``age_at_study=False`` uses anchor_age); ages > 89 are given as 91 by
  MIMIC-IV and fall into "80+".
- race and insurance from admissions, one value per patient by this rule: bin every admission's
  value (demographics.bin_race / bin_insurance), ignore admissions whose bin is Unknown, take the
  most frequent bin; ties go to the bin with the latest admittime (then alphabetical). A patient
  with no informative admission is Unknown. Older MIMIC-IV (v1.0) calls the race column
  ``ethnicity``; it is accepted.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from tfdpfair.data import chexpert, demographics, tables
from tfdpfair.data.chexpert import UncertainPolicy
from tfdpfair.data.sources import ImageConfig, ImageFileSource

MIMIC_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
SPLITS = ("train", "validate", "test")
FILE_CHANNELS = 1  # MIMIC-CXR-JPG images are grayscale; verify_images refuses other counts
_HINT = "root must be the MIMIC-CXR-JPG directory (with files/ and the mimic-cxr-2.0.0-*.csv)."
_log = logging.getLogger("tfdpfair.data")


def image_path(root: str, subject_id: int, study_id: int, dicom_id: str) -> str:
    """files/p<first two digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg under ``root``."""
    subject = str(int(subject_id))
    return os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{int(study_id)}",
                        f"{dicom_id}.jpg")


def _read(directory: str, name: str, columns: Sequence[str], hint: str) -> pd.DataFrame:
    path = tables.resolve_file(directory, name, hint)
    frame = pd.read_csv(path)
    tables.require_columns(frame, columns, path, hint)
    frame.attrs["path"] = path
    return frame


def most_frequent_latest(admissions: pd.DataFrame, column: str,
                         binner: Callable[[object], str]) -> pd.Series:
    """One binned value per subject_id: the most frequent informative bin of ``column``.

    Admissions whose bin is Unknown are ignored; ties in frequency go to the bin seen at the
    latest admittime, then to the alphabetically first bin. Returns a Series indexed by
    subject_id (subjects with no informative admission are absent).
    """
    frame = pd.DataFrame({
        "subject_id": admissions["subject_id"].to_numpy(),
        "bin": [binner(v) for v in admissions[column].tolist()],
        "time": pd.to_datetime(admissions["admittime"], errors="coerce").to_numpy()})
    frame = frame[frame["bin"] != demographics.UNKNOWN]
    stats = (frame.groupby(["subject_id", "bin"])
             .agg(count=("bin", "size"), latest=("time", "max")).reset_index())
    stats = stats.sort_values(["subject_id", "count", "latest", "bin"],
                              ascending=[True, False, False, True], na_position="last")
    return stats.drop_duplicates("subject_id").set_index("subject_id")["bin"]


def read_mimic_iv_demographics(mimic_iv_dir: str) -> pd.DataFrame:
    """patients + admissions -> one row per subject_id with columns sex, anchor_age,
    anchor_year (NaN if absent), race, insurance (bins; see the module docstring)."""
    hosp = os.path.join(mimic_iv_dir, "hosp")
    folder = hosp if os.path.isdir(hosp) else mimic_iv_dir
    hint = "mimic_iv_dir must be the MIMIC-IV directory (with hosp/patients.csv.gz)."
    patients = _read(folder, "patients.csv", ("subject_id", "gender", "anchor_age"), hint)
    admissions = _read(folder, "admissions.csv", ("subject_id", "admittime", "insurance"), hint)
    dup = patients["subject_id"].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise ValueError(f"{patients.attrs['path']} line {i + 2}: subject_id "
                         f"{patients['subject_id'].iloc[i]} appears twice; keep one row each.")
    race_col = "race" if "race" in admissions.columns else "ethnicity"
    tables.require_columns(admissions, (race_col,), admissions.attrs["path"], hint)
    sex = []
    for i, value in enumerate(patients["gender"].tolist()):
        try:
            sex.append(demographics.bin_sex(value))
        except ValueError as err:
            raise ValueError(f"{patients.attrs['path']} line {i + 2}: {err}") from None
    anchor_year = (pd.to_numeric(patients["anchor_year"], errors="coerce").to_numpy(np.float64)
                   if "anchor_year" in patients.columns else np.full(len(patients), np.nan))
    out = pd.DataFrame({
        "sex": sex,
        "anchor_age": pd.to_numeric(patients["anchor_age"], errors="coerce").to_numpy(np.float64),
        "anchor_year": anchor_year}, index=patients["subject_id"].to_numpy())
    out["race"] = most_frequent_latest(admissions, race_col, demographics.bin_race)
    out["insurance"] = most_frequent_latest(admissions, "insurance", demographics.bin_insurance)
    return out.fillna({"race": demographics.UNKNOWN, "insurance": demographics.UNKNOWN})


def _join_split(meta: pd.DataFrame, split_frame: pd.DataFrame, split: str,
                report: tables.LoadReport, on_bad: str) -> pd.DataFrame:
    where = split_frame.attrs["path"]
    bad = ~split_frame["split"].isin(SPLITS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{where} line {i + 2}: split {split_frame['split'].iloc[i]!r} is not "
                         f"one of {SPLITS}; fix the file.")
    meta = meta.merge(split_frame[["dicom_id", "split"]], on="dicom_id", how="left")
    keep = tables.filter_rows(
        meta["split"].notna().to_numpy(), "image without a row in split.csv",
        list(meta["dicom_id"]), report, on_bad,
        lambda m: f"{len(m)} dicom_id(s), e.g. {m[0]}, have no row in {where}; use the "
                  "matching split file or pass on_bad='skip'.")
    meta = meta[keep]
    return meta[meta["split"] == split]


def _join_labels(meta: pd.DataFrame, labels: pd.DataFrame, report: tables.LoadReport,
                 on_bad: str) -> tuple[pd.DataFrame, np.ndarray]:
    where = labels.attrs["path"]
    raw, ok, problems = chexpert.parse_label_values(labels, MIMIC_LABELS, where)
    tables.filter_rows(ok, "unknown label value", [f"{where} line {i + 2}"
                                                   for i in range(len(labels))],
                       report, on_bad, lambda _: (
        f"{problems[0]} (expected 1, 0, -1 or blank; {len(problems)} bad values); fix the "
        "file or pass on_bad='skip'."))
    dup = labels.duplicated(["subject_id", "study_id"], keep=False).to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise ValueError(f"{where} line {i + 2}: study {labels['study_id'].iloc[i]} is listed "
                         "more than once; keep one row per study.")
    keyed = pd.DataFrame(raw[ok], columns=list(MIMIC_LABELS))
    keyed["subject_id"] = labels["subject_id"].to_numpy()[ok]
    keyed["study_id"] = labels["study_id"].to_numpy()[ok]
    keyed["_has_labels"] = True
    meta = meta.merge(keyed, on=["subject_id", "study_id"], how="left")
    keep = tables.filter_rows(
        meta["_has_labels"].eq(True).to_numpy(), "study without labels in chexpert.csv",
        [f"study {s} (dicom {d})" for s, d in zip(meta["study_id"], meta["dicom_id"])],
        report, on_bad,
        lambda m: f"{m[0]} has no row in {where}; pass on_bad='skip' to skip such images.")
    meta = meta[keep].reset_index(drop=True)
    return meta, meta[list(MIMIC_LABELS)].to_numpy(np.float64)


def _add_demographics(meta: pd.DataFrame, mimic_iv_dir: str, age_at_study: bool) -> None:
    people = read_mimic_iv_demographics(mimic_iv_dir)
    known = meta["subject_id"].isin(people.index).to_numpy()
    if not known.all():
        _log.warning("%d images belong to subjects missing from patients.csv: their "
                     "demographics are Unknown", int((~known).sum()))
    rows = people.reindex(meta["subject_id"].to_numpy())
    age = rows["anchor_age"].to_numpy(np.float64)
    if age_at_study and "StudyDate" in meta.columns:
        study_year = pd.to_numeric(meta["StudyDate"], errors="coerce").to_numpy() // 10000
        shift = study_year - rows["anchor_year"].to_numpy(np.float64)
        age = np.where(np.isnan(shift), age, age + shift)
    meta["sex"] = rows["sex"].fillna(demographics.UNKNOWN).to_numpy()
    meta["age"] = age
    meta["age_bin"] = [demographics.bin_age(a) for a in age]
    meta["race"] = rows["race"].fillna(demographics.UNKNOWN).to_numpy()
    meta["insurance"] = rows["insurance"].fillna(demographics.UNKNOWN).to_numpy()


def read_mimic_cxr_table(root: str, split: str = "train", *, mimic_iv_dir: str | None = None,
                         views: Sequence[str] | None = ("PA", "AP"), on_bad: str = "error",
                         check_files: bool = True, verify_images: bool = True,
                         age_at_study: bool = True,
                         report: tables.LoadReport | None = None) -> pd.DataFrame:
    """One official split as a table: path, dicom_id, subject_id, study_id, ViewPosition, raw
    labels (1, 0, -1, NaN) and, with ``mimic_iv_dir``, sex, age, age_bin, race, insurance.

    ``check_files`` checks that every image of the split exists; ``verify_images`` (default)
    also decodes each once (tfdpfair.data.image_check: JPEG/PNG, complete, FILE_CHANNELS
    channels); bad files are refused, or dropped with ``on_bad='skip'`` before N is counted."""
    if split not in SPLITS:
        raise ValueError(f"unknown MIMIC-CXR split {split!r}; choose from {SPLITS}.")
    tables.check_on_bad(on_bad)
    report = report if report is not None else tables.LoadReport()
    meta = _read(root, METADATA_CSV, ("dicom_id", "subject_id", "study_id", "ViewPosition"),
                 _HINT)
    meta = _join_split(meta, _read(root, SPLIT_CSV, ("dicom_id", "split"), _HINT), split,
                       report, on_bad)
    if views is not None:
        wanted = {v.upper() for v in views}
        in_view = meta["ViewPosition"].fillna("").astype(str).str.upper().isin(wanted)
        meta = meta[tables.filter_rows(in_view.to_numpy(), f"view not in {sorted(wanted)}",
                                       list(meta["dicom_id"]), report, None)]
    labels = _read(root, CHEXPERT_CSV, ("subject_id", "study_id", *MIMIC_LABELS), _HINT)
    meta, _ = _join_labels(meta.reset_index(drop=True), labels, report, on_bad)
    meta["path"] = [image_path(root, s, t, d) for s, t, d in
                    zip(meta["subject_id"], meta["study_id"], meta["dicom_id"])]
    if mimic_iv_dir is not None:
        _add_demographics(meta, mimic_iv_dir, age_at_study)
    if check_files or verify_images:
        keep = tables.check_image_files(meta["path"].to_numpy(), verify_images, report,
                                        on_bad, FILE_CHANNELS)
        meta = meta[keep]
    return meta.reset_index(drop=True)


def load_mimic_cxr(root: str, split: str = "train", *, mimic_iv_dir: str | None = None,
                   image_config: ImageConfig = ImageConfig(),
                   policy: str | UncertainPolicy = UncertainPolicy.ZEROS,
                   views: Sequence[str] | None = ("PA", "AP"), on_bad: str = "error",
                   check_files: bool = True, verify_images: bool = True,
                   age_at_study: bool = True) -> ImageFileSource:
    """An official MIMIC-CXR split ("train", "validate", "test") as an index-addressable source.

    Examples carry ``image``, ``label`` [14] (MIMIC_LABELS order; uncertain and blank -> 0 under
    the default policy), ``index`` and, with ``mimic_iv_dir``, ``sex``, ``age_bin``, ``race``,
    ``insurance`` codes and ``age`` in years. ``policy="paper"`` is refused: the CheXpert
    per-task policy is not the paper's choice for MIMIC-CXR.
    """
    policy = UncertainPolicy(policy)
    if policy is UncertainPolicy.PAPER:
        raise ValueError("policy='paper' is CheXpert's per-task rule; MIMIC-CXR's paper policy "
                         "is 'zeros' (uncertain and blank -> 0).")
    report = tables.LoadReport()
    table = read_mimic_cxr_table(root, split, mimic_iv_dir=mimic_iv_dir, views=views,
                                 on_bad=on_bad, check_files=check_files,
                                 verify_images=verify_images, age_at_study=age_at_study,
                                 report=report)
    labels = chexpert.map_labels(table[list(MIMIC_LABELS)].to_numpy(), MIMIC_LABELS, policy)
    group_cols = [g for g in ("sex", "age_bin", "race", "insurance") if g in table.columns]
    values = {"age": table["age"].to_numpy()} if "age" in table.columns else {}
    return ImageFileSource(
        table["path"].tolist(), labels, MIMIC_LABELS, image_config,
        {g: demographics.encode(g, table[g]) for g in group_cols},
        {g: demographics.GROUP_NAMES[g] for g in group_cols}, values,
        [str(s) for s in table["subject_id"]], report)
