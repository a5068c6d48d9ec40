"""Micro-batch streams for ``DPModel.fit``: Poisson logical batches -> Keras input elements.

Every element is ``(x, y, mask, end_of_step)`` for one fixed-shape micro-batch: ``mask`` [m] is
1 for a sampled example and 0 for padding, and ``end_of_step`` is True on the last micro-batch
of a logical step (where the noise is added and the update applied). Two data sources:

* in-memory numpy arrays ``x`` [N, ...], ``y`` [N, ...] (gathered in a Python generator);
* an index-addressable ``tfdpfair.data.sources.IndexedSource`` (CheXpert, MIMIC-CXR, TFDS
  arrays): indices are mapped through ``source.get_batch`` in a parallel tf.data pipeline.

A stream may be iterated only once. If anything restarted it in the middle of a logical step,
the examples already accumulated would be accumulated again and one example could move the
step by more than C; a restart therefore raises.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import tensorflow as tf

from tfdpfair.privacy.sampling import LogicalBatch

PlanElement = tuple[np.ndarray, np.ndarray, np.bool_]


def is_indexed_source(data: Any) -> bool:
    """True for a tfdpfair IndexedSource (anything with get_batch and a length)."""
    return hasattr(data, "get_batch") and hasattr(data, "element_spec") and hasattr(data, "__len__")


def _one_shot(batches: Iterable[LogicalBatch]):
    started = []

    def plan() -> Iterator[PlanElement]:
        if started:
            raise RuntimeError("the DP micro-batch stream was restarted; refusing to re-sample "
                               "examples into a logical step.")
        started.append(True)
        for batch in batches:
            last = batch.num_microbatches - 1
            for k in range(batch.num_microbatches):
                yield batch.indices[k], batch.mask[k], np.bool_(k == last)

    return plan


def array_stream(x: np.ndarray, y: np.ndarray, batches: Iterable[LogicalBatch],
                 micro_batch_size: int) -> tf.data.Dataset:
    """Micro-batches gathered from in-memory arrays."""
    m = micro_batch_size
    plan = _one_shot(batches)

    def gather():
        for indices, mask, end in plan():
            yield x[indices], y[indices], mask, end

    signature = (tf.TensorSpec((m,) + x.shape[1:], tf.as_dtype(x.dtype)),
                 tf.TensorSpec((m,) + y.shape[1:], tf.as_dtype(y.dtype)),
                 tf.TensorSpec((m,), tf.float32), tf.TensorSpec((), tf.bool))
    return tf.data.Dataset.from_generator(gather, output_signature=signature).prefetch(2)


def source_stream(source: Any, batches: Iterable[LogicalBatch], micro_batch_size: int,
                  image_key: str = "image", label_key: str = "label") -> tf.data.Dataset:
    """Micro-batches read from an IndexedSource, decoded in parallel, in order."""
    m = micro_batch_size
    signature = (tf.TensorSpec((m,), tf.int64), tf.TensorSpec((m,), tf.float32),
                 tf.TensorSpec((), tf.bool))
    plan = tf.data.Dataset.from_generator(_one_shot(batches), output_signature=signature)

    def read(indices, mask, end):
        examples = source.get_batch(indices)
        return examples[image_key], examples[label_key], mask, end

    return plan.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
