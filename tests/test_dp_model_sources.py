"""DPModel.fit on index-addressable sources: a TFDS-style array source and a CheXpert
directory (multi-label, images decoded from files), as users bring them."""

import os

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tfdpfair.data import chexpert
from tfdpfair.data.sources import ArraySource, ImageConfig
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.dp_model import make_private

LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
          "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
          "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def tiny_conv(input_shape, outputs):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(input_shape), keras.layers.Conv2D(2, 3, strides=2),
                             keras.layers.Flatten(), keras.layers.Dense(outputs)])


def test_fit_on_array_source_matches_fit_on_arrays():
    """Same seeds, same data: the source path and the array path give identical weights."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 30)
    config = ImageConfig(image_size=(8, 8), channels=1, normalization="zero_one")
    source = ArraySource(images, labels, config, num_classes=3)
    dp_config = DPConfig(expected_batch_size=6, micro_batch_size=4, noise_multiplier=1.0,
                         delta=1e-3, noise_seed=1, sampling_seed=2)
    results = []
    for use_source in (True, False):
        model = tiny_conv((8, 8, 1), 3)
        dp = make_private(model, dp_config)
        dp.compile(optimizer=keras.optimizers.SGD(0.5),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if use_source:
            dp.fit(source, steps=5, verbose=0)
        else:
            dp.fit(images.astype(np.float32) / 255.0, labels, steps=5, verbose=0)
        assert dp.logical_steps_done == 5
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture()
def chexpert_root(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    rng = np.random.default_rng(0)
    records = []
    for p in range(12):
        path = f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_frontal.jpg"
        os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L").save(
            tmp_path / path)
        record = {"Path": path, "Sex": "Female" if p % 2 else "Male", "Age": 30 + p,
                  "Frontal/Lateral": "Frontal", "AP/PA": "PA"}
        record.update({name: float(rng.choice([1.0, 0.0, -1.0])) for name in LABELS})
        records.append(record)
    pd.DataFrame(records).to_csv(root / "train.csv", index=False)
    return str(root)


def test_fit_on_chexpert_directory_multilabel(chexpert_root):
    source = chexpert.load_chexpert(
        chexpert_root, split="train_all",
        image_config=ImageConfig(image_size=(16, 16), channels=1, normalization="zero_one"),
        demo_path=None)
    assert len(source) == 12
    model = tiny_conv((16, 16, 1), len(LABELS))
    dp = make_private(model, DPConfig(expected_batch_size=4, micro_batch_size=3,
                                      noise_multiplier=1.0, delta=1e-3, augmult=2))
    dp.compile(optimizer=keras.optimizers.SGD(0.1),
               loss=keras.losses.BinaryCrossentropy(from_logits=True))
    history = dp.fit(source, steps=3, verbose=0)
    assert dp.logical_steps_done == 3
    assert np.isfinite(history.history["nonprivate_loss"][-1])
    with pytest.raises(ValueError, match="y=None"):
        dp.fit(source, np.zeros(12), verbose=0)
