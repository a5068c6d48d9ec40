"""Per-example kernel gradients of a depthwise convolution, without im2col patches.

A DepthwiseConv2D with kernel W [kh, kw, C, M] computes, per example row n,

    z[n, y, x, c·M + m] = Σ_{dy, dx} xp[n, y·s_h + dy·d_h, x·s_w + dx·d_w, c] · W[dy, dx, c, m]

(xp = the input padded as TensorFlow pads it, s = strides, d = dilation), so the per-example
gradient is, for each kernel offset (dy, dx),

    G_i[dy, dx, c, m] = Σ_{rows n of example i} Σ_{y, x} xp[n, y·s_h + dy·d_h, x·s_w + dx·d_w, c]
                                                     · δ[n, y, x, c·M + m],

one element-wise product of a shifted input window with δ and a sum over the output pixels:
kh·kw·B·H'·W'·C·M multiply-adds, the cost of the forward depthwise convolution itself. The
strided windows are read as contiguous slices of the input reshaped to
[n, H/s_h, s_h, W/s_w, s_w, C] (offset o = q·s + r → phase r, rows q .. q + H' − 1): strided
slices were 5–10× slower on this CPU.

Measured on the 2-core CPU of docs/benchmarks.md (B = 32, 3×3 kernel, M = 1), against im2col
patches [B, T, C, 9] followed by a batched matmul (the Conv2D rule's direct route) or an
element-wise product with δ and a sum over T:

| input, C, stride | this | patches + matmul | patches · δ |
|---|---|---|---|
| 16×16, 32, 1 | 2.3–2.8 ms | 23–36 ms | 11–25 ms |
| 16×16, 96, 2 | 2.5 ms | 19–35 ms | 8–10 ms |
| 8×8, 144, 1 | 2.6 ms | 28–72 ms | 23–55 ms |
| 8×8, 192, 2 | 1.7 ms | 5 ms | 4–6 ms |
| 32×32, 64, 1 | 17 ms | 376–482 ms | 238–329 ms |

Gram ("ghost") norms never pay for a depthwise kernel: P·O = kh·kw·M per channel is tiny, so
``ghost_linear.choose_mode`` picks this direct route under conv_mode="auto".
"""

from __future__ import annotations

import tensorflow as tf


def _same_padding(size: int, out: int, kernel: int, stride: int, dilation: int) -> tuple:
    """(before, after) padding of TensorFlow's "SAME" along one axis."""
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def depthwise_per_example_gradients(x: tf.Tensor, dz: tf.Tensor, kernel_size, strides,
                                    padding: str, dilation, rows_per_example: int) -> tf.Tensor:
    """Per-example kernel gradients of a depthwise conv as [n, C, kh·kw, M] (see module doc).

    x: [n·R, H, W, C] layer inputs; dz: [n·R, H', W', C·M] = ∂L/∂(conv output); the R rows of
    an example (augmentation views) are summed. Static spatial shapes are required. The
    [C, kh·kw, M] layout is the grouped [G, P, O_g] layout of ``ghost_linear`` with G = C.
    """
    x, dz = tf.cast(x, tf.float32), tf.cast(dz, tf.float32)
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    h, w, c = (int(d) for d in x.shape[1:])
    ho, wo = int(dz.shape[1]), int(dz.shape[2])
    m = int(dz.shape[-1]) // c
    top, left = 0, 0
    if padding.upper() == "SAME":
        top = _same_padding(h, ho, kh, sh, dh)[0]
        left = _same_padding(w, wo, kw, sw, dw)[0]
    # Enough phase rows/cols for every offset: q = (dy·d) // s ranges up to ((k−1)·d) // s.
    hq, wq = ho + ((kh - 1) * dh) // sh + 1, wo + ((kw - 1) * dw) // sw + 1
    pad_h, pad_w = max(hq * sh - h - top, 0), max(wq * sw - w - left, 0)
    xp = tf.pad(x, [[0, 0], [top, pad_h], [left, pad_w], [0, 0]])[:, :hq * sh, :wq * sw]
    xp = tf.reshape(xp, [-1, hq, sh, wq, sw, c])
    d = tf.reshape(dz, [-1, ho, wo, c, m])
    offsets = []
    for dy in range(kh):
        qy, ry = divmod(dy * dh, sh)
        for dx in range(kw):
            qx, rx = divmod(dx * dw, sw)
            window = xp[:, qy:qy + ho, ry, qx:qx + wo, rx, :]  # [n·R, H', W', C]
            offsets.append(tf.reduce_sum(window[..., None] * d, axis=[1, 2]))  # [n·R, C, M]
    g = tf.stack(offsets, axis=2)  # [n·R, C, kh·kw, M]
    if rows_per_example > 1:
        g = tf.reduce_sum(tf.reshape(g, [-1, rows_per_example, c, kh * kw, m]), axis=1)
    return g
