"""The per-unit loss that DP-SGD differentiates and clips: one example, or one patient.

Each function maps ONE unit (no batch axis) to ``(loss, (label, prediction))``: the scalar
loss whose gradient is clipped to C, and a label/prediction pair for the monitoring metrics.

* example: loss(y, f(x)); with augmentation multiplicity, the mean over its K views
  (data/augment.py), so the views' gradients are averaged before clipping.
* patient (training/patients.py): x holds up to k images [k, ...] (or their views
  [k, K, ...]) with an image mask; the loss is the mean over the patient's real images (and
  views). Padding slots carry zero inputs and weight 0. A patient without images has loss 0.
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
    def patient_loss(example):
        x, y = example
        labels, image_mask = y["labels"], y["image_mask"]
        if augmult > 1:  # x: [k, K, H, W, C] -> k·K views, each weighted like its image
            x = tf.reshape(x, [-1] + x.shape[2:].as_list())
            labels = tf.repeat(labels, augmult, axis=0)
            image_mask = tf.repeat(image_mask, augmult, axis=0)
        predictions = model(x, training=True)
        losses = tf.cast(per_sample(labels, predictions), tf.float32)
        losses = tf.reshape(losses, [-1])
        weights = image_mask / tf.maximum(tf.reduce_sum(image_mask), 1.0)
        value = tf.reduce_sum(tf.where(image_mask > 0, losses, 0.0) * weights)
        return value, (labels[0], predictions[0])

    return patient_loss
