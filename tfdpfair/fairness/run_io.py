"""Run directories: what a training run writes for the fairness evaluation, and reading it back.

Layout of a run directory:
  <run_dir>/metrics.json   {"task": "multiclass" | "multilabel", "class_names": [...],
                            "variants": {"<name>": {"private": bool, "epsilon": float | null,
                                                    "delta": float | null,
                                                    "test_accuracy": float, ...}}, ...}
  <run_dir>/predictions/<name>.npz
      y_true      int [N] (multiclass) or 0/1 float [N, T] (multilabel)
      y_score     float [N, C] class probabilities, or [N, T] per-task scores
      task_names  str [T] (optional; multilabel)
      patient_id  str [N] (optional; enables the cluster bootstrap)
      group__<attribute>  str [N], one per demographic attribute (e.g. group__sex)
A training binary calls `write_variant` once per evaluated model (e.g. "non_private",
"private", "private_ema"); `load_runs` combines several run directories that share one
evaluation set.

Reading a missing, truncated or inconsistent run directory raises RunDirError (a ValueError;
MissingRunFileError, also a FileNotFoundError, when a file is absent) naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import zipfile
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from tfdpfair.fairness import compare
from tfdpfair.fairness import metrics as metrics_lib

METRICS_FILE = "metrics.json"
PREDICTIONS_DIR = "predictions"
GROUP_PREFIX = "group__"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
PathLike = str | os.PathLike


class RunDirError(ValueError):
    """A run directory's metrics.json or predictions file is unreadable or inconsistent.

    The message names the offending file and says how to fix it.
    """


class MissingRunFileError(RunDirError, FileNotFoundError):
    """A run directory, its metrics.json or a listed predictions file does not exist."""


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy values to Python ones and NaN/inf to None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path: PathLike, obj: Any) -> pathlib.Path:
    """Write obj as indented strict JSON (NaN -> null), atomically (temp file + rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, path)
    return path


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} {name!r} must use only letters, digits, '_', '.', '-'.")


def write_predictions(run_dir: PathLike, variant: str, *, y_true: np.ndarray,
                      y_score: np.ndarray, groups: Mapping[str, Sequence[str]],
                      patient_id: Sequence[str] | None = None,
                      task_names: Sequence[str] | None = None) -> pathlib.Path:
    """Write <run_dir>/predictions/<variant>.npz (see module docstring), atomically (temp file
    + rename); returns its path."""
    _check_name("variant", variant)
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, np.float32)
    n = len(y_true)
    if y_score.ndim != 2 or len(y_score) != n:
        raise ValueError(f"y_score must be [N={n}, K]; got {y_score.shape}.")
    arrays: dict[str, np.ndarray] = {"y_true": y_true, "y_score": y_score}
    if task_names is not None:
        arrays["task_names"] = np.asarray(task_names).astype(str)
    if patient_id is not None:
        arrays["patient_id"] = np.asarray(patient_id).astype(str)
    for attribute, labels in groups.items():
        _check_name("group attribute", attribute)
        arrays[GROUP_PREFIX + attribute] = np.asarray(labels).astype(str)
    for key, value in arrays.items():
        if key not in ("y_score", "task_names") and len(value) != n:
            raise ValueError(f"{key} has {len(value)} entries but y_true has {n}.")
    path = pathlib.Path(run_dir) / PREDICTIONS_DIR / f"{variant}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: never a truncated .npz
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
    return path


def record_variant(run_dir: PathLike, variant: str, *, task: str, class_names: Sequence[str],
                   private: bool, epsilon: float | None, delta: float | None,
                   test_accuracy: float, **extra: Any) -> pathlib.Path:
    """Add or replace variant's entry in <run_dir>/metrics.json, keeping every other key.

    `extra` (e.g. steps, noise_multiplier, test_macro_auc) is stored in the variant's entry.
    """
    _check_name("variant", variant)
    if task not in (metrics_lib.MULTICLASS, metrics_lib.MULTILABEL):
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}.")
    path = pathlib.Path(run_dir) / METRICS_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in (("task", task), ("class_names", list(class_names))):
        if data.get(key, value) != value:
            raise ValueError(f"{path} has {key}={data[key]!r}, not {value!r}.")
        data[key] = value
    entry = {"private": bool(private), "epsilon": epsilon, "delta": delta,
             "test_accuracy": test_accuracy, **extra}
    data.setdefault("variants", {})[variant] = entry
    return write_json(path, data)


def write_variant(run_dir: PathLike, variant: str, *, task: str, class_names: Sequence[str],
                  private: bool, epsilon: float | None, delta: float | None,
                  test_accuracy: float, y_true: np.ndarray, y_score: np.ndarray,
                  groups: Mapping[str, Sequence[str]], patient_id: Sequence[str] | None = None,
                  task_names: Sequence[str] | None = None, **extra: Any) -> None:
    """write_predictions + record_variant: everything evaluate.py needs for one model."""
    write_predictions(run_dir, variant, y_true=y_true, y_score=y_score, groups=groups,
                      patient_id=patient_id, task_names=task_names)
    record_variant(run_dir, variant, task=task, class_names=class_names, private=private,
                   epsilon=epsilon, delta=delta, test_accuracy=test_accuracy, **extra)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """One variant's predictions file."""

    y_true: np.ndarray
    y_score: np.ndarray
    groups: dict[str, np.ndarray]
    patient_id: np.ndarray | None = None
    task_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A parsed run directory: metrics.json contents and each variant's predictions."""

    path: pathlib.Path
    task: str
    class_names: tuple[str, ...]
    info: dict[str, dict[str, Any]]
    predictions: dict[str, Predictions]


def _rerun_hint(run_dir: PathLike | None) -> str:
    """How to regenerate a run directory's files."""
    where = f"--workdir={run_dir}" if run_dir is not None else "--workdir=<run dir>"
    return (f"re-run the training job that wrote it (e.g. `tfdpfair-train {where}`) "
            f"to regenerate it")


def _npz_run_dir(path: pathlib.Path) -> pathlib.Path | None:
    """The run directory of <run_dir>/predictions/<name>.npz (None for other paths)."""
    return path.parent.parent if path.parent.name == PREDICTIONS_DIR else None


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file; RunDirError naming the file if it cannot be read."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it is a single .npy array, not an .npz archive")
        with loaded as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise RunDirError(
            f"cannot read predictions file {path} ({type(e).__name__}: {e}). It is truncated or "
            f"corrupt, e.g. because the run was interrupted while writing it: "
            f"{_rerun_hint(_npz_run_dir(path))}.") from e


def _check_arrays(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Required keys present and every array's shape consistent with y_true's N."""
    hint = _rerun_hint(_npz_run_dir(path))
    missing = [k for k in ("y_true", "y_score") if k not in arrays]
    if missing:
        raise RunDirError(f"predictions file {path} lacks {missing} (it has {sorted(arrays)}); "
                          f"it was not written by run_io.write_predictions: {hint}.")
    y_true, y_score = arrays["y_true"], arrays["y_score"]
    n = len(y_true) if y_true.ndim else 0
    problems = []
    if y_true.ndim not in (1, 2):
        problems.append(f"y_true has shape {y_true.shape}, not [N] or [N, T]")
    if y_score.ndim != 2 or len(y_score) != n:
        problems.append(f"y_score has shape {y_score.shape}, not [N={n}, K]")
    if not np.issubdtype(y_score.dtype, np.number):
        problems.append(f"y_score has dtype {y_score.dtype}, not float")
    for key, value in arrays.items():
        if key.startswith(GROUP_PREFIX) or key == "patient_id":
            if value.shape != (n,):
                problems.append(f"{key} has shape {value.shape}, not [N={n}]")
        elif key == "task_names" and value.ndim != 1:
            problems.append(f"task_names has shape {value.shape}, not [T]")
    if problems:
        raise RunDirError(f"predictions file {path} is inconsistent: {'; '.join(problems)}. "
                          f"Write it with run_io.write_predictions: {hint}.")


def read_predictions(path: PathLike) -> Predictions:
    """Read one predictions .npz written by write_predictions.

    Raises MissingRunFileError if it does not exist, and RunDirError naming the file if it is
    truncated or corrupt, lacks y_true / y_score, or has inconsistent shapes.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingRunFileError(f"predictions file {path} not found: "
                                  f"{_rerun_hint(_npz_run_dir(path))}.")
    z = _load_npz(path)
    _check_arrays(path, z)
    groups = {k[len(GROUP_PREFIX):]: v.astype(str) for k, v in z.items()
              if k.startswith(GROUP_PREFIX)}
    return Predictions(
        y_true=z["y_true"], y_score=z["y_score"].astype(np.float64), groups=groups,
        patient_id=z["patient_id"].astype(str) if "patient_id" in z else None,
        task_names=tuple(z["task_names"].astype(str)) if "task_names" in z else None)


def _missing_metrics_message(run_dir: pathlib.Path) -> str:
    """Why <run_dir>/metrics.json is absent, and what to pass instead."""
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        return (f"run directory {run_dir} does not exist: pass the --workdir of a finished "
                f"training run.")
    nested = sorted(str(p.parent) for p in run_dir.glob(f"*/{METRICS_FILE}"))
    if nested:
        shown = ", ".join(nested[:5]) + (", ..." if len(nested) > 5 else "")
        return (f"{path} not found: {run_dir} is not a run directory but contains run "
                f"directories ({shown}); pass those instead.")
    return (f"{path} not found: {run_dir} is not a finished training run directory (training "
            f"writes {METRICS_FILE} once its first model is evaluated). Pass a finished run's "
            f"--workdir, or {_rerun_hint(run_dir)}.")


def _read_metrics(run_dir: pathlib.Path) -> dict[str, Any]:
    """<run_dir>/metrics.json, checked for what the evaluation needs (RunDirError if not)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise MissingRunFileError(_missing_metrics_message(run_dir))
    hint = _rerun_hint(run_dir)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); it may be truncated: {hint}.") from e
    if not isinstance(data, dict):
        raise RunDirError(f"{path} holds a {type(data).__name__}, not a JSON object: {hint}.")
    missing = [k for k in ("task", "class_names", "variants") if k not in data]
    if missing:
        raise RunDirError(f"{path} lacks {missing}; a training run writes them with "
                          f"run_io.write_variant: {hint}.")
    if data["task"] not in (metrics_lib.MULTICLASS, metrics_lib.MULTILABEL):
        raise RunDirError(f"{path}: task must be 'multiclass' or 'multilabel', not "
                          f"{data['task']!r}.")
    if not isinstance(data["class_names"], list) or not all(
            isinstance(c, str) for c in data["class_names"]):
        raise RunDirError(f"{path}: class_names must be a list of strings.")
    if not isinstance(data["variants"], Mapping) or not data["variants"]:
        raise RunDirError(f"{path} lists no variants (no model finished evaluation): {hint}.")
    for name, info in data["variants"].items():
        if not isinstance(info, Mapping) or not isinstance(info.get("private"), bool):
            raise RunDirError(f"{path}: variant {name!r} needs a boolean 'private' entry.")
    return data


def _variant_npz(run_dir: pathlib.Path, name: str) -> pathlib.Path:
    """predictions/<name>.npz of a variant listed in metrics.json; MissingRunFileError if absent."""
    npz = run_dir / PREDICTIONS_DIR / f"{name}.npz"
    if npz.is_file():
        return npz
    listed = f"variant {name!r} is listed in {run_dir / METRICS_FILE}"
    if not npz.parent.is_dir():
        where = f"{run_dir} has no {PREDICTIONS_DIR}/ directory"
    else:
        where = f"{npz.parent} has {sorted(p.name for p in npz.parent.glob('*.npz'))}"
    raise MissingRunFileError(f"predictions file {npz} not found ({listed}, but {where}): "
                              f"{_rerun_hint(run_dir)}.")


def _check_against_metrics(npz: pathlib.Path, pred: Predictions, task: str,
                           class_names: Sequence[str]) -> None:
    """The predictions file agrees with metrics.json's task and class names."""
    y_true, y_score = pred.y_true, pred.y_score
    if task == metrics_lib.MULTICLASS:
        ok = (y_true.ndim == 1 and np.issubdtype(y_true.dtype, np.integer)
              and y_score.shape[1] == len(class_names))
        want = (f"multiclass: int y_true [N] and y_score [N, {len(class_names)}] (one column "
                f"per class name)")
    else:
        k = len(pred.task_names) if pred.task_names is not None else len(class_names)
        ok = y_true.ndim == 2 and y_score.shape == y_true.shape == (len(y_true), k)
        want = f"multilabel: y_true and y_score [N, {k}] (one column per task)"
    if not ok:
        raise RunDirError(
            f"predictions file {npz} has y_true {y_true.dtype} {y_true.shape} and y_score "
            f"{y_score.shape}, but {npz.parent.parent / METRICS_FILE} implies {want}; the two "
            f"files do not belong together: {_rerun_hint(npz.parent.parent)}.")
    if not np.isfinite(y_score).all():
        raise RunDirError(f"predictions file {npz}: y_score contains NaN or infinite values "
                          f"(did training diverge?); fix the run, then "
                          f"{_rerun_hint(npz.parent.parent)}.")


def read_run_dir(run_dir: PathLike) -> RunDir:
    """Read <run_dir>/metrics.json and predictions/<variant>.npz for every listed variant.

    Raises MissingRunFileError / RunDirError naming the missing or bad file and the fix.
    """
    run_dir = pathlib.Path(run_dir)
    data = _read_metrics(run_dir)
    predictions = {}
    for name in data["variants"]:
        npz = _variant_npz(run_dir, name)
        predictions[name] = read_predictions(npz)
        _check_against_metrics(npz, predictions[name], data["task"], data["class_names"])
    return RunDir(run_dir, data["task"], tuple(data["class_names"]), dict(data["variants"]),
                  predictions)


def _difference(ref: Predictions, other: Predictions) -> str | None:
    """How other's evaluation set differs from ref's (None if identical)."""
    if ref.y_true.shape != other.y_true.shape:
        return f"y_true has shape {other.y_true.shape}, not {ref.y_true.shape}"
    if not np.array_equal(ref.y_true, other.y_true):
        k = int((ref.y_true != other.y_true).reshape(len(ref.y_true), -1).any(axis=1).sum())
        return f"y_true differs in {k} of {len(ref.y_true)} examples"
    if sorted(ref.groups) != sorted(other.groups):
        return f"group attributes {sorted(other.groups)}, not {sorted(ref.groups)}"
    for attribute, labels in ref.groups.items():
        if not np.array_equal(labels, other.groups[attribute]):
            return f"group__{attribute} differs"
    if (ref.patient_id is None) != (other.patient_id is None) or (
            ref.patient_id is not None and not np.array_equal(ref.patient_id, other.patient_id)):
        return "patient_id differs (or is present in only one of them)"
    if ref.task_names != other.task_names:
        return f"task_names {other.task_names}, not {ref.task_names}"
    return None


def _unique_prefixes(paths: Sequence[pathlib.Path]) -> list[str]:
    """Run directory base names, made unique with '#<i>' where two coincide."""
    names = [p.resolve().name for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def load_runs(run_dirs: Sequence[PathLike]) -> tuple[
        metrics_lib.EvalSet, dict[str, np.ndarray], dict[str, compare.Variant]]:
    """Combine run directories that share one evaluation set into (eval_set, scores, variants).

    Variant names are "<variant>" for one run directory and "<run dir name>/<variant>" for
    several. Raises ValueError naming the first variant whose y_true, groups, patient ids or
    task names differ from the first variant's: paired comparisons need identical examples in
    identical order.
    """
    if not run_dirs:
        raise ValueError("no run directories given.")
    runs = [read_run_dir(d) for d in run_dirs]
    prefixes = _unique_prefixes([r.path for r in runs])
    first: tuple[str, Predictions] | None = None
    scores: dict[str, np.ndarray] = {}
    variants: dict[str, compare.Variant] = {}
    for run, prefix in zip(runs, prefixes):
        if (run.task, run.class_names) != (runs[0].task, runs[0].class_names):
            raise ValueError(f"{run.path} has task/class_names {run.task}/{run.class_names}, "
                             f"but {runs[0].path} has {runs[0].task}/{runs[0].class_names}.")
        for name, pred in run.predictions.items():
            full = name if len(runs) == 1 else f"{prefix}/{name}"
            if first is None:
                first = (full, pred)
            elif (why := _difference(first[1], pred)) is not None:
                raise ValueError(
                    f"'{full}' ({run.path}) was not evaluated on the same examples as "
                    f"'{first[0]}': {why}. All run directories must share one evaluation set "
                    f"(same examples, same order).")
            info = run.info[name]
            scores[full] = pred.y_score
            variants[full] = compare.Variant(
                name=full, private=bool(info["private"]), epsilon=info.get("epsilon"),
                delta=info.get("delta"), test_accuracy=info.get("test_accuracy"),
                run_dir=str(run.path), series=name,
                privacy_unit=info.get("privacy_unit") if info["private"] else None)
    if first is None:
        raise ValueError(f"no variants listed in {[str(r.path) for r in runs]}.")
    pred = first[1]
    label_names = pred.task_names if pred.task_names is not None else runs[0].class_names
    eval_set = metrics_lib.EvalSet(runs[0].task, pred.y_true, tuple(label_names), pred.groups,
                                   pred.patient_id)
    return eval_set, scores, variants
