"""CheXpert (v1.0 and v1.0-small) with labels, demographics and patient-level splits.

Layout: ``root`` is the directory that holds ``train.csv`` and ``valid.csv`` (e.g.
``.../CheXpert-v1.0-small``). A CSV ``Path`` such as
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` is resolved as
``root/train/patient00001/study1/view1_frontal.jpg`` (its first component, the dataset's folder
name, is replaced by ``root``, so a renamed copy still works); the patient is the
``patientNNNNN`` component. Race comes from ``CHEXPERT DEMO.xlsx`` (columns PATIENT, GENDER,
AGE_AT_CXR, PRIMARY_RACE, ETHNICITY), looked for in ``root`` and its parent; sex and age come
from the CSV (per image). There is no insurance field in CheXpert.

Labels (14 observations, CSV order): 1.0 positive, 0.0 negative, -1.0 uncertain, blank not
mentioned. Blank -> 0 always. Uncertain -> by :class:`UncertainPolicy`:
  - "ones": 1 for every task;  "zeros": 0 for every task;
  - "paper": 1 for Atelectasis, Edema, Pleural Effusion and 0 for the other 11 tasks.
With ``smoothing=(hi, lo)`` (the paper's training choice is (0.8, 0.2)) an uncertain entry mapped
to 1 becomes ``hi`` and one mapped to 0 becomes ``lo``; certain labels are never smoothed.
Evaluation should use ``smoothing=None`` (AUC needs 0/1 targets).

Splits: "train" / "validation" / "test" are a patient-level random split of train.csv (fractions
of patients, default 80/10/10, deterministic in ``seed``; see tables.split_patients). All
patients of train.csv are split before any filtering, so frontal_only or skipped rows never
move a patient to another part. "valid" is the official valid.csv (234 images, labelled by
radiologists: no uncertain or blank labels); "train_all" is all of train.csv.
"""

from __future__ import annotations

import enum
import os
import re
from typing import Sequence

import numpy as np
import pandas as pd

from tfdpfair.data import demographics
from tfdpfair.data import tables
from tfdpfair.data.sources import ImageConfig, ImageFileSource

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
EVAL_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
PAPER_UNCERTAIN_POSITIVE = ("Atelectasis", "Edema", "Pleural Effusion")
PAPER_SMOOTHING = (0.8, 0.2)
CSV_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
DEMO_FILE = "CHEXPERT DEMO.xlsx"
DEMO_COLUMNS = ("PATIENT", "PRIMARY_RACE", "ETHNICITY")
SPLITS = ("train", "validation", "test", "valid", "train_all")
FILE_CHANNELS = 1  # CheXpert JPEGs are grayscale; verify_images refuses other channel counts
_PATIENT = re.compile(r"^patient\d+$")


class UncertainPolicy(str, enum.Enum):
    """What an uncertain (-1) label becomes; see the module docstring."""

    ONES = "ones"
    ZEROS = "zeros"
    PAPER = "paper"


def uncertain_targets(label_names: Sequence[str], policy: str | UncertainPolicy,
                      smoothing: tuple[float, float] | None = None) -> np.ndarray:
    """Per task, the target value an uncertain label gets under ``policy`` (float32 [L])."""
    policy = UncertainPolicy(policy)
    if policy is UncertainPolicy.ONES:
        positive = np.ones(len(label_names), bool)
    elif policy is UncertainPolicy.ZEROS:
        positive = np.zeros(len(label_names), bool)
    else:
        positive = np.isin(label_names, PAPER_UNCERTAIN_POSITIVE)
    hi, lo = smoothing if smoothing is not None else (1.0, 0.0)
    return np.where(positive, hi, lo).astype(np.float32)


def map_labels(raw: np.ndarray, label_names: Sequence[str], policy: str | UncertainPolicy,
               smoothing: tuple[float, float] | None = None) -> np.ndarray:
    """Raw CSV values [N, L] (1, 0, -1 or NaN for blank) -> float32 targets [N, L].

    1 -> 1, 0 -> 0, NaN (blank) -> 0, -1 -> ``uncertain_targets(label_names, policy, smoothing)``.
    """
    raw = np.asarray(raw, np.float64)
    out = np.where(raw == 1.0, 1.0, 0.0).astype(np.float32)
    uncertain = raw == -1.0
    targets = np.broadcast_to(uncertain_targets(label_names, policy, smoothing), out.shape)
    out[uncertain] = targets[uncertain]
    return out


def parse_label_values(frame: pd.DataFrame, columns: Sequence[str], where: str
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Label columns -> (raw float [N, L] with NaN for blank, valid-row mask [N], problems).

    A value is valid if it is blank or numerically 1, 0 or -1 ("1.0", "-1" are accepted).
    ``problems`` describes each invalid row as "<where> line <n> column <c>: value <v>"
    (line numbers count the header as line 1).
    """
    raw = np.empty((len(frame), len(columns)), np.float64)
    valid = np.ones(len(frame), bool)
    problems = []
    for j, col in enumerate(columns):
        values = frame[col]
        if pd.api.types.is_numeric_dtype(values):
            numbers = values.to_numpy(np.float64, copy=True)
            blank = np.isnan(numbers)
        else:  # text somewhere in the column
            text = values.astype("string").str.strip()
            blank = (values.isna() | (text == "")).to_numpy(bool)
            numbers = pd.to_numeric(text, errors="coerce").to_numpy(np.float64, na_value=np.nan)
            numbers[blank] = np.nan
        bad = ~blank & ~np.isin(numbers, (1.0, 0.0, -1.0))
        raw[:, j] = numbers
        for i in np.flatnonzero(bad):
            problems.append(f"{where} line {i + 2} column {col!r}: value {str(values.iloc[i])!r}")
        valid &= ~bad
    return raw, valid, problems


def patient_id(csv_path: str) -> str:
    """'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg' -> 'patient00001'."""
    for part in str(csv_path).replace("\\", "/").split("/"):
        if _PATIENT.match(part):
            return part
    raise ValueError(f"no 'patientNNNNN' component in Path {csv_path!r}")


def patient_ids(csv_paths: pd.Series, where: str) -> np.ndarray:
    """Vectorised :func:`patient_id`; a Path without one raises, naming the CSV line."""
    found = csv_paths.astype(str).str.replace("\\", "/", regex=False).str.extract(
        r"(?:^|/)(patient\d+)(?:/|$)", expand=False)
    if found.isna().any():
        i = int(np.flatnonzero(found.isna().to_numpy())[0])
        raise ValueError(f"{where} line {i + 2}: no 'patientNNNNN' component in Path "
                         f"{csv_paths.iloc[i]!r}; fix the Path column.")
    return found.to_numpy(dtype=object)


def resolve_image_paths(root: str, csv_paths: pd.Series) -> np.ndarray:
    """CSV Paths -> files: the leading 'CheXpert-v1.0*' folder is replaced by ``root``."""
    rel = csv_paths.astype(str).str.replace("\\", "/", regex=False).str.replace(
        r"^[Cc][Hh][Ee][Xx][Pp][Ee][Rr][Tt]-[Vv]1\.0[^/]*/", "", regex=True)
    return (os.path.join(root, "") + rel).to_numpy(dtype=object)


def find_demo_file(root: str) -> str | None:
    """``CHEXPERT DEMO.xlsx`` (or .csv) in ``root`` or its parent, else None."""
    for folder in (root, os.path.dirname(os.path.abspath(root))):
        for name in (DEMO_FILE, DEMO_FILE.replace(".xlsx", ".csv")):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def read_race_table(path: str) -> dict[str, str]:
    """CHEXPERT DEMO file -> {patient id: race bin} using demographics.bin_race.

    PATIENT values are used as written ("patient00001"); bare numbers become "patient%05d".
    A patient listed twice with different race bins is an error naming the file.
    """
    frame = pd.read_csv(path) if path.endswith(".csv") else pd.read_excel(path)
    tables.require_columns(frame, DEMO_COLUMNS, path,
                           "Pass demo_path=None to load CheXpert without race.")
    races: dict[str, str] = {}
    for row in frame.itertuples(index=False):
        raw = getattr(row, "PATIENT")
        pid = f"patient{int(raw):05d}" if str(raw).strip().isdigit() else str(raw).strip()
        race = demographics.bin_race(getattr(row, "PRIMARY_RACE"), getattr(row, "ETHNICITY"))
        if races.get(pid, race) != race:
            raise ValueError(f"{path}: patient {pid} has conflicting races "
                             f"{races[pid]!r} and {race!r}; fix the file.")
        races[pid] = race
    return races


def _sex_bins(frame: pd.DataFrame, where: str, report: tables.LoadReport, on_bad: str
              ) -> tuple[list[str], np.ndarray]:
    """Sex column -> bins; unknown strings raise (on_bad='error') or are skipped and counted."""
    bins, keep, rows = [], np.ones(len(frame), bool), []
    for i, value in enumerate(frame["Sex"].tolist()):
        rows.append(f"{where} line {i + 2}: Sex {value!r}")
        try:
            bins.append(demographics.bin_sex(value))
        except ValueError:
            bins.append(demographics.UNKNOWN)
            keep[i] = False
    tables.filter_rows(keep, "unknown Sex value", rows, report, on_bad, lambda b: (
        f"{b[0]} is not Female/Male/Unknown/blank ({len(b)} rows); fix the CSV or pass "
        "on_bad='skip'."))
    return bins, keep


def _label_rows(frame: pd.DataFrame, where: str, report: tables.LoadReport, on_bad: str
                ) -> tuple[np.ndarray, np.ndarray]:
    raw, keep, problems = parse_label_values(frame, CHEXPERT_LABELS, where)
    rows = [f"{where} line {i + 2}" for i in range(len(frame))]
    tables.filter_rows(keep, "unknown label value", rows, report, on_bad, lambda _: (
        f"{problems[0]} (expected 1, 0, -1 or blank; {len(problems)} bad values); fix the CSV "
        "or pass on_bad='skip' to skip such rows."))
    return raw, keep


def read_chexpert_csv(root: str, csv_name: str = "train.csv", *, frontal_only: bool = False,
                      demo_path: str | None = "auto", on_bad: str = "error",
                      check_files: bool = True, verify_images: bool = True,
                      report: tables.LoadReport | None = None) -> pd.DataFrame:
    """Parses one CheXpert CSV into a table, one row per image kept.

    Columns of the result: ``path`` (resolved file), ``patient``, ``sex`` (bin), ``age`` (years,
    NaN if missing), ``age_bin``, ``race`` (bin; only when a demo file is used), ``frontal``
    (bool), ``ap_pa`` and the 14 raw label columns (1, 0, -1 or NaN). Removed rows (lateral
    views with ``frontal_only``, and bad rows with ``on_bad='skip'``) are counted in ``report``.
    ``check_files`` checks that every image exists; ``verify_images`` (default) also decodes every
    image once (tfdpfair.data.image_check: JPEG/PNG, complete, FILE_CHANNELS channels), so a bad
    file is refused, or dropped with ``on_bad='skip'``, before anything counts N.
    """
    tables.check_on_bad(on_bad)
    report = report if report is not None else tables.LoadReport()
    where = os.path.join(root, csv_name)
    if not os.path.exists(where):
        raise FileNotFoundError(f"{where} not found: root must be the CheXpert directory that "
                                "holds train.csv and valid.csv.")
    frame = pd.read_csv(where, dtype={"Path": str, "Sex": str})
    tables.require_columns(frame, CSV_COLUMNS, where, "Is this a CheXpert v1.0 CSV?")
    raw, keep = _label_rows(frame, where, report, on_bad)
    sex, sex_ok = _sex_bins(frame, where, report, on_bad)
    keep &= sex_ok
    patients = patient_ids(frame["Path"], where)
    age = pd.to_numeric(frame["Age"], errors="coerce").to_numpy(np.float64)
    table = pd.DataFrame({
        "path": resolve_image_paths(root, frame["Path"]), "patient": patients,
        "sex": sex, "age": age, "age_bin": [demographics.bin_age(a) for a in age],
        "frontal": frame["Frontal/Lateral"].astype(str).str.strip().str.lower() == "frontal",
        "ap_pa": frame["AP/PA"].fillna("").astype(str)})
    table[list(CHEXPERT_LABELS)] = raw
    demo_file = find_demo_file(root) if demo_path == "auto" else demo_path
    if demo_file is not None:
        races = read_race_table(demo_file)
        table["race"] = [races.get(p, demographics.UNKNOWN) for p in patients]
    if frontal_only:
        keep &= tables.filter_rows(table["frontal"].to_numpy(), "lateral view (frontal_only)",
                                   list(table["path"]), report, None)
    table = table[keep].reset_index(drop=True)
    if check_files or verify_images:
        exists = tables.check_image_files(table["path"].to_numpy(), verify_images, report,
                                          on_bad, FILE_CHANNELS)
        table = table[exists]
    return table.reset_index(drop=True)


def to_source(table: pd.DataFrame, image_config: ImageConfig, policy: str | UncertainPolicy,
              smoothing: tuple[float, float] | None, report: tables.LoadReport
              ) -> ImageFileSource:
    """A parsed table -> index-addressable source (labels mapped by ``policy``/``smoothing``)."""
    labels = map_labels(table[list(CHEXPERT_LABELS)].to_numpy(), CHEXPERT_LABELS, policy,
                        smoothing)
    group_cols = [g for g in ("sex", "age_bin", "race") if g in table.columns]
    groups = {g: demographics.encode(g, table[g]) for g in group_cols}
    return ImageFileSource(
        table["path"].tolist(), labels, CHEXPERT_LABELS, image_config, groups,
        {g: demographics.GROUP_NAMES[g] for g in group_cols}, {"age": table["age"].to_numpy()},
        table["patient"].tolist(), report)


def load_chexpert_splits(root: str, *, image_config: ImageConfig = ImageConfig(),
                         policy: str | UncertainPolicy = UncertainPolicy.PAPER,
                         smoothing: tuple[float, float] | None | dict = None,
                         frontal_only: bool = False, seed: int = 0,
                         fractions: Sequence[float] = (0.8, 0.1, 0.1),
                         demo_path: str | None = "auto", on_bad: str = "error",
                         check_files: bool = True, verify_images: bool = True,
                         with_official_valid: bool = True) -> dict[str, ImageFileSource]:
    """Patient-level "train"/"validation"/"test" of train.csv (+ official "valid").

    Every source shares one :class:`~tfdpfair.data.tables.LoadReport` (``source.report``).
    Examples carry ``image``, ``label`` [14], ``index``, ``sex``, ``age_bin``, ``age`` and, with
    a demo file, ``race``. Labels of every split use ``policy``/``smoothing``; build evaluation
    splits with ``smoothing=None``.
    """
    report = tables.LoadReport()
    kwargs = dict(frontal_only=frontal_only, demo_path=demo_path, on_bad=on_bad,
                  check_files=check_files, verify_images=verify_images, report=report)
    table = read_chexpert_csv(root, "train.csv", **kwargs)
    # Split the patients of the whole CSV, so filters and skipped rows do not move patients.
    where = os.path.join(root, "train.csv")
    all_paths = pd.read_csv(where, usecols=["Path"], dtype=str)["Path"]
    parts = tables.split_patients(patient_ids(all_paths, where), fractions, seed)
    per_split = smoothing if isinstance(smoothing, dict) else None
    smoothing_of = (lambda name: per_split.get(name)) if per_split is not None else (
        lambda name: smoothing)
    out = {name: to_source(table[table["patient"].isin(part)].reset_index(drop=True),
                           image_config, policy, smoothing_of(name), report)
           for name, part in zip(("train", "validation", "test"), parts)}
    if with_official_valid:
        valid = read_chexpert_csv(root, "valid.csv", **kwargs)
        out["valid"] = to_source(valid, image_config, policy, smoothing_of("valid"), report)
    return out


def load_chexpert(root: str, split: str = "train", *,
                  image_config: ImageConfig = ImageConfig(),
                  policy: str | UncertainPolicy = UncertainPolicy.PAPER,
                  smoothing: tuple[float, float] | None = None, frontal_only: bool = False,
                  seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  demo_path: str | None = "auto", on_bad: str = "error",
                  check_files: bool = True, verify_images: bool = True) -> ImageFileSource:
    """One split ("train", "validation", "test", "valid" or "train_all") as an
    :class:`~tfdpfair.data.sources.ImageFileSource`; arguments as :func:`load_chexpert_splits`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown CheXpert split {split!r}; choose from {SPLITS}.")
    read = dict(frontal_only=frontal_only, demo_path=demo_path, on_bad=on_bad,
                check_files=check_files, verify_images=verify_images)
    if split in ("valid", "train_all"):
        report = tables.LoadReport()
        csv_name = "valid.csv" if split == "valid" else "train.csv"
        table = read_chexpert_csv(root, csv_name, report=report, **read)
        return to_source(table, image_config, policy, smoothing, report)
    return load_chexpert_splits(root, image_config=image_config, policy=policy,
                                smoothing=smoothing, seed=seed, fractions=fractions,
                                with_official_valid=False, **read)[split]
