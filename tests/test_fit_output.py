"""What fit() shows a person: the progress bar counts logical steps that ran (issue 20 item 7): N/B = 20 steps per Keras
epoch, T = 11 planned, 3 steps per compiled call. Keras's own bar showed 20/20 (or 4/4 calls)."""

import re

import keras
import numpy as np

from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.dp_model import make_private


class StopAfter(keras.callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        if logs["logical_steps"] >= self.steps:
            self.model.stop_training = True


def bar_counts(capsys, **fit_kwargs) -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(160, 4)).astype(np.float32), rng.integers(0, 3, 160)
    keras.utils.set_random_seed(0)
    dp = make_private(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
                      DPConfig(l2_norm_clip=1.0, expected_batch_size=8, noise_multiplier=1.0,
                               delta=1e-3))
    dp.compile(optimizer="sgd", steps_per_execution=3,
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    capsys.readouterr()
    dp.fit(x, y, steps=11, verbose=1, **fit_kwargs)
    text = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) ━", text)]


def test_bar_shows_the_logical_steps_that_ran(capsys):
    counts = bar_counts(capsys)
    assert counts[-1] == (11, 11)
    assert all(b == 11 for _, b in counts)


def test_bar_ends_at_the_steps_that_ran_when_stopped_early(capsys):
    counts = bar_counts(capsys, callbacks=[StopAfter(5)])
    assert counts[-1] == (6, 11)  # two calls of 3 steps ran


class NoRuleDepthwise(keras.layers.DepthwiseConv2D):
    """A subclass: ghost rules match exact classes, so its kernel falls back."""


def test_the_clipping_method_and_its_reason_are_logged(caplog):
    """A model with a layer that has no ghost rule says which variables fall back to
    per-example gradients inside ghost clipping (issue 20 item 6, issue 23 item 5)."""
    import logging

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, 16)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 2)), NoRuleDepthwise(3, name="dw"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="head")])
    dp = make_private(model, DPConfig(l2_norm_clip=1.0, expected_batch_size=8,
                                      noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with caplog.at_level(logging.INFO, logger="tfdpfair"):
        dp.fit(x, y, steps=1, verbose=0)
    assert dp.clipping_method == "ghost"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "dw/kernel" in warning[0] and "fall back" in warning[0]
    assert "head/kernel" not in warning[0]

    dense = make_private(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
                         DPConfig(l2_norm_clip=1.0, expected_batch_size=8,
                                  noise_multiplier=1.0, delta=1e-3))
    dense.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tfdpfair"):
        dense.fit(rng.normal(size=(16, 4)).astype(np.float32), y, steps=1, verbose=0)
    assert dense.clipping_method == "ghost"
    assert any("ghost norms for all trained variables" in r.getMessage()
               for r in caplog.records)
