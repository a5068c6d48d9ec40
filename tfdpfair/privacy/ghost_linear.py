"""Per-example gradient norms and weighted sums of (grouped) linear maps, without a backward pass.

A layer whose weight W (one [P, O] block per group g) acts on per-example rows as
z[i, t, g, :] = A[i, t, g, :] · W_g, with t running over the T positions of example i
(T = 1 for a Dense on vectors, T = H'·W' conv output pixels with A = im2col patches, times K
for K augmented views), has the per-example gradient

    G_i = Σ_t A[i, t]ᵀ D[i, t],        D[i, t] = ∂L/∂z[i, t],   L = Σ_j l_j,

because the models clipped here never mix examples (∂l_j/∂z[i] = 0 for j ≠ i). Its squared
Frobenius norm is computed either

* "ghost":  ‖G_i‖² = Σ_{t,s} (A_t·A_s)(D_t·D_s), from two T×T Gram matrices per example and
  group (memory 2T², time ≈ T²(P + O)); or
* "direct": G_i itself, [P, O] per example and group (memory P·O, time ≈ T·P·O).

``choose_mode`` picks ghost when T·(P + O) < P·O (fewer flops; it then also needs less
memory, since T < P·O/(P + O) implies 2T² < P·O/2) and the direct gradient would be large
(> DIRECT_MAX_ENTRIES per example), else direct. The clipped sum
Σ_i c_i G_i is one matmul over (i, t) with D scaled by c_i (book-keeping), or a tensordot of
the already materialised G_i in direct mode.

Weight-standardised kernels (:class:`WSProjection`) add the exact correction of the
standardisation Jacobian; the derivation is in docs/ghost_clipping.md.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tfdpfair.models.layers import extract_patches

GHOST, DIRECT, AUTO = "ghost", "direct", "auto"


@dataclasses.dataclass
class WSProjection:
    """The standardisation Jacobian of a WS kernel, per group g and output channel o.

    u: [G, P, O] the standardised kernel without gain, (w − mean)/sqrt(max(N·var, eps)).
    active: [G, O] 1.0 where the floor is inactive (N·var ≥ eps, so ‖u‖ = 1), else 0.0.
    fan_in: N = P.
    The A/D of the :class:`LinearPiece` are then taken with respect to u and scaled by
    1/sqrt(max(N·var, eps)) per channel, so that the kernel gradient is P_o(h) = h −
    active·u(uᵀh) − mean_p(h) per channel (``project``).
    ``asum`` [B, T, G] = Σ_p A and ``tu`` [B, T, G, O] = A·u give the per-example norm of the
    projected gradient in closed form (both modes), so no per-example gradient is projected.
    """

    u: tf.Tensor
    active: tf.Tensor
    asum: tf.Tensor | None = None
    tu: tf.Tensor | None = None

    def project(self, h: tf.Tensor) -> tf.Tensor:
        """h [..., G, P, O] -> h − active·u·(uᵀh) − mean_p(h), per (g, o)."""
        uh = tf.reduce_sum(self.u * h, axis=-2, keepdims=True)
        return h - self.active[:, None, :] * self.u * uh - tf.reduce_mean(h, -2, keepdims=True)


@dataclasses.dataclass
class LinearPiece:
    """Per-example gradient Σ_t A[i,t]ᵀ D[i,t] of one variable (see the module docstring).

    A: [B, T, G, P]; D: [B, T, G, O]; ``to_variable`` maps a [G, P, O] (or [B, G, P, O])
    gradient to the variable's shape (e.g. HWIO kernel layout).
    """

    variable: object
    A: tf.Tensor
    D: tf.Tensor
    ws: WSProjection | None = None
    mode: str = AUTO
    _per_example: tf.Tensor | None = None  # [B, G, P, O] in direct mode after sq_norms (unprojected)

    def dims(self) -> tuple[int | None, int, int]:
        return self.A.shape[1], int(self.A.shape[-1]), int(self.D.shape[-1])

    def resolved_mode(self) -> str:
        if self.mode != AUTO:
            return self.mode
        return choose_mode(*self.dims(), groups=int(self.A.shape[2]))

    def sq_norms(self) -> tf.Tensor:
        """‖∂l_i/∂variable‖² for every example, shape [B] (NaN stays NaN)."""
        A, D = self.A, self.D
        t = A.shape[1]
        if self.ws is None and t == 1:  # rank-2 Dense: ‖a_i‖²·‖δ_i‖² per group
            return tf.reduce_sum(tf.reduce_sum(A * A, -1) * tf.reduce_sum(D * D, -1), [1, 2])
        a, d = group_major(A), group_major(D)  # [B, G, T, P], [B, G, T, O]
        if self.resolved_mode() == DIRECT:
            g = tf.linalg.matmul(a, d, transpose_a=True)  # [B, G, P, O], before any WS projection
            self._per_example = g
            sq = tf.reduce_sum(tf.square(g), [1, 2, 3])
        else:
            sq = tf.reduce_sum(tf.linalg.matmul(a, a, transpose_b=True)
                               * tf.linalg.matmul(d, d, transpose_b=True), [1, 2, 3])
        return sq if self.ws is None else self._standardisation_correction(sq, d)

    def _standardisation_correction(self, sq: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
        """‖P(h_i)‖² from ‖h_i‖² (docs/ghost_clipping.md): per (g, o), subtract
        (Σ_p h)²/N and active·(uᵀh)², both formed from A's row sums and A·u, never from h."""
        ws = self.ws
        fan_in = float(self.A.shape[-1])
        hsum = tf.linalg.matmul(group_major(ws.asum[..., None]), d,
                                transpose_a=True)[:, :, 0]  # Σ_p h[p, o]: [B, G, O]
        uh = tf.reduce_sum(ws.tu * self.D, axis=1)  # uᵀh per (g, o)
        sq = sq - tf.reduce_sum(tf.square(hsum), [1, 2]) / fan_in \
            - tf.reduce_sum(ws.active * tf.square(uh), [1, 2])
        return tf.where(sq < 0.0, tf.zeros_like(sq), sq)  # rounding; keeps NaN

    def weighted_sum(self, factors: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
        """Σ_i factors_i · G_i as [G, P, O]; rows with keep = False contribute exactly 0."""
        if self._per_example is not None:
            h = tf.tensordot(factors, zero_rows(self._per_example, keep), axes=[[0], [0]])
        else:
            A = zero_rows(self.A, keep)
            D = zero_rows(self.D, keep) * factors[:, None, None, None]
            # One [P, B·T] x [B·T, O] product per group: examples and positions are contracted.
            a = tf.transpose(tf.reshape(A, [-1] + A.shape[2:].as_list()), [1, 0, 2])
            d = tf.transpose(tf.reshape(D, [-1] + D.shape[2:].as_list()), [1, 0, 2])
            h = tf.linalg.matmul(a, d, transpose_a=True)
        # The standardisation Jacobian is the same for every example: Σ c_i·P(h_i) = P(Σ c_i·h_i).
        return h if self.ws is None else self.ws.project(h)


def group_major(x: tf.Tensor) -> tf.Tensor:
    """[B, T, G, K] -> [B, G, T, K] for batched matmuls (a free reshape when G = 1).

    ``tf.einsum`` over the same indices transposes its operands first; on a 2-core CPU that
    made the per-example products 1.5–3.8× slower than these batched matmuls
    (benchmarks/clipping_methods.py, WRN-16-4 at 32×32).
    """
    if x.shape[2] == 1:
        return tf.reshape(x, [tf.shape(x)[0], 1, tf.shape(x)[1], x.shape[3]])
    return tf.transpose(x, [0, 2, 1, 3])


DIRECT_MAX_ENTRIES = 1 << 16
"""Below this many entries per example (P·O summed over groups is what direct mode stores),
"auto" always picks "direct": on a 2-core CPU the Gram path was slower for every layer of
nfnet nano/micro and WRN-16-2 (benchmarks/clipping_methods.py), its einsums being small."""


def choose_mode(t: int | None, p: int, o: int, groups: int = 1) -> str:
    """"ghost" if T·(P + O) < P·O (fewer flops, hence also less memory) and the direct
    per-example gradient would hold more than DIRECT_MAX_ENTRIES values; else "direct"."""
    if t is None:
        return DIRECT
    cheaper = t * (p + o) < p * o
    return GHOST if cheaper and groups * p * o > DIRECT_MAX_ENTRIES else DIRECT


def zero_rows(x: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """x with the rows i (axis 0) where keep[i] is False replaced by exact zeros (even NaN)."""
    keep = tf.reshape(keep, [-1] + [1] * (x.shape.rank - 1))
    return tf.where(keep, x, tf.zeros_like(x))


def per_example_rows(x: tf.Tensor, batch: int | tf.Tensor) -> tf.Tensor:
    """[B·R, ...] -> [B, R·prod(middle dims), last]: all rows and positions of one example."""
    x = tf.cast(x, tf.float32)
    last = x.shape[-1] if x.shape[-1] is not None else tf.shape(x)[-1]
    return tf.reshape(x, [batch, -1, last])


def image_patches(x: tf.Tensor, kernel_size, strides, padding: str, dilation=(1, 1)):
    """im2col of NHWC ``x``: [N, H', W', kh·kw·C], depth ordered (row, col, channel) = HWIO."""
    kh, kw = kernel_size
    sh, sw = strides
    if kh == kw == 1 and tuple(dilation) == (1, 1):
        return x[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else x
    if kh == kw and sh == sw == 1 and tuple(dilation) == (1, 1):
        # pad + shifted slices: 39 ms vs 60 ms for ExtractImagePatches at [128, 32, 32, 64];
        # with stride 2 the strided slices are the slow ones (85 ms vs 16 ms at the same size).
        return extract_patches(x, kh, sh, padding)
    return tf.image.extract_patches(
        x, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
        rates=[1, dilation[0], dilation[1], 1], padding=padding.upper())


def grouped_patches(x, kernel_size, strides, padding, groups, batch, dilation=(1, 1)):
    """Patches as [B, T, G, P] (P = kh·kw·C/G), T = all output pixels (and views) of an example."""
    patches = image_patches(tf.cast(x, tf.float32), kernel_size, strides, padding, dilation)
    cin = int(x.shape[-1])
    kk = kernel_size[0] * kernel_size[1]
    patches = tf.reshape(patches, [batch, -1, kk, groups, cin // groups])
    patches = tf.transpose(patches, [0, 1, 3, 2, 4])
    return tf.reshape(patches, [batch, -1, groups, kk * (cin // groups)])


def window_sums(x: tf.Tensor, kernel_size, strides, padding: str, groups: int, batch):
    """Σ_p A[i, t, g, p] as [B, T, G]: the sum of each im2col patch within each group, formed
    as a depthwise box filter over the group's channel sums (no patches are materialised)."""
    x = tf.cast(x, tf.float32)
    cin = int(x.shape[-1])
    sums = tf.reduce_sum(tf.reshape(x, tf.concat([tf.shape(x)[:-1], [groups, cin // groups]],
                                                  0)), -1)  # [N, H, W, G]
    box = tf.ones(list(kernel_size) + [groups, 1], tf.float32)
    out = tf.nn.depthwise_conv2d(sums, box, [1, strides[0], strides[1], 1], padding.upper())
    return tf.reshape(out, [batch, -1, groups])


def grouped_rows(d: tf.Tensor, groups: int, batch) -> tf.Tensor:
    """[B·R, ..., G·O] -> [B, T, G, O] (output channels of group g are a contiguous block)."""
    d = per_example_rows(d, batch)
    return tf.reshape(d, [batch, -1, groups, int(d.shape[-1]) // groups])


def grouped_to_kernel(g: tf.Tensor, kernel_shape) -> tf.Tensor:
    """[G, P, O_g] -> HWIO kernel [kh, kw, C/G, G·O_g]."""
    g = tf.transpose(g, [1, 0, 2])
    return tf.reshape(g, kernel_shape)


def kernel_to_grouped(k: tf.Tensor, groups: int) -> tf.Tensor:
    """HWIO kernel [kh, kw, C/G, G·O_g] -> [G, P, O_g]."""
    p = int(k.shape[0] * k.shape[1] * k.shape[2])
    return tf.transpose(tf.reshape(k, [p, groups, int(k.shape[-1]) // groups]), [1, 0, 2])
