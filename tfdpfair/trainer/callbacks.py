"""Keras callbacks of the trainer's DP loop: checkpoints, preemption, progress, evaluation.

All of them act only on public quantities (the step counter, ε, held-out evaluations, a
signal), never on the un-noised ``nonprivate_*`` training statistics, which they only log.
DPModel releases whole logical steps per compiled call, so at ``on_train_batch_end`` the
gradient accumulators are empty and a checkpoint is always consistent.
"""

from __future__ import annotations

import math
import pathlib
import signal
import threading
import time
from typing import Callable

import keras

from tfdpfair.training.callback_logs import allow_nonprivate_logs
from tfdpfair.training.checkpoint import save_dp_checkpoint
from tfdpfair.trainer.metric_writer import MetricWriter


def log(message: str) -> None:
    """Progress output, flushed immediately."""
    print(f"[train {time.strftime('%H:%M:%S')}] {message}", flush=True)


def every(step: int, previous: int, interval: int | None) -> bool:
    """True when a multiple of ``interval`` lies in (previous, step]."""
    return bool(interval) and step // interval > previous // interval


class Preemption:
    """Turns SIGTERM into a request to checkpoint and stop (installed while training)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.requested = True
        log("SIGTERM received: writing a checkpoint, then stopping")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _EveryLogicalSteps(keras.callbacks.Callback):
    """Base: acts when a multiple of ``every_steps`` logical steps has been passed since the
    step it last acted at (``_last``, the run's starting step at first)."""

    def __init__(self, every_steps: int | None):
        super().__init__()
        self.every_steps, self._last = every_steps, 0

    def on_train_begin(self, logs=None) -> None:
        self._last = self.model.logical_steps_done

    def _due(self, step: int) -> bool:
        return every(step, self._last, self.every_steps)


class DPCheckpointCallback(_EveryLogicalSteps):
    """Atomic resume checkpoint every ``every_steps`` logical steps, at the end, and on
    preemption (then stops training)."""

    def __init__(self, directory: pathlib.Path, every_steps: int | None,
                 preemption: Preemption):
        super().__init__(every_steps)
        self.directory, self.preemption = directory, preemption

    def on_train_batch_end(self, batch, logs=None) -> None:
        step = self.model.logical_steps_done
        if self._due(step) or self.preemption.requested:
            save_dp_checkpoint(self.model, self.directory)
            self._last = step
        if self.preemption.requested:
            self.model.stop_training = True

    def on_train_end(self, logs=None) -> None:
        if self.model.logical_steps_done != self._last:
            save_dp_checkpoint(self.model, self.directory)


class ProgressCallback(_EveryLogicalSteps):
    """Logs ε, learning rate and (tagged) monitoring stats; prints a progress line with ETA."""

    def __init__(self, writer: MetricWriter, total_steps: int, every_steps: int,
                 learning_rate: Callable[[], float]):
        super().__init__(max(1, every_steps))
        self.writer, self.total, self.learning_rate = writer, total_steps, learning_rate
        allow_nonprivate_logs(self)  # it only displays and records them (nonprivate/ tags)
        self._start_time, self._start_step = 0.0, 0

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        self._start_time, self._start_step = time.time(), self._last

    def on_train_batch_end(self, batch, logs=None) -> None:
        step = self.model.logical_steps_done
        if not (self._due(step) or step >= self.total):
            return
        self._last = step
        scalars = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        scalars["learning_rate"] = self.learning_rate()
        self.writer.write_scalars(step, scalars)
        log(self.line(step, scalars))

    def line(self, step: int, scalars: dict) -> str:
        elapsed = time.time() - self._start_time
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.nan
        eps = scalars.get("epsilon")
        parts = [f"step {step}/{self.total} ({100.0 * step / max(1, self.total):.0f}%)"]
        if eps is not None:
            parts.append(f"ε = {eps:.3f}")
        parts.append(f"lr = {scalars['learning_rate']:.4g}")
        if "nonprivate_loss" in scalars:
            parts.append(f"nonprivate/loss = {scalars['nonprivate_loss']:.4f}")
        parts.append(f"{rate:.2f} steps/s, ETA {_duration(eta)}")
        return ", ".join(parts)


class PeriodicEvalCallback(_EveryLogicalSteps):
    """Every ``every_steps`` logical steps, evaluates on held-out data and logs the result.

    ``evaluate(step) -> {tag: value}`` covers the last, EMA and Polyak weights.
    """

    def __init__(self, writer: MetricWriter, every_steps: int | None,
                 evaluate: Callable[[], dict[str, float]]):
        super().__init__(every_steps)
        self.writer, self.evaluate = writer, evaluate

    def on_train_batch_end(self, batch, logs=None) -> None:
        step = self.model.logical_steps_done
        if self._due(step):
            self._last = step
            results = self.evaluate()
            self.writer.write_scalars(step, results)
            log("eval at step {}: {}".format(
                step, ", ".join(f"{k} = {v:.4f}" for k, v in results.items())))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
