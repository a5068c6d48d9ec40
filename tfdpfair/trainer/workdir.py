"""A run's working directory: which config it belongs to, and where its artefacts live.

``<workdir>/config.json`` is written when a run starts. Rerunning with the same config resumes
the run; a config that differs in anything but the runtime-only keys (RUNTIME_KEYS: logging,
checkpoint and evaluation cadence, steps per compiled call) is refused, naming the differences
and how to start fresh, because resuming would mix two runs' weights and privacy plans.

Layout: config.json, checkpoint/ (DP resume checkpoint, with the secret seeds: keep private),
pretrained.weights.h5 (public pre-training, demo), non_private.weights.h5 and
non_private_backup/ (baseline), metrics.jsonl + tensorboard/ (per-step scalars), metrics.json,
predictions/*.npz, report.md.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from tfdpfair.fairness import run_io

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
PRETRAINED_FILE = "pretrained.weights.h5"
NON_PRIVATE_FILE = "non_private.weights.h5"
NON_PRIVATE_BACKUP = "non_private_backup"
RUNTIME_KEYS = ("train.checkpoint_every_steps", "train.log_every_steps",
                "train.eval_every_steps", "train.steps_per_execution", "train.eval_batch_size",
                "data.verify_images")  # the image check refuses or passes; it changes nothing
# Keys added after runs were written: absent from an older config.json means this value.
ADDED_KEYS = {"data.on_bad": "error"}


class WorkdirConfigMismatchError(ValueError):
    """The workdir holds a run of a different config."""


def config_as_dict(config: Any) -> dict:
    """A ConfigDict as plain JSON-compatible data (what config.json stores)."""
    return json.loads(config.to_json_best_effort())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every non-runtime key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    a.update({k: v for k, v in ADDED_KEYS.items() if k in b and k not in a})
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if k not in RUNTIME_KEYS and a.get(k) != b.get(k)]


def has_run_artefacts(workdir: pathlib.Path) -> bool:
    """True once a run wrote anything that depends on its config (checkpoint, weights, ...)."""
    return any((workdir / name).exists() for name in (
        CHECKPOINT_DIR, PRETRAINED_FILE, NON_PRIVATE_FILE, NON_PRIVATE_BACKUP,
        run_io.METRICS_FILE))


def claim_workdir(workdir: pathlib.Path, config: Any) -> bool:
    """Creates ``workdir`` or checks it holds a run of ``config``; True when resuming.

    Raises WorkdirConfigMismatchError (before any data is read or budget spent) when the
    workdir's config.json differs from ``config`` and the workdir holds that run's artefacts;
    a workdir whose earlier start failed before writing any (only config.json) is reused.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    current = config_as_dict(config)
    if path.exists():
        differences = config_differences(json.loads(path.read_text()), current)
        if differences and not has_run_artefacts(workdir):
            differences = []  # a start that failed before training (e.g. a wrong data path)
        if differences:
            shown = "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else "")
            raise WorkdirConfigMismatchError(
                f"{workdir} holds a run of a different config ({shown}). Resuming it would mix "
                "two runs (weights, privacy plan). Rerun with the same config and flags to "
                "resume it, or start fresh with a new --workdir (or delete this directory "
                "first).")
        resuming = True
    else:
        resuming = False
    run_io.write_json(path, current)
    return resuming
