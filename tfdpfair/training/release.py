"""Release exports: what a DP run may publish, apart from what it needs to resume.

A *resume checkpoint* (``DPModel.save``, ``save_weights``, BackupAndRestore, ModelCheckpoint,
training/checkpoint.py) holds the weights, the optimizer, the DP state and the secret seeds:
keep it with the private data. A *release export* holds only what DP protects:

  model.keras      the inner Keras model (weights and architecture; no DP state, no seeds, no
                   optimizer, no un-noised training statistics)
  privacy.json     plan, steps taken, (ε, δ), accountant, the exported weights' fingerprint
  PRIVACY.md       the plain-language privacy statement

Only weights DP-SGD produced carry the statement: the export is refused when the weights differ
from what the last release left (training/release_binding.py). An audit run (trained with m
gradient canaries, tfdpfair/audit) is refused unless ``allow_audit_run=True``; its statement
and privacy.json then say "audit run" and give m.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place,
so an interrupted export never leaves a half-written release.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile

from tfdpfair.privacy.statement import privacy_statement
from tfdpfair.training import release_binding

MODEL_FILE = "model.keras"
PRIVACY_JSON = "privacy.json"
PRIVACY_MD = "PRIVACY.md"


def check_releasable(dp_model, what: str, allow_audit_run: bool = False) -> int:
    """Refuses weights changed outside DP-SGD, and audit runs unless allowed; returns m."""
    if dp_model.plan is None:
        raise ValueError("nothing to release: this DPModel has no privacy plan (not trained).")
    release_binding.verify(dp_model, what)
    canaries = dp_model.audit_canaries
    if canaries and not allow_audit_run:
        raise release_binding.ReleaseBindingError(
            f"{what} refused: this is an audit run, trained with {canaries} gradient canaries "
            "(crafted extra units chosen by the auditor), so its weights are an audit artefact, "
            "not a model of the data alone. Release the model of a run without canaries; to "
            "keep this one as a marked audit artefact, pass allow_audit_run=True.")
    return canaries


def audit_run_note(canaries: int) -> str:
    return (f"AUDIT RUN: trained with {canaries} gradient canaries (privacy-audit units chosen "
            "by the auditor, counted in N). Not a release of a model of the data alone.")


def export_release(dp_model, directory: str | os.PathLike, weights: str = "last", *,
                   allow_audit_run: bool = False) -> pathlib.Path:
    """Writes the release export of a trained DPModel into ``directory`` (replaced if present).

    ``weights``: "last", or an average the run keeps ("ema", "polyak"; post-processing of the
    released weights, so the same guarantee).
    """
    canaries = check_releasable(dp_model, "export_release", allow_audit_run)
    plan = dp_model.plan
    steps = dp_model.logical_steps_done
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with dp_model.swapped_weights(weights):
            dp_model.inner.save(staging / MODEL_FILE)
            fingerprint = release_binding.combined_digest(dp_model.inner.weights)
        record = {"weights": weights, "plan": dataclasses.asdict(plan), "logical_steps": steps,
                  "epsilon": plan.epsilon(steps), "delta": plan.delta,
                  "accountant": plan.accountant,
                  "l2_norm_clip": dp_model.dp_config.l2_norm_clip,
                  "weights_fingerprint": f"{fingerprint:016x}",
                  "note": "Release export: no seeds, no optimizer, no training statistics."}
        statement = privacy_statement(plan, steps)
        if canaries:
            record["audit_run"] = {"canaries": canaries, "note": audit_run_note(canaries)}
            statement = f"**{audit_run_note(canaries)}**\n\n{statement}"
        (staging / PRIVACY_JSON).write_text(json.dumps(record, indent=2))
        (staging / PRIVACY_MD).write_text(statement + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
