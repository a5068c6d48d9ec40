"""Ghost clipping: Σ_i m_i·clip_C(g_i) without materialising per-example gradients.

Same mathematics, mask and non-finite semantics and return type as
:func:`tfdpfair.privacy.clipping.clipped_grad_sum` (see its module docstring):

    clipped_sum = Σ_i m_i · c_i · g_i,   c_i = C / max(‖g_i‖₂, C),   g_i = ∇_θ l_i(θ),

with ‖g_i‖ the global norm over all ``variables``; a padded or non-finite example gets
c_i = 0 and contributes exactly zero. What differs is how ‖g_i‖ and the sum are computed:

1. ONE batched forward pass of ``batch_loss_fn`` under a gradient tape, during which every layer
   with a rule (:mod:`tfdpfair.privacy.ghost_rules`: Dense, Conv2D, WSConv2D, GroupNorm /
   LayerNorm affine parameters, NFNet / WRN SkipInit gains) runs through a recording ``call``
   that keeps its input and watches its pre-activation output z.
2. ONE backward pass of L = Σ_i l_i to those outputs only: row i of ∂L/∂z is ∂l_i/∂z_i,
   because DP-safe models do not mix examples. No weight gradient is formed here.
3. Per-example squared norms per layer from (input, ∂L/∂z): ‖a_i‖²‖δ_i‖² for Dense on
   vectors, T×T Gram matrices ("ghost") or direct per-example weight gradients (for convs one
   native kernel gradient with every example as its own channel group) for convs and
   higher-rank Dense (:mod:`tfdpfair.privacy.ghost_linear`), with the exact standardisation
   Jacobian for WSConv2D (docs/ghost_clipping.md); small variables are materialised per example.
   Large layers run one chunk of examples and one layer at a time (bounded memory).
4. The clipped sum by book-keeping: each weight's Σ_i c_i g_i is one matmul of the stored
   inputs and c-weighted output gradients (or a tensordot of the direct per-example
   gradients) -- no second backward pass. (A second backward pass of Σ_i c_i l_i would cost
   a full backward, and 0·NaN from a non-finite row would leak into it; book-keeping zeroes
   those rows exactly.)

Variables without a rule (e.g. Embedding, EinsumDense, custom layers, a Dense subclass) fall
back to exact per-example gradients by ``tf.vectorized_map`` of the one-example loss for those
variables only, combined into the same global norm and summed from the same per-example
gradients. That costs a second, per-example forward and backward pass through the model above
(and below) the variable: keep it for a few small layers. With training-time randomness
(dropout, stochastic depth) the fallback sees its own random draws; the sensitivity still
holds (the vector whose norm is clipped is exactly the one summed), but the two parts of g_i
come from different draws.

Requirements on ``batch_loss_fn(examples) -> losses [B]`` (or ``(losses, aux)`` with
``has_aux``): loss i depends on example i only (no batch norm in training mode, no batch-mean
loss); the model is called inside it (any number of times; each call's rows must be
example-major, e.g. [B·K] views of B examples via a reshape of [B, K, ...]); rule layers
must not be used in ways the rule does not see (e.g. reading a Dense kernel outside its call).
Augmentation multiplicity: :func:`batch_example_loss_fn` with ``augmult=K`` feeds [B·K] views
and averages the K losses of each example; the K views then count as K·T positions of one
example in every rule. Patient-level units (training/patients.py):
``training.example_loss.batch_patient_loss_fn`` feeds a patient's up to k images (× K views)
as k·K rows of one unit and returns the patient's mean loss, so a patient's norm is the Gram
sum Σ_{j,l}⟨a_j,a_l⟩⟨δ_j,δ_l⟩ over all positions of all its images and views, and the
patient is clipped once, as an example is.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from tfdpfair.data import augment
from tfdpfair.models.layer_paths import iter_layers_with_paths
from tfdpfair.privacy import ghost_linear as gl
from tfdpfair.privacy import ghost_rules
from tfdpfair.privacy.clipping import ClippedGradients, clip_factors, per_example_gradients

BatchLossFn = Callable[[Any], Any]
"""Maps a batch of examples (axis 0 = example) to per-example losses [B], or (losses, aux)."""

_ACTIVE = threading.local()  # the capture of the forward pass running in this thread
_LOCK = threading.Lock()
_INSTALLED: dict[int, list] = {}  # id(layer) -> [layer, refcount, previous instance `call`]


class _Capture:
    """Records of one forward pass: per layer, one dict per call (+ its watched output z)."""

    def __init__(self, tape: tf.GradientTape, rules: dict[int, ghost_rules.Rule]):
        self.tape, self.rules = tape, rules
        self.records: dict[int, list[dict]] = {}

    def record(self, layer, z, **data) -> None:
        self.tape.watch(z)
        self.records.setdefault(id(layer), []).append({"z": z, **data})


def _make_wrapper(layer, original):
    def call(*args, **kwargs):
        capture = getattr(_ACTIVE, "capture", None)
        rule = capture.rules.get(id(layer)) if capture is not None else None
        if rule is None:
            return original(*args, **kwargs)
        return rule.forward(layer, original, capture, *args, **kwargs)

    return call


def _install(layers: list) -> None:
    with _LOCK:
        for layer in layers:
            entry = _INSTALLED.get(id(layer))
            if entry is not None:
                entry[1] += 1
                continue
            previous = layer.__dict__.get("call")
            object.__setattr__(layer, "call", _make_wrapper(layer, layer.call))
            _INSTALLED[id(layer)] = [layer, 1, previous]


def _uninstall(layers: list) -> None:
    with _LOCK:
        for layer in layers:
            entry = _INSTALLED[id(layer)]
            entry[1] -= 1
            if entry[1] == 0:
                del _INSTALLED[id(layer)]
                if entry[2] is None:
                    object.__delattr__(layer, "call")
                else:
                    object.__setattr__(layer, "call", entry[2])


def plan_rules(model: keras.Model, variables: Sequence[Any]):
    """(rules by layer id, covered layers, fallback variables) for ``variables``.

    A variable is covered when a layer of ``model`` (searched recursively) has a rule that
    covers it; every other requested variable falls back to per-example gradients.
    """
    wanted = {id(v) for v in variables}
    rules, layers, covered = {}, [], set()
    for _, layer in iter_layers_with_paths(model):
        rule = ghost_rules.rule_for(layer)
        if rule is None or not getattr(layer, "built", False):
            continue
        mine = {id(v) for v in rule.variables(layer)} & wanted
        if mine:
            rules[id(layer)] = rule
            layers.append(layer)
            covered |= mine
    fallback = [v for v in variables if id(v) not in covered]
    return rules, layers, fallback


def describe_plan(model: keras.Model, variables: Sequence[Any] | None = None) -> dict:
    """{"ghost": [variable paths with a rule], "fallback": [variable paths without]}."""
    variables = list(model.trainable_variables if variables is None else variables)
    _, _, fallback = plan_rules(model, variables)
    fb = {id(v) for v in fallback}
    return {"ghost": [v.path for v in variables if id(v) not in fb],
            "fallback": [v.path for v in variables if id(v) in fb]}


def ghost_clipped_grad_sum(
    model: keras.Model,
    batch_loss_fn: BatchLossFn,
    variables: Sequence[Any],
    examples: Any,
    mask: tf.Tensor,
    l2_norm_clip: float,
    has_aux: bool = False,
    conv_mode: str = gl.AUTO,
) -> ClippedGradients:
    """Σ_i m_i · clip_C(∇ l_i) over one micro-batch, by ghost norms and book-keeping.

    Args:
      model: the Keras model whose layers ``batch_loss_fn`` calls (searched for rule layers).
      batch_loss_fn: ``batch_loss_fn(examples) -> losses [B]`` (or ``(losses, aux)`` with
        ``has_aux``, aux batched on axis 0); see the module docstring for the requirements.
      variables, examples, mask, l2_norm_clip, has_aux: as in ``clipping.clipped_grad_sum``.
      conv_mode: "auto" (per layer by cost), "ghost" or "direct" for every weight matrix.

    Returns:
      A :class:`~tfdpfair.privacy.clipping.ClippedGradients` with the same fields and
      semantics as ``clipping.clipped_grad_sum``.
    """
    if not l2_norm_clip > 0:
        raise ValueError(f"l2_norm_clip must be > 0, got {l2_norm_clip}.")
    if conv_mode not in (gl.AUTO, gl.GHOST, gl.DIRECT):
        raise ValueError(f"conv_mode must be 'auto', 'ghost' or 'direct', got {conv_mode!r}.")
    variables = list(variables)
    rules, layers, fallback = plan_rules(model, variables)
    mask = tf.convert_to_tensor(mask)
    batch = mask.shape[0] if mask.shape[0] is not None else tf.shape(mask)[0]

    with tf.GradientTape(watch_accessed_variables=False) as tape:
        capture = _Capture(tape, rules)
        _install(layers)
        _ACTIVE.capture = capture
        try:
            out = batch_loss_fn(examples)
        finally:
            _ACTIVE.capture = None
            _uninstall(layers)
        losses, aux = out if has_aux else (out, None)
        losses = tf.reshape(tf.cast(losses, tf.float32), [-1])
        total = tf.reduce_sum(losses)
    records = [r for recs in capture.records.values() for r in recs]
    if records:
        deltas = tape.gradient(total, [r["z"] for r in records],
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for r, d in zip(records, deltas):
            r["dz"] = d
    wanted = {id(v) for v in variables}
    pieces = []
    for layer in layers:
        recs = capture.records.get(id(layer))
        if recs:
            pieces += rules[id(layer)].pieces(layer, recs, batch, wanted, conv_mode)
    fb_grads = _fallback_gradients(batch_loss_fn, fallback, examples, has_aux)

    # Weight matrices one after the other (control dependencies), so that only one layer's
    # patches exist at a time (TF would otherwise make every layer's as soon as it can), and
    # from the last layer to the first: the order in which the backward pass yields their ∂L/∂z.
    # Small layers (whole-batch patches within CHUNK_BYTES) stay unordered: for them TF's
    # parallel scheduling is worth more than the memory.
    squares, after = [], []
    for p in reversed(pieces):
        if isinstance(p, ghost_rules.KernelPiece):
            large = p.piece.is_large()
            squares.append(p.piece.sq_norms(after=after if large else ()))
            after = squares[-1:] if large else after
        else:
            squares.append(tf.reduce_sum(tf.reshape(tf.square(p.grads), [batch, -1]), axis=1))
    squares += [tf.reduce_sum(tf.reshape(tf.square(g), [batch, -1]), axis=1) for g in fb_grads]
    raw_norms = tf.sqrt(tf.add_n(squares)) if squares else tf.zeros_like(losses)

    sampled = tf.cast(mask, tf.float32)
    finite = tf.math.is_finite(raw_norms) & tf.math.is_finite(losses)
    kept = tf.where(finite, sampled, 0.0)  # a non-finite example counts as padding
    norms = tf.where(kept > 0, raw_norms, 0.0)
    factors = clip_factors(norms, l2_norm_clip, kept)
    keep = kept > 0

    sums: dict[int, tf.Tensor] = {}
    after = []
    for p in pieces:
        if isinstance(p, ghost_rules.KernelPiece):
            large = p.piece.is_large()
            g = gl.grouped_to_kernel(p.piece.weighted_sum(
                factors, keep, after=after if large else ()), p.shape)
            after = [g] if large else after
        else:
            g = tf.tensordot(factors, gl.zero_rows(p.grads, keep), axes=[[0], [0]])
        sums[id(p.variable)] = sums.get(id(p.variable), 0.0) + g
    for v, g in zip(fallback, fb_grads):
        sums[id(v)] = tf.tensordot(factors, gl.zero_rows(tf.cast(g, tf.float32), keep),
                                   axes=[[0], [0]])
    grad_sum = [tf.reshape(sums[id(v)], v.shape) if id(v) in sums
                else tf.zeros(v.shape, tf.float32) for v in variables]
    return ClippedGradients(
        grad_sum=grad_sum,
        loss_sum=tf.reduce_sum(tf.where(keep, losses, 0.0)),
        num_examples=tf.reduce_sum(kept),
        num_clipped=tf.reduce_sum(kept * tf.cast(norms > l2_norm_clip, tf.float32)),
        grad_norms=norms,
        num_nonfinite=tf.reduce_sum(sampled) - tf.reduce_sum(kept),
        aux=aux,
        kept=kept,
    )


def _fallback_gradients(batch_loss_fn, variables, examples, has_aux) -> list[tf.Tensor]:
    """Exact per-example gradients [B, *shape] of the variables without a rule (or [])."""
    if not variables:
        return []

    def one_example(example):
        out = batch_loss_fn(tf.nest.map_structure(lambda t: t[None], example))
        return tf.reshape((out[0] if has_aux else out), [])

    grads, _ = per_example_gradients(one_example, variables, examples)
    return [tf.cast(g, tf.float32) for g in grads]


def batch_example_loss_fn(model: keras.Model, loss: Any, augmult: int = 1) -> BatchLossFn:
    """The batched counterpart of ``training.example_loss.example_loss_fn`` (example units).

    Maps ``(x, y)`` with x [B, ...] (or [B, K, ...] views when ``augmult`` = K > 1) to
    ``(losses [B], (y, predictions [B, ...]))``; with views, loss_i is the mean over the K views
    and the prediction is that of view 0, as in the per-example version.
    """
    per_sample = augment.unreduced_loss(keras.losses.get(loss))

    def batch_loss(examples):
        x, y = examples
        if augmult == 1:
            predictions = model(x, training=True)
            return tf.cast(per_sample(y, predictions), tf.float32), (y, predictions)
        views = tf.reshape(x, [-1] + x.shape[2:].as_list())  # [B·K, ...], example-major
        labels = tf.repeat(y, augmult, axis=0)
        predictions = model(views, training=True)
        losses = tf.reshape(tf.cast(per_sample(labels, predictions), tf.float32), [-1, augmult])
        first = tf.reshape(predictions, [-1, augmult] + predictions.shape[1:].as_list())[:, 0]
        return tf.reduce_mean(losses, axis=1), (y, first)

    return batch_loss
