"""An ordinary Keras script keeps working after make_private (issue 10): metrics, validation,
callbacks, evaluate/predict, save/load, and clear refusals where DP forbids something."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import reference_epsilon as rdp_epsilon
from step_callbacks import StopAtStep

import tfdpfair
from tfdpfair.training.input_pipeline import StreamNotSupportedError, materialize

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@keras.saving.register_keras_serializable(package="tests")
class Scale(keras.layers.Layer):
    """A custom layer, to check that save/load keeps user layers."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def separable(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)


def build_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), Scale(0.5, name="scale"),
                             keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(2, name="head")])


def test_an_ordinary_keras_script(tmp_path):
    """The README's script: the 3 DP lines are make_private, the DPConfig, and epochs= staying
    the same; everything else is unchanged Keras."""
    x, y = separable()
    x_val, y_val = separable(100, seed=1)
    model = build_model()
    model = tfdpfair.make_private(model, tfdpfair.DPConfig(  # DP line 1
        expected_batch_size=50, micro_batch_size=25, noise_multiplier=0.8, delta=1e-4))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS, metrics=["accuracy"])
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=50),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "full_{epoch}.keras")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "w.weights.h5"), save_weights_only=True),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
    ]
    history = model.fit(x, y, epochs=3, validation_data=(x_val, y_val), callbacks=callbacks,
                        verbose=0)
    assert model.logical_steps_done == 18  # 3 epochs of ceil(300/50) steps
    assert history.history["epsilon"][-1] == pytest.approx(
        rdp_epsilon(0.8, 50 / 300, 18, 1e-4), rel=1e-9)
    assert history.history["val_accuracy"][-1] > 0.8
    assert "nonprivate_accuracy" in history.history
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(v not in ("", "NA") for row in rows for v in row.values())
    assert not any(k.startswith("val_") and k[4:] in ("epsilon", "logical_steps",
                                                      "nonprivate_clipped_fraction")
                   for k in rows[0])
    assert list((tmp_path / "tb").rglob("*.tfevents.*"))
    # evaluate and predict are those of the wrapped model.
    results = model.evaluate(x_val, y_val, verbose=0, return_dict=True)
    plain = model.inner
    plain.compile(loss=LOSS, metrics=["accuracy"])
    expected = plain.evaluate(x_val, y_val, verbose=0, return_dict=True)
    assert results == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(model.predict(x_val, verbose=0),
                               plain.predict(x_val, verbose=0), rtol=1e-6)
    assert (tmp_path / "full_3.keras").stat().st_size > 0
    assert (tmp_path / "w.weights.h5").exists()


def test_save_and_load_model_round_trip_keeps_plan_budget_and_layers(tmp_path):
    x, y = separable()
    dp = tfdpfair.make_private(build_model(), tfdpfair.DPConfig(
        expected_batch_size=50, micro_batch_size=25, noise_multiplier=0.8, delta=1e-4))
    dp.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS, metrics=["accuracy"])
    dp.fit(x, y, steps=12, verbose=0, callbacks=[StopAtStep(7)])
    dp.save(tmp_path / "run.keras")
    loaded = keras.models.load_model(tmp_path / "run.keras")
    assert isinstance(loaded, tfdpfair.DPModel)
    assert isinstance(loaded.inner.get_layer("scale"), Scale)
    assert loaded.plan == dp.plan and loaded.logical_steps_done == 7
    assert loaded.seeds == dp.seeds
    assert loaded.epsilon_spent() == dp.epsilon_spent()
    for a, b in zip(loaded.inner.get_weights(), dp.inner.get_weights()):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, verbose=0)  # resumes the same plan to its end
    assert loaded.logical_steps_done == 12
    assert loaded.epsilon_spent() == pytest.approx(rdp_epsilon(0.8, 50 / 300, 12, 1e-4),
                                                   rel=1e-9)



def test_release_export_has_no_seeds_or_dp_state(tmp_path):
    x, y = separable()
    dp = tfdpfair.make_private(build_model(), tfdpfair.DPConfig(
        expected_batch_size=50, micro_batch_size=25, noise_multiplier=0.8, delta=1e-4,
        noise_seed=123456789, sampling_seed=987654321))
    dp.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    dp.fit(x, y, steps=4, verbose=0)
    out = dp.export_release(tmp_path / "release")
    released = keras.models.load_model(out / "model.keras")
    assert not isinstance(released, tfdpfair.DPModel)
    assert len(released.weights) == len(dp.inner.weights)
    values = np.concatenate([np.ravel(w) for w in released.get_weights()])
    assert not np.isin([123456789, 987654321], values).any()
    import json
    record = json.loads((out / "privacy.json").read_text())
    assert record["logical_steps"] == 4
    assert record["epsilon"] == pytest.approx(rdp_epsilon(0.8, 50 / 300, 4, 1e-4), rel=1e-9)
    assert "seed" not in json.dumps(record["plan"])
    assert "ε" in (out / "PRIVACY.md").read_text() or "differential" in (
        out / "PRIVACY.md").read_text()


def test_streams_are_refused_with_the_helper_named_and_the_helper_works():
    x, y = separable(60)
    dp = tfdpfair.make_private(build_model(), tfdpfair.DPConfig(
        expected_batch_size=10, micro_batch_size=5, noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer="sgd", loss=LOSS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with pytest.raises(StreamNotSupportedError, match="infinite"):  # finite ones are read
        dp.fit(dataset.repeat(), epochs=1, verbose=0)

    class Seq(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[i * 20:(i + 1) * 20], y[i * 20:(i + 1) * 20]

    with pytest.raises(StreamNotSupportedError, match="Poisson"):
        dp.fit(Seq(), epochs=1, verbose=0)
    for stream, batched in ((dataset, None), (dataset.unbatch(), None), (Seq(), True)):
        got_x, got_y = materialize(stream, batched=batched)  # Seq: 3 x 20, ambiguous
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
    dp.fit(*materialize(dataset), steps=2, verbose=0)
    assert dp.logical_steps_done == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=32), "Poisson-sampled"),
    (dict(sample_weight=np.ones(60)), "sensitivity"),
    (dict(validation_split=0.1), "held-out"),
])
def test_keras_fit_arguments_dp_forbids_say_why(kwargs, match):
    x, y = separable(60)
    dp = tfdpfair.make_private(build_model(), tfdpfair.DPConfig(
        expected_batch_size=10, micro_batch_size=5, noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer="sgd", loss=LOSS)
    with pytest.raises(TypeError, match=match):
        dp.fit(x, y, epochs=1, verbose=0, **kwargs)
