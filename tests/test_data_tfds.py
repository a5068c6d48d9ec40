"""TFDS readers: mock data (no download) and a tiny dataset written as ArrayRecord by the tests:
shapes, normalisation, index access in memory and on disk, DP training on a TFDS data source."""

import dataclasses

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


# ---------------------------------------------------------------------------------------------
# Random access on disk: TfdsDataSource over tfds.data_source (ArrayRecord)
# ---------------------------------------------------------------------------------------------


def test_source_on_mock_cifar10(mock):
    """Plain tfds.testing.mock_data works (its data source's __getitems__ is broken in tfds
    4.9.10; the source then reads record by record)."""
    source = tfds_data.load_tfds_source("cifar10", "train")
    raw = tfds.data_source("cifar10", split="train", download=False)  # decoded by TFDS
    assert isinstance(source, tfds_data.TfdsDataSource) and len(source) == N
    assert source.num_classes == 10
    assert source.element_spec == {"image": tf.TensorSpec([32, 32, 3], tf.float32),
                                   "label": tf.TensorSpec([], tf.int64),
                                   "index": tf.TensorSpec([], tf.int64)}
    np.testing.assert_array_equal(source.labels, [int(raw[i]["label"]) for i in range(N)])
    batch = source.get_batch(tf.constant([4, 1, 1], tf.int64))
    assert batch["image"].shape == (3, 32, 32, 3)
    for row, i in enumerate([4, 1, 1]):
        want = (raw[i]["image"] / 255.0 - CIFAR10_MEAN) / CIFAR10_STD
        np.testing.assert_allclose(batch["image"][row].numpy(), want, atol=1e-5)
        assert int(batch["label"][row]) == int(raw[i]["label"])
    np.testing.assert_array_equal(batch["index"].numpy(), [4, 1, 1])
    one = source.get(tf.constant(2, tf.int64))
    assert one["image"].shape == (32, 32, 3) and int(one["index"]) == 2
    seq = list(source.sequential(4))
    assert [len(b["label"]) for b in seq] == [4, 2]
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in seq]), source.labels)


def test_source_on_mock_imagenet_and_mnist(mock):
    config = tfds_data.image_config("imagenet2012", image_size=(24, 24),
                                    normalization="zero_one")
    source = tfds_data.load_tfds_source("imagenet2012", "validation", config,
                                        read_labels=False)
    assert source.labels is None and source.num_classes == 1000
    images = source.get_batch(tf.constant([0, 5], tf.int64))["image"].numpy()
    assert images.shape == (2, 24, 24, 3) and 0.0 <= images.min() and images.max() <= 1.0
    mnist = tfds_data.tfds_source("mnist", "test", (32, 32), channels=3)
    image = mnist.get(tf.constant(3, tf.int64))["image"].numpy()
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    in_memory = tfds_data.tfds_source("cifar10", "test", in_memory=True)
    assert isinstance(in_memory, tfds_data.ArraySource) and len(in_memory) == N


TINY_N, TINY_CLASSES = 10, 3
TINY_SPEC = tfds_data.TfdsSpec("tfdpfair_tiny_images", ("train",), TINY_CLASSES, (8, 8), 3,
                               (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _tiny_example(key):
    rng = np.random.default_rng(key)
    return {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "label": key % TINY_CLASSES}


class TfdpfairTinyImages(tfds.core.GeneratorBasedBuilder):
    """10 random 8x8 RGB images with 3 classes, written for real by the tests."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(num_classes=TINY_CLASSES)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for key in range(TINY_N):
            yield key, _tiny_example(key)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """The tiny dataset prepared as ArrayRecord (random access) and as TFRecord (not)."""
    dirs = {}
    for fmt in ("array_record", "tfrecord"):
        data_dir = str(tmp_path_factory.mktemp(fmt))
        TfdpfairTinyImages(data_dir=data_dir, file_format=fmt).download_and_prepare()
        dirs[fmt] = data_dir
    return dirs


def _tiny_source(tiny_dirs, **kwargs):
    return tfds_data.load_tfds_source("tfdpfair_tiny_images", "train",
                                      data_dir=tiny_dirs["array_record"], spec=TINY_SPEC,
                                      **kwargs)


def test_source_on_real_array_record_files(tiny_dirs):
    source = _tiny_source(tiny_dirs)
    raw = tfds.data_source("tfdpfair_tiny_images", split="train", download=False,
                           data_dir=tiny_dirs["array_record"])
    raw = [raw[i] for i in range(TINY_N)]  # decoded by TFDS, in index order
    # TFDS stores the generated examples in its own (hashed) order; all are there once.
    generated = {_tiny_example(k)["image"].tobytes(): k % TINY_CLASSES for k in range(TINY_N)}
    assert {r["image"].tobytes(): int(r["label"]) for r in raw} == generated
    assert len(source) == TINY_N and source.num_classes == TINY_CLASSES
    assert source.element_spec["image"] == tf.TensorSpec([8, 8, 3], tf.float32)
    np.testing.assert_array_equal(source.labels, [r["label"] for r in raw])
    assert source.labels.dtype == np.int64
    order = np.arange(TINY_N)[::-1]
    batch = source.get_batch(tf.constant(order))
    for row, i in enumerate(order):
        np.testing.assert_allclose(batch["image"][row].numpy(),
                                   (raw[i]["image"] / 255.0 - 0.5) / 0.25, atol=1e-5)
    np.testing.assert_array_equal(batch["label"].numpy(), [raw[i]["label"] for i in order])
    np.testing.assert_array_equal(batch["index"].numpy(), order)
    one = source.get(tf.constant(7, tf.int64))
    np.testing.assert_allclose(one["image"].numpy(), (raw[7]["image"] / 255.0 - 0.5) / 0.25,
                               atol=1e-5)

    @tf.function
    def in_graph(indices):  # what DPModel's input pipeline does: get_batch in Dataset.map
        return tf.data.Dataset.from_tensor_slices(indices).map(source.get_batch).reduce(
            tf.constant(0, tf.int64), lambda acc, b: acc + tf.reduce_sum(b["label"]))

    assert int(in_graph(tf.constant([[0, 1], [2, 3]], tf.int64))) == sum(
        int(raw[i]["label"]) for i in range(4))
    assert source._batch_read  # real files: one parallel array_record read per batch
    arrays = source.to_array_source()
    np.testing.assert_array_equal(arrays.images, np.stack([r["image"] for r in raw]))
    np.testing.assert_array_equal(arrays.labels, source.labels)
    with pytest.raises(IndexError, match="has 10 examples; index 10 is out of range"):
        source.get_batch(tf.constant([0, TINY_N], tf.int64))  # eager: the Python error
    with pytest.raises(tf.errors.OpError, match="index 10 is out of range"):
        list(source.batches([np.array([TINY_N, 0])]))  # in tf.data: wrapped by TensorFlow


def test_source_labels_policy_and_errors(tiny_dirs, monkeypatch):
    assert _tiny_source(tiny_dirs, read_labels=False).labels is None
    monkeypatch.setattr(tfds_data, "LABEL_SCAN_LIMIT", TINY_N - 1)
    assert _tiny_source(tiny_dirs).labels is None  # too large to scan by default
    assert _tiny_source(tiny_dirs, read_labels=True).labels.shape == (TINY_N,)
    with pytest.raises(RuntimeError, match="not stored as ArrayRecord.*file_format=array_record"):
        tfds_data.load_tfds_source("tfdpfair_tiny_images", "train", spec=TINY_SPEC,
                                   data_dir=tiny_dirs["tfrecord"])
    with pytest.raises(ValueError, match="has 3 classes, the spec says 5"):
        tfds_data.load_tfds_source("tfdpfair_tiny_images", "train",
                                   data_dir=tiny_dirs["array_record"],
                                   spec=dataclasses.replace(TINY_SPEC, num_classes=5))
    with pytest.raises(ValueError, match="unsupported TFDS dataset"):
        tfds_data.tfds_source("tfdpfair_tiny_images", "train", data_dir=tiny_dirs["tfrecord"])
    # In memory from an ArrayRecord-only copy (tfds.load cannot read it): through the source.
    monkeypatch.setitem(tfds_data.SPECS, TINY_SPEC.name, TINY_SPEC)
    in_memory = tfds_data.tfds_source(TINY_SPEC.name, "train", in_memory=True,
                                      data_dir=tiny_dirs["array_record"])
    assert isinstance(in_memory, tfds_data.ArraySource) and len(in_memory) == TINY_N


def test_dp_fit_on_tfds_data_source(tiny_dirs):
    import keras

    import tfdpfair

    source = _tiny_source(tiny_dirs)
    weights = []
    for data in (source, source.to_array_source()):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3, strides=2),
                                  keras.layers.Flatten(), keras.layers.Dense(TINY_CLASSES)])
        dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
            expected_batch_size=4, micro_batch_size=2, noise_multiplier=1.0, delta=1e-3,
            noise_seed=0, sampling_seed=0))
        dp.compile(optimizer=keras.optimizers.SGD(0.1),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        dp.fit(data, steps=2, verbose=0)
        assert dp.logical_steps_done == 2
        weights.append(model.get_weights())
    for a, b in zip(*weights):  # same examples, same seeds: on-disk == in-memory
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
