"""Resume checkpoints of a DP run: a thin, atomic layer over the DPModel's Keras-tracked state.

Everything that decides ε (plan, steps taken, seeds) is Keras-tracked state of the DPModel
(training/dp_state.py), so a checkpoint is just ``save_weights`` of the whole DPModel (inner
weights, optimizer, DP state) plus a human-readable ``dp_state.json``. Resuming restores the plan
instead of re-planning, so the accountant continues from the steps taken and a resumed run
reports the same ε as an uninterrupted one (DESIGN.md invariant 4); with the same seeds it also
samples the same batches and draws the same noise. A partial logical step is never saved: the
loop releases whole steps per call.

Writes are atomic: the files go to a temporary sibling directory, renamed into place only once
complete, so a kill during a save leaves the previous checkpoint intact, never a torn one.

The seeds make a checkpoint as sensitive as the training data: whoever has them can remove the
noise. Keep checkpoints with the private data; publish ``DPModel.export_release`` instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile

from tfdpfair.privacy.accounting import PrivacyPlan

STATE_FILE = "dp_state.json"
WEIGHTS_FILE = "state.weights.h5"
FORMAT_VERSION = 2


def save_dp_checkpoint(dp_model, directory: str | os.PathLike) -> pathlib.Path:
    """Writes the run's weights, optimizer state, DP state and seeds to ``directory``."""
    plan = dp_model.plan
    if plan is None:
        raise ValueError("nothing to save: this DPModel has not started training (no plan).")
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        dp_model.save_weights(staging / WEIGHTS_FILE)
        summary = {"format": FORMAT_VERSION, "plan": dataclasses.asdict(plan),
                   "logical_steps": dp_model.logical_steps_done,
                   "epsilon": dp_model.epsilon_spent(),
                   "warning": "resume checkpoint: holds the secret seeds, keep it private"}
        (staging / STATE_FILE).write_text(json.dumps(summary, indent=2))
        if directory.exists():
            previous = directory.with_name(directory.name + ".previous")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(directory, previous)
            os.replace(staging, directory)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def restore_dp_checkpoint(dp_model, directory: str | os.PathLike) -> PrivacyPlan:
    """Restores a checkpoint into a compiled DPModel of the same architecture.

    Returns the restored plan; ``dp_model.fit(x, y)`` then continues from the saved step.
    """
    directory = pathlib.Path(directory)
    for name in (STATE_FILE, WEIGHTS_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} is missing: not a tfdpfair DP checkpoint.")
    summary = json.loads((directory / STATE_FILE).read_text())
    if summary.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory / STATE_FILE}: unsupported format {summary.get('format')!r}.")
    if not dp_model.compiled:
        raise ValueError("compile the DPModel before restoring (the optimizer state is restored).")
    plan = PrivacyPlan(**summary["plan"])
    if dp_model.dp_config.expected_batch_size != plan.expected_batch_size:
        raise ValueError(f"checkpoint expected batch {plan.expected_batch_size} differs from "
                         f"DPConfig.expected_batch_size {dp_model.dp_config.expected_batch_size}.")
    dp_model.optimizer.build(dp_model.inner.trainable_variables)
    dp_model.load_weights(directory / WEIGHTS_FILE)
    if dp_model.plan != plan:
        raise ValueError(f"{directory}: the weights file's DP state does not match "
                         f"{STATE_FILE}; the checkpoint is inconsistent.")
    return plan
