"""A release certifies only weights DP-SGD produced (issue 19 case 2, DESIGN.md invariant 8).

Each test changes the weights by a public Keras path after (or during) a DP run and checks
that no export carries the run's statement for them; the controls check that the untouched
weights, their EMA and a save/load round trip still export.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.tfx import export as export_lib
from tfdpfair.training.dp_model import make_private
from tfdpfair.training.release_binding import ReleaseBindingError

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def toy(n=40):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def trained(steps=4, callbacks=(), **config):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="hidden"),
                              keras.layers.Dense(3, name="head")])
    dp = make_private(model, DPConfig(l2_norm_clip=1.0, expected_batch_size=8,
                                      noise_multiplier=1.0, delta=1e-3, **config))
    dp.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    dp.fit(*toy(), steps=steps, verbose=0, callbacks=list(callbacks))
    return dp


def test_untouched_weights_and_their_averages_export(tmp_path):
    dp = trained(ema_decay=0.9)
    for weights in ("last", "ema"):
        out = dp.export_release(tmp_path / weights, weights=weights)
        record = json.loads((out / "privacy.json").read_text())
        assert len(record["weights_fingerprint"]) == 16


def test_non_private_training_after_the_run_is_refused(tmp_path):
    dp = trained()
    dp.inner.compile(optimizer="sgd", loss=LOSS)
    dp.inner.fit(*toy(), epochs=1, verbose=0)  # un-noised training on private data
    with pytest.raises(ReleaseBindingError, match=r"export_release refused.*hidden/kernel"):
        dp.export_release(tmp_path / "release")
    assert not (tmp_path / "release").exists()
    with pytest.raises(ReleaseBindingError, match="serving export refused"):
        export_lib.privacy_record_of(dp)


def test_a_direct_optimizer_apply_is_refused(tmp_path):
    dp = trained()
    grads = [tf.ones_like(v) for v in dp.inner.trainable_variables]
    dp.optimizer.apply(grads, dp.inner.trainable_variables)
    with pytest.raises(ReleaseBindingError, match="4 weight variable"):
        dp.export_release(tmp_path / "release")
    with pytest.raises(ReleaseBindingError):  # and no further DP step certifies them either
        dp.fit(*toy(), verbose=0)


class AssignAtStep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.logical_steps_done == 2:
            head = self.model.inner.get_layer("head")
            head.kernel.assign(head.kernel + 1.0)


def test_a_callback_that_assigns_weights_stops_the_next_step():
    with pytest.raises(ReleaseBindingError, match=r"the next DP step refused.*head/kernel"):
        trained(steps=4, callbacks=[AssignAtStep()])


def test_changed_averages_are_refused(tmp_path):
    dp = trained(polyak=True)
    dp.averages.averages["polyak"][0].assign(tf.zeros_like(dp.averages.averages["polyak"][0]))
    with pytest.raises(ReleaseBindingError, match="averages"):
        dp.export_release(tmp_path / "release", weights="polyak")


def test_the_fingerprint_travels_with_a_resume_file(tmp_path):
    dp = trained()
    dp.save(tmp_path / "resume.keras")
    loaded = keras.models.load_model(tmp_path / "resume.keras")
    loaded.export_release(tmp_path / "release")  # the loaded weights are the released ones
    head = loaded.inner.get_layer("head")
    head.bias.assign(head.bias + 0.5)
    with pytest.raises(ReleaseBindingError, match="head/bias"):
        loaded.export_release(tmp_path / "release2")


def test_weights_may_change_before_the_first_release():
    """Before step 1 the weights are the public starting point (e.g. loading pre-trained ones)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="head")])
    dp = make_private(model, DPConfig(l2_norm_clip=1.0, expected_batch_size=8,
                                      noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    dp.prepare(40, steps=2)
    model.set_weights([w + 1.0 for w in model.get_weights()])
    dp.fit(*toy(), verbose=0)
    assert dp.logical_steps_done == 2


def test_serving_export_of_a_plain_model_needs_the_fingerprint_of_its_weights(tmp_path):
    from tfdpfair.data.sources import ImageConfig

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, name="head")])
    dp = make_private(model, DPConfig(l2_norm_clip=1.0, expected_batch_size=8,
                                      noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    rng = np.random.default_rng(0)
    dp.fit(rng.random((40, 4, 4, 1)).astype(np.float32), rng.integers(0, 3, 40), steps=2,
           verbose=0)
    release = dp.export_release(tmp_path / "release")
    record = export_lib.privacy_record_from_release(release)
    config = ImageConfig(image_size=(4, 4), channels=1, normalization="zero_one")
    served = keras.saving.load_model(release / "model.keras", compile=False)
    export_lib.export_serving(served, tmp_path / "serving", config, record)  # control
    served.get_layer("head").kernel.assign(served.get_layer("head").kernel * 2.0)
    with pytest.raises(ReleaseBindingError, match="written for other weights"):
        export_lib.export_serving(served, tmp_path / "serving2", config, record)
    with pytest.raises(ReleaseBindingError, match="carries no weights_fingerprint"):
        export_lib.export_serving(served, tmp_path / "serving3", config,
                                  {k: v for k, v in record.items()
                                   if k != "weights_fingerprint"})


# ---- the fingerprint DPModel.fit takes per step is stored lazily (issue 23) ----------------

def blake2b_digests(weights) -> list[int]:
    """Independent digests: BLAKE2b-64 of dtype, shape and bytes, top bit cleared."""
    import hashlib
    out = []
    for w in weights:
        a = np.ascontiguousarray(w.numpy())
        h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode() + a.tobytes(), digest_size=8)
        out.append(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
    return out


class SaveAtStep(keras.callbacks.Callback):
    """Saves the whole DPModel mid-epoch, after editing head/kernel if ``edit``."""

    def __init__(self, path, edit):
        super().__init__()
        self.path, self.edit = path, edit

    def on_train_batch_end(self, batch, logs=None):
        if self.model.logical_steps_done == 2:
            if self.edit:
                head = self.model.inner.get_layer("head")
                head.kernel.assign(head.kernel * 2.0)
            self.model.save(self.path)
            self.model.stop_training = True


def test_a_mid_fit_save_holds_the_fingerprint_of_the_released_weights(tmp_path):
    trained(steps=4, callbacks=[SaveAtStep(tmp_path / "mid.keras", edit=False)])
    loaded = keras.models.load_model(tmp_path / "mid.keras")
    assert loaded.logical_steps_done == 2
    stored = loaded.dp_state.weight_digests.numpy().tolist()
    assert stored == blake2b_digests(loaded.inner.weights)
    loaded.export_release(tmp_path / "release")


def test_an_edit_saved_mid_fit_is_refused_after_loading(tmp_path):
    trained(steps=4, callbacks=[SaveAtStep(tmp_path / "mid.keras", edit=True)])
    loaded = keras.models.load_model(tmp_path / "mid.keras")
    with pytest.raises(ReleaseBindingError, match=r"1 weight variable.*head/kernel"):
        loaded.export_release(tmp_path / "release")


class AssignAtLastStep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.logical_steps_done == 4:  # no next step checks it inside fit
            head = self.model.inner.get_layer("head")
            head.bias.assign(head.bias + 0.5)


def test_an_edit_after_the_last_step_is_refused_at_export(tmp_path):
    dp = trained(steps=4, callbacks=[AssignAtLastStep()])
    with pytest.raises(ReleaseBindingError, match=r"1 weight variable.*head/bias"):
        dp.export_release(tmp_path / "release")
    with pytest.raises(ReleaseBindingError, match="head/bias"):
        dp.fit(*toy(), verbose=0)


def test_fit_returns_with_the_fingerprint_stored():
    dp = trained(steps=3)
    assert dp.dp_state.weight_digests.numpy().tolist() == blake2b_digests(dp.inner.weights)


class SnapshotAtStep(keras.callbacks.Callback):
    """Keeps get_weights() of step 2, as EarlyStopping(restore_best_weights=True) does."""

    def on_train_batch_end(self, batch, logs=None):
        if self.model.logical_steps_done == 2:
            self.snapshot = self.model.get_weights()


def test_a_get_weights_snapshot_taken_mid_fit_still_exports(tmp_path):
    snapshot = SnapshotAtStep()
    dp = trained(steps=4, callbacks=[snapshot])
    dp.set_weights(snapshot.snapshot)  # the weights and DP state of release 2
    assert dp.logical_steps_done == 2
    assert dp.dp_state.weight_digests.numpy().tolist() == blake2b_digests(dp.inner.weights)
    dp.export_release(tmp_path / "release")
