"""TFDS readers on tfds.testing.mock_data (no download): shapes, normalisation, index access."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfdpfair.data import tfds as tfds_data
from tfdpfair.data.sources import ImageConfig, resize_image

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465])  # published per-channel statistics
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616])
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
N = 6


@pytest.fixture()
def mock():
    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _raw(name, split):
    return list(tfds.as_numpy(tfds.load(name, split=split)))


def test_cifar10_arrays_normalised_and_indexed(mock):
    source = tfds_data.load_tfds_arrays("cifar10", "train")
    raw = _raw("cifar10", "train")
    assert len(source) == N and source.images.shape == (N, 32, 32, 3)
    np.testing.assert_array_equal(source.images, np.stack([r["image"] for r in raw]))
    np.testing.assert_array_equal(source.labels, [r["label"] for r in raw])
    batch = source.get_batch(tf.constant([4, 1, 1], tf.int64))
    for row, i in enumerate([4, 1, 1]):
        want = (raw[i]["image"] / 255.0 - CIFAR10_MEAN) / CIFAR10_STD
        np.testing.assert_allclose(batch["image"][row].numpy(), want, atol=1e-5)
        assert int(batch["label"][row]) == raw[i]["label"]
    np.testing.assert_array_equal(batch["index"].numpy(), [4, 1, 1])
    one = source.get(tf.constant(2, tf.int64))
    np.testing.assert_allclose(one["image"].numpy(),
                               (raw[2]["image"] / 255.0 - CIFAR10_MEAN) / CIFAR10_STD, atol=1e-5)
    streamed = list(source.batches([np.array([0, 5])]))
    np.testing.assert_array_equal(streamed[0]["label"].numpy(),
                                  [raw[0]["label"], raw[5]["label"]])


def test_mnist_to_rgb_at_model_resolution(mock):
    config = tfds_data.image_config("mnist", image_size=(32, 32), channels=3)
    source = tfds_data.load_tfds_arrays("mnist", "test", config=config)
    assert source.images.shape == (N, 32, 32, 3)
    image = source.get(tf.constant(0, tf.int64))["image"].numpy()
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    native = tfds_data.load_tfds_arrays("mnist", "test")  # 28x28x1, not resampled
    raw = _raw("mnist", "test")
    np.testing.assert_array_equal(native.images, np.stack([r["image"] for r in raw]))
    want = (raw[3]["image"] / 255.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(native.get(tf.constant(3, tf.int64))["image"].numpy(), want,
                               atol=1e-5)


def test_imagenet_and_places_resized_and_cropped(mock):
    config = tfds_data.image_config("imagenet2012", image_size=(24, 24),
                                    normalization="zero_one")
    assert config.resize == "center_crop" and config.crop_fraction == 0.875
    source = tfds_data.load_tfds_arrays("imagenet2012", "validation", config=config)
    assert source.images.shape == (N, 24, 24, 3)  # mock images have random sizes
    places = tfds_data.load_tfds_dataset("places365_small", "validation", batch_size=4,
                                         config=tfds_data.image_config("places365_small"))
    batches = list(places)
    assert [b["image"].shape for b in batches] == [(4, 256, 256, 3), (2, 256, 256, 3)]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), range(N))
    cifar = list(tfds_data.load_tfds_dataset("cifar100", "test",
                                             config=tfds_data.image_config("cifar100")))
    assert len(cifar) == N and cifar[0]["image"].shape == (32, 32, 3)


def test_center_crop_keeps_the_centre():
    # 40 x 80 image: left quarter 0, middle half 1, right quarter 0. Shorter side 40 -> 16
    # (scale 0.4) gives 16 x 32; the centre 16 x 16 crop lies in the middle half: all ones.
    image = np.zeros((40, 80, 1), np.float32)
    image[:, 20:60] = 1.0
    config = ImageConfig((16, 16), 1, "zero_one", "center_crop", 1.0)
    out = resize_image(tf.constant(image), config).numpy()
    assert out.shape == (16, 16, 1)
    np.testing.assert_allclose(out[:, 2:14], 1.0, atol=1e-5)


def test_errors(mock, tmp_path):
    with pytest.raises(ValueError, match="unsupported TFDS dataset 'svhn'"):
        tfds_data.load_tfds_arrays("svhn", "train")
    with pytest.raises(ValueError, match="cifar10 has no split 'validation'"):
        tfds_data.load_tfds_arrays("cifar10", "validation")
    with pytest.raises(MemoryError, match="train\\[:10%\\]"):
        tfds_data.load_tfds_arrays("cifar10", "train", max_bytes=32 * 32 * 3 * 2)


def test_not_prepared_dataset_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="tfds build mnist"):
        tfds_data.load_tfds_arrays("mnist", "train", data_dir=str(tmp_path))
