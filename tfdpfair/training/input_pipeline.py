"""Training data for DP-SGD: index-addressable examples -> Poisson-sampled, sharded micro-batches.

Poisson sampling draws example *indices* at every logical step, so the training set must be
random-access: numpy arrays, or a tfdpfair ``IndexedSource`` (CheXpert, MIMIC-CXR, TFDS arrays).
A stream cannot be Poisson-sampled, and shuffled fixed-size batches are a different mechanism
with a different ε: a finite ``tf.data.Dataset`` is read into memory first (its batches, if
any, undone); an infinite one, ``keras.utils.PyDataset`` and generators are refused (materialise
a finite stream with :func:`materialize`).

The pipeline runs in TensorFlow only (no Python on the training path, as TPU hosts need). For
logical step t it draws the sample from (sampling seed, t) (privacy/sampling.py), pads it to
k_t global micro-batches of m examples per replica × R replicas, laid out [k_t, R, m], and each
host (``tf.distribute.InputContext``) keeps only the columns of its own replicas. Elements are
per-replica micro-batches ``(step, x [m, ...], y [m, ...], mask [m])``, in the order
(micro-batch, local replica), which is how ``distribute_datasets_from_function`` hands
consecutive elements to a host's replicas. The per-host shards partition the step's sample.

With ``trim_multiple`` M (trimmed padding, privacy/sampling.py), the last micro-batch of each
step has s <= m rows per replica (a multiple of M, or m) instead of m: the element spec's batch
dimension is then unknown (None), and the step loop pins the full micro-batches to [m] again.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from tfdpfair.privacy import sampling
from tfdpfair.training import patients as patients_lib

_LOG = logging.getLogger("tfdpfair.training")
GatherFn = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


class StreamNotSupportedError(TypeError):
    """fit() was given a stream, which Poisson sampling cannot draw from."""


STREAM_MESSAGE = (
    "DPModel.fit needs random access to the training examples: Poisson sampling decides for "
    "every example independently whether it joins a step, which a stream cannot do (shuffled "
    "fixed-size batches are a different mechanism, and the reported ε would be wrong). Pass "
    "numpy arrays x, y; a finite tf.data.Dataset of (x, y) (read into memory); or a finite "
    "stream materialised with `x, y = "
    "tfdpfair.training.input_pipeline.materialize(dataset, batched=...)`; or an index-addressable "
    "source (tfdpfair.data: ArraySource, TFDS via tfdpfair.data.tfds, CheXpert, MIMIC-CXR).")


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """N random-access training examples.

    Attributes:
      num_examples: N.
      gather: maps indices int64 [m] to (x [m, ...], y [m, ...]); runs inside tf.data.
      x_spec, y_spec: per-example TensorSpecs (no batch axis).
      labels: every label as numpy (for validation before training), if available.
      inputs: the inputs as numpy, if held in memory (for validation before training).
      patients: with patient-level DP, the patient -> examples index (training/patients.py);
        the sampled units are then patients, and each element carries up to
        ``images_per_patient`` images per patient.
      images_per_patient: k, the cap on one patient's images per step.
    """

    num_examples: int
    gather: GatherFn
    x_spec: tf.TensorSpec
    y_spec: tf.TensorSpec
    labels: np.ndarray | None = None
    inputs: np.ndarray | None = None
    patients: patients_lib.PatientIndex | None = None
    images_per_patient: int = 1

    @property
    def num_units(self) -> int:
        """What Poisson sampling draws from: N examples, or P patients."""
        return self.num_examples if self.patients is None else self.patients.num_patients


def is_indexed_source(data: Any) -> bool:
    """True for a tfdpfair IndexedSource (anything with get_batch, element_spec and a length)."""
    return hasattr(data, "get_batch") and hasattr(data, "element_spec") and hasattr(data, "__len__")


def is_stream(data: Any) -> bool:
    """True for inputs that can only be iterated: tf.data, PyDataset, generators, iterators."""
    if isinstance(data, (tf.data.Dataset, tf.distribute.DistributedDataset)):
        return True
    if type(data).__name__ in ("PyDataset", "Sequence") or hasattr(data, "__getitem__") and hasattr(
            data, "on_epoch_end") and not isinstance(data, np.ndarray):
        return True
    return hasattr(data, "__next__") or (hasattr(data, "__iter__") and not hasattr(data, "__len__"))


INFINITE_MESSAGE = (
    "DPModel.fit was given an infinite tf.data.Dataset (repeat() or similar): DP-SGD needs the "
    "N training examples once each, to Poisson-sample them and to count N for the accountant. "
    "Remove repeat() (epochs/steps of fit decide how long training runs).")


def dataset_arrays(dataset: tf.data.Dataset, max_examples: int = 10_000_000,
                   max_bytes: int = 4 * 1024 ** 3) -> tuple[np.ndarray, np.ndarray]:
    """A finite ``tf.data.Dataset`` of (x, y) examples or batches -> numpy x [N, ...], y [N, ...].

    Refuses an infinite dataset (``cardinality() == INFINITE_CARDINALITY``) before reading
    anything; one of unknown cardinality is read up to the :func:`materialize` limits
    (``max_examples``, ``max_bytes``), which also stop an infinite one that TensorFlow cannot
    recognise. Batched or not is decided as :func:`materialize` does (an ambiguous dataset is
    refused). Logs how many examples were read.
    """
    if int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise StreamNotSupportedError(INFINITE_MESSAGE)
    try:
        x, y = materialize(dataset, max_examples=max_examples, max_bytes=max_bytes)
    except ValueError as error:
        raise ValueError(f"DPModel.fit could not read the tf.data.Dataset into memory: {error} "
                         "Or call fit(*tfdpfair.training.input_pipeline.materialize(dataset, "
                         "batched=...)).") from None
    _LOG.info("DPModel.fit read %d examples (%.1f MiB) from a tf.data.Dataset into memory",
              len(x), (x.nbytes + y.nbytes) / 2 ** 20)
    return x, y


def training_data(x: Any, y: Any = None, image_key: str = "image",
                  label_key: str = "label") -> TrainingData:
    """Wraps fit()'s (x, y) into :class:`TrainingData`, refusing what cannot be sampled.

    x: numpy arrays (with y), an IndexedSource (y=None), or a finite ``tf.data.Dataset`` of
    (x, y) examples or batches (y=None), read into memory by :func:`dataset_arrays`; infinite
    datasets and other streams are refused.
    """
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("with a tf.data.Dataset the labels come from its (x, y) elements; "
                             "pass y=None.")
        x, y = dataset_arrays(x)
    if is_indexed_source(x):
        if y is not None:
            raise ValueError("with an IndexedSource the labels come from the source; pass y=None.")
        spec = x.element_spec

        def gather_source(indices):
            examples = x.get_batch(indices)
            return examples[image_key], examples[label_key]

        labels = getattr(x, "labels", None)
        return TrainingData(len(x), gather_source, spec[image_key], spec[label_key],
                            labels=None if labels is None else np.asarray(labels))
    if is_stream(x) or is_stream(y):
        raise StreamNotSupportedError(STREAM_MESSAGE)
    if x is None or y is None:
        raise ValueError("DPModel.fit needs inputs x and labels y (or an IndexedSource as x).")
    if isinstance(x, (dict, list, tuple)) and not isinstance(x, np.ndarray) and not np.isscalar(x):
        try:
            x = np.asarray(x)
        except ValueError:
            raise TypeError("DPModel.fit takes one input array (multi-input models are not "
                            "supported yet).") from None
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == object or y.dtype == object:
        raise TypeError("x and y must be numeric arrays of one shape each (got dtype object: "
                        "ragged or mixed data?).")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}.")
    x_const, y_const = tf.constant(x), tf.constant(y)

    def gather_arrays(indices):
        return tf.gather(x_const, indices), tf.gather(y_const, indices)

    return TrainingData(len(x), gather_arrays, tf.TensorSpec(x.shape[1:], tf.as_dtype(x.dtype)),
                        tf.TensorSpec(y.shape[1:], tf.as_dtype(y.dtype)), labels=y, inputs=x)


def with_patients(data: TrainingData, patient_ids: Any, images_per_patient: int
                  ) -> TrainingData:
    """The same data with patients as the unit of sampling (training/patients.py).

    ``patient_ids``: one id per example (N of them), e.g. an ImageFileSource's patient_ids.
    """
    ids = np.asarray(patient_ids)
    if ids.shape != (data.num_examples,):
        raise ValueError(f"patient_ids must have one id per example ({data.num_examples}), "
                         f"got shape {ids.shape}.")
    if images_per_patient < 1:
        raise ValueError(f"max_examples_per_patient must be >= 1, got {images_per_patient}.")
    return dataclasses.replace(data, patients=patients_lib.PatientIndex.from_ids(ids),
                               images_per_patient=int(images_per_patient))


AMBIGUOUS_MESSAGE = (
    "materialize() cannot tell whether the elements of this stream are batches or single "
    "examples: every element is (x [{k}, ...], y [{k}, ...]), which is a batch of {k} examples "
    "or one example whose label has {k} entries (one-hot or multi-label). Pass batched=True if "
    "each element is a batch, batched=False if each element is one example.")


def materialize(dataset: Any, *, batched: bool | None = None, max_examples: int = 10_000_000,
                max_bytes: int = 4 * 1024 ** 3) -> tuple[np.ndarray, np.ndarray]:
    """Reads a finite stream of (x, y) examples or batches into numpy arrays x [N, ...], y [N, ...].

    For ``tf.data.Dataset``, ``keras.utils.PyDataset`` or any iterable of (x, y) pairs.
    ``batched``: True if each element is a batch (x [b, ...], y [b, ...]), False if each is one
    example. ``None`` decides only when the stream proves it: a scalar label, or x and y that
    differ in their first dimension, means single examples; batches whose size varies between
    elements means batches. Otherwise (every element (x [k, ...], y [k, ...]) for one k) the
    stream is ambiguous and refused (:data:`AMBIGUOUS_MESSAGE`). A batched element whose x and
    y differ in length is refused. Holds everything in memory: refuses a stream of more than
    ``max_examples`` examples or ``max_bytes`` bytes (use an IndexedSource for such data).
    Messages give shapes and counts only, never values.
    """
    elements, count, nbytes = [], 0, 0
    iterable = dataset if not hasattr(dataset, "__getitem__") or isinstance(
        dataset, tf.data.Dataset) else (dataset[i] for i in range(len(dataset)))
    for element in iterable:
        if not isinstance(element, (tuple, list)) or len(element) < 2:
            raise ValueError("materialize() needs elements (x, y); got another structure.")
        x, y = np.asarray(element[0]), np.asarray(element[1])
        elements.append((x, y))
        count += len(x) if batched is not False and x.ndim else 1  # None: at most this
        nbytes += x.nbytes + y.nbytes
        if count > max_examples or nbytes > max_bytes:
            raise ValueError(f"the stream has more than {max_examples} examples or "
                             f"{max_bytes} bytes (is it repeated?); use an IndexedSource for "
                             "data that does not fit in memory.")
    if not elements:
        raise ValueError("the stream is empty.")
    if batched is None:
        batched = _infer_batched(elements)
    if batched:
        for x, y in elements:
            if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
                raise ValueError(f"batched=True, but an element has x of shape {x.shape} and y "
                                 f"of shape {y.shape} (not one label per example).")
        return (np.concatenate([x for x, _ in elements]),
                np.concatenate([y for _, y in elements]))
    return np.stack([x for x, _ in elements]), np.stack([y for _, y in elements])


def _infer_batched(elements: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """False/True when the elements prove it (see :func:`materialize`); raises otherwise."""
    if any(x.ndim == 0 or y.ndim == 0 or len(x) != len(y) for x, y in elements):
        return False
    sizes = {len(x) for x, _ in elements}
    if len(sizes) > 1:
        return True
    raise ValueError(AMBIGUOUS_MESSAGE.format(k=sizes.pop()))


def dataset_fn(data: TrainingData, *, sampling_seed: int, sampling_rate: float,
               micro_batch_size: int, start_step: int, end_step: int,
               trim_multiple: int | None = None
               ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """The per-host dataset function for ``strategy.distribute_datasets_from_function``.

    Emits, for steps start_step <= t < end_step, this host's per-replica micro-batches
    ``(t, x, y, mask)`` (see the module docstring for the layout); each step's last micro-batch
    trimmed to a multiple of ``trim_multiple`` rows if given (None: full padding, static [m]).
    """
    n, m = data.num_units, micro_batch_size

    def make(context: tf.distribute.InputContext) -> tf.data.Dataset:
        replicas = context.num_replicas_in_sync
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def step_elements(step):
            sample = sampling.poisson_sample(sampling_seed, step, n, sampling_rate)
            if trim_multiple is None:
                return slices(step, *sampling.pack_sample(sample, m * replicas), m)
            full, full_mask, last, last_mask = sampling.pack_sample_trimmed(
                sample, m, replicas, trim_multiple)
            rows = tf.shape(last)[0] // replicas  # s, this step's last micro-batch per replica
            return slices(step, full, full_mask, m).concatenate(
                slices(step, last[None], last_mask[None], rows))

        def slices(step, indices, mask, width):
            """Global micro-batches [k, R·w] -> this host's replicas' rows [k·local, w]."""
            indices, mask = (tf.reshape(tf.reshape(t, [tf.shape(t)[0], replicas, width])[
                :, first:first + local], [-1, width]) for t in (indices, mask))
            steps = tf.fill(tf.shape(mask)[:1], step)
            return tf.data.Dataset.from_tensor_slices((steps, indices, mask))

        def read(step, indices, mask):
            if data.patients is not None:
                return (step, *_read_patients(data, sampling_seed, step, indices, mask), mask)
            x, y = data.gather(indices)
            return step, x, y, mask

        steps = tf.data.Dataset.range(start_step, end_step)
        return (steps.flat_map(step_elements)
                .map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .prefetch(2))

    return make


def _read_patients(data: TrainingData, sampling_seed: int, step, patients, mask):
    """x [m, k, ...] (zeros in padding slots), y {"labels": [m, k, ...], "image_mask": [m, k]}."""
    index = data.patients
    k = data.images_per_patient
    rows = tf.gather(tf.constant(index.table), patients)
    counts = tf.gather(tf.constant(index.counts), patients)
    step_seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(sampling_seed, tf.int64), step]), 0x5EED)  # image choice stream
    chosen, image_mask = patients_lib.choose_images(
        rows, counts, k, patients_lib.image_keys(step_seed, patients, index.table.shape[1]))
    image_mask = image_mask * mask[:, None]
    x, y = data.gather(tf.reshape(chosen, [-1]))
    x = tf.reshape(x, [-1, k] + list(data.x_spec.shape))
    y = tf.reshape(y, [-1, k] + list(data.y_spec.shape))
    keep = tf.reshape(image_mask > 0, [-1, k] + [1] * (x.shape.rank - 2))
    x = tf.where(keep, x, tf.zeros([], x.dtype))  # never another patient's image in a padding slot
    return x, {"labels": y, "image_mask": image_mask}


def host_shard(step: int, *, sampling_seed: int, num_examples: int, sampling_rate: float,
               micro_batch_size: int, num_replicas: int, num_hosts: int, host: int,
               trim_multiple: int | None = None) -> np.ndarray:
    """The sampled indices (mask 1) that ``host`` reads at ``step``: for tests and audits."""
    context = tf.distribute.InputContext(num_input_pipelines=num_hosts, input_pipeline_id=host,
                                         num_replicas_in_sync=num_replicas)
    data = TrainingData(num_examples, lambda i: (i, i), tf.TensorSpec([], tf.int64),
                        tf.TensorSpec([], tf.int64))
    ds = dataset_fn(data, sampling_seed=sampling_seed, sampling_rate=sampling_rate,
                    micro_batch_size=micro_batch_size, start_step=step, end_step=step + 1,
                    trim_multiple=trim_multiple)(context)
    chosen = [indices[mask > 0] for _, indices, _, mask in ds.as_numpy_iterator()]
    return np.concatenate(chosen) if chosen else np.zeros([0], np.int64)
