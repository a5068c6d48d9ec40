"""EMA (with warm-up) and Polyak averages of the released weights, against numpy recomputed
from the sequence of weights each logical step released."""

import keras
import numpy as np
import pytest

import tfdpfair

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class RecordWeights(keras.callbacks.Callback):
    """Records the released weights after every logical step (one step per Keras batch)."""

    def __init__(self):
        super().__init__()
        self.released = []

    def on_train_batch_end(self, batch, logs=None):
        self.released.append([w.copy() for w in self.model.inner.get_weights()])


def numpy_averages(initial, released, decay):
    ema = [w.astype(np.float64) for w in initial]
    polyak = None
    for t, weights in enumerate(released):
        mu = min(decay, (1 + t) / (10 + t))
        ema = [mu * a + (1 - mu) * w for a, w in zip(ema, weights)]
        polyak = [w.astype(np.float64) for w in weights] if polyak is None else [
            (t * p + w) / (t + 1) for p, w in zip(polyak, weights)]
    return ema, polyak


def run(decay=0.9):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = rng.integers(0, 3, 60).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(3)])
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        expected_batch_size=12, micro_batch_size=4, noise_multiplier=0.5, delta=1e-3,
        ema_decay=decay, polyak=True, noise_seed=1, sampling_seed=2))
    dp.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS, metrics=["accuracy"])
    return dp, model, x, y


def test_ema_and_polyak_equal_numpy_over_released_weights():
    dp, model, x, y = run()
    initial = [w.copy() for w in model.get_weights()]
    recorder = RecordWeights()
    dp.fit(x, y, steps=12, verbose=0, callbacks=[recorder])
    assert len(recorder.released) == 12
    ema, polyak = numpy_averages(initial, recorder.released, 0.9)
    for got, want in zip(dp.averaged_weights("ema"), ema):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(dp.averaged_weights("polyak"), polyak):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert dp.average_names() == ["ema", "polyak"]


def test_swapped_weights_evaluate_the_average_and_restore_the_last(tmp_path):
    dp, model, x, y = run()
    dp.fit(x, y, steps=6, verbose=0)
    last = [w.copy() for w in model.get_weights()]
    with dp.swapped_weights("ema"):
        for got, want in zip(model.get_weights(), dp.averaged_weights("ema")):
            np.testing.assert_array_equal(got, want)
        dp.evaluate(x, y, verbose=0)
    for got, want in zip(model.get_weights(), last):
        np.testing.assert_array_equal(got, want)
    plain = tfdpfair.make_private(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
                                  tfdpfair.DPConfig(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="ema_decay"):
        plain.averaged_weights("ema")


def test_averages_are_checkpointed_and_resume(tmp_path):
    dp, model, x, y = run()
    dp.fit(x, y, steps=6, verbose=0)
    dp.save_weights(tmp_path / "ck.weights.h5")
    resumed, _, _, _ = run()
    resumed.load_weights(tmp_path / "ck.weights.h5")
    for got, want in zip(resumed.averaged_weights("polyak"), dp.averaged_weights("polyak")):
        np.testing.assert_array_equal(got, want)


def test_release_export_of_the_ema_weights(tmp_path):
    dp, model, x, y = run()
    dp.fit(x, y, steps=4, verbose=0)
    out = dp.export_release(tmp_path / "release", weights="ema")
    released = keras.models.load_model(out / "model.keras")
    for got, want in zip(released.get_weights(), dp.averaged_weights("ema")):
        np.testing.assert_array_equal(got, want)
