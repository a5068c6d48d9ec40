"""Ghost-clipping rules for EinsumDense and Embedding (the layers of token models).

Registered in :func:`tfdpfair.privacy.ghost_registry.rule_for`; LoRA / quantised layers have
no rule (their variables fall back to per-example gradients).

**EinsumDense** z = einsum("in,kernel->out", x, W) (+ bias, broadcast right-aligned). Each
label of the equation (after expanding "..." for the input's rank) is one of

  batch  the first input label, first output label, not in the kernel;
  T      in input and output only (positions: sequence, heads of an attention score, ...);
  G      in input, kernel and output (a separate weight block per value: "groups");
  P      in input and kernel only (contracted);
  O      in kernel and output only;
  input-only labels are summed over in x first.

With A = x as [B, T, G, P] and D = ∂L/∂z as [B, T, G, O] (R augmentation rows of an example
join its T), g_i = Σ_t A[i,t]ᵀD[i,t] per group: exactly a ``ghost_linear.LinearPiece`` (ghost
Gram or direct norms, book-keeping sum). The [G, P, O] sum is reshaped and transposed back to
the kernel's label order. Equations with a repeated label in one operand, a batch label that
is not first in input and output or is in the kernel, or a kernel label missing from input and
output are refused: those kernels fall back to per-example gradients.

**Embedding** z[i, t] = W[id_it] for W [V, D]: g_i = Σ_t e_{id_it} δ_itᵀ, a sum of one-hot rows,
so ‖g_i‖² = Σ_v ‖Σ_{t: id_it = v} δ_it‖² = Σ_{t,s: id_it = id_is} δ_it·δ_is (repeated ids add
up before squaring). It is computed by sorting each example's ids and one segment sum of the
δ rows over the runs of equal ids (memory of δ, never [B, V, D]), and Σ_i c_i g_i by one
scatter-add of the c-weighted δ rows into [V, D]. mask_zero changes nothing here: id 0 is
looked up as any id, and the layers after it give its positions whatever gradient they give
(zero for masked reductions). Ids outside [0, V) contribute nothing (as TensorFlow's gather
gradient drops them), and can never merge two examples' rows.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Sequence

import keras
import tensorflow as tf

from tfdpfair.privacy import ghost_linear as gl
from tfdpfair.privacy import ghost_rules as gr
from tfdpfair.privacy.ghost_rules_keras import activate, add_bias, plain_layer


@dataclasses.dataclass(frozen=True)
class EinsumLayout:
    """How one EinsumDense equation maps onto a LinearPiece (see the module docstring).

    to_a / to_d: unary einsums x -> [rows, T.., G.., P..] and δ -> [rows, T.., G.., O..];
    kernel_perm: the transpose from [G.., P.., O..] to the kernel's label order.
    """

    to_a: str
    to_d: str
    g: str
    p: str
    o: str
    kernel_perm: tuple
    out_rank: int

    def sizes(self, kernel_labels: str, kernel_shape) -> tuple[list, list, list]:
        dims = dict(zip(kernel_labels, (int(d) for d in kernel_shape)))
        return [dims[c] for c in self.g], [dims[c] for c in self.p], [dims[c] for c in self.o]


def einsum_layout(equation: str, input_rank: int) -> EinsumLayout | None:
    """The :class:`EinsumLayout` of ``equation`` for an input of ``input_rank``, or None when
    the rule does not cover it (the kernel then falls back to per-example gradients)."""
    eq = equation.replace(" ", "")
    try:
        lhs, out = eq.split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        return None
    if "..." in ker:
        return None
    if "..." in inp or "..." in out:
        used = set(inp + ker + out)
        fresh = [c for c in string.ascii_letters if c not in used]
        n = input_rank - (len(inp) - 3)
        if n < 0 or inp.count("...") != 1 or out.count("...") != 1 or n > len(fresh):
            return None
        inp, out = inp.replace("...", "".join(fresh[:n])), out.replace("...", "".join(fresh[:n]))
    if (len(inp) != input_rank or any(len(set(s)) != len(s) for s in (inp, ker, out))
            or not inp or not out or inp[0] != out[0] or inp[0] in ker
            or not set(ker) <= set(inp) | set(out) or not set(out) <= set(inp) | set(ker)):
        return None
    batch = inp[0]
    t = "".join(c for c in inp[1:] if c in out and c not in ker)
    g = "".join(c for c in ker if c in inp and c in out)
    p = "".join(c for c in ker if c in inp and c not in out)
    o = "".join(c for c in ker if c in out and c not in inp)
    order = g + p + o
    return EinsumLayout(to_a=f"{inp}->{batch}{t}{g}{p}", to_d=f"{out}->{batch}{t}{g}{o}",
                        g=g, p=p, o=o, kernel_perm=tuple(order.index(c) for c in ker),
                        out_rank=len(out))


def _kernel_labels(equation: str) -> str:
    return equation.replace(" ", "").split("->")[0].split(",")[1]


@dataclasses.dataclass
class EinsumKernelPiece(gr.KernelPiece):
    """A KernelPiece whose [G, P, O] sum is reshaped to [G.., P.., O..] and transposed to the
    kernel's label order."""

    split: tuple = ()
    perm: tuple = ()

    def to_variable(self, summed: tf.Tensor) -> tf.Tensor:
        return tf.transpose(tf.reshape(summed, self.split), self.perm)


def _bias_grads(bias, records, batch) -> tf.Tensor:
    """[B, *bias.shape]: Σ over the positions each bias entry is broadcast to (right-aligned)."""
    shape = [int(d) for d in bias.shape]
    total = 0.0
    for r in records:
        dz = tf.cast(r["dz"], tf.float32)
        rank = dz.shape.rank
        full = [1] * (rank - len(shape)) + shape
        axes = [a for a in range(1, rank) if full[a] == 1]
        summed = tf.reduce_sum(dz, axis=axes, keepdims=True) if axes else dz
        summed = tf.reshape(summed, [batch, -1] + shape)
        total = total + tf.reduce_sum(summed, axis=1)
    return total


class EinsumDenseRule(gr.Rule):
    layer_type = keras.layers.EinsumDense

    @staticmethod
    def _layout(layer) -> EinsumLayout | None:
        return einsum_layout(layer.equation, layer.input_spec.ndim)

    def variables(self, layer):
        layout = self._layout(layer) if plain_layer(layer) else None
        if layout is None:
            return []
        bias = getattr(layer, "bias", None)
        # The bias is right-aligned with the output and must not reach its batch axis.
        bias = bias if bias is not None and len(bias.shape) < layout.out_rank else None
        return [v for v in (layer.kernel, bias) if v is not None]

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        z = add_bias(keras.ops.einsum(layer.equation, inputs, layer.kernel),
                     getattr(layer, "bias", None))
        capture.record(layer, z, x=inputs)
        return activate(layer, z)

    def pieces(self, layer, records, batch, wanted, mode):
        out = []
        bias = getattr(layer, "bias", None)
        if bias is not None and id(bias) in wanted and any(
                v is bias for v in self.variables(layer)):
            out.append(gr.PerExample(bias, _bias_grads(bias, records, batch)))
        kernel = layer.kernel
        if id(kernel) in wanted:
            labels = _kernel_labels(layer.equation)
            layout = einsum_layout(layer.equation, records[0]["x"].shape.rank)
            gs, ps, os_ = layout.sizes(labels, kernel.shape)
            g, p, o = math.prod(gs), math.prod(ps), math.prod(os_)

            def rows(key, spec, last):
                return gr._concat(records, key, lambda r: tf.reshape(
                    tf.einsum(spec, tf.cast(r[key], tf.float32)), [batch, -1, g, last]))

            piece = gl.LinearPiece(kernel, rows("x", layout.to_a, p),
                                   rows("dz", layout.to_d, o), mode=mode)
            out.append(EinsumKernelPiece(piece, tuple(kernel.shape), split=tuple(gs + ps + os_),
                                         perm=layout.kernel_perm))
        return out


@dataclasses.dataclass
class GatherPiece:
    """Per-example gradients g_i = Σ_t e_{id_it} δ_itᵀ of a lookup table [V, D] (module doc).

    ids: [B, T] int; grads: [B, T, D] float32 (T: every lookup and view of example i).
    Same interface as ``ghost_linear.LinearPiece`` (is_large, sq_norms, weighted_sum).
    """

    variable: Any
    ids: tf.Tensor
    grads: tf.Tensor

    def _valid(self):
        rows = int(self.variable.shape[0])
        valid = (self.ids >= 0) & (self.ids < rows)
        return (tf.where(valid, self.ids, tf.zeros([], self.ids.dtype)),
                tf.where(valid[..., None], self.grads, tf.zeros([], self.grads.dtype)))

    def is_large(self) -> bool:
        return False

    def sq_norms(self, after: Sequence[tf.Tensor] = ()) -> tf.Tensor:
        """‖g_i‖² [B]: each example's δ rows sorted by id, rows of equal id summed (one segment
        per run of equal ids), then squared. Static output shapes, no tf.unique (XLA-safe);
        memory of δ. NaN stays in its own example."""
        ids, grads = self._valid()
        order = tf.argsort(ids, axis=1, stable=True)
        ids, grads = tf.gather(ids, order, batch_dims=1), tf.gather(grads, order, batch_dims=1)
        shape = tf.shape(ids)
        first = tf.ones_like(ids[:, :1], tf.bool)
        new_run = tf.concat([first, ids[:, 1:] != ids[:, :-1]], axis=1)
        segment = (tf.cumsum(tf.cast(new_run, tf.int32), axis=1) - 1
                   + tf.range(shape[0])[:, None] * shape[1])  # example i: i·T + run index
        summed = tf.math.unsorted_segment_sum(
            tf.reshape(grads, [-1, int(self.grads.shape[-1])]), tf.reshape(segment, [-1]),
            tf.size(ids))
        return tf.reduce_sum(tf.reshape(tf.reduce_sum(tf.square(summed), -1), shape), axis=1)

    def weighted_sum(self, factors: tf.Tensor, keep: tf.Tensor,
                     after: Sequence[tf.Tensor] = ()) -> tf.Tensor:
        """Σ_i factors_i g_i as [V, D] by one scatter-add; rows with keep False add exactly 0."""
        ids, grads = self._valid()
        grads = gl.zero_rows(grads, keep) * factors[:, None, None]
        return tf.math.unsorted_segment_sum(tf.reshape(grads, [-1, grads.shape[-1]]),
                                            tf.reshape(ids, [-1]), int(self.variable.shape[0]))


class TablePiece(gr.KernelPiece):
    """A KernelPiece whose piece already sums in the variable's layout."""

    def to_variable(self, summed: tf.Tensor) -> tf.Tensor:
        return summed


class EmbeddingRule(gr.Rule):
    layer_type = keras.layers.Embedding

    def variables(self, layer):
        return [layer.embeddings] if plain_layer(layer) else []

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        ids = tf.cast(inputs, tf.int32) if inputs.dtype not in (tf.int32, tf.int64) else inputs
        z = keras.ops.cast(keras.ops.take(layer.embeddings, ids, axis=0), layer.compute_dtype)
        capture.record(layer, z, ids=ids)
        return z

    def pieces(self, layer, records, batch, wanted, mode):
        table = layer.embeddings
        if id(table) not in wanted:
            return []
        ids = tf.concat([tf.reshape(r["ids"], [batch, -1]) for r in records], axis=1)
        grads = gr._concat(records, "dz", lambda r: gl.per_example_rows(r["dz"], batch))
        return [TablePiece(GatherPiece(table, ids, grads), tuple(table.shape))]


RULES: list[gr.Rule] = [EinsumDenseRule(), EmbeddingRule()]
"""Tried by ``ghost_registry.rule_for`` after the other rule lists."""
