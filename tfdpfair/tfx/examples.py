"""TFRecord files of tf.Example (as TFX ExampleGen writes them) -> model inputs.

One preprocessing function serves training, evaluation and the serving graph, so a served model
sees exactly the inputs it was trained on: parse the image feature, decode it (PNG/JPEG bytes, or
a float list reshaped to ``image_shape`` and divided by ``float_scale``) to float32 in [0, 1],
resize, convert channels and normalise per the ImageConfig (tfdpfair/data/sources.py).

DP-SGD draws every logical batch by Poisson sampling over example indices, so the training split
must be random-access with a known N. :func:`load_training_examples` counts the records first and
materialises them as numpy arrays only when they fit the configured memory limit; otherwise it
refuses (:class:`TrainingSetTooLargeError`) and names the alternative (an IndexedSource reading
image files, e.g. the CheXpert / MIMIC-CXR readers). It never samples from the stream.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from tfdpfair.data import sources
from tfdpfair.tfx.config import ExampleFormat

GZIP_MAGIC = b"\x1f\x8b"


class TrainingSetTooLargeError(ValueError):
    """The training examples do not fit the in-memory limit run_fn materialises them under."""


TOO_LARGE_MESSAGE = (
    "the training split has {n} examples ({gib:.2f} GiB as float32 model inputs), over the "
    "in-memory limit (custom_config max_train_examples={max_n}, max_train_bytes={max_b}). "
    "DP-SGD needs random access to every training example and a known N (Poisson sampling "
    "decides for each example independently whether it joins a step), so this module never "
    "samples from the TFRecord stream. Raise the limits if the machine has the memory, or train "
    "outside this module on an IndexedSource that reads images from disk on demand: a "
    "tfdpfair.data.sources.ImageFileSource (e.g. tfdpfair.data.chexpert.load_chexpert, or the "
    "tfdpfair.data.mimic_cxr reader) passed to DPModel.fit or to the experiment binary "
    "(tfdpfair-train), then export with tfdpfair.tfx.export.export_serving.")


def resolve_files(patterns: Sequence[str] | str | None, what: str) -> list[str]:
    """File patterns (TFX passes e.g. ``.../Split-train/*``) or directories -> sorted files."""
    if not patterns:
        raise ValueError(f"fn_args.{what} is empty: no examples to read.")
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        if tf.io.gfile.isdir(pattern):
            pattern = pattern.rstrip("/") + "/*"
        files.extend(f for f in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(f))
    if not files:
        raise ValueError(f"fn_args.{what} = {list(patterns)} matches no files.")
    return sorted(files)


def _compression(path: str) -> str:
    """"GZIP" when the file starts with the gzip magic bytes (ExampleGen's default), else ""."""
    with tf.io.gfile.GFile(path, "rb") as f:
        return "GZIP" if f.read(2) == GZIP_MAGIC else ""


def record_dataset(files: Sequence[str]) -> tf.data.Dataset:
    """Serialized tf.Examples of ``files``, in file order (each file's compression detected)."""
    datasets = [tf.data.TFRecordDataset(f, compression_type=_compression(f)) for f in files]
    dataset = datasets[0]
    for more in datasets[1:]:
        dataset = dataset.concatenate(more)
    return dataset


def count_examples(files: Sequence[str]) -> int:
    """Number of records in ``files`` (reads them; decodes nothing)."""
    return int(record_dataset(files).reduce(np.int64(0), lambda n, _: n + 1))


def feature_spec(fmt: ExampleFormat, with_label: bool, task: str = "multiclass",
                 num_classes: int = 0) -> dict[str, tf.io.FixedLenFeature]:
    """tf.io.parse_example spec for the image (and label) features."""
    if fmt.encoding == "encoded":
        spec = {fmt.image_key: tf.io.FixedLenFeature([], tf.string)}
    else:
        size = int(np.prod(fmt.image_shape))
        spec = {fmt.image_key: tf.io.FixedLenFeature([size], tf.float32)}
    if with_label:
        spec[fmt.label_key] = (tf.io.FixedLenFeature([], tf.int64) if task == "multiclass"
                               else tf.io.FixedLenFeature([num_classes], tf.float32))
    return spec


def model_input(image: tf.Tensor, fmt: ExampleFormat) -> tf.Tensor:
    """One float image [h, w, c] in [0, 1] -> float32 [H, W, C] normalised model input."""
    config = fmt.image_config
    image = sources.resize_image(tf.cast(image, tf.float32), config)
    image = sources.to_channels(image, config.channels)
    image = tf.ensure_shape(image, [*config.image_size, config.channels])
    return sources.normalize(image, config)


def decode_feature(raw: tf.Tensor, fmt: ExampleFormat) -> tf.Tensor:
    """One parsed image feature -> float32 [H, W, C] model input."""
    if fmt.encoding == "encoded":
        image = tf.io.decode_image(raw, channels=fmt.decode_channels, dtype=tf.float32,
                                   expand_animations=False)
    else:
        image = tf.reshape(raw, fmt.image_shape) / fmt.float_scale
    return model_input(image, fmt)


def input_spec(fmt: ExampleFormat) -> tf.TensorSpec:
    height, width = fmt.image_config.image_size
    return tf.TensorSpec([height, width, fmt.image_config.channels], tf.float32)


def images_from_serialized(serialized: tf.Tensor, fmt: ExampleFormat) -> tf.Tensor:
    """Serialized tf.Examples [B] -> model inputs [B, H, W, C] (graph ops only: servable)."""
    parsed = tf.io.parse_example(serialized, feature_spec(fmt, with_label=False))
    return tf.map_fn(lambda raw: decode_feature(raw, fmt), parsed[fmt.image_key],
                     fn_output_signature=input_spec(fmt))


def images_from_pixels(images: tf.Tensor, fmt: ExampleFormat) -> tf.Tensor:
    """Images [B, h, w, c] with values in [0, 1] (any h, w) -> model inputs [B, H, W, C]."""
    return tf.map_fn(lambda image: model_input(image, fmt), tf.cast(images, tf.float32),
                     fn_output_signature=input_spec(fmt))


def _parse_batch_fn(fmt: ExampleFormat, task: str, num_classes: int):
    spec = feature_spec(fmt, with_label=True, task=task, num_classes=num_classes)

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        images = tf.map_fn(lambda raw: decode_feature(raw, fmt), parsed[fmt.image_key],
                           fn_output_signature=input_spec(fmt))
        return images, parsed[fmt.label_key], serialized

    return parse


def feature_as_strings(serialized: Sequence[bytes], key: str) -> np.ndarray:
    """The first value of feature ``key`` of each serialized example, as str ("" if absent)."""
    out = []
    for raw in serialized:
        feature = tf.train.Example.FromString(raw).features.feature.get(key)
        kind = None if feature is None else feature.WhichOneof("kind")
        values = [] if kind is None else list(getattr(feature, kind).value)
        value = values[0] if values else ""
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        out.append(str(value))
    return np.asarray(out, dtype=str)


def batches(files: Sequence[str], fmt: ExampleFormat, task: str, num_classes: int,
            batch_size: int) -> tf.data.Dataset:
    """(model inputs [b, H, W, C], labels [b, ...], serialized [b]) in file order."""
    return (record_dataset(files).batch(batch_size)
            .map(_parse_batch_fn(fmt, task, num_classes), num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True).prefetch(2))


@dataclasses.dataclass(frozen=True)
class Examples:
    """A split held in memory: inputs [N, H, W, C] float32, labels, optional per-example columns.

    ``columns``: feature -> str value per example (groups, patient ids).
    """

    x: np.ndarray
    y: np.ndarray
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def read_examples(files: Sequence[str], fmt: ExampleFormat, task: str, num_classes: int,
                  batch_size: int = 256, columns: Sequence[str] = ()) -> Examples:
    """Decodes every example of ``files`` into memory (no limit: check first)."""
    xs, ys, cols = [], [], {k: [] for k in columns}
    for x, y, serialized in batches(files, fmt, task, num_classes, batch_size).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
        for key in columns:
            cols[key].append(feature_as_strings(serialized, key))
    if not xs:
        raise ValueError(f"no examples in {list(files)}.")
    return Examples(np.concatenate(xs), np.concatenate(ys),
                    {k: np.concatenate(v) for k, v in cols.items()})


def iterate_batches(files: Sequence[str], fmt: ExampleFormat, task: str, num_classes: int,
                    batch_size: int, columns: Sequence[str] = ()
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """Streams (x, y, columns) batches: for evaluation, which needs no random access."""
    for x, y, serialized in batches(files, fmt, task, num_classes, batch_size).as_numpy_iterator():
        yield x, y, {k: feature_as_strings(serialized, k) for k in columns}


def check_fits_in_memory(num_examples: int, fmt: ExampleFormat, max_examples: int,
                         max_bytes: int) -> int:
    """Bytes of N float32 model inputs; raises TrainingSetTooLargeError beyond a limit."""
    height, width = fmt.image_config.image_size
    nbytes = num_examples * height * width * fmt.image_config.channels * 4
    if num_examples > max_examples or nbytes > max_bytes:
        raise TrainingSetTooLargeError(TOO_LARGE_MESSAGE.format(
            n=num_examples, gib=nbytes / 1024 ** 3, max_n=max_examples, max_b=max_bytes))
    return nbytes


def load_training_examples(files: Sequence[str], fmt: ExampleFormat, task: str,
                           num_classes: int, max_examples: int, max_bytes: int) -> Examples:
    """Counts the training records, checks the memory limit, then materialises them.

    Returns the examples with the patient ids as a column when ``fmt.patient_key`` is set.
    """
    num_examples = count_examples(files)
    if num_examples == 0:
        raise ValueError(f"the training files {list(files)} hold no examples.")
    check_fits_in_memory(num_examples, fmt, max_examples, max_bytes)
    columns = (fmt.patient_key,) if fmt.patient_key else ()
    examples = read_examples(files, fmt, task, num_classes, columns=columns)
    if len(examples) != num_examples:
        raise RuntimeError(f"counted {num_examples} training examples but decoded "
                           f"{len(examples)}: were the files changed while reading?")
    return examples


def check_encoded_images(files: Sequence[str], fmt: ExampleFormat, what: str) -> int:
    """Decodes the image of every record of ``files`` once; returns the record count.

    Run before the DP plan is fixed, on the training and the evaluation files alike, so a
    record whose image feature is missing, not a JPEG/PNG or truncated is refused before any
    budget is spent (evaluation files are otherwise read only after training). Raises
    ValueError naming the file and record number (0-based) of up to five bad records and the
    reason; no image bytes or values. Float-list images (``encoding="float"``) are not decoded
    and not checked here (their length is checked when they are parsed).
    """
    if fmt.encoding != "encoded":
        return count_examples(files)
    spec = {fmt.image_key: tf.io.FixedLenFeature([], tf.string)}

    def decode(position, serialized):
        raw = tf.io.parse_single_example(serialized, spec)[fmt.image_key]
        image = tf.io.decode_image(raw, channels=0, expand_animations=False)
        return position, tf.strings.substr(raw, 0, 4), tf.size(image) > 0

    bad, total = [], 0
    for path in files:
        n = count_examples([path])
        seen = np.zeros(n, bool)
        decoded = (record_dataset([path]).enumerate()
                   .map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors())
        for position, head, _ in decoded.as_numpy_iterator():
            seen[position] = True
            if not (head[:3] == b"\xff\xd8\xff" or head == b"\x89PNG"):
                bad.append(f"{path} record {position} (not a JPEG/PNG image)")
        bad += [f"{path} record {i} (image feature {fmt.image_key!r} missing, or truncated or "
                "corrupt image data)" for i in np.flatnonzero(~seen)]
        total += n
    if bad:
        raise ValueError(f"{len(bad)} {what} record(s) have an image that cannot be decoded, "
                         f"e.g. {bad[:5]}; every record was checked before training and nothing "
                         "was spent. Rewrite or remove these records.")
    return total
