"""Release exports: what a DP run may publish, apart from what it needs to resume.

A *resume checkpoint* (``DPModel.save``, ``save_weights``, BackupAndRestore, ModelCheckpoint,
training/checkpoint.py) holds the weights, the optimizer, the DP state and the secret seeds:
keep it with the private data. A *release export* holds only what DP protects:

  model.keras      the inner Keras model (weights and architecture; no DP state, no seeds, no
                   optimizer, no un-noised training statistics)
  privacy.json     plan, steps taken, (ε, δ), accountant
  PRIVACY.md       the plain-language privacy statement

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

MODEL_FILE = "model.keras"
PRIVACY_JSON = "privacy.json"
PRIVACY_MD = "PRIVACY.md"


def export_release(dp_model, directory: str | os.PathLike, weights: str = "last"
                   ) -> pathlib.Path:
    """Writes the release export of a trained DPModel into ``directory`` (replaced if present).

    ``weights``: "last", or an average the run keeps ("ema", "polyak"; post-processing of the
    released weights, so the same guarantee).
    """
    plan = dp_model.plan
    if plan is None:
        raise ValueError("nothing to release: this DPModel has no privacy plan (not trained).")
    steps = dp_model.logical_steps_done
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with dp_model.swapped_weights(weights):
            dp_model.inner.save(staging / MODEL_FILE)
        record = {"weights": weights,"plan": dataclasses.asdict(plan), "logical_steps": steps,
                  "epsilon": plan.epsilon(steps), "delta": plan.delta,
                  "accountant": plan.accountant,
                  "l2_norm_clip": dp_model.dp_config.l2_norm_clip,
                  "note": "Release export: no seeds, no optimizer, no training statistics."}
        (staging / PRIVACY_JSON).write_text(json.dumps(record, indent=2))
        (staging / PRIVACY_MD).write_text(privacy_statement(plan, steps) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
