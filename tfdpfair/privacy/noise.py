"""Gaussian noise for DP-SGD: one draw N(0, σ²C²) per coordinate per logical step.

The noise is *stateless*: the draw for logical step t is a pure function of (noise_seed, t) and
the variable's position. That gives the two properties the privacy proof needs:

* exactly one draw per logical step, however many micro-batches the step was accumulated over
  (noise is added once, to the accumulated sum, never per micro-batch);
* under tf.distribute, every replica adds the *same* draw to the *same* all-reduced sum, so the
  replicas stay identical and the total noise is still one N(0, σ²C²) draw, not R of them
  (adding independent std σC per replica before a sum would give std σC·√R; adding the same
  draw before a sum would give R·σC; both are the bug class "noise calibrated for the sum but
  added elsewhere").

The seed must be secret: anyone who knows it can subtract the noise. It defaults to OS entropy.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def step_seed(noise_seed: int | tf.Tensor, step: int | tf.Tensor) -> tf.Tensor:
    """The stateless RNG seed [2] (int64) of logical step ``step``."""
    return tf.stack([tf.cast(noise_seed, tf.int64), tf.cast(step, tf.int64)])


def gaussian_noise_like(
    tensors: Sequence[tf.Tensor | tf.Variable],
    stddev: float | tf.Tensor,
    seed: tf.Tensor,
) -> list[tf.Tensor]:
    """Independent N(0, stddev²) noise with the shape of each tensor, from one step seed.

    Each tensor gets its own sub-seed (the seed folded with the tensor's position), so two
    variables of the same shape never receive the same noise.
    """
    noise = []
    for position, tensor in enumerate(tensors):
        sub_seed = tf.random.experimental.stateless_fold_in(seed, position)
        noise.append(tf.random.stateless_normal(
            tf.shape(tensor), seed=sub_seed, stddev=tf.cast(stddev, tf.float32),
            dtype=tf.float32))
    return noise
