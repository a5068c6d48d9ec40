"""validation_data that repeats training rows is refused by content, not only by memory
(issue 19 case 5a): copies, tensors, subsets, shuffles, mixes; the message gives a count only."""

import dataclasses
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training import held_out
from tfdpfair.training.dp_model import make_private
from tfdpfair.training.guards import DPUsageError, check_validation_is_held_out
from tfdpfair.training.input_pipeline import training_data

N = 40


def arrays(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 3, 2)) + 0.123456789).astype(np.float32)
    return x, rng.integers(0, 3, size=n).astype(np.int32)


X, Y = arrays()
DATA = training_data(X, Y)
X_OTHER, Y_OTHER = arrays(25, seed=1)


def refused(validation_data) -> str:
    with pytest.raises(DPUsageError, match="held-out") as info:
        check_validation_is_held_out(DATA, validation_data)
    return str(info.value)


def passes(validation_data) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_validation_is_held_out(DATA, validation_data)


@pytest.mark.parametrize("make_x", [
    lambda: X.copy(),
    lambda: tf.constant(X),
    lambda: X.astype(np.float64),  # same values, another dtype
    lambda: list(X),
], ids=["copy", "tf_constant", "float64", "list_of_rows"])
def test_full_copies_are_refused_with_the_count(make_x):
    assert refused((make_x(), Y)).startswith(f"{N} of the {N} validation rows")


def test_row_subset_shuffled_and_mixed_with_other_rows_is_refused():
    rng = np.random.default_rng(3)
    picked = rng.permutation(N)[:7]
    x_val = np.concatenate([X[picked], X_OTHER])
    order = rng.permutation(len(x_val))
    y_val = np.concatenate([Y[picked], Y_OTHER])[order]
    message = refused((tf.constant(x_val[order]), y_val, np.ones(len(x_val), np.float32)))
    assert message.startswith("7 of the 32 validation rows")


def test_message_gives_a_count_never_indices_or_values():
    message = refused((X[[5, 17, 33]], Y[[5, 17, 33]]))
    assert message.startswith("3 of the 3 validation rows")
    digits = {int(t) for t in __import__("re").findall(r"\d+", message)}
    assert digits == {3}, message  # no index, no value (the rows hold 0.123...)


@pytest.mark.parametrize("batch", [None, 4], ids=["unbatched", "batched"])
def test_dataset_with_training_rows_is_refused(batch):
    ds = tf.data.Dataset.from_tensor_slices((np.concatenate([X_OTHER, X[:2]]),
                                             np.concatenate([Y_OTHER, Y[:2]])))
    ds = ds.batch(batch) if batch else ds
    assert refused(ds).startswith("2 of the 27 validation rows")


def test_a_held_out_split_passes_without_warning():
    passes((X_OTHER, Y_OTHER))
    passes((tf.constant(X_OTHER), Y_OTHER))
    passes(tf.data.Dataset.from_tensor_slices((X_OTHER, Y_OTHER)).batch(5))
    nudged = X.copy()
    nudged.view(np.uint32)[:, 0, 0] ^= 1  # one bit of each row differs: not a copy
    passes((nudged, Y))


def test_integer_training_images_and_float_validation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 4, 4, 1), dtype=np.uint8)
    data = training_data(images, np.zeros(30, np.int32))
    with pytest.raises(DPUsageError, match="^30 of the 30"):
        check_validation_is_held_out(data, (images.astype(np.float32), np.zeros(30)))
    check_validation_is_held_out(data, (images.astype(np.float32) / 255.0 + 0.5, np.zeros(30)))


def test_what_cannot_be_checked_is_named_in_a_warning():
    def generator():
        yield X[:4], Y[:4]

    with pytest.warns(UserWarning, match="not checked.*generator"):
        check_validation_is_held_out(DATA, generator())
    in_source = dataclasses.replace(DATA, inputs=None)  # as for an IndexedSource
    with pytest.warns(UserWarning, match="not checked.*IndexedSource"):
        check_validation_is_held_out(in_source, (X, Y))
    with pytest.warns(UserWarning, match="infinite"):
        check_validation_is_held_out(DATA, tf.data.Dataset.from_tensor_slices((X, Y)).repeat())
    passes(None)


def test_fit_refuses_a_copy_before_any_step():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3, 2)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    dp = make_private(model, DPConfig(expected_batch_size=10, micro_batch_size=5,
                                      noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer=keras.optimizers.SGD(0.1),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(DPUsageError, match=f"^{N} of the {N} validation rows"):
        dp.fit(X, Y, steps=2, verbose=0, validation_data=(tf.constant(X), Y),
               callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss")])
    assert dp.logical_steps_done == 0


def test_count_is_exact_for_duplicates_and_against_a_brute_force_loop():
    rng = np.random.default_rng(7)
    train = rng.integers(0, 5, size=(500, 2, 2)).astype(np.int8)  # many equal rows
    val = rng.integers(0, 5, size=(300, 2, 2)).astype(np.int8)
    expected = sum(any(np.array_equal(v, t) for t in train) for v in val)
    assert 0 < held_out.count_rows_in_training(train, val) == expected


def test_count_is_exact_when_every_hash_collides(monkeypatch):
    """Equal hashes are confirmed byte by byte, so collisions never count as copies."""
    rng = np.random.default_rng(8)
    train = rng.integers(0, 5, size=(200, 3)).astype(np.int16)
    val = rng.integers(0, 5, size=(100, 3)).astype(np.int16)
    expected = sum(any(np.array_equal(v, t) for t in train) for v in val)
    monkeypatch.setattr(held_out, "_row_hashes",
                        lambda words: np.zeros(len(words), np.dtype((np.void, 16))))
    assert 0 < held_out.count_rows_in_training(train, val) == expected < len(val)
