"""Per-example losses of a Keras model: the score producer of membership inference (TF)."""

from __future__ import annotations

import keras
import numpy as np


def per_example_losses(model: keras.Model, x: np.ndarray, y: np.ndarray,
                       from_logits: bool = True, batch_size: int = 256) -> np.ndarray:
    """Cross-entropy loss of every example, float64 [n] (sparse integer labels; nats).

    The model runs in inference mode (``predict``), as a released model would be queried.
    """
    outputs = model.predict(x, batch_size=batch_size, verbose=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction=None)
    return np.asarray(loss(np.asarray(y), outputs), np.float64)


def task_losses(logits: np.ndarray, y_true: np.ndarray, task: str) -> np.ndarray:
    """The run's training loss of every example from its logits, float64 [n] (nats).

    The per-example values of ``trainer.registries.make_loss(task)`` (reduction none):
      multiclass: −log softmax(z)_y (sparse integer labels y);
      multilabel: (1/L) Σ_l [max(z_l, 0) − z_l·y_l + log(1 + e^{−|z_l|})], the binary
        cross-entropy with logits averaged over the L labels (targets y_l in [0, 1]).
    """
    from tfdpfair.trainer.registries import make_loss
    loss = make_loss(task)
    unreduced = type(loss).from_config({**loss.get_config(), "reduction": None})
    return np.asarray(unreduced(np.asarray(y_true), np.asarray(logits)), np.float64)


def split_losses(model: keras.Model, split, task: str, batch_size: int = 256) -> np.ndarray:
    """:func:`task_losses` of ``model`` (inference mode) on a trainer EvalSplit, in index
    order: numpy images or an IndexedSource read sequentially."""
    from tfdpfair.trainer.task_data import predict_split
    logits, y_true = predict_split(model, split, batch_size)
    return task_losses(logits, y_true, task)
