"""Per-layer rules of ghost clipping: how a layer is run while its tensors are recorded, and how
its variables' per-example gradients (norms and weighted sums) follow from them.

A rule replaces the layer's ``call`` during the one batched forward pass of
:func:`tfdpfair.privacy.ghost_clipping.ghost_clipped_grad_sum`. It computes the same output
(up to float rounding) while recording the layer input and *watching* the pre-activation
output z on the gradient tape; after the backward pass of L = Σ_i l_i each record holds
``dz`` = ∂L/∂z, whose row i is ∂l_i/∂z_i (no example mixing). From these each rule returns
"pieces": a :class:`~tfdpfair.privacy.ghost_linear.LinearPiece` for a weight matrix (norm by
ghost/direct, sum by book-keeping), or a :class:`PerExample` [B, *shape] gradient for small
variables (biases, gains, normalisation affine parameters), materialised outright.

Rules match the exact class (a subclass may override ``call``):

  Dense           kernel (LinearPiece, any input rank) and bias      (no LoRA / quantisation)
  Conv2D          kernel (grouped LinearPiece over im2col patches) and bias
                  (channels_last, no LoRA / quantisation; dilation and groups supported)
  WSConv2D        raw kernel (exact standardisation Jacobian, :class:`WSProjection`), gain, bias
  GroupNormalization, LayerNormalization   gamma, beta (batch axis not normalised)
  NFBlock         skip_gain (a scalar SkipInit gain; the block's sub-layers have their own rules)
  WideResNetBlock skip_gain (use_skip_init=True)

Stock Keras layers beyond these have rules in :mod:`tfdpfair.privacy.ghost_rules_keras`
(DepthwiseConv2D, SeparableConv2D, Conv1D) and :mod:`tfdpfair.privacy.ghost_rules_tokens`
(EinsumDense, Embedding); :mod:`tfdpfair.privacy.ghost_registry` tries them all. A piece's
weighted sum is put into the variable's layout by ``KernelPiece.to_variable`` (HWIO here;
other layouts override it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import keras
import tensorflow as tf

from tfdpfair.models import canary_slots
from tfdpfair.models import layers as tfdp_layers
from tfdpfair.models import nfnet, wide_resnet
from tfdpfair.privacy import ghost_linear as gl


@dataclasses.dataclass
class PerExample:
    """Materialised per-example gradients of one (small) variable: [B, *variable.shape]."""

    variable: Any
    grads: tf.Tensor


@dataclasses.dataclass
class KernelPiece:
    """A LinearPiece plus the map from its [G, P, O] gradient to the variable's shape."""

    piece: gl.LinearPiece
    shape: tuple

    @property
    def variable(self):
        return self.piece.variable

    def to_variable(self, summed: tf.Tensor) -> tf.Tensor:
        """The piece's weighted sum ([G, P, O] for a LinearPiece) in the variable's layout
        (HWIO for convs and Dense); subclasses with other layouts override this."""
        return gl.grouped_to_kernel(summed, self.shape)


def _concat(records: list[dict], key: str, fn: Callable[[Any], tf.Tensor]) -> tf.Tensor:
    """fn(record) of every call of the layer, concatenated along the position axis T."""
    parts = [fn(r) for r in records]
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)


def _fan_in(kernel) -> int:
    """P = kh·kw·C/G of an HWIO conv kernel [kh, kw, C/G, O]."""
    return int(kernel.shape[0] * kernel.shape[1] * kernel.shape[2])


def _positions_sum(x: tf.Tensor, batch) -> tf.Tensor:
    """[B·R, ..., C] -> [B, C]: the sum over every position (and view) of each example."""
    return tf.reduce_sum(gl.per_example_rows(x, batch), axis=1)


class Rule:
    """Base class: ``variables`` it covers, ``forward`` (recording), ``pieces``."""

    layer_type: type = type(None)

    def matches(self, layer) -> bool:
        return type(layer) is self.layer_type

    def variables(self, layer) -> list:
        raise NotImplementedError

    def forward(self, layer, original: Callable, capture, *args, **kwargs):
        raise NotImplementedError

    def pieces(self, layer, records: list[dict], batch, wanted: set, mode: str) -> list:
        raise NotImplementedError


def _patch_rows(records: list[dict], batch, kernel_size, strides, padding, groups,
                dilation=(1, 1)) -> gl.RowsFn:
    """rows(i0, i1) -> the grouped im2col patches [i1 − i0, T, G, P] of examples i0..i1 over
    every call of the layer (its input rows are example-major: R = rows per example)."""

    def rows(i0, i1):
        parts = []
        for r in records:
            x, n = r["x"], batch
            if i0 is not None:
                views = int(x.shape[0]) // batch
                x, n = x[i0 * views:i1 * views], i1 - i0
            parts.append(gl.grouped_patches(x, kernel_size, strides, padding, groups, n,
                                            dilation))
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

    return rows


def _native_per_example(records: list[dict], batch, kernel_shape, strides, padding, groups,
                        scale_dz: Callable[[tf.Tensor], tf.Tensor]) -> gl.RowsFn | None:
    """per_example(i0, i1) -> [n, G, P, O_g] kernel gradients of examples i0..i1, summed over
    the layer's calls, by gl.conv_per_example_gradients; None unless all shapes are static."""
    static = isinstance(batch, int) and all(
        r["x"].shape.is_fully_defined() and r["dz"].shape.is_fully_defined() for r in records)
    if not static or not gl.native_grouped_backprop_supported():
        return None  # im2col patches instead

    def per_example(i0, i1):
        total = None
        for r in records:
            views = int(r["x"].shape[0]) // batch
            rows = slice(None) if i0 is None else slice(i0 * views, i1 * views)
            g = gl.conv_per_example_gradients(r["x"][rows], scale_dz(r["dz"][rows]),
                                              kernel_shape, strides, padding, groups, views)
            total = g if total is None else total + g
        return total

    return per_example


def _native_weighted_sum(records: list[dict], kernel_shape, strides, padding, groups):
    """weighted(factors, keep) -> Σ_i factors_i·G_i [G, P, O_g] over the layer's calls, by one
    batched native kernel gradient per call (gl.conv_weighted_sum); None for a grouped kernel
    where this TensorFlow has no grouped Conv2DBackpropFilter."""
    if groups > 1 and not gl.native_grouped_backprop_supported():
        return None

    def weighted(factors, keep):
        return sum(gl.conv_weighted_sum(r["x"], r["dz"], factors, keep, kernel_shape, strides,
                                        padding, groups) for r in records)

    return weighted


def _bias_piece(var, records, batch, wanted):
    if var is None or id(var) not in wanted:
        return []
    grads = sum(_positions_sum(r["dz"], batch) for r in records)
    return [PerExample(var, grads)]


class DenseRule(Rule):
    layer_type = keras.layers.Dense

    def variables(self, layer):
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return []
        return [v for v in (layer.kernel, layer.bias) if v is not None]

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        z = keras.ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            z = keras.ops.add(z, layer.bias)
        capture.record(layer, z, a=inputs)
        return layer.activation(z) if layer.activation is not None else z

    def pieces(self, layer, records, batch, wanted, mode):
        out = _bias_piece(layer.bias, records, batch, wanted)
        if id(layer.kernel) in wanted:
            a = _concat(records, "a", lambda r: gl.per_example_rows(r["a"], batch)[:, :, None])
            d = _concat(records, "dz", lambda r: gl.per_example_rows(r["dz"], batch)[:, :, None])
            out.append(KernelPiece(gl.LinearPiece(layer.kernel, a, d, mode=mode),
                                   tuple(layer.kernel.shape)))
        return out


class Conv2DRule(Rule):
    layer_type = keras.layers.Conv2D

    def variables(self, layer):
        if (layer.data_format != "channels_last" or getattr(layer, "lora_enabled", False)
                or getattr(layer, "quantization_mode", None)):
            return []
        return [v for v in (layer.kernel, layer.bias) if v is not None]

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        z = layer.convolution_op(inputs, layer.kernel)
        if layer.use_bias:
            z = keras.ops.add(z, keras.ops.reshape(layer.bias, (1, 1, 1, layer.filters)))
        capture.record(layer, z, x=inputs)
        return layer.activation(z) if layer.activation is not None else z

    def pieces(self, layer, records, batch, wanted, mode):
        out = _bias_piece(layer.bias if layer.use_bias else None, records, batch, wanted)
        if id(layer.kernel) in wanted:
            g = layer.groups
            a = _patch_rows(records, batch, layer.kernel_size, layer.strides, layer.padding, g,
                            layer.dilation_rate)
            d = _concat(records, "dz", lambda r: gl.grouped_rows(r["dz"], g, batch))
            native = weighted = None
            if tuple(layer.dilation_rate) == (1, 1):
                native = _native_per_example(records, batch, layer.kernel.shape, layer.strides,
                                             layer.padding, g, lambda dz: dz)
                weighted = _native_weighted_sum(records, layer.kernel.shape, layer.strides,
                                                layer.padding, g)
            out.append(KernelPiece(gl.LinearPiece(layer.kernel, a, d, mode=mode,
                                                  fan_in=_fan_in(layer.kernel),
                                                  per_example=native, weighted_native=weighted),
                                   tuple(layer.kernel.shape)))
        return out


class WSConv2DRule(Rule):
    """z = conv(x, u)·gain + bias with u the gain-free standardised kernel (same maths as
    WSConv2D.call, which convolves with gain·u). Kernel gradient: docs/ghost_clipping.md."""

    layer_type = tfdp_layers.WSConv2D

    def variables(self, layer):
        return [layer.kernel, layer.gain, layer.bias]

    @staticmethod
    def _standardisation(layer):
        # The layer's own moments (same ops), so u and the floor agree with WSConv2D.call.
        centred, var_n = tfdp_layers.standardization_moments(
            tf.cast(tf.convert_to_tensor(layer.kernel), tf.float32))  # c [.., O], N·var_o [O]
        u = centred * tf.math.rsqrt(tf.maximum(var_n, layer.eps))
        # tf.maximum sends the gradient to its first argument on ties: floor inactive iff N·var ≥ eps.
        active = tf.cast(var_n >= layer.eps, tf.float32)
        return u, tf.maximum(var_n, layer.eps), active

    @staticmethod
    def _conv(layer, x, u):
        """conv(x, u) in x's dtype, grouped as WSConv2D.call does."""
        pad, stride, uk = layer.padding.upper(), layer.strides, tf.cast(u, x.dtype)
        if layer.groups == 1:
            return tf.nn.conv2d(x, uk, stride, pad)
        return tf.concat([tf.nn.conv2d(xg, ug, stride, pad) for xg, ug in zip(
            tf.split(x, layer.groups, -1), tf.split(uk, layer.groups, -1))], axis=-1)

    def _t32(self, layer, record):
        """t = conv(x, u) in float32. Under a bf16 policy the forward's t is rounded to bf16;
        the norm's closed form (uᵀh from t) must match the float32 projection of the summed
        gradient, so t is recomputed from the recorded x in float32 (sensitivity)."""
        if record["t"].dtype == tf.float32:
            return record["t"]
        return self._conv(layer, tf.cast(record["x"], tf.float32), record["u"])

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        u, s, active = self._standardisation(layer)
        x = tf.convert_to_tensor(inputs)
        t = self._conv(layer, x, u)
        z = t * tf.cast(layer.gain, t.dtype) + tf.cast(layer.bias, t.dtype)
        capture.record(layer, z, x=x, t=t, u=u, s=s, active=active)
        return z

    def pieces(self, layer, records, batch, wanted, mode):
        out = _bias_piece(layer.bias, records, batch, wanted)
        if id(layer.gain) in wanted:
            grads = sum(_positions_sum(tf.cast(r["t"], tf.float32) * tf.cast(r["dz"], tf.float32),
                                       batch) for r in records)
            out.append(PerExample(layer.gain, grads))
        if id(layer.kernel) in wanted:
            g, k = layer.groups, layer.kernel_size
            first = records[0]
            scale = tf.cast(layer.gain, tf.float32) * tf.math.rsqrt(first["s"])  # [O]
            a = _patch_rows(records, batch, (k, k), (layer.strides,) * 2, layer.padding, g)
            # ∂L/∂u = (∂L/∂z)·gain/√s per channel: the scale is applied to the products
            # (LinearPiece.out_scale), not to a kept copy of ∂L/∂z.
            d = _concat(records, "dz", lambda r: gl.grouped_rows(r["dz"], g, batch))
            tu = _concat(records, "t", lambda r: gl.grouped_rows(self._t32(layer, r), g, batch))
            ws = gl.WSProjection(
                u=gl.kernel_to_grouped(first["u"], g),
                active=tf.reshape(first["active"], [g, -1]),
                asum=_concat(records, "x", lambda r: gl.window_sums(
                    r["x"], (k, k), (layer.strides,) * 2, layer.padding, g, batch)), tu=tu)
            strides = (layer.strides,) * 2
            native = _native_per_example(records, batch, layer.kernel.shape, strides,
                                         layer.padding, g, lambda dz: dz)
            weighted = _native_weighted_sum(records, layer.kernel.shape, strides, layer.padding,
                                            g)
            out.append(KernelPiece(gl.LinearPiece(layer.kernel, a, d, ws=ws, mode=mode,
                                                  fan_in=_fan_in(layer.kernel),
                                                  per_example=native, weighted_native=weighted,
                                                  out_scale=tf.reshape(scale, [g, -1])),
                                   tuple(layer.kernel.shape)))
        return out


class NormAffineRule(Rule):
    """y = x̂·gamma + beta, with x̂ the layer's own output for gamma = 1, beta = 0 (substituted
    through ``keras.StatelessScope``, so the normalisation code itself is not duplicated)."""

    def __init__(self, layer_type):
        self.layer_type = layer_type

    @staticmethod
    def _axes(layer, rank):
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return sorted(a % rank for a in axes)

    def variables(self, layer):
        params = [v for v in (getattr(layer, "gamma", None), getattr(layer, "beta", None))
                  if v is not None]
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return [] if 0 in axes else params

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        gamma, beta = getattr(layer, "gamma", None), getattr(layer, "beta", None)
        mapping = [(v, keras.ops.ones(v.shape, v.dtype)) for v in (gamma,) if v is not None]
        mapping += [(v, keras.ops.zeros(v.shape, v.dtype)) for v in (beta,) if v is not None]
        with keras.StatelessScope(mapping):
            xhat = original(inputs, *args, **kwargs)
        rank = len(xhat.shape)
        axes = self._axes(layer, rank)
        shape = [xhat.shape[a] if a in axes else 1 for a in range(rank)]
        z = xhat
        if gamma is not None:
            z = z * keras.ops.reshape(keras.ops.cast(gamma, z.dtype), shape)
        if beta is not None:
            z = z + keras.ops.reshape(keras.ops.cast(beta, z.dtype), shape)
        capture.record(layer, z, xhat=xhat, axes=axes)
        return z

    def pieces(self, layer, records, batch, wanted, mode):
        out = []
        for var, factor in ((getattr(layer, "gamma", None), "xhat"),
                            (getattr(layer, "beta", None), None)):
            if var is None or id(var) not in wanted:
                continue
            total = 0.0
            for r in records:
                prod = tf.cast(r["dz"], tf.float32)
                if factor:
                    prod = prod * tf.cast(r[factor], tf.float32)
                rank, axes = len(prod.shape), r["axes"]
                prod = tf.reduce_sum(prod, [a for a in range(1, rank) if a not in axes])
                prod = tf.reshape(prod, [batch, -1] + list(var.shape))
                total = total + tf.reduce_sum(prod, axis=1)
            out.append(PerExample(var, total))
        return out


def _skip_gain_pieces(layer, records, batch, wanted, alpha):
    if id(layer.skip_gain) not in wanted:
        return []
    grads = 0.0
    for r in records:
        prod = tf.cast(r["r"], tf.float32) * tf.cast(r["dz"], tf.float32)
        grads = grads + alpha * tf.reduce_sum(tf.reshape(prod, [batch, -1]), axis=1)
    return [PerExample(layer.skip_gain, grads)]


class NFBlockRule(Rule):
    """NFBlock.call with the residual branch r recorded: y = r·(skip_gain·α) + shortcut, so
    ∂l_i/∂skip_gain = α·Σ r_i·δ_i (NFBlock.branch_and_shortcut gives r and the shortcut)."""

    layer_type = nfnet.NFBlock

    def variables(self, layer):
        return [layer.skip_gain]

    def forward(self, layer, original, capture, inputs, training=None, **kwargs):
        branch, shortcut = layer.branch_and_shortcut(inputs, training=training)
        z = branch * (layer.skip_gain * layer.alpha) + shortcut
        capture.record(layer, z, r=branch)
        return z

    def pieces(self, layer, records, batch, wanted, mode):
        return _skip_gain_pieces(layer, records, batch, wanted, layer.alpha)


class WideResNetBlockRule(Rule):
    """WideResNetBlock.call (use_skip_init=True) with the residual branch recorded."""

    layer_type = wide_resnet.WideResNetBlock

    def variables(self, layer):
        return [layer.skip_gain] if layer.use_skip_init else []

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        branch, skip = layer.branch_and_shortcut(inputs)
        z = branch * layer.skip_gain + skip
        capture.record(layer, z, r=branch)
        return z

    def pieces(self, layer, records, batch, wanted, mode):
        return _skip_gain_pieces(layer, records, batch, wanted, 1.0)


RULES: list[Rule] = [
    DenseRule(), Conv2DRule(), WSConv2DRule(),
    NormAffineRule(keras.layers.GroupNormalization),
    NormAffineRule(keras.layers.LayerNormalization),
    NFBlockRule(), WideResNetBlockRule(),
]
"""The rules tried, in order, for every layer (first ``matches`` wins)."""


def rule_for(layer) -> Rule | None:
    """The rule of :data:`RULES` for ``layer``'s exact class, or None (every rule, the stock
    Keras layers' too: :func:`tfdpfair.privacy.ghost_registry.rule_for`)."""
    for rule in RULES:
        if rule.matches(layer):
            return rule
    return None


class CanarySlotsRule(Rule):
    """CanarySlots (models/canary_slots.py): identity whose ``slots`` the call never reads, so
    every example's gradient on them is exactly zero. Nothing is recorded and no piece is
    returned, so ghost_clipped_grad_sum gives the slots a zero norm share and a zero sum."""

    layer_type = canary_slots.CanarySlots

    def variables(self, layer):
        return [layer.slots]

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        return original(inputs, *args, **kwargs)

    def pieces(self, layer, records, batch, wanted, mode):
        return []


RULES.append(CanarySlotsRule())
