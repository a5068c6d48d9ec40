"""Invariant 4: resuming from a checkpoint (or after an interrupted fit) reports the same ε and
continues exactly like an uninterrupted run."""

import keras
import numpy as np
import pytest

from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.checkpoint import restore_dp_checkpoint, save_dp_checkpoint
from tfdpfair.training.dp_model import make_private

CONFIG = DPConfig(expected_batch_size=8, micro_batch_size=3, noise_multiplier=1.2,
                  target_epsilon=50.0, delta=1e-3, noise_seed=5, sampling_seed=6)


def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(40, 4)).astype(np.float32),
            rng.integers(0, 3, 40).astype(np.int32))


def new_dp_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    dp = make_private(model, CONFIG)
    dp.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return dp


class StopAt(keras.callbacks.Callback):
    """Stops after ``micro`` micro-batches (possibly in the middle of a logical step)."""

    def __init__(self, micro):
        super().__init__()
        self.micro, self.seen = micro, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.micro:
            self.model.stop_training = True


def uninterrupted():
    dp = new_dp_model()
    dp.fit(*data(), steps=8, verbose=0)
    return dp


def test_resume_from_checkpoint_keeps_steps_and_epsilon(tmp_path):
    """A resumed run ends with the same T and ε as an uninterrupted one; its steps after the
    restore draw fresh noise (restores never replay noise), so its weights differ."""
    reference = uninterrupted()
    first = new_dp_model()
    first.fit(*data(), steps=8, verbose=0, callbacks=[StopAt(7)])
    assert 0 < first.logical_steps_done < 8
    save_dp_checkpoint(first, tmp_path)
    resumed = new_dp_model()
    plan = restore_dp_checkpoint(resumed, tmp_path)
    assert plan == first.plan
    assert resumed.epsilon_spent() == first.epsilon_spent()
    resumed.fit(*data(), verbose=0)
    assert resumed.logical_steps_done == reference.logical_steps_done == 8
    assert resumed.epsilon_spent() == pytest.approx(reference.epsilon_spent(), rel=1e-12)
    assert resumed.seeds["noise"] != first.seeds["noise"]
    assert resumed.seeds["sampling"] == first.seeds["sampling"]


def test_interrupted_fit_drops_the_partial_step():
    """Stopping in the middle of a step and calling fit() again must not accumulate the step's
    first micro-batches twice: the result equals the uninterrupted run."""
    reference = uninterrupted()
    dp = new_dp_model()
    dp.fit(*data(), steps=8, verbose=0, callbacks=[StopAt(2)])
    assert 0 < dp.logical_steps_done < 8
    dp.fit(*data(), verbose=0)
    assert dp.logical_steps_done == 8
    for a, b in zip(dp.inner.get_weights(), reference.inner.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_restore_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dp_state.json"):
        restore_dp_checkpoint(new_dp_model(), tmp_path)
    with pytest.raises(ValueError, match="not started"):
        save_dp_checkpoint(new_dp_model(), tmp_path)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = new_dp_model()
    first.fit(*data(), steps=8, verbose=0, callbacks=[StopAt(3)])
    save_dp_checkpoint(first, tmp_path / "ck")
    saved_steps = first.logical_steps_done
    first.fit(*data(), verbose=0)  # continue to the end, then die while saving

    def torn_save(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(type(first), "save_weights", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_dp_checkpoint(first, tmp_path / "ck")
    monkeypatch.undo()
    resumed = new_dp_model()
    restore_dp_checkpoint(resumed, tmp_path / "ck")
    assert resumed.logical_steps_done == saved_steps
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no staging debris left behind
