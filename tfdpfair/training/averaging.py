"""Parameter averaging of the released weights: EMA with warm-up and Polyak averaging.

After every released logical step t (0-based) with new weights θ_{t+1}:

    EMA:     μ_t = min(decay, (1 + t) / (10 + t)),   a ← μ_t · a + (1 − μ_t) · θ_{t+1}
    Polyak:  p ← (t · p + θ_{t+1}) / (t + 1)        (the mean of θ_1 … θ_{t+1})

with a = θ_0 (the weights before the first DP step) initially. Both are functions of released
weights only, so they are post-processing: no privacy cost. The papers evaluate (and measure
subgroup disparities) on averaged weights.

The averages are Keras-tracked variables of the DPModel, so every checkpoint path saves and
restores them with the weights; ``updates`` counts the steps folded in, so a resumed run
continues the same averages.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

AVERAGE_NAMES = ("ema", "polyak")


@keras.saving.register_keras_serializable(package="tfdpfair")
class ParameterAverages(keras.layers.Layer):
    """EMA and/or Polyak copies of a list of variables (see module docstring)."""

    def __init__(self, shapes: Sequence[Sequence[int]], ema_decay: float | None = None,
                 polyak: bool = False, **kwargs):
        super().__init__(trainable=False, **kwargs)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}.")
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.ema_decay = ema_decay
        self.polyak = bool(polyak)
        self.averages: dict[str, list] = {}
        for name in self.names:
            self.averages[name] = [
                self.add_weight(shape=s, initializer="zeros", trainable=False,
                                name=f"{name}_{i}", aggregation="only_first_replica")
                for i, s in enumerate(self.shapes)]
        self.initialized = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                           trainable=False, name="initialized",
                                           aggregation="only_first_replica")
        self.built = True

    @property
    def names(self) -> list[str]:
        return [n for n, on in (("ema", self.ema_decay is not None), ("polyak", self.polyak))
                if on]

    def call(self, inputs):
        raise TypeError("ParameterAverages holds averaged weights and is not called on data.")

    def start_from(self, variables: Sequence[tf.Variable]) -> None:
        """Sets every average to the current weights θ_0 (before the first DP step)."""
        for name in self.names:
            for average, variable in zip(self.averages[name], variables):
                average.assign(tf.cast(variable, average.dtype))
        self.initialized.assign(1)

    def update(self, variables: Sequence[tf.Variable], step: tf.Tensor) -> None:
        """Folds in the weights released by logical step ``step`` (in-graph, cross-replica)."""
        t = tf.cast(step, tf.float32)
        if self.ema_decay is not None:
            mu = tf.minimum(tf.constant(self.ema_decay, tf.float32), (1.0 + t) / (10.0 + t))
            for average, variable in zip(self.averages["ema"], variables):
                average.assign(mu * average + (1.0 - mu) * tf.cast(variable, tf.float32))
        if self.polyak:
            for average, variable in zip(self.averages["polyak"], variables):
                average.assign((t * average + tf.cast(variable, tf.float32)) / (t + 1.0))

    def values(self, name: str) -> list[np.ndarray]:
        if name not in self.names:
            raise ValueError(f"no {name!r} average: this run keeps {self.names or 'none'} "
                             "(DPConfig.ema_decay / DPConfig.polyak).")
        return [np.asarray(a.numpy()) for a in self.averages[name]]

    def get_config(self) -> dict:
        return {**super().get_config(), "shapes": [list(s) for s in self.shapes],
                "ema_decay": self.ema_decay, "polyak": self.polyak}


@contextlib.contextmanager
def swapped(variables: Sequence[tf.Variable], values: Sequence[np.ndarray]) -> Iterator[None]:
    """Temporarily assigns ``values`` to ``variables``; restores the originals on exit."""
    saved = [np.asarray(v.numpy()) for v in variables]
    try:
        for variable, value in zip(variables, values):
            variable.assign(value.astype(variable.dtype))
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
