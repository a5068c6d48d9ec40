"""A compiled DP step holds no tensor between its calls.

Grappler constant-folds a statically shaped ``tf.zeros_like(x)`` into a Const node as large as
``x``, whose kernel keeps that tensor for the life of the function. Used as the "else" branch of
a ``tf.where`` that zeroes padded rows, this held 270 MB for WRN-16-4 at B = 128 in the ghost
step (docs/benchmarks.md, "Constants the ghost step held"). The check is the CPU allocator's own
count of bytes in use (oneDNN's allocator tracks it; tests/conftest.py turns oneDNN on): after a
step returns, the bytes in use may grow by its outputs, not by anything the step keeps.
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.privacy import clipping, ghost_clipping

B, SIDE, CHANNELS = 32, 16, 16
ACTIVATION_BYTES = 4 * B * SIDE * SIDE * CHANNELS  # 512 KiB: one conv output of the model
SLACK_BYTES = 64 << 10  # allocator rounding and small runtime buffers, far below one activation


def bytes_in_use() -> int:
    try:
        return int(tf.config.experimental.get_memory_info("CPU:0")["current"])
    except ValueError as error:  # an allocator that does not count (oneDNN off)
        pytest.fail(f"the CPU allocator does not count bytes in use ({error}); "
                    "tests/conftest.py should have turned oneDNN on")


def retained_bytes(function, *args) -> int:
    """Bytes in use after the first call of a fresh ``tf.function(function)`` (trace, kernels
    built, run) minus before, minus the bytes of what it returned. A first, throwaway instance
    runs before: state that any first call creates once (variable buffers) is not counted."""
    tf.function(function)(*args)
    step = tf.function(function)
    gc.collect()
    before = bytes_in_use()
    out = step(*args)
    out_bytes = sum(int(np.prod(t.shape)) * t.dtype.size for t in tf.nest.flatten(out))
    return bytes_in_use() - before - out_bytes


def conv_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((SIDE, SIDE, 8)),
        keras.layers.Conv2D(CHANNELS, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(CHANNELS, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])


def batch():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(B, SIDE, SIDE, 8)).astype(np.float32))
    y = tf.constant(rng.integers(0, 4, B).astype(np.int32))
    mask = tf.constant([1.0] * (B - 3) + [0.0] * 3)  # padded rows: the zeroing path runs
    return x, y, mask


def test_allocator_counts_a_held_constant():
    """The check can fail: a step whose zeros_like is folded is caught."""
    x = tf.random.normal([B, SIDE, SIDE, CHANNELS])
    keep = tf.constant([True] * (B - 1) + [False])

    def folded(x):
        return tf.reduce_sum(tf.where(keep[:, None, None, None], x, tf.zeros_like(x)))

    assert retained_bytes(folded, x) >= ACTIVATION_BYTES - SLACK_BYTES


def test_ghost_step_holds_nothing():
    model, (x, y, mask) = conv_model(), batch()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    loss_fn = ghost_clipping.batch_example_loss_fn(model, loss)

    def step(x, y, mask):
        return ghost_clipping.ghost_clipped_grad_sum(
            model, loss_fn, model.trainable_variables, (x, y), mask, 1.0,
            has_aux=True).grad_sum

    assert retained_bytes(step, x, y, mask) < SLACK_BYTES


def test_vectorized_step_holds_nothing():
    model, (x, y, mask) = conv_model(), batch()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def example_loss(example):
        xi, yi = example
        return loss(yi[None], model(xi[None], training=True))

    def step(x, y, mask):
        return clipping.clipped_grad_sum(example_loss, model.trainable_variables, (x, y),
                                         mask, 1.0).grad_sum

    assert retained_bytes(step, x, y, mask) < SLACK_BYTES

