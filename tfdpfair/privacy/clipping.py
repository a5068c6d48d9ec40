"""Per-example gradient clipping: the only place where the data touches the gradient.

For a micro-batch of B examples with per-example losses l_i(θ) and a 0/1 mask m_i, this module
computes

    clipped_sum = Σ_i m_i · g_i · min(1, C / ||g_i||₂),      g_i = ∇_θ l_i(θ),

where ||g_i||₂ is the *global* L2 norm over every trained variable together (not per layer), and
C is the clipping norm in the units of the gradient. One example therefore moves
``clipped_sum`` by at most C in L2 norm (DESIGN.md invariant 1), and a padded example (m_i = 0)
moves it by exactly zero.

Gradients are taken only with respect to ``variables`` (normally ``model.trainable_variables``),
so a frozen backbone contributes no per-example gradient storage. Per-example gradients are
computed with ``tf.vectorized_map`` (one example per map iteration), which turns the backward
pass into a batched computation instead of a Python loop.

An "example" may itself carry several augmented views (augmentation multiplicity): the
per-example loss function then averages over its K views before differentiation, so the
clipped object is still the gradient of one example's loss.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from tfdpfair.models.layers import vectorizable_conv_gradients

PerExampleLossFn = Callable[[Any], Any]
"""Maps ONE example (a nested structure of tensors without a batch axis) to a scalar loss, or
with ``has_aux=True`` to ``(loss, aux)`` where aux is any nested structure of tensors (e.g. the
model's prediction, for monitoring metrics)."""


class ClippedGradients(NamedTuple):
    """Result of clipping one micro-batch.

    A NamedTuple, so it can be returned from a ``tf.function``.

    Attributes:
      grad_sum: per variable, Σ_i m_i · clip_C(g_i); same shapes as the variables.
      loss_sum: Σ_i m_i · l_i (unclipped per-example losses, summed over real examples).
      num_examples: Σ_i m_i, the number of real (unpadded) examples, float32.
      num_clipped: number of real examples whose gradient norm exceeded C.
      grad_norms: per-example global gradient norms ||g_i||₂ before clipping, shape [B];
        padded rows are reported as 0.
      num_nonfinite: number of real examples whose gradient was not finite (contributed 0).
      aux: the stacked per-example aux outputs of the loss function (None without has_aux).
      kept: float32 [B], 1 for a real example that contributed (finite gradient), else 0.
    """

    grad_sum: list[tf.Tensor]
    loss_sum: tf.Tensor
    num_examples: tf.Tensor
    num_clipped: tf.Tensor
    grad_norms: tf.Tensor
    num_nonfinite: tf.Tensor | None = None
    aux: Any = None
    kept: tf.Tensor | None = None


def per_example_gradients(
    loss_fn: PerExampleLossFn,
    variables: Sequence[tf.Variable],
    examples: Any,
    has_aux: bool = False,
) -> tuple[list[tf.Tensor], tf.Tensor] | tuple[list[tf.Tensor], tf.Tensor, Any]:
    """Per-example losses and gradients of ``loss_fn`` over a batch, vectorised over axis 0.

    Args:
      loss_fn: maps one example (the batch structure with axis 0 removed) to a scalar loss.
      variables: the variables to differentiate (e.g. ``model.trainable_variables``).
      examples: nested structure of tensors, each with the batch on axis 0.

      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is stacked over examples and returned.

    Returns:
      (grads, losses) or (grads, losses, aux): ``grads[v]`` has shape
      [B, *variables[v].shape] with g_i in row i; ``losses`` has shape [B]. A variable that does
      not influence the loss gets zeros.
    """
    variables = list(variables)

    def one_example(example):
        with tf.GradientTape() as tape:
            out = loss_fn(example)
            loss, aux = out if has_aux else (out, ())
            loss = tf.cast(loss, tf.float32)
        grads = tape.gradient(loss, variables)
        # Zeros for unconnected variables made here: UnconnectedGradients.ZERO fails on Keras 3
        # variables (e.g. the never-read CanarySlots of an audit model).
        grads = [tf.zeros(v.shape, v.dtype) if g is None else g
                 for g, v in zip(grads, variables)]
        return grads, loss, aux

    with vectorizable_conv_gradients():  # traced here, so WSConv2D picks its vectorisable grad
        grads, losses, aux = tf.vectorized_map(one_example, examples)
    return (list(grads), losses, aux) if has_aux else (list(grads), losses)


def global_norms(per_example_grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """||g_i||₂ over all variables jointly: sqrt(Σ_v Σ_j g_{i,v,j}²); shape [B]."""
    squares = [
        tf.reduce_sum(tf.reshape(tf.square(tf.cast(g, tf.float32)), [tf.shape(g)[0], -1]), axis=1)
        for g in per_example_grads
    ]
    return tf.sqrt(tf.add_n(squares))


def clip_factors(norms: tf.Tensor, l2_norm_clip: float, mask: tf.Tensor) -> tf.Tensor:
    """m_i · min(1, C / ||g_i||) computed as m_i · C / max(||g_i||, C) (exact, no epsilon)."""
    clip = tf.constant(l2_norm_clip, tf.float32)
    return tf.cast(mask, tf.float32) * clip / tf.maximum(norms, clip)


def clipped_grad_sum(
    loss_fn: PerExampleLossFn,
    variables: Sequence[tf.Variable],
    examples: Any,
    mask: tf.Tensor,
    l2_norm_clip: float,
    has_aux: bool = False,
) -> ClippedGradients:
    """Σ_i m_i · clip_C(∇ l_i) over one micro-batch; see the module docstring for the math.

    Args:
      loss_fn: per-example loss, ``loss_fn(example) -> scalar``.
      variables: trained variables; only these are differentiated and returned.
      examples: nested structure of batched tensors (axis 0 = example).
      mask: shape [B], 1 for a real example and 0 for padding. Values are cast to float32 and
        must be 0 or 1 (anything else would change the sensitivity).
      l2_norm_clip: C > 0, in gradient units.
      has_aux: ``loss_fn`` returns ``(loss, aux)`` (see :func:`per_example_gradients`).

    Returns:
      A :class:`ClippedGradients` with summed (not averaged) clipped gradients. A real example
      with a non-finite gradient is treated as padding (factor 0) and counted in
      ``num_nonfinite``; its loss is left out of ``loss_sum``.
    """
    if not l2_norm_clip > 0:
        raise ValueError(f"l2_norm_clip must be > 0, got {l2_norm_clip}.")
    grads, losses, *aux = per_example_gradients(loss_fn, variables, examples, has_aux=has_aux)
    sampled = tf.cast(mask, tf.float32)
    raw_norms = global_norms(grads)
    finite = tf.math.is_finite(raw_norms) & tf.math.is_finite(losses)
    mask = tf.where(finite, sampled, 0.0)  # a non-finite example counts as padding
    norms = tf.where(mask > 0, raw_norms, 0.0)
    factors = clip_factors(norms, l2_norm_clip, mask)
    grad_sum = [_masked_weighted_sum(factors, mask, g) for g in grads]
    return ClippedGradients(
        grad_sum=grad_sum,
        loss_sum=tf.reduce_sum(tf.where(mask > 0, losses, 0.0)),
        num_examples=tf.reduce_sum(mask),
        num_clipped=tf.reduce_sum(mask * tf.cast(norms > l2_norm_clip, tf.float32)),
        grad_norms=norms,
        num_nonfinite=tf.reduce_sum(sampled) - tf.reduce_sum(mask),
        aux=aux[0] if has_aux else None,
        kept=mask,
    )


def clipped_rows_sum(rows: Sequence[tf.Tensor], mask: tf.Tensor, l2_norm_clip: float
                     ) -> list[tf.Tensor]:
    """Σ_j m_j · clip_C(r_j) for given per-unit gradients ``rows`` ([m, *shape] per variable).

    For contributions that arrive as gradients rather than losses (audit canaries): each row is
    clipped to global L2 norm C like an example's gradient, so one row moves the sum by at most
    C whatever values it holds; a non-finite row contributes zero. ``mask`` is bool or 0/1.
    """
    if not l2_norm_clip > 0:
        raise ValueError(f"l2_norm_clip must be > 0, got {l2_norm_clip}.")
    sampled = tf.cast(tf.cast(mask, tf.bool), tf.float32)  # 0/1 whatever the caller passed
    raw_norms = global_norms(rows)
    kept = tf.where(tf.math.is_finite(raw_norms), sampled, 0.0)
    factors = clip_factors(tf.where(kept > 0, raw_norms, 0.0), l2_norm_clip, kept)
    return [_masked_weighted_sum(factors, kept, r) for r in rows]


def clipped_coordinates_sum(shapes: Sequence[Sequence[int]], coordinates: tf.Tensor,
                            values: tf.Tensor, mask: tf.Tensor, l2_norm_clip: float
                            ) -> list[tf.Tensor]:
    """Σ_j m_j · clip_C(v_j·e_{k_j}) for one-coordinate ("Dirac") gradients, per variable.

    Unit j's gradient is v_j times the basis vector of flat coordinate k_j = ``coordinates[j]``
    of the concatenation of variables with ``shapes`` (each flattened, in order). Its L2 norm is
    |v_j|, so clipping gives v_j·C/max(|v_j|, C); a non-finite v_j contributes zero. Units may
    share a coordinate (their clipped values add). ``coordinates`` must lie in [0, P) (checked
    by the caller when the units are set); ``mask`` is bool or 0/1. Returns one tensor per
    shape, as :func:`clipped_rows_sum` does for dense rows.
    """
    if not l2_norm_clip > 0:
        raise ValueError(f"l2_norm_clip must be > 0, got {l2_norm_clip}.")
    sizes = [int(np.prod(s)) for s in shapes]
    v = tf.cast(values, tf.float32)
    sampled = tf.cast(tf.cast(mask, tf.bool), tf.float32)
    kept = tf.where(tf.math.is_finite(v), sampled, 0.0)
    norms = tf.where(kept > 0, tf.abs(v), 0.0)
    clipped = clip_factors(norms, l2_norm_clip, kept) * tf.where(kept > 0, v, 0.0)
    flat = tf.math.unsorted_segment_sum(clipped, tf.cast(coordinates, tf.int64), sum(sizes))
    return [tf.reshape(part, s) for part, s in zip(tf.split(flat, sizes), shapes)]


def _masked_weighted_sum(factors: tf.Tensor, mask: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
    """Σ_i factors_i · g_i, with padded rows zeroed first so that even a non-finite gradient of
    a padding example (0 · NaN = NaN) cannot leak into the sum."""
    grads = tf.cast(grads, tf.float32)
    keep = tf.reshape(mask > 0, [-1] + [1] * (grads.shape.rank - 1))
    grads = tf.where(keep, grads, tf.zeros([], grads.dtype))
    return tf.tensordot(factors, grads, axes=[[0], [0]])
