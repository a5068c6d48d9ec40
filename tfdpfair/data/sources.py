"""Index-addressable example sources shared by every dataset reader.

DP-SGD with Poisson sampling draws, at every logical step, a set of example *indices*
(tfdpfair/privacy/sampling.py), so a dataset here is something that maps an int64 index to one
example, not a stream. Two implementations share one interface (:class:`IndexedSource`):

- :class:`ArraySource`: the whole split is held in memory as a uint8 numpy array
  (CIFAR, MNIST, small TFDS sub-splits); a lookup is a ``tf.gather``.
- :class:`ImageFileSource`: a table of image paths + labels + demographic group codes (CheXpert,
  MIMIC-CXR); a lookup reads and decodes the file (:func:`decode_image_file`).

Both return a dict per example: ``image`` float32 [H, W, C] (normalised, see
:class:`ImageConfig`), ``label`` (int64 class id, or float32 [L] multi-label targets),
``index`` int64 and one int32 code per demographic group
(see tfdpfair/data/demographics.py). Batched access: ``get_batch(indices[B])`` (usable inside a
``tf.function``) or ``batches(index_dataset)`` (a ``tf.data`` pipeline that decodes in parallel
and prefetches); sequential evaluation: ``sequential(batch_size)``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfdpfair.data.tables import LoadReport

Example = dict[str, tf.Tensor]

# Per-channel mean/std of pixel values in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("zero_one", "minus_one_one", "imagenet", "mean_std")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How a decoded image becomes the model input.

    Attributes:
      image_size: (height, width) in pixels of the model input.
      channels: 1 (grayscale) or 3 (grayscale tiled to RGB for ImageNet-pre-trained models).
      normalization: with x in [0, 1]: "zero_one" -> x; "minus_one_one" -> 2x - 1;
        "imagenet" -> (x - IMAGENET_MEAN) / IMAGENET_STD (1-channel images use the mean of the
        three channels' mean and std); "mean_std" -> (x - mean) / std with the fields below.
      resize: "stretch" resizes to image_size ignoring the aspect ratio; "center_crop" resizes
        the shorter side to image_size / crop_fraction and crops the centre.
      crop_fraction: fraction of the resized shorter side kept by "center_crop".
      mean, std: per-channel statistics for "mean_std".
    """

    image_size: tuple[int, int] = (224, 224)
    channels: int = 3
    normalization: str = "imagenet"
    resize: str = "stretch"
    crop_fraction: float = 1.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                             f"got {self.normalization!r}.")
        if self.resize not in ("stretch", "center_crop"):
            raise ValueError(f"resize must be 'stretch' or 'center_crop', got {self.resize!r}.")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}.")


def normalize(image: tf.Tensor, config: ImageConfig) -> tf.Tensor:
    """Float image with values in [0, 1] -> normalised float32, per ``config.normalization``."""
    image = tf.cast(image, tf.float32)
    if config.normalization == "zero_one":
        return image
    if config.normalization == "minus_one_one":
        return image * 2.0 - 1.0
    mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if config.normalization == "imagenet"
                 else (config.mean, config.std))
    channels = image.shape[-1]
    if channels == 1 and len(mean) == 3:
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def resize_image(image: tf.Tensor, config: ImageConfig) -> tf.Tensor:
    """Float [h, w, c] -> [H, W, c] by ``config.resize`` (bilinear, antialiased when shrinking)."""
    height, width = config.image_size
    if config.resize == "stretch":
        return tf.image.resize(image, (height, width), antialias=True)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    target = tf.constant([height, width], tf.float32) / config.crop_fraction
    scale = tf.reduce_max(target / shape)  # shorter side reaches its target
    new_hw = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, new_hw, antialias=True)
    top = (new_hw[0] - height) // 2
    left = (new_hw[1] - width) // 2
    return image[top:top + height, left:left + width, :]


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """[H, W, 1|3] -> [H, W, channels]: tile grayscale to RGB, or average RGB to grayscale."""
    have = image.shape[-1]
    if have == channels:
        return image
    if channels == 3:
        return tf.tile(image, [1, 1, 3])
    return tf.reduce_mean(image, axis=-1, keepdims=True)


def _assert_image_bytes(contents: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
    """Fails, naming ``path``, unless ``contents`` starts with a JPEG or PNG signature."""
    head = tf.strings.substr(contents, 0, 4)
    is_jpeg = tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff")
    is_png = tf.equal(head, b"\x89PNG")
    check = tf.debugging.Assert(
        tf.logical_or(is_jpeg, is_png),
        ["Not a JPEG/PNG image (corrupt, empty or wrong file):", path,
         "Re-download the file, or reload the dataset with on_bad='skip' and "
         "verify_images=True to skip it."])
    with tf.control_dependencies([check]):
        return tf.identity(contents)


def decode_image_file(path: tf.Tensor, config: ImageConfig) -> tf.Tensor:
    """Reads one JPEG/PNG file -> float32 [H, W, C] normalised model input.

    The file is decoded as grayscale with values in [0, 1] (8- and 16-bit PNGs alike), resized
    per ``config`` and converted to ``config.channels`` channels before normalisation. A file
    without a JPEG/PNG signature fails with an error naming it.
    """
    contents = _assert_image_bytes(tf.io.read_file(path), path)
    image = tf.io.decode_image(contents, channels=1, dtype=tf.float32, expand_animations=False)
    image = resize_image(image, config)
    image = to_channels(image, config.channels)
    height, width = config.image_size
    image = tf.ensure_shape(image, [height, width, config.channels])
    return normalize(image, config)


class IndexedSource:
    """A split addressable by example index 0 <= i < len(self).

    Subclasses implement ``get(index) -> dict`` for one scalar int64 index. The padding slots of
    a Poisson-sampled micro-batch must hold a valid index (the sampler uses 0) and a mask of 0.
    """

    group_names: Mapping[str, tuple[str, ...]] = {}
    decode_per_example = True  # False where get_batch is vectorised (ArraySource)

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def num_examples(self) -> int:
        return len(self)

    def get(self, index: tf.Tensor) -> Example:
        """One example (no batch axis) for a scalar int64 index."""
        raise NotImplementedError

    def get_batch(self, indices: tf.Tensor) -> Example:
        """Examples for an int64 vector of indices [B] -> dict of tensors with batch axis B."""
        indices = tf.cast(indices, tf.int64)
        return tf.map_fn(self.get, indices, fn_output_signature=self.element_spec,
                         parallel_iterations=32)

    @property
    def element_spec(self) -> dict[str, tf.TensorSpec]:
        """Shapes and dtypes of one example, as returned by :meth:`get`."""
        raise NotImplementedError

    def batches(self, index_batches: tf.data.Dataset | Iterable[np.ndarray],
                prefetch: int = 2) -> tf.data.Dataset:
        """Maps a dataset (or iterable) of int64 index vectors [B] to batched examples.

        Each index vector becomes exactly one batch, in order (an empty vector gives an empty
        batch), so masks produced alongside the indices stay aligned. When every vector has the
        same length (the sampler's fixed micro-batch size) examples are decoded in parallel
        across batch boundaries; otherwise batch by batch (:meth:`get_batch`).
        """
        dataset = index_batches
        if not isinstance(dataset, tf.data.Dataset):
            batches = [np.asarray(b, np.int64).reshape(-1) for b in index_batches]
            if len({len(b) for b in batches}) == 1:
                dataset = tf.data.Dataset.from_tensor_slices(np.stack(batches))
            else:
                dataset = tf.data.Dataset.from_generator(
                    lambda: iter(batches), output_signature=tf.TensorSpec([None], tf.int64))
        size = dataset.element_spec.shape[0]
        if size and self.decode_per_example:  # fixed, non-zero batch size: flat parallel decode
            out = (dataset.unbatch()
                   .map(self.get, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                   .batch(size, drop_remainder=True))
        else:
            out = dataset.map(self.get_batch, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
        return out.prefetch(prefetch)

    def sequential(self, batch_size: int, drop_remainder: bool = False) -> tf.data.Dataset:
        """Every example once, in index order, in batches of ``batch_size`` (for evaluation)."""
        return (tf.data.Dataset.range(len(self))
                .map(self.get, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .batch(batch_size, drop_remainder=drop_remainder)
                .prefetch(tf.data.AUTOTUNE))


class ArraySource(IndexedSource):
    """A split held in memory: uint8 images [N, H, W, C] and integer labels [N].

    ``get`` returns {"image": float32 [H, W, C] normalised per ``config``, "label": int64,
    "index": int64}. Images are stored as uint8 (1 byte per value) and converted on lookup.
    """

    decode_per_example = False

    def __init__(self, images: np.ndarray, labels: np.ndarray, config: ImageConfig,
                 num_classes: int):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} "
                             f"{images.shape}.")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {labels.shape}.")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.config = config
        self.num_classes = int(num_classes)
        self._images = tf.constant(images)
        self._labels = tf.constant(self.labels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def element_spec(self) -> dict[str, tf.TensorSpec]:
        return {"image": tf.TensorSpec(self.images.shape[1:], tf.float32),
                "label": tf.TensorSpec([], tf.int64), "index": tf.TensorSpec([], tf.int64)}

    def _convert(self, images: tf.Tensor) -> tf.Tensor:
        return normalize(tf.cast(images, tf.float32) / 255.0, self.config)

    def get(self, index: tf.Tensor) -> Example:
        index = tf.cast(index, tf.int64)
        return {"image": self._convert(tf.gather(self._images, index)),
                "label": tf.gather(self._labels, index), "index": index}

    def get_batch(self, indices: tf.Tensor) -> Example:
        """Vectorised gather (no per-example loop)."""
        indices = tf.cast(indices, tf.int64)
        return {"image": self._convert(tf.gather(self._images, indices)),
                "label": tf.gather(self._labels, indices), "index": indices}


class ImageFileSource(IndexedSource):
    """A split stored as image files plus per-example labels and demographic codes.

    ``get`` returns {"image": float32 [H, W, C], "label": float32 [L] (multi-label targets),
    "index": int64, <group>: int32 code for each group in ``groups``, <name>: float32 for each
    entry of ``values``} (e.g. "age" in years, NaN if unknown).

    Attributes:
      paths, labels, groups, values: numpy arrays with one row per example.
      label_names: names of the L label columns.
      group_names: group -> category names (code i means group_names[group][i]).
      patient_ids: the patient of each example (str), for patient-level analyses.
      report: what loading skipped or filtered, by reason (see :class:`LoadReport`).
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, label_names: Sequence[str],
                 config: ImageConfig, groups: Mapping[str, np.ndarray],
                 group_names: Mapping[str, tuple[str, ...]],
                 values: Mapping[str, np.ndarray] | None = None,
                 patient_ids: Sequence[str] | None = None, report: LoadReport | None = None):
        self.paths = np.asarray(paths, dtype=object)
        n = len(self.paths)
        self.labels = np.asarray(labels, np.float32).reshape(n, len(label_names))
        self.label_names = tuple(label_names)
        self.config = config
        self.groups = {k: np.asarray(v, np.int32) for k, v in groups.items()}
        self.group_names = {k: tuple(group_names[k]) for k in self.groups}
        self.values = {k: np.asarray(v, np.float32) for k, v in (values or {}).items()}
        self.patient_ids = np.asarray(patient_ids if patient_ids is not None else [""] * n,
                                      dtype=object)
        self.report = report or LoadReport()
        for name, arr in [*self.groups.items(), *self.values.items()]:
            if arr.shape != (n,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({n},).")
        self._paths = tf.constant([str(p) for p in self.paths] or [""], tf.string)
        self._labels = tf.constant(self.labels)
        self._groups = {k: tf.constant(v) for k, v in self.groups.items()}
        self._values = {k: tf.constant(v) for k, v in self.values.items()}

    def __len__(self) -> int:
        return int(len(self.paths))

    @property
    def element_spec(self) -> dict[str, tf.TensorSpec]:
        height, width = self.config.image_size
        spec = {"image": tf.TensorSpec([height, width, self.config.channels], tf.float32),
                "label": tf.TensorSpec([len(self.label_names)], tf.float32),
                "index": tf.TensorSpec([], tf.int64)}
        spec.update({k: tf.TensorSpec([], tf.int32) for k in self.groups})
        spec.update({k: tf.TensorSpec([], tf.float32) for k in self.values})
        return spec

    def get(self, index: tf.Tensor) -> Example:
        index = tf.cast(index, tf.int64)
        example = {"image": decode_image_file(tf.gather(self._paths, index), self.config),
                   "label": tf.gather(self._labels, index), "index": index}
        example.update({k: tf.gather(v, index) for k, v in self._groups.items()})
        example.update({k: tf.gather(v, index) for k, v in self._values.items()})
        return example

    def subset(self, indices: np.ndarray) -> "ImageFileSource":
        """A new source with the rows ``indices`` (re-indexed from 0), same config and report."""
        idx = np.asarray(indices, np.int64)
        return ImageFileSource(
            self.paths[idx], self.labels[idx], self.label_names, self.config,
            {k: v[idx] for k, v in self.groups.items()}, self.group_names,
            {k: v[idx] for k, v in self.values.items()}, self.patient_ids[idx], self.report)

    def group_counts(self) -> dict[str, dict[str, int]]:
        """Number of examples per category of each demographic group."""
        return {g: {name: int(np.sum(codes == i)) for i, name in enumerate(self.group_names[g])}
                for g, codes in self.groups.items()}
