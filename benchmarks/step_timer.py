"""A Keras callback timing every fit() batch, shared by the benchmark scripts."""

import os
import time

import keras


def current_rss_mb() -> float:
    """The process's resident set size now (not its peak), in MB; Linux /proc."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class StepTimer(keras.callbacks.Callback):
    """Wall time of every fit() batch (one logical step each for a DPModel with
    steps_per_execution=1), and the resident set size after it (``rss_mb``)."""

    def __init__(self):
        super().__init__()
        self.times, self.rss_mb, self._start = [], [], 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.rss_mb.append(round(current_rss_mb()))
