"""TFDS image-classification datasets: imagenet2012, places365_small, cifar10, cifar100, mnist.

Two ways to read a split, pick by size:

- :func:`load_tfds_arrays` -> :class:`~tfdpfair.data.sources.ArraySource`: the split (or a TFDS
  slice such as ``"train[:50000]"``) is materialised in memory as uint8 images at the model
  resolution plus int64 labels, addressable by index (``get``, ``get_batch``, ``batches``). This
  is what DP-SGD training with Poisson sampling needs; use it for CIFAR, MNIST and sub-splits
  of the large datasets. A ``max_bytes`` guard (default 4 GiB) refuses splits that do not fit.
- :func:`load_tfds_dataset` -> ``tf.data.Dataset`` streaming the split in file order, for
  evaluation of the large datasets (ImageNet validation, Places-365). It is not index
  addressable, so do not use it for DP training.

Preprocessing (both paths): uint8 image -> [0, 1] -> resized to the model resolution ->
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
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfdpfair.data.sources import (ArraySource, IMAGENET_MEAN, IMAGENET_STD, ImageConfig,
                                   normalize, resize_image, to_channels)


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
    spec = get_spec(name)
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
