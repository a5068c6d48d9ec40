"""A Keras callback timing every fit() batch, shared by the benchmark scripts."""

import time

import keras


class StepTimer(keras.callbacks.Callback):
    """Wall time of every fit() batch (one logical step each for a DPModel with
    steps_per_execution=1)."""

    def __init__(self):
        super().__init__()
        self.times, self._start = [], 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
