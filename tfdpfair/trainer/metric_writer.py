"""One metric writer for a run: JSON lines + TensorBoard scalars, un-noised stats tagged.

Every scalar goes to ``<workdir>/metrics.jsonl`` (one JSON object per step) and to TensorBoard
(``<workdir>/tensorboard``). Values computed from the private training data without noise
(training loss, compiled metrics, clip fraction: DPModel logs them as ``nonprivate_*``) are
written under the ``nonprivate/`` tag prefix, so nobody publishes them by mistake; ε, the step
counter, the learning rate and held-out evaluations keep their own names. A non-finite value
is reported with the step at which it appeared.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Mapping

import tensorflow as tf

NONPRIVATE_TAG = "nonprivate/"
_log = logging.getLogger("tfdpfair.trainer")


def tag_for(key: str) -> str:
    """Log key -> TensorBoard tag: ``nonprivate_loss`` -> ``nonprivate/loss``."""
    if key.startswith("nonprivate_"):
        return NONPRIVATE_TAG + key[len("nonprivate_"):]
    if key.startswith(NONPRIVATE_TAG):
        return key
    return {"epsilon": "privacy/epsilon", "logical_steps": "train/logical_steps",
            "learning_rate": "train/learning_rate"}.get(key, key)


class MetricWriter:
    """Writes scalars per step to metrics.jsonl and TensorBoard (see module docstring)."""

    def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = (tf.summary.create_file_writer(str(pathlib.Path(workdir) / "tensorboard"))
                        if tensorboard else None)
        self.nonfinite: list[str] = []

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Records ``scalars`` at ``step`` (keys mapped by :func:`tag_for`)."""
        tagged = {tag_for(k): float(v) for k, v in scalars.items()}
        for tag, value in tagged.items():
            if not math.isfinite(value):
                self.nonfinite.append(f"{tag} at step {step}")
                _log.warning("non-finite %s = %s at step %d", tag, value, step)
        record = {"step": int(step), "time": time.time(),
                  **{k: (v if math.isfinite(v) else None) for k, v in tagged.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            with self._writer.as_default(step=int(step)):
                for tag, value in tagged.items():
                    tf.summary.scalar(tag, value)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
