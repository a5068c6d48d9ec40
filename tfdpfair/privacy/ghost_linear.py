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
import functools
import logging
import os
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfdpfair import tf_cpu
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


RowsFn = Callable[[Optional[int], Optional[int]], tf.Tensor]
"""rows(i0, i1) -> A[i0:i1] ([i1 − i0, T, G, P]); rows(None, None) -> all of A."""

CHUNK_BYTES = 16 << 20
"""Per-example products are formed for as many examples at a time as fit their A (im2col
patches) in this many bytes, one chunk after the other. Patches of a 3×3 conv are 9× the layer
input; made for the whole batch (and, by TF's scheduler, for every layer at once) they were
the largest term of the DP step's peak memory (benchmarks/clipping_methods.py)."""


NATIVE_CHUNK_BYTES = 12 << 20
"""Examples per call of :func:`conv_per_example_gradients`: as many as keep their per-example
gradients, A-sized transposes and D within this many bytes (≈ 18 examples of a 64-channel
32×32 WRN layer; a whole small-model batch in one call). Every chunk adds its own ops to the
traced step. WRN-16-4, B = 128, oneDNN, 2-core AMD EPYC, benchmarks/ghost_memory.py, two
alternating runs: 12 MB against the earlier 3 MB gave 3.12/3.02 s against 3.24/3.03 s per
step, 2.59 GB against 2.66–2.70 GB peak RSS, 13.8k against 19.6k graph nodes and 20–21 s
against 25–26 s to trace and run the first call."""


NATIVE_WEIGHTED_SUM = True
"""Form a conv's clipped sum Σ_i c_i G_i by ONE batched native kernel gradient of
(x, c·∂L/∂z) (``LinearPiece.weighted_native``, :func:`conv_weighted_sum`) instead of from the
kept direct-mode per-example gradients (memory B·P·O per layer, held until the clip factors
are known) or, in ghost mode, from im2col patches. WRN-16-4, B = 128, on a 2-core CPU without
oneDNN: 19% faster than the kept-gradient path in the same run; peak RSS within noise
(benchmarks/ghost_memory.py, docs/benchmarks.md "Where the memory goes")."""


KEEP_PER_EXAMPLE_BYTES = 128 << 20
"""A direct-mode layer whose per-example gradients of the whole micro-batch (B·G·P·O float32)
fit in this many bytes keeps them from its norm to its clipped sum, which is then one
tensordot Σ_i c_i G_i instead of a second (batched native) kernel gradient; larger layers use
``weighted_native`` (NATIVE_WEIGHTED_SUM). WRN-16-4, B = 128 (every direct layer ≤ 75 MB),
oneDNN, 2-core AMD EPYC, one run of benchmarks/ghost_memory.py: keeping all 2.99 s against
3.24 s with a 32 MB budget and 3.43 s (another run) keeping none; peak RSS within ±0.1 GB,
since the step's peak lies in the backward pass (docs/benchmarks.md, "oneDNN")."""


NATIVE_MIN_POSITIONS = 512
"""The native per-example kernel gradient (:func:`conv_per_example_gradients`) is used only
for layers with at least this many positions T per example; below it im2col patches and a
batched matmul were faster. benchmarks/conv_kernels.py, oneDNN, 2-core AMD EPYC, a [128, T, C]
→ C 3×3 layer, all B squared norms: T = 1024 native 0.096 s vs patches 0.094 s; T = 256
0.117 vs 0.091 s; T = 64 0.219 vs 0.097 s (Gram 0.036 s, which "auto" picks there)."""


@dataclasses.dataclass
class LinearPiece:
    """Per-example gradient Σ_t A[i,t]ᵀ D[i,t] of one variable (see the module docstring).

    A: [B, T, G, P], or a :data:`RowsFn` that makes rows of it on demand (conv patches, so that
    they exist for one chunk of examples at a time); D: [B, T, G, O]. ``fan_in`` = P is needed
    when A is a function. ``per_example`` (optional) gives the direct mode's per-example
    gradients of examples i0..i1 as [n, G, P, O] without A (a conv's native kernel gradient).
    ``weighted_native`` (optional) gives Σ_i c_i G_i as [G, P, O] from (factors, keep) in one
    call (a conv's batched native kernel gradient); with it (and NATIVE_WEIGHTED_SUM) direct mode
    keeps no per-example gradient. ``out_scale`` (optional, [G, O]) scales output channel o of
    the gradient: the piece's gradient is (Σ_t A_tᵀ D_t)·diag(out_scale), applied to the
    products, so that no scaled copy of D is kept (WS kernels: gain/√s per channel).
    ``sq_norms`` and ``weighted_sum`` run their chunks in order (control dependencies), after
    the ops in ``after``.
    """

    variable: object
    A: tf.Tensor | RowsFn
    D: tf.Tensor
    ws: WSProjection | None = None
    mode: str = AUTO
    fan_in: int | None = None
    per_example: RowsFn | None = None
    weighted_native: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None
    out_scale: tf.Tensor | None = None
    _per_example: list | None = None  # direct mode after sq_norms: [(i0, i1, g [n, G, P, O])]

    def dims(self) -> tuple[int | None, int, int]:
        p = self.fan_in if self.fan_in is not None else int(self.A.shape[-1])
        return self.D.shape[1], int(p), int(self.D.shape[-1])

    def resolved_mode(self) -> str:
        if self.mode != AUTO:
            return self.mode
        return choose_mode(*self.dims(), groups=int(self.D.shape[2]))

    def rows(self, i0: int | None, i1: int | None) -> tf.Tensor:
        if callable(self.A):
            return self.A(i0, i1)
        return self.A if i0 is None else self.A[i0:i1]

    def example_bytes(self, native: bool = False) -> int | None:
        """Bytes per example of A (patches), or, for the native path, of A's input, D and the
        per-example gradient; None if T is not static."""
        t, p, o = self.dims()
        if t is None:
            return None
        groups = int(self.D.shape[2])
        if native:  # input ≈ A / (kh·kw) is not known here; D + gradient + D-sized input
            return 4 * groups * (2 * t * o + p * o)
        return 4 * t * groups * p

    def is_large(self) -> bool:
        """Whether the whole batch's A exceeds CHUNK_BYTES (then chunked and ordered)."""
        batch, per_example = self.D.shape[0], self.example_bytes()
        return batch is None or per_example is None or batch * per_example > CHUNK_BYTES

    def chunks(self, native: bool = False) -> list[tuple[int | None, int | None]]:
        """[(i0, i1)] covering the batch, as many examples per chunk as fit CHUNK_BYTES of A
        (NATIVE_CHUNK_BYTES for the native path); one chunk (None, None) if B or T is not
        static."""
        batch, per_example = self.D.shape[0], self.example_bytes(native)
        if batch is None or per_example is None:
            return [(None, None)]
        budget = NATIVE_CHUNK_BYTES if native else CHUNK_BYTES
        step = min(batch, max(1, budget // max(per_example, 1)))
        return [(i, min(i + step, batch)) for i in range(0, batch, step)]

    def _d_rows(self, i0, i1) -> tf.Tensor:
        return self.D if i0 is None else self.D[i0:i1]

    def _scaled(self, x: tf.Tensor, channel_axis_of_groups: int = -3) -> tf.Tensor:
        """x [..., G, (·,) O] times out_scale [G, O] (x unchanged without out_scale); the group
        axis is ``channel_axis_of_groups`` (−3 for [.., G, P, O], −2 for [.., G, O])."""
        if self.out_scale is None:
            return x
        scale = self.out_scale if channel_axis_of_groups == -2 else self.out_scale[:, None, :]
        return x * scale

    def sq_norms(self, after: Sequence[tf.Tensor] = ()) -> tf.Tensor:
        """‖∂l_i/∂variable‖² for every example, shape [B] (NaN stays NaN)."""
        if self.ws is None and self.D.shape[1] == 1 and not callable(self.A):
            A, D = self.A, self.D  # rank-2 Dense: ‖a_i‖²·‖δ_i‖² per group
            return tf.reduce_sum(tf.reduce_sum(A * A, -1) * tf.reduce_sum(D * D, -1), [1, 2])
        direct = self.resolved_mode() == DIRECT
        positions = self.dims()[0]
        native = (direct and self.per_example is not None and positions is not None
                  and positions >= NATIVE_MIN_POSITIONS)
        keep = direct and (not self.native_sum() or self.kept_bytes() <= KEEP_PER_EXAMPLE_BYTES)
        self._per_example = [] if keep else None
        parts, deps = [], list(after)
        for i0, i1 in self.chunks(native):
            with tf.control_dependencies(deps):
                if not native:
                    a, d = group_major(self.rows(i0, i1)), group_major(self._d_rows(i0, i1))
                if direct:  # [n, G, P, O], before any WS projection
                    g = self._scaled(self.per_example(i0, i1) if native
                                     else tf.linalg.matmul(a, d, transpose_a=True))
                    if keep:
                        self._per_example.append((i0, i1, g))
                    sq = tf.reduce_sum(tf.square(g), [1, 2, 3])
                else:
                    d = self._scaled(d)  # [n, G, T, O]
                    sq = tf.reduce_sum(tf.linalg.matmul(a, a, transpose_b=True)
                                       * tf.linalg.matmul(d, d, transpose_b=True), [1, 2, 3])
            parts.append(sq)
            deps = [sq]
        sq = parts[0] if len(parts) == 1 else tf.concat(parts, 0)
        return sq if self.ws is None else self._standardisation_correction(sq)

    def kept_bytes(self) -> float:
        """Bytes of the whole batch's direct-mode per-example gradients (inf if B is unknown)."""
        batch = self.D.shape[0]
        if batch is None:
            return float("inf")
        _, p, o = self.dims()
        return 4.0 * batch * int(self.D.shape[2]) * p * o

    def native_sum(self) -> bool:
        """Whether ``weighted_sum`` uses ``weighted_native`` (see NATIVE_WEIGHTED_SUM)."""
        return NATIVE_WEIGHTED_SUM and self.weighted_native is not None

    def _standardisation_correction(self, sq: tf.Tensor) -> tf.Tensor:
        """‖P(h_i)‖² from ‖h_i‖², with P = ``ws.project`` (docs/ghost_clipping.md): per (g, o),
        with a = active, uh = uᵀh, hs = 1ᵀh (from A's row sums and A·u, never from h),

            ‖h − a·u·uh − (hs/N)·1‖² = ‖h‖² − hs²/N − a·uh²·(2 − ‖u‖²) + 2a·uh·hs·(1ᵀu)/N,

        the exact norm of the vector ``project`` adds to the sum for the u actually used: it
        does not assume ‖u‖ = 1 and 1ᵀu = 0 (which the float32 u meets only to rounding)."""
        ws = self.ws
        n = float(self.dims()[1])
        hsum = self._scaled(tf.linalg.matmul(group_major(ws.asum[..., None]), group_major(self.D),
                                             transpose_a=True)[:, :, 0], -2)  # Σ_p h[p, o]
        uh = self._scaled(tf.reduce_sum(ws.tu * self.D, axis=1), -2)  # uᵀh per (g, o)
        uu = tf.reduce_sum(tf.square(ws.u), axis=-2)  # ‖u‖² per (g, o): [G, O]
        u1 = tf.reduce_sum(ws.u, axis=-2)  # 1ᵀu per (g, o)
        terms = (tf.square(hsum) / n + ws.active * tf.square(uh) * (2.0 - uu)
                 - 2.0 / n * ws.active * uh * hsum * u1)
        sq = sq - tf.reduce_sum(terms, [1, 2])
        return tf.where(sq < 0.0, tf.zeros_like(sq), sq)  # rounding; keeps NaN

    def weighted_sum(self, factors: tf.Tensor, keep: tf.Tensor,
                     after: Sequence[tf.Tensor] = ()) -> tf.Tensor:
        """Σ_i factors_i · G_i as [G, P, O]; rows with keep = False contribute exactly 0."""
        h, deps = None, list(after)
        if self._per_example is not None:  # direct mode kept them (KEEP_PER_EXAMPLE_BYTES)
            for i0, i1, g in self._per_example:
                f, k = (factors, keep) if i0 is None else (factors[i0:i1], keep[i0:i1])
                part = tf.tensordot(f, zero_rows(g, k), axes=[[0], [0]])
                h = part if h is None else h + part
        elif self.native_sum():
            with tf.control_dependencies(deps):
                h = self._scaled(self.weighted_native(factors, keep))
        else:
            for i0, i1 in self.chunks():
                with tf.control_dependencies(deps):
                    f, k = (factors, keep) if i0 is None else (factors[i0:i1], keep[i0:i1])
                    A = zero_rows(self.rows(i0, i1), k)
                    D = zero_rows(self._d_rows(i0, i1), k) * f[:, None, None, None]
                    # [P, n·T] x [n·T, O] per group: examples and positions are contracted.
                    a = tf.transpose(tf.reshape(A, [-1] + A.shape[2:].as_list()), [1, 0, 2])
                    d = tf.transpose(tf.reshape(D, [-1] + D.shape[2:].as_list()), [1, 0, 2])
                    part = tf.linalg.matmul(a, d, transpose_a=True)
                h = part if h is None else h + part
                deps = [h]
            h = self._scaled(h)
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
    """x with the rows i (axis 0) where keep[i] is False replaced by exact zeros (even NaN).

    The zero is a broadcast scalar, not ``tf.zeros_like(x)``: Grappler constant-folds a
    statically shaped ``zeros_like`` into a Const as large as x, which its kernel then holds
    for the life of the function (270 MB for WRN-16-4 at B = 128).
    """
    keep = tf.reshape(keep, [-1] + [1] * (x.shape.rank - 1))
    return tf.where(keep, x, tf.zeros([], x.dtype))


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


@functools.lru_cache(maxsize=None)
def native_grouped_backprop_supported() -> bool:
    """Whether this TensorFlow build runs a *grouped* Conv2DBackpropFilter on its default device.

    :func:`conv_per_example_gradients` needs it. TF's oneDNN kernels (on by default only on CPUs
    with AVX-512/AMX features), cuDNN and TPUs have it; the plain Eigen CPU kernel (e.g. an
    AVX2-only AMD EPYC, or TF_ENABLE_ONEDNN_OPTS=0) rejects it ("filter_size does not have enough
    elements"). Probed once, eagerly, on a 1×1 two-group problem; callers fall back to patches.
    """
    try:
        with tf.init_scope():
            out = tf.raw_ops.Conv2DBackpropFilter(
                input=tf.ones([1, 2, 2, 2]), filter_sizes=[1, 1, 1, 2],
                out_backprop=tf.ones([1, 2, 2, 2]), strides=[1, 1, 1, 1], padding="VALID")
            return bool(np.allclose(out.numpy().ravel(), [4.0, 4.0]))
    except (tf.errors.OpError, ValueError):
        if os.environ.get(tf_cpu.ONEDNN_ENV) is None:
            logging.getLogger("tfdpfair").warning(
                "TensorFlow's oneDNN CPU kernels are off on this CPU, so ghost clipping forms "
                "im2col patches for per-example conv gradients. Set %s=1 before importing "
                "TensorFlow (or call tfdpfair.prefer_onednn() first) for faster steps: "
                "docs/benchmarks.md, 'oneDNN'.", tf_cpu.ONEDNN_ENV)
        return False


def conv_per_example_gradients(x: tf.Tensor, dz: tf.Tensor, kernel_shape, strides,
                               padding: str, groups: int, rows_per_example: int) -> tf.Tensor:
    """Per-example kernel gradients [n, G, P, O_g] of a conv by ONE native
    Conv2DBackpropFilter in which every row (example or view) is its own group of channels.

    x: [n·R, H, W, C] layer inputs; dz: [n·R, H', W', G·O_g] = ∂L/∂(conv output); the R rows
    of an example (augmentation views) are summed. P = kh·kw·C/G in HWIO order, as in
    :func:`grouped_patches`. No im2col patches are formed: 43 ms instead of 72–110 ms for
    patches + batched matmul at [128, 32, 32, 64] → 64 channels on this CPU.
    """
    kh, kw, cg, o_total = (int(d) for d in kernel_shape)
    og = o_total // groups
    rows, (h, w, c), (ho, wo) = int(x.shape[0]), x.shape[1:], dz.shape[1:3]
    x, dz = tf.cast(x, tf.float32), tf.cast(dz, tf.float32)
    # [rows, H, W, C] -> [1, H, W, rows·C]: channels (row, g, c) form group (row, g) of one conv.
    xs = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h, w, rows * c])
    ds = tf.reshape(tf.transpose(dz, [1, 2, 0, 3]), [1, ho, wo, rows * o_total])
    k = tf.raw_ops.Conv2DBackpropFilter(
        input=xs, filter_sizes=[kh, kw, cg, rows * o_total], out_backprop=ds,
        strides=[1, strides[0], strides[1], 1], padding=padding.upper())
    k = tf.transpose(tf.reshape(k, [kh * kw * cg, rows, groups, og]), [1, 2, 0, 3])
    if rows_per_example > 1:
        k = tf.reduce_sum(tf.reshape(k, [-1, rows_per_example, groups, kh * kw * cg, og]), 1)
    return k


def conv_weighted_sum(x: tf.Tensor, dz: tf.Tensor, factors: tf.Tensor, keep: tf.Tensor,
                      kernel_shape, strides, padding: str, groups: int) -> tf.Tensor:
    """Σ_i factors_i · G_i as [G, P, O_g] by ONE batched native Conv2DBackpropFilter of
    (x, factors·dz): the kernel gradient of Σ_i factors_i·l_i, formed like the non-private
    step's. x: [B·R, H, W, C], dz: [B·R, H', W', G·O_g] (R example-major rows per example);
    factors, keep: [B]. Rows with keep = False are zeroed in x and dz first, so they contribute
    exactly 0 even when non-finite. Grouped kernels need a grouped Conv2DBackpropFilter
    (:func:`native_grouped_backprop_supported`)."""
    static = x.shape[0] is not None and factors.shape[0] is not None
    rows = x.shape[0] // factors.shape[0] if static else tf.shape(x)[0] // tf.shape(factors)[0]
    keep_rows, c_rows = tf.repeat(keep, rows), tf.repeat(tf.cast(factors, tf.float32), rows)
    x = zero_rows(tf.cast(x, tf.float32), keep_rows)
    dz = zero_rows(tf.cast(dz, tf.float32), keep_rows) * c_rows[:, None, None, None]
    k = tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=[int(d) for d in kernel_shape], out_backprop=dz,
        strides=[1, strides[0], strides[1], 1], padding=padding.upper())
    return kernel_to_grouped(k, groups)


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
