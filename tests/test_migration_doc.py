"""docs/migrating_from_tf_privacy.md: the migrated TF Privacy tutorial runs as written (issue 22).

Both tfdpfair code blocks of the doc (the Keras ``fit`` one and the custom loop) are run from a
file, on the digits that ship with scikit-learn in place of MNIST (one-hot labels for the
tutorial's CategoricalCrossentropy), and must train within the planned budget.
"""

from __future__ import annotations

import pathlib
import re
import runpy

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import reference_epsilon

from tfdpfair.data.demo import load_demo_data

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating_from_tf_privacy.md"


def tfdpfair_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return [b for b in blocks if b.lstrip().startswith("# tfdpfair")]


def tutorial_globals() -> dict:
    data = load_demo_data(public_fraction=0.1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10)])
    one_hot = lambda y: keras.utils.to_categorical(y, 10).astype(np.float32)  # noqa: E731
    return {"keras": keras, "tf": tf, "model": model, "strategy": tf.distribute.get_strategy(),
            "train_data": data.private.images, "train_labels": one_hot(data.private.labels),
            "test_data": data.test.images, "test_labels": one_hot(data.test.labels),
            "loss": keras.losses.CategoricalCrossentropy(from_logits=True)}


@pytest.mark.parametrize("index", [0, 1], ids=["keras_fit", "custom_loop"])
def test_migrated_tutorial_block_runs(index, tmp_path, monkeypatch):
    blocks = tfdpfair_blocks()
    assert len(blocks) == 2
    script = tmp_path / "migrated.py"  # from a file: AutoGraph reads the loop's source
    script.write_text(blocks[index])
    monkeypatch.chdir(tmp_path)
    result = runpy.run_path(str(script), init_globals=tutorial_globals())
    trained = result.get("dp") or result.get("dp_opt")
    plan = trained.plan
    assert plan.expected_batch_size == 250 and plan.noise_multiplier == 1.1
    assert trained.epsilon_spent() == pytest.approx(
        reference_epsilon(1.1, plan.sampling_rate, plan.steps, 1e-5), rel=1e-6)
    if index == 0:
        assert (tmp_path / "release" / "PRIVACY.md").exists()
