"""DPModel.fit on a finite tf.data.Dataset (issue 20 item 4): read into memory, then the same
run as on the arrays; infinite datasets are refused before any step.

The reference is fit on the original numpy arrays (not on input_pipeline's own reading of the
dataset), with the same DPConfig seeds: same plan, same ε, same sampled steps, same weights.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdpfair
from tfdpfair.training import input_pipeline
from tfdpfair.training.input_pipeline import StreamNotSupportedError

N = 120


def data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, 5)).astype(np.float32)
    return x, (x[:, 0] - x[:, 2] > 0).astype(np.int64)


def private_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                              keras.layers.Dense(2)])
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        expected_batch_size=20, micro_batch_size=8, noise_multiplier=1.1, delta=1e-3,
        sampling_seed=1234, noise_seed=5678))
    dp.compile(optimizer=keras.optimizers.SGD(0.5),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return dp


@pytest.fixture(scope="module")
def reference():
    x, y = data()
    dp = private_model()
    dp.fit(x, y, steps=4, verbose=0)
    return dp


@pytest.mark.parametrize("batch", [None, 32])  # 120 = 3·32 + 24: batches proven by sizes
def test_fit_on_a_finite_dataset_equals_fit_on_its_arrays(reference, batch, caplog):
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    dataset = dataset if batch is None else dataset.batch(batch)
    dp = private_model()
    with caplog.at_level(logging.INFO, logger="tfdpfair.training"):
        dp.fit(dataset, steps=4, verbose=0)
    assert f"read {N} examples" in caplog.text
    assert dp.plan == reference.plan and dp.plan.num_examples == N
    assert dp.logical_steps_done == reference.logical_steps_done == 4
    assert dp.epsilon_spent() == reference.epsilon_spent()
    sampled = [input_pipeline.host_shard(
        t, sampling_seed=1234, num_examples=N, sampling_rate=20 / N, micro_batch_size=8,
        num_replicas=1, num_hosts=1, host=0) for t in range(4)]
    assert sum(len(s) for s in sampled) > 0  # the steps touched data
    for got, want in zip(dp.inner.get_weights(), reference.inner.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_infinite_or_ambiguous_datasets_are_refused_before_any_step():
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    dp = private_model()
    for infinite in (dataset.repeat(), dataset.batch(32).repeat()):
        with pytest.raises(StreamNotSupportedError, match=r"infinite.*repeat\(\)"):
            dp.fit(infinite, steps=2, verbose=0)
    with pytest.raises(ValueError, match="batched=True"):  # 4 batches of 30: ambiguous
        dp.fit(dataset.batch(30), steps=2, verbose=0)
    with pytest.raises(ValueError, match="y=None"):
        dp.fit(dataset, y, steps=2, verbose=0)
    with pytest.raises(ValueError, match="more than 100 examples"):
        input_pipeline.dataset_arrays(dataset, max_examples=100)
    assert dp.logical_steps_done == 0 and dp.epsilon_spent() == 0.0
