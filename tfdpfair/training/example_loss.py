"""The per-unit loss that DP-SGD differentiates and clips: one example, or one patient.

Each function maps ONE unit (no batch axis) to ``(loss, (label, prediction))``: the scalar
loss whose gradient is clipped to C, and a label/prediction pair for the monitoring metrics.

* example: loss(y, f(x)); with augmentation multiplicity, the mean over its K views
  (data/augment.py), so the views' gradients are averaged before clipping.
* patient (training/patients.py): x holds up to k images [k, ...] (or their views
  [k, K, ...]) with an image mask; the loss is the mean over the patient's real images (and
  views). Padding slots carry zero inputs and weight 0. A patient without images has loss 0.
  One implementation, :func:`batch_patient_loss_fn`, serves both clipping methods: ghost
  clipping calls it on B patients, vectorized clipping on a batch of one.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import tensorflow as tf

from tfdpfair.data import augment

UnitLoss = Callable[[Any], tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]]


def example_loss_fn(model: keras.Model, loss: Any, augmult: int = 1,
                    patient: bool = False) -> UnitLoss:
    """The unit loss for ``model`` and a Keras loss (object, name or function)."""
    per_sample = augment.unreduced_loss(keras.losses.get(loss))
    if patient:
        return _patient_loss(model, per_sample, augmult)
    if augmult > 1:
        views_loss = augment.multiview_loss_fn(model, loss, with_prediction=True)

        def multiview(example):
            value, prediction = views_loss(example)
            return value, (example[1], prediction)

        return multiview

    def single(example):
        x, y = example
        prediction = model(x[None], training=True)
        value = tf.reduce_sum(tf.cast(per_sample(y[None], prediction), tf.float32))
        return value, (y, prediction[0])

    return single


def _patient_loss(model: keras.Model, per_sample: Callable, augmult: int) -> UnitLoss:
    batch_loss = _batch_patient_loss(model, per_sample, augmult)

    def patient_loss(example):  # one patient = a batch of one
        value, (label, prediction) = batch_loss(tf.nest.map_structure(lambda t: t[None], example))
        return value[0], (label[0], prediction[0])

    return patient_loss


BatchUnitLoss = Callable[[Any], tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]]


def batch_patient_loss_fn(model: keras.Model, loss: Any, augmult: int = 1) -> BatchUnitLoss:
    """The patient loss of B patients at once (ghost clipping; vectorized uses a batch of one).

    Maps ``(x, y)`` with x [B, k, H, W, C] (or [B, k, K, H, W, C] views when ``augmult`` = K
    > 1) and y = {"labels": [B, k, ...], "image_mask": [B, k]} to
    ``(losses [B], (labels [B, ...], predictions [B, ...]))``. The model sees the B·k·K images
    (views) as rows, patient-major, so every ghost rule counts them as the k·K·T positions of
    one unit, exactly as it counts augmult views. Patient p's loss is

        l_p = Σ_{j,v} w_pj · loss(y_pj, f(x_pjv)) / (K · max(Σ_j w_pj, 1)),

    the mean over its real images (image_mask w_pj = 1) and their views; l_p = 0 for a patient
    without images. The aux is the label and prediction of slot 0 (view 0).

    Padding slots (w_pj = 0) are fed all-zero images whatever ``x`` holds there; their losses
    are dropped by selection (``tf.where``, not a product with 0) and their predictions reach
    the loss through ``stop_gradient``, so their gradient rows are exactly 0, even where the
    loss or its gradient is infinite or NaN, as long as the model is finite on a zero image.
    A non-finite real image makes its own patient's loss and gradient rows non-finite; rows of
    different patients never mix, so clipping drops that patient alone.
    """
    return _batch_patient_loss(model, augment.unreduced_loss(keras.losses.get(loss)), augmult)


def _batch_patient_loss(model: keras.Model, per_sample: Callable, augmult: int
                        ) -> BatchUnitLoss:
    def batch_loss(patients):
        x, y = patients
        labels, image_mask = y["labels"], tf.cast(y["image_mask"], tf.float32)
        slots = x.shape[1] * augmult  # k·K rows per patient
        rows = tf.reshape(x, [-1] + x.shape[(3 if augmult > 1 else 2):].as_list())
        row_mask = tf.reshape(tf.repeat(image_mask, augmult, axis=1), [-1])  # [B·k·K]
        real = row_mask > 0
        rows = tf.where(tf.reshape(real, [-1] + [1] * (rows.shape.rank - 1)), rows,
                        tf.zeros([], rows.dtype))
        predictions = model(rows, training=True)
        to_loss = tf.where(tf.reshape(real, [-1] + [1] * (predictions.shape.rank - 1)),
                           predictions, tf.stop_gradient(predictions))
        row_labels = tf.repeat(tf.reshape(labels, [-1] + labels.shape[2:].as_list()),
                               augmult, axis=0)
        losses = tf.reshape(tf.cast(per_sample(row_labels, to_loss), tf.float32), [-1, slots])
        row_mask = tf.reshape(row_mask, [-1, slots])
        weights = row_mask / tf.maximum(tf.reduce_sum(row_mask, axis=1, keepdims=True), 1.0)
        value = tf.reduce_sum(tf.where(row_mask > 0, losses, 0.0) * weights, axis=1)
        first = tf.reshape(predictions, [-1, slots] + predictions.shape[1:].as_list())[:, 0]
        return value, (labels[:, 0], first)

    return batch_loss
