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
