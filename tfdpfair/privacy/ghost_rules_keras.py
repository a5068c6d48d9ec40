"""Ghost-clipping rules for stock Keras layers beyond Dense / Conv2D / normalisation.

Registered in :func:`tfdpfair.privacy.ghost_registry.rule_for` (same :class:`Rule` interface,
exact class match, channels_last only; LoRA / quantised layers have no rule and fall back):

  DepthwiseConv2D  kernel [kh, kw, C, M] as a grouped conv with G = C groups (P = kh·kw,
                   O_g = M); direct per-example gradients from shifted input windows
                   (:mod:`tfdpfair.privacy.ghost_depthwise`); bias. Strides, dilation, both
                   paddings, depth_multiplier.
  SeparableConv2D  depthwise kernel (as DepthwiseConv2D, on ∂L/∂u with u the depthwise output),
                   pointwise kernel [1, 1, C·M, F] (a Dense on the positions of u), bias.
  Conv1D           kernel [k, C/G, F] as a Conv2D of height 1 (patches; any padding incl.
                   "causal", strides, dilation, groups), bias.
  EinsumDense, Embedding   :mod:`tfdpfair.privacy.ghost_rules_tokens`.

Every rule records its input and watches its pre-activation output z (SeparableConv2D also the
intermediate u), so the pieces are those of ``ghost_linear.LinearPiece`` (norms by ghost Gram
matrices or direct per-example gradients, book-keeping sums) or materialised small variables.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfdpfair.privacy import ghost_linear as gl
from tfdpfair.privacy import ghost_rules as gr
from tfdpfair.privacy.ghost_depthwise import depthwise_per_example_gradients


def plain_layer(layer) -> bool:
    """No LoRA / quantisation, and channels_last where the layer has a data_format (the rules
    re-implement only the plain call)."""
    return (getattr(layer, "data_format", "channels_last") == "channels_last"
            and not getattr(layer, "lora_enabled", False)
            and not getattr(layer, "quantization_mode", None))


def add_bias(z, bias):
    if bias is None:
        return z
    return keras.ops.add(z, keras.ops.cast(bias, z.dtype))


def activate(layer, z):
    return layer.activation(z) if layer.activation is not None else z


def _kernel_and_bias(layer) -> list:
    if not plain_layer(layer):
        return []
    return [v for v in (layer.kernel, layer.bias if layer.use_bias else None) if v is not None]


def _static(records, batch) -> bool:
    return isinstance(batch, int) and all(
        r["x"].shape.is_fully_defined() and r["dz"].shape.is_fully_defined() for r in records)


def _depthwise_piece(kernel, records, batch, layer, mode) -> gr.KernelPiece:
    """The KernelPiece of a depthwise kernel [kh, kw, C, M] from records with "x" (input) and
    "dz" (∂L/∂ depthwise output): a grouped linear map with G = C, P = kh·kw, O_g = M."""
    kh, kw, c, _ = (int(d) for d in kernel.shape)
    a = gr._patch_rows(records, batch, layer.kernel_size, layer.strides, layer.padding, c,
                       layer.dilation_rate)
    d = gr._concat(records, "dz", lambda r: gl.grouped_rows(r["dz"], c, batch))
    per_example = None
    if _static(records, batch):
        def per_example(i0, i1):
            total = None
            for r in records:
                views = int(r["x"].shape[0]) // batch
                rows = slice(None) if i0 is None else slice(i0 * views, i1 * views)
                g = depthwise_per_example_gradients(
                    r["x"][rows], r["dz"][rows], layer.kernel_size, layer.strides,
                    layer.padding, layer.dilation_rate, views)
                total = g if total is None else total + g
            return total
    return gr.KernelPiece(gl.LinearPiece(kernel, a, d, mode=mode, fan_in=kh * kw,
                                         per_example=per_example), tuple(kernel.shape))


def _depthwise(layer, x, kernel):
    return keras.ops.depthwise_conv(x, kernel, strides=layer.strides, padding=layer.padding,
                                    dilation_rate=layer.dilation_rate)


class DepthwiseConv2DRule(gr.Rule):
    layer_type = keras.layers.DepthwiseConv2D

    def variables(self, layer):
        return _kernel_and_bias(layer)

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        z = add_bias(_depthwise(layer, inputs, layer.kernel),
                      layer.bias if layer.use_bias else None)
        capture.record(layer, z, x=inputs)
        return activate(layer, z)

    def pieces(self, layer, records, batch, wanted, mode):
        out = gr._bias_piece(layer.bias if layer.use_bias else None, records, batch, wanted)
        if id(layer.kernel) in wanted:
            out.append(_depthwise_piece(layer.kernel, records, batch, layer, mode))
        return out


class SeparableConv2DRule(gr.Rule):
    """u = depthwise(x) (recorded and watched), z = u·pointwise + bias: two records per call,
    told apart by their "x" (depthwise input) or "u" (pointwise input) entry."""

    layer_type = keras.layers.SeparableConv2D

    def variables(self, layer):
        if not plain_layer(layer):
            return []
        return [v for v in (layer.depthwise_kernel, layer.pointwise_kernel,
                            layer.bias if layer.use_bias else None) if v is not None]

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        u = _depthwise(layer, inputs, layer.depthwise_kernel)
        capture.record(layer, u, x=inputs)  # watched before z is computed from it
        z = keras.ops.conv(u, layer.pointwise_kernel, strides=1, padding="valid")
        z = add_bias(z, layer.bias if layer.use_bias else None)
        capture.record(layer, z, u=u)
        return activate(layer, z)

    def pieces(self, layer, records, batch, wanted, mode):
        depthwise = [r for r in records if "x" in r]
        pointwise = [r for r in records if "u" in r]
        out = gr._bias_piece(layer.bias if layer.use_bias else None, pointwise, batch, wanted)
        if id(layer.depthwise_kernel) in wanted:
            out.append(_depthwise_piece(layer.depthwise_kernel, depthwise, batch, layer, mode))
        kernel = layer.pointwise_kernel
        if id(kernel) in wanted:
            a = gr._concat(pointwise, "u",
                           lambda r: gl.per_example_rows(r["u"], batch)[:, :, None])
            d = gr._concat(pointwise, "dz",
                           lambda r: gl.per_example_rows(r["dz"], batch)[:, :, None])
            out.append(gr.KernelPiece(gl.LinearPiece(kernel, a, d, mode=mode),
                                      tuple(kernel.shape)))
        return out


class Conv1DRule(gr.Rule):
    """A Conv1D as a Conv2D of height 1: x [n, L, C] is recorded as [n, 1, L, C] (after the
    left padding of "causal", which then convolves "valid"); kernel [k, C/G, F] = HWIO with
    kh = 1, so the Conv2D grouped patches and kernel layout apply unchanged."""

    layer_type = keras.layers.Conv1D

    def variables(self, layer):
        return _kernel_and_bias(layer)

    @staticmethod
    def _padding(layer) -> str:
        return "valid" if layer.padding == "causal" else layer.padding

    def forward(self, layer, original, capture, inputs, *args, **kwargs):
        x = inputs
        if layer.padding == "causal":
            x = keras.ops.pad(x, layer._compute_causal_padding())
        z = keras.ops.conv(x, layer.kernel, strides=list(layer.strides),
                           padding=self._padding(layer), dilation_rate=layer.dilation_rate)
        z = add_bias(z, layer.bias if layer.use_bias else None)
        capture.record(layer, z, x=keras.ops.expand_dims(x, 1))
        return activate(layer, z)

    def pieces(self, layer, records, batch, wanted, mode):
        out = gr._bias_piece(layer.bias if layer.use_bias else None, records, batch, wanted)
        kernel = layer.kernel
        if id(kernel) in wanted:
            groups = layer.groups
            a = gr._patch_rows(records, batch, (1, layer.kernel_size[0]),
                               (1, layer.strides[0]), self._padding(layer), groups,
                               (1, layer.dilation_rate[0]))
            d = gr._concat(records, "dz", lambda r: gl.grouped_rows(r["dz"], groups, batch))
            fan_in = int(kernel.shape[0] * kernel.shape[1])
            out.append(gr.KernelPiece(gl.LinearPiece(kernel, a, d, mode=mode, fan_in=fan_in),
                                      tuple(kernel.shape)))
        return out


RULES: list[gr.Rule] = [DepthwiseConv2DRule(), SeparableConv2DRule(), Conv1DRule()]
"""Rules for stock Keras layers, tried by ``ghost_registry.rule_for`` after ghost_rules.RULES."""
