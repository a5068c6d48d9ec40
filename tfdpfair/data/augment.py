"""Augmentation multiplicity (Hoffer et al. 2019; Fort et al. 2021; De et al. 2022).

Each example x_i gets K augmented views v_{i,1..K}; its loss is the mean over its views,

    l_i(θ) = (1/K) Σ_k loss(f_θ(v_{i,k}), y_i),

so its gradient ∇l_i = (1/K) Σ_k ∇loss(v_{i,k}) is the *average* of the view gradients and is
clipped once, as one example (tfdpfair/privacy/clipping.py). One example therefore still moves
the clipped sum by at most C (add/remove adjacency), not K·C: the views are never clipped or
counted as separate examples.

Views (:func:`make_views`): pad each side by ``pad`` pixels by reflection (tf.pad "REFLECT": the
edge pixel is not repeated; jax_privacy mirrors *with* the edge pixel, i.e. "SYMMETRIC", which
``pad_mode`` offers), crop a random H x W window (offsets uniform in {0, ..., 2·pad} per axis)
and flip it left-right with probability 1/2. As in jax_privacy (augmult.py: every one of the
``augmult`` views is augmented), all K views are random by default; ``include_original=True``
makes view 0 the un-augmented image (training accuracy is then reported on view 0).
Randomness is stateless: the same ``seed`` gives the same views (same TF version and device
type). Pass a different seed each step, e.g. ``seed=(run_seed, step)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

Seed = int | Sequence[int] | tf.Tensor


def _as_seed(seed: Seed) -> tf.Tensor:
    """int -> [seed, 0]; a pair or [2] tensor -> int64 [2] stateless seed."""
    if isinstance(seed, int):
        return tf.constant([seed, 0], tf.int64)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.reshape(seed, [2])


def make_views(images: tf.Tensor, num_views: int, seed: Seed, *, pad: int = 4,
               pad_mode: str = "REFLECT", random_crop: bool = True, random_flip: bool = True,
               include_original: bool = False) -> tf.Tensor:
    """K augmented views of every image: [B, H, W, C] -> [B, K, H, W, C] (same dtype).

    View (i, k) = flip_{i,k}(crop_{i,k}(pad(x_i))) where crop takes rows o_y..o_y+H-1 and
    columns o_x..o_x+W-1 of the padded image, o_y, o_x ~ U{0..2·pad} and flip ~ Bernoulli(1/2),
    all drawn independently per (i, k) from ``seed``. ``include_original`` sets view 0 to
    offset (pad, pad) without flip, i.e. the image itself.

    Args:
      images: batch of images [B, H, W, C], any dtype.
      num_views: K >= 1.
      seed: int or pair of ints (stateless seed); same seed -> same views.
      pad: pixels of padding on each side (the crop range); 0 disables cropping.
      pad_mode: "REFLECT" or "SYMMETRIC" (see the module docstring).
      random_crop, random_flip: turn either augmentation off.
      include_original: make view 0 the un-augmented image.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}.")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}.")
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), 2))
    max_offset = 2 * pad if random_crop else 0
    offsets = tf.random.stateless_uniform([batch, num_views, 2], seed=crop_seed, minval=0,
                                          maxval=max_offset + 1, dtype=tf.int32)
    offsets = offsets if random_crop else tf.fill([batch, num_views, 2], pad)
    flips = tf.random.stateless_uniform([batch, num_views], seed=flip_seed, minval=0, maxval=2,
                                        dtype=tf.int32) if random_flip else tf.zeros(
                                            [batch, num_views], tf.int32)
    if include_original:
        first = tf.one_hot(0, num_views, on_value=True, off_value=False)[None, :]
        offsets = tf.where(first[..., None], tf.fill(tf.shape(offsets), pad), offsets)
        flips = tf.where(first, 0, flips)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=pad_mode)
    rows = offsets[..., :1] + tf.range(height)[None, None, :]  # [B, K, H]
    cols = offsets[..., 1:] + tf.range(width)[None, None, :]  # [B, K, W]
    cols = tf.where(flips[..., None] == 1, tf.reverse(cols, axis=[-1]), cols)
    views = tf.gather(padded, rows, axis=1, batch_dims=1)  # [B, K, H, W + 2 pad, C]
    return tf.gather(views, cols, axis=3, batch_dims=2)  # [B, K, H, W, C]


def unreduced_loss(loss_object: Any) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A per-sample version of ``loss_object`` (Keras Loss with reduction=None, or as is)."""
    if isinstance(loss_object, keras.losses.Loss):
        if loss_object.reduction is None:
            return loss_object
        try:
            return type(loss_object).from_config({**loss_object.get_config(),
                                                  "reduction": None})
        except (TypeError, ValueError):
            return loss_object.call  # per-sample values, no reduction
    return loss_object


def multiview_loss_fn(model: keras.Model, loss_object: Any, *, training: bool = True,
                      image_key: str = "image", label_key: str = "label",
                      with_prediction: bool = False) -> Callable[[Any], Any]:
    """Per-example loss for augmentation multiplicity, for ``clipped_grad_sum``.

    The returned function maps ONE example, ``(views, label)`` or a dict with ``image_key`` and
    ``label_key``, where views is [K, H, W, C] and label has no view axis (a class id, or a [L]
    multi-label target), to the scalar (1/K) Σ_k loss(label, model(views)[k]).

    Args:
      model: Keras model mapping [K, H, W, C] -> predictions [K, ...].
      loss_object: a ``keras.losses.Loss`` (its reduction is replaced by per-sample values, so
        "sum" or "mean" make no difference) or a function returning per-view losses [K].
      training: passed to the model call (dropout, stochastic depth).
      image_key, label_key: keys of a dict example.
      with_prediction: return ``(loss, prediction of view 0)`` (for monitoring metrics).
    """
    per_view_loss = unreduced_loss(loss_object)

    def loss_fn(example: Any) -> tf.Tensor:
        if isinstance(example, dict):
            views, label = example[image_key], example[label_key]
        else:
            views, label = example
        label = tf.convert_to_tensor(label)
        labels = tf.repeat(label[None], tf.shape(views)[0], axis=0)  # [K, ...]
        predictions = model(views, training=training)
        losses = tf.cast(per_view_loss(labels, predictions), tf.float32)
        loss = tf.reduce_mean(losses)
        return (loss, predictions[0]) if with_prediction else loss

    return loss_fn
