"""TFDS image-classification datasets: imagenet2012, places365_small, cifar10, cifar100, mnist.

Public API (all return index-addressable sources for Poisson-sampled DP-SGD unless noted)::

    tfds_source(name, split, image_size=None, *, normalization="dataset", channels=None,
                data_dir=None, download=False, in_memory=False, read_labels=None,
                max_bytes=4 * 2**30, spec=None) -> IndexedSource
    load_tfds_source(name, split, config=None, *, data_dir=None, download=False,
                     read_labels=None, spec=None) -> TfdsDataSource
    load_tfds_arrays(name, split, *, config=None, data_dir=None, download=False,
                     max_bytes=4 * 2**30) -> ArraySource
    load_tfds_dataset(name, split, *, config=None, batch_size=None, data_dir=None,
                      download=False) -> tf.data.Dataset      (a stream: evaluation only)
    image_config(name, image_size=None, normalization="dataset", channels=None) -> ImageConfig
    spec_image_config(spec, image_size=None, normalization="dataset", channels=None)
    get_spec(name) -> TfdsSpec;  SPECS: dict[str, TfdsSpec];  LABEL_SCAN_LIMIT = 200_000

    TfdsDataSource(data_source, spec, config, *, split="", read_labels=None,
                   image_key="image", label_key="label")            (an IndexedSource)
      len(s), s.element_spec, s.num_classes, s.labels (np.int64 [N] | None), s.config,
      s.get(i), s.get_batch(indices [m]), s.batches(...), s.sequential(batch_size),
      s.read_all_labels(), s.to_array_source(indices=None, *, max_bytes=4 * 2**30)

Three ways to read a split, pick by size and host:

- :func:`load_tfds_source` -> :class:`TfdsDataSource`: random access to a split *on disk*
  through TFDS's ``tfds.data_source`` (ArrayRecord files), nothing loaded into memory. Each
  ``get_batch(indices)`` reads just those records (one Python call per batch, through
  ``tf.numpy_function``) and decodes / resizes / normalises them with TensorFlow ops. Use it
  for ImageNet, Places-365 and anything that does not fit in memory, **on CPU/GPU hosts**:
  the read is a Python function (PyFunc), which TPU hosts cannot run, so on TPU use
  :func:`load_tfds_arrays` (a split or a shard of it) or another TF-native reader. The split
  must have been prepared in the ``array_record`` format (``tfds build <name>
  --file_format=array_record``, or ``tfds convert_format`` for an existing TFRecord copy).
- :func:`load_tfds_arrays` -> :class:`~tfdpfair.data.sources.ArraySource`: the split (or a TFDS
  slice such as ``"train[:50000]"``) is materialised in memory as uint8 images at the model
  resolution plus int64 labels, addressable by index (``get``, ``get_batch``, ``batches``): pure
  TF lookups, so it also runs on TPU hosts. Use it for CIFAR, MNIST and sub-splits of the large
  datasets. A ``max_bytes`` guard (default 4 GiB) refuses splits that do not fit. It reads
  TFRecord copies (``tfds.load``); for an ArrayRecord-only copy use
  ``load_tfds_source(...).to_array_source()``.
- :func:`load_tfds_dataset` -> ``tf.data.Dataset`` streaming the split in file order, for
  evaluation of the large datasets (ImageNet validation, Places-365). It is not index
  addressable, so do not use it for DP training.

:func:`tfds_source` is the one-call entry point for an experiment registry keyed by dataset
name: it builds the :func:`image_config` and returns a :class:`TfdsDataSource`
(``in_memory=False``, default) or an :class:`~tfdpfair.data.sources.ArraySource`
(``in_memory=True``, for TPU). Every source returns examples {"image": float32 [H, W, C]
normalised, "label": int64, "index": int64 (position in the split)}; ``source.num_classes``,
``source.labels`` (numpy [N] or None, see :class:`TfdsDataSource`) and ``source.element_spec``
describe it. Datasets outside :data:`SPECS` can be read by passing ``spec=TfdsSpec(...)``.

Preprocessing (all paths): uint8 image -> [0, 1] -> resized to the model resolution ->
channels converted -> normalised (see :func:`image_config`). Fixed-size datasets read at their
native resolution are not resampled; ImageNet/Places images are resized so the shorter side is
``size / 0.875`` and centre-cropped (the usual evaluation crop); small images read at a larger
resolution (CIFAR at 224 for a pre-trained model) are resized whole. Random crops/flips for
training are applied per step by tfdpfair/data/augment.py, not here.

Nothing is downloaded unless ``download=True``; ImageNet additionally needs the ILSVRC2012
archives placed by hand in ``<data_dir>/downloads/manual`` (TFDS's rule).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np
from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from tfdpfair.data.sources import (ArraySource, Example, IMAGENET_MEAN, IMAGENET_STD,
                                   ImageConfig, IndexedSource, normalize, resize_image,
                                   to_channels)


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """What we need to know about one TFDS dataset.

    Attributes:
      splits: the split names it has (labels of places365_small "test" are -1: unlabelled).
      native_size: (H, W) when every image has that size, else None.
      mean, std: per-channel pixel statistics in [0, 1] used by normalization="dataset".
      eval_crop: True for photos of varying size (resize shorter side + centre crop).
    """

    name: str
    splits: tuple[str, ...]
    num_classes: int
    native_size: tuple[int, int] | None
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_crop: bool = False


SPECS: dict[str, TfdsSpec] = {
    "cifar10": TfdsSpec("cifar10", ("train", "test"), 10, (32, 32), 3,
                        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": TfdsSpec("cifar100", ("train", "test"), 100, (32, 32), 3,
                         (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": TfdsSpec("mnist", ("train", "test"), 10, (28, 28), 1, (0.1307,), (0.3081,)),
    "imagenet2012": TfdsSpec("imagenet2012", ("train", "validation"), 1000, None, 3,
                             IMAGENET_MEAN, IMAGENET_STD, eval_crop=True),
    "places365_small": TfdsSpec("places365_small", ("train", "validation", "test"), 365,
                                (256, 256), 3, IMAGENET_MEAN, IMAGENET_STD, eval_crop=True),
}
EVAL_CROP_FRACTION = 0.875


def get_spec(name: str) -> TfdsSpec:
    """The :class:`TfdsSpec` of ``name``; ValueError listing the supported names otherwise."""
    if name not in SPECS:
        raise ValueError(f"unsupported TFDS dataset {name!r}; supported: {sorted(SPECS)}.")
    return SPECS[name]


def check_split(spec: TfdsSpec, split: str) -> None:
    """Accepts "train", "train[:10%]", "train+test" ...; raises if a base name is unknown."""
    for part in split.split("+"):
        base = re.split(r"\[", part.strip(), maxsplit=1)[0]
        if base not in spec.splits:
            raise ValueError(f"{spec.name} has no split {base!r} (in {split!r}); "
                             f"splits: {spec.splits}.")


def image_config(name: str, image_size: tuple[int, int] | None = None,
                 normalization: str = "dataset", channels: int | None = None) -> ImageConfig:
    """The :class:`ImageConfig` for dataset ``name`` at the model resolution.

    Args:
      image_size: (H, W); default the native size (224 x 224 for imagenet2012).
      normalization: "dataset" -> (x - mean) / std with the dataset's own statistics (SPECS);
        or any ImageConfig normalization ("imagenet" for an ImageNet-pre-trained model, ...).
      channels: default the dataset's (1 for MNIST, 3 otherwise); 3 tiles MNIST to RGB.
    """
    return spec_image_config(get_spec(name), image_size, normalization, channels)


def spec_image_config(spec: TfdsSpec, image_size: tuple[int, int] | None = None,
                      normalization: str = "dataset", channels: int | None = None
                      ) -> ImageConfig:
    """:func:`image_config` for a :class:`TfdsSpec` (also one outside :data:`SPECS`)."""
    size = tuple(image_size or spec.native_size or (224, 224))
    channels = channels or spec.channels
    if normalization == "dataset":
        mean, std = spec.mean, spec.std
        if channels != len(mean):
            mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
        return ImageConfig(size, channels, "mean_std", _resize_mode(spec), _crop(spec), mean,
                           std)
    return ImageConfig(size, channels, normalization, _resize_mode(spec), _crop(spec))


def _resize_mode(spec: TfdsSpec) -> str:
    return "center_crop" if spec.eval_crop else "stretch"


def _crop(spec: TfdsSpec) -> float:
    return EVAL_CROP_FRACTION if spec.eval_crop else 1.0


def _resized_unit(image: tf.Tensor, spec: TfdsSpec, config: ImageConfig) -> tf.Tensor:
    """uint8 [h, w, c] -> float32 [H, W, C] in [0, 1] at the model resolution (no normalising)."""
    image = tf.cast(image, tf.float32) / 255.0
    if spec.native_size is None or tuple(spec.native_size) != tuple(config.image_size):
        image = tf.clip_by_value(resize_image(image, config), 0.0, 1.0)
    image = to_channels(image, config.channels)
    return tf.ensure_shape(image, [*config.image_size, config.channels])


def _load(spec: TfdsSpec, split: str, data_dir: str | None, download: bool) -> tf.data.Dataset:
    check_split(spec, split)
    try:
        return tfds.load(spec.name, split=split, data_dir=data_dir, download=download,
                         shuffle_files=False)
    except Exception as err:  # tfds raises several types for "not prepared"
        raise RuntimeError(
            f"could not load TFDS {spec.name!r} split {split!r} from data_dir={data_dir!r}: "
            f"{type(err).__name__}: {err}. Prepare it first (`tfds build {spec.name} "
            f"--data_dir=...`; imagenet2012 needs the ILSVRC2012 tars in "
            f"<data_dir>/downloads/manual) or pass download=True.") from err


def load_tfds_dataset(name: str, split: str, *, config: ImageConfig | None = None,
                      batch_size: int | None = None, data_dir: str | None = None,
                      download: bool = False) -> tf.data.Dataset:
    """Streams a split in file order as {"image": float32 [H, W, C], "label": int64,
    "index": int64 (position in the split)}, batched if ``batch_size`` is given."""
    spec = get_spec(name)
    config = config or image_config(name)
    dataset = _load(spec, split, data_dir, download).enumerate()

    def convert(index: tf.Tensor, example: dict[str, Any]) -> dict[str, tf.Tensor]:
        image = normalize(_resized_unit(example["image"], spec, config), config)
        return {"image": image, "label": tf.cast(example["label"], tf.int64), "index": index}

    dataset = dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if batch_size:
        dataset = dataset.batch(batch_size)
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_tfds_arrays(name: str, split: str, *, config: ImageConfig | None = None,
                     data_dir: str | None = None, download: bool = False,
                     max_bytes: int = 4 * 2**30) -> ArraySource:
    """Materialises a split as an index-addressable :class:`ArraySource`.

    Images are stored as uint8 [N, H, W, C] already at the model resolution (so memory is
    N·H·W·C bytes) and normalised per ``config`` on lookup. Raises MemoryError naming the split
    and what to do once more than ``max_bytes`` would be needed.
    """
    spec = get_spec(name)
    config = config or image_config(name)
    per_image = int(np.prod(config.image_size)) * config.channels
    dataset = _load(spec, split, data_dir, download).map(
        lambda ex: (tf.cast(tf.round(_resized_unit(ex["image"], spec, config) * 255.0),
                            tf.uint8), tf.cast(ex["label"], tf.int64)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(1024)
    images, labels, total = [], [], 0
    for image_batch, label_batch in dataset.as_numpy_iterator():
        total += len(image_batch) * per_image
        if total > max_bytes:
            raise MemoryError(
                f"{name} split {split!r} needs more than max_bytes={max_bytes} bytes at "
                f"{config.image_size}x{config.channels}; read a slice (e.g. '{split}[:10%]'), "
                "raise max_bytes, or stream it with load_tfds_dataset for evaluation.")
        images.append(image_batch)
        labels.append(label_batch)
    if not images:
        raise ValueError(f"{name} split {split!r} is empty.")
    return ArraySource(np.concatenate(images), np.concatenate(labels), config,
                       spec.num_classes)


# --------------------------------------------------------------------------------------------
# Random access on disk: tfds.data_source (ArrayRecord)
# --------------------------------------------------------------------------------------------

# read_labels=None reads every label (one pass over the records, images not decoded) only for
# splits up to this size: CIFAR/MNIST (<= 60k) yes; ImageNet train (1.28M), Places (1.8M) no.
LABEL_SCAN_LIMIT = 200_000
_LABEL_CHUNK = 4096


class TfdsDataSource(IndexedSource):
    """A TFDS split read by index from its ArrayRecord files, never loaded into memory.

    Wraps ``tfds.data_source(name, split=..., decoders={image: SkipDecoding()})``: a record is
    read as (encoded image bytes, label) by Python, and the image is decoded, resized,
    channel-converted and normalised per ``config`` by TensorFlow ops (the same preprocessing
    as :func:`load_tfds_arrays` / :func:`load_tfds_dataset`).

    ``get_batch(indices int64 [m])`` -> {"image": float32 [m, H, W, C], "label": int64 [m],
    "index": int64 [m]} with static shapes, usable in ``tf.data`` and ``tf.function``: the read
    is one ``tf.numpy_function`` call per batch (array_record fetches the records in parallel
    threads), so DPModel's input pipeline reads a micro-batch per call. **CPU/GPU hosts only**:
    TPU hosts cannot run PyFunc; on TPU use an ArraySource (:meth:`to_array_source` of a shard,
    :func:`load_tfds_arrays`) or a TF-native reader. A ``tf.data`` pipeline containing this
    read cannot be serialised (tf.data service, iterator checkpoints of the pipeline graph).

    Attributes:
      name, split, spec, config: what is read and how it is preprocessed.
      num_classes: number of classes (``spec.num_classes``, checked against the TFDS
        ClassLabel feature).
      labels: int64 numpy [N], read lazily on first access by one pass over the records (image
        bytes are read but not decoded), or None when not read (``read_labels=False``, or
        ``read_labels=None`` and N > LABEL_SCAN_LIMIT). DPModel.fit validates labels before
        training only when they are not None, so for ImageNet/Places train the label-range
        check is skipped unless ``read_labels=True`` (one full pass over the split, I/O-bound).
      data_source: the underlying TFDS data source (``len``, ``[i]``, ``__getitems__``).
    """

    decode_per_example = False  # one read per batch: batches() maps get_batch

    def __init__(self, data_source: Sequence[Any], spec: TfdsSpec, config: ImageConfig, *,
                 split: str = "", read_labels: bool | None = None,
                 image_key: str = "image", label_key: str = "label"):
        self.data_source = data_source
        self.spec = spec
        self.name = spec.name
        self.split = split
        self.config = config
        self.num_classes = int(spec.num_classes)
        self.image_key, self.label_key = image_key, label_key
        self._num_examples = int(len(data_source))
        self._read_labels = read_labels
        self._labels: np.ndarray | None = None
        self._labels_done = False
        self._batch_read = hasattr(data_source, "__getitems__")
        _check_features(data_source, spec, image_key, label_key)

    def __len__(self) -> int:
        return self._num_examples

    def __repr__(self) -> str:
        return (f"TfdsDataSource({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image={tuple(self.config.image_size)}x{self.config.channels})")

    @property
    def element_spec(self) -> dict[str, tf.TensorSpec]:
        height, width = self.config.image_size
        return {"image": tf.TensorSpec([height, width, self.config.channels], tf.float32),
                "label": tf.TensorSpec([], tf.int64), "index": tf.TensorSpec([], tf.int64)}

    # -- labels ---------------------------------------------------------------------------

    @property
    def labels(self) -> np.ndarray | None:
        """Every label (int64 [N]) in index order, or None if not read (see the class doc)."""
        if not self._labels_done:
            scan = self._read_labels
            if scan is None:
                scan = len(self) <= LABEL_SCAN_LIMIT
                if not scan:
                    logging.info("%s %s: %d examples > LABEL_SCAN_LIMIT=%d; labels not read "
                                 "(pass read_labels=True to read them).", self.name,
                                 self.split, len(self), LABEL_SCAN_LIMIT)
            self._labels = self.read_all_labels() if scan else None
            self._labels_done = True
        return self._labels

    def read_all_labels(self, chunk: int = _LABEL_CHUNK) -> np.ndarray:
        """Reads every label in index order (one pass over the records; images not decoded)."""
        out = np.empty([len(self)], np.int64)
        for start in range(0, len(self), chunk):
            keys = list(range(start, min(start + chunk, len(self))))
            out[start:start + len(keys)] = [int(_item(r[self.label_key]))
                                            for r in self._get_records(keys)]
        return out

    # -- reading --------------------------------------------------------------------------

    def _get_records(self, keys: list[int]) -> Sequence[Any]:
        """Records for ``keys``: one batched read (array_record fetches in parallel threads),
        or one read per key where the source has no working ``__getitems__`` (e.g. the
        ``tfds.testing.mock_data`` data source of tfds 4.9.10, whose ``__getitems__`` raises
        TypeError because it is called without ``self``)."""
        if self._batch_read:
            try:
                return self.data_source.__getitems__(keys)
            except (AttributeError, TypeError) as err:
                self._batch_read = False
                logging.warning("%s: batched read failed (%s: %s); reading record by record.",
                                self.name, type(err).__name__, err)
        return [self.data_source[k] for k in keys]

    def _read_records(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """numpy int64 [m] -> (encoded images object [m], labels int64 [m]); runs as PyFunc."""
        keys = [int(i) for i in np.asarray(indices).reshape(-1)]
        bad = [k for k in keys if not 0 <= k < self._num_examples]
        if bad:
            raise IndexError(f"{self.name} split {self.split!r} has {self._num_examples} "
                             f"examples; index {bad[0]} is out of range.")
        if not keys:
            return np.zeros([0], object), np.zeros([0], np.int64)
        records = self._get_records(keys)
        images = np.empty([len(keys)], object)
        images[:] = [_item(r[self.image_key]) for r in records]
        labels = np.asarray([int(_item(r[self.label_key])) for r in records], np.int64)
        return images, labels

    def _read(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        encoded, labels = tf.numpy_function(self._read_records, [indices],
                                            (tf.string, tf.int64), name="tfds_data_source_read")
        encoded.set_shape(indices.shape)
        labels.set_shape(indices.shape)
        return encoded, labels

    def _decode_unit(self, encoded: tf.Tensor) -> tf.Tensor:
        """Encoded bytes -> float32 [H, W, C] in [0, 1] at the model resolution."""
        image = tf.io.decode_image(encoded, channels=self.spec.channels,
                                   expand_animations=False, dtype=tf.uint8)
        return _resized_unit(image, self.spec, self.config)

    def _decode_batch(self, encoded: tf.Tensor, unit_only: bool = False) -> tf.Tensor:
        def one(data):
            unit = self._decode_unit(data)
            return unit if unit_only else normalize(unit, self.config)

        return tf.map_fn(one, encoded, fn_output_signature=self.element_spec["image"],
                         parallel_iterations=16)

    def get_batch(self, indices: tf.Tensor) -> Example:
        """int64 [m] -> {"image": float32 [m, H, W, C], "label": int64 [m], "index": [m]}."""
        indices = tf.reshape(tf.cast(indices, tf.int64), [-1])
        encoded, labels = self._read(indices)
        return {"image": self._decode_batch(encoded), "label": labels, "index": indices}

    def get(self, index: tf.Tensor) -> Example:
        """One example (no batch axis) for a scalar int64 index."""
        batch = self.get_batch(tf.reshape(tf.cast(index, tf.int64), [1]))
        return {k: v[0] for k, v in batch.items()}

    def sequential(self, batch_size: int, drop_remainder: bool = False) -> tf.data.Dataset:
        """Every example once, in index order, one read per batch (for evaluation)."""
        return (tf.data.Dataset.range(len(self))
                .batch(batch_size, drop_remainder=drop_remainder)
                .map(self.get_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .prefetch(tf.data.AUTOTUNE))

    def to_array_source(self, indices: Sequence[int] | np.ndarray | None = None, *,
                        max_bytes: int = 4 * 2**30, batch_size: int = 256) -> ArraySource:
        """Materialises ``indices`` (default: the whole split) as an in-memory ArraySource.

        Images are stored as uint8 at the model resolution, exactly as
        :func:`load_tfds_arrays` does (for TPU hosts, or a shard of a large split); the new
        source's index i is ``indices[i]`` here. MemoryError beyond ``max_bytes``.
        """
        idx = (np.arange(len(self), dtype=np.int64) if indices is None
               else np.asarray(indices, np.int64).reshape(-1))
        need = len(idx) * int(np.prod(self.config.image_size)) * self.config.channels
        if need > max_bytes:
            raise MemoryError(
                f"{self.name} split {self.split!r}: {len(idx)} images at "
                f"{tuple(self.config.image_size)}x{self.config.channels} need {need} bytes > "
                f"max_bytes={max_bytes}; materialise a shard (indices=...) or raise max_bytes.")
        if not len(idx):
            raise ValueError("to_array_source() needs at least one index.")

        def read_uint8(batch):
            encoded, labels = self._read(batch)
            unit = self._decode_batch(encoded, unit_only=True)
            return tf.cast(tf.round(unit * 255.0), tf.uint8), labels

        dataset = (tf.data.Dataset.from_tensor_slices(idx).batch(batch_size)
                   .map(read_uint8, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
        images, labels = zip(*dataset.as_numpy_iterator())
        return ArraySource(np.concatenate(images), np.concatenate(labels), self.config,
                           self.num_classes)


def _item(value: Any) -> Any:
    """A record field as a Python scalar (TFDS gives bytes / int, or 0-d numpy arrays)."""
    return value.item() if isinstance(value, np.ndarray) else value


def _check_features(data_source: Any, spec: TfdsSpec, image_key: str, label_key: str) -> None:
    """The split must have an encoded uint8 Image and a ClassLabel with spec.num_classes."""
    info = getattr(data_source, "dataset_info", None)
    features = getattr(info, "features", None)
    if features is None:
        return  # a plain sequence of {"image": bytes, "label": int} records (tests, adapters)
    if image_key not in features or label_key not in features:
        raise ValueError(f"{spec.name} has features {sorted(features.keys())}; expected "
                         f"{image_key!r} and {label_key!r}.")
    image = features[image_key]
    if not isinstance(image, tfds.features.Image):
        raise ValueError(f"{spec.name}[{image_key!r}] is a {type(image).__name__}, not a "
                         "tfds.features.Image (encoded image) feature.")
    if np.dtype(getattr(image, "np_dtype", np.uint8)) != np.uint8:
        raise ValueError(f"{spec.name}[{image_key!r}] has dtype {image.np_dtype}; only uint8 "
                         "images are supported.")
    label = features[label_key]
    classes = getattr(label, "num_classes", None)
    if classes is not None and int(classes) != spec.num_classes:
        raise ValueError(f"{spec.name}[{label_key!r}] has {classes} classes, the spec says "
                         f"{spec.num_classes}.")


def load_tfds_source(name: str, split: str, config: ImageConfig | None = None, *,
                     data_dir: str | None = None, download: bool = False,
                     read_labels: bool | None = None, spec: TfdsSpec | None = None
                     ) -> TfdsDataSource:
    """Random access to a prepared TFDS split without loading it (see :class:`TfdsDataSource`).

    Args:
      name: a dataset of :data:`SPECS`, or any TFDS image-classification dataset if ``spec``
        describes it (features "image" and "label").
      split: "train", a slice "train[:10%]", "train+test" ...; index i is the i-th example of
        the split as TFDS orders it.
      config: preprocessing; default :func:`image_config` at the native resolution.
      data_dir: the TFDS data directory (default ~/tensorflow_datasets); the split must be
        prepared in the ``array_record`` format there.
      download: build it (download + prepare as ArrayRecord) if missing.
      read_labels: True / False / None (= only when N <= LABEL_SCAN_LIMIT); see ``labels``.
    """
    spec = spec or get_spec(name)
    check_split(spec, split)
    config = config or spec_image_config(spec)
    try:
        source = tfds.data_source(spec.name, split=split, data_dir=data_dir, download=download,
                                  decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as err:  # prepared, but as TFRecord only
        raise RuntimeError(
            f"TFDS {spec.name!r} in data_dir={data_dir!r} is not stored as ArrayRecord, which "
            f"random access needs: rebuild with `tfds build {spec.name} --data_dir=... "
            "--file_format=array_record`, convert the copy with `tfds convert_format "
            "--root_data_dir=... --out_file_format=array_record`, or read it into memory with "
            f"load_tfds_arrays. ({err})") from err
    except Exception as err:  # not prepared / not found: tfds raises several types
        raise RuntimeError(
            f"could not open TFDS {spec.name!r} split {split!r} for random access from "
            f"data_dir={data_dir!r}: {type(err).__name__}: {err}. Prepare it first (`tfds build "
            f"{spec.name} --data_dir=... --file_format=array_record`; imagenet2012 needs the "
            "ILSVRC2012 tars in <data_dir>/downloads/manual) or pass download=True.") from err
    return TfdsDataSource(source, spec, config, split=split, read_labels=read_labels)


def tfds_source(name: str, split: str, image_size: tuple[int, int] | None = None, *,
                normalization: str = "dataset", channels: int | None = None,
                data_dir: str | None = None, download: bool = False, in_memory: bool = False,
                read_labels: bool | None = None, max_bytes: int = 4 * 2**30,
                spec: TfdsSpec | None = None) -> IndexedSource:
    """One call for a registry keyed by dataset name: an IndexedSource for ``name``/``split``.

    ``in_memory=False`` (default): a :class:`TfdsDataSource` reading the ArrayRecord files on
    demand (CPU/GPU hosts; any split size). ``in_memory=True``: an ArraySource (pure TF, also
    on TPU hosts) read with ``tfds.load`` (TFRecord copies), or, for an ArrayRecord-only copy,
    through the data source; ``max_bytes`` bounds its memory. ``image_size``,
    ``normalization`` and ``channels`` go to :func:`image_config` (with ``spec`` for a dataset
    outside SPECS: ``normalization="dataset"`` uses ``spec.mean``/``spec.std``).
    """
    config = spec_image_config(spec or get_spec(name), image_size, normalization, channels)
    if not in_memory:
        return load_tfds_source(name, split, config, data_dir=data_dir, download=download,
                                read_labels=read_labels, spec=spec)
    if spec is None:
        try:
            return load_tfds_arrays(name, split, config=config, data_dir=data_dir,
                                    download=download, max_bytes=max_bytes)
        except RuntimeError as err:
            if "ArrayRecord" not in str(err.__cause__) and "as_data_source" not in str(
                    err.__cause__):
                raise
    return load_tfds_source(name, split, config, data_dir=data_dir, download=download,
                            read_labels=False, spec=spec).to_array_source(max_bytes=max_bytes)
