"""Callbacks see un-noised statistics only if they display or record them (issue 19 case 5b).

A LambdaCallback (or any user callback) could stop training on ``nonprivate_loss``: its
decision would be an un-accounted release. It must receive the public logs only, while the
progress bar, History, CSVLogger and TensorBoard (and callbacks the user marks) keep them.
"""

from __future__ import annotations

import csv

import keras
import numpy as np

from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.callback_logs import allow_nonprivate_logs
from tfdpfair.training.dp_model import make_private


class Seen(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.keys = set()

    def on_train_batch_end(self, batch, logs=None):
        self.keys |= set(logs or {})

    def on_epoch_end(self, epoch, logs=None):
        self.keys |= set(logs or {})


def test_only_displaying_callbacks_see_nonprivate_logs(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 3, 40)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    dp = make_private(model, DPConfig(l2_norm_clip=1.0, expected_batch_size=8,
                                      noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer=keras.optimizers.SGD(0.1),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               metrics=["accuracy"])
    lambda_keys, plain, marked = set(), Seen(), allow_nonprivate_logs(Seen())
    stopper = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: lambda_keys.update(logs))
    csv_path = tmp_path / "log.csv"
    history = dp.fit(x, y, steps=10, verbose=0, validation_data=(x[:5] + 10.0, y[:5]),
                     callbacks=[stopper, plain, marked, keras.callbacks.CSVLogger(str(csv_path))])
    private = {"nonprivate_loss", "nonprivate_clipped_fraction", "nonprivate_accuracy"}
    assert lambda_keys and not lambda_keys & private
    assert {"epsilon", "logical_steps"} <= lambda_keys
    assert not plain.keys & private and "val_loss" in plain.keys
    assert private <= marked.keys
    assert private <= set(history.history)
    with open(csv_path) as f:
        assert private <= set(next(csv.reader(f)))
