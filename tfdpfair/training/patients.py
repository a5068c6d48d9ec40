"""Patient-level DP: the unit of privacy is a patient with all their images.

With ``DPConfig(privacy_unit="patient", max_examples_per_patient=k)``:

* Poisson sampling draws *patients*: each of the P patients joins a logical step independently
  with probability q = B / P (B = expected_batch_size, counted in patients);
* each sampled patient contributes up to k of their n_p images, chosen uniformly without
  replacement per step from a secret seed (random keys u ~ U(0,1) per image slot, the k smallest);
* the patient's loss is the mean over those images (and their augmult views), and the gradient
  of that one loss is clipped to C: a patient is one "example" of the clipping, so adding or
  removing a patient, with any number of images, views, micro-batches or replicas, moves a
  step's clipped sum by at most C;
* noise, normalisation by B and the accountant are as for examples, with N = P patients;
  δ defaults from P.

A patient with 0 usable images contributes exactly zero and still counts in P (conservative).
Padding slots (fewer than k images, or padding patients) get all-zero inputs, never another
patient's image, so no patient's data can affect another's contribution.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class PatientIndex:
    """Which examples belong to which patient.

    Attributes:
      table: int64 [P, M]: the example indices of patient p in row p, padded with 0.
      counts: int64 [P]: n_p, the number of examples of patient p (M = max n_p).
      ids: the patient ids, in row order.
    """

    table: np.ndarray
    counts: np.ndarray
    ids: np.ndarray

    @property
    def num_patients(self) -> int:
        return int(self.counts.shape[0])

    @classmethod
    def from_ids(cls, patient_ids: Sequence) -> "PatientIndex":
        """Groups examples by patient id (any hashable values; order of first appearance)."""
        ids = np.asarray(patient_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"patient_ids must be a non-empty 1-D array, got shape {ids.shape}.")
        unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        order = np.argsort(first)  # patients in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        patient_of_example = rank[inverse]
        counts = np.bincount(patient_of_example, minlength=order.size).astype(np.int64)
        table = np.zeros((order.size, int(counts.max())), np.int64)
        filled = np.zeros(order.size, np.int64)
        for example, patient in enumerate(patient_of_example):
            table[patient, filled[patient]] = example
            filled[patient] += 1
        return cls(table, counts, unique[order])


def image_keys(step_seed: tf.Tensor, patients: tf.Tensor, width: int) -> tf.Tensor:
    """Uniform keys [b, width] for the image slots of each sampled patient at one step.

    Row i is a stateless draw seeded by (step seed folded with the patient's index), so a
    patient's choice of images does not depend on how patients are packed into micro-batches.
    """
    def row(patient):
        seed = tf.random.experimental.stateless_fold_in(step_seed, patient)
        return tf.random.stateless_uniform([width], seed=seed)

    return tf.map_fn(row, patients, fn_output_signature=tf.TensorSpec([width], tf.float32))


def choose_images(rows: tf.Tensor, counts: tf.Tensor, k: int, keys: tf.Tensor
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Up to k of each row's examples, uniformly without replacement (the k smallest keys).

    Args:
      rows: int64 [b, M] example indices of b patients (PatientIndex.table rows).
      counts: int64 [b] their numbers of examples.
      k: the cap per patient and step.
      keys: float32 [b, M] independent U(0, 1) keys (:func:`image_keys`).

    Returns:
      (indices int64 [b, k], mask float32 [b, k]): padding slots hold index 0 and mask 0.
    """
    width = tf.shape(rows)[1]
    valid = tf.range(width, dtype=tf.int64)[None, :] < counts[:, None]
    keys = tf.where(valid, keys, 2.0)  # invalid slots sort last
    pad = tf.maximum(0, k - width)
    keys = tf.pad(keys, [[0, 0], [0, pad]], constant_values=3.0)
    rows = tf.pad(rows, [[0, 0], [0, pad]])
    _, slots = tf.math.top_k(-keys, k=k)
    mask = tf.cast(tf.gather(keys, slots, batch_dims=1) < 1.5, tf.float32)
    indices = tf.gather(rows, slots, batch_dims=1)
    return tf.where(mask > 0, indices, tf.zeros_like(indices)), mask
