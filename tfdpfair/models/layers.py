"""Normaliser-free building blocks (Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization"), as serialisable Keras 3 layers (TensorFlow backend).

None of these layers mixes examples: every output row depends on its own input row only, so
per-example gradients exist and DP-SGD clipping is meaningful.

Randomness (dropout, stochastic depth) uses TensorFlow's *stateful* random ops on purpose.
Under ``tf.vectorized_map`` (how per-example gradients are computed) a stateful random op is
vectorised into independent draws per example, whereas Keras' seed-generator ops are stateless
with a loop-invariant seed and would give every example of the micro-batch the *same* mask.
Seed them globally with ``tf.random.set_seed``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import keras
import tensorflow as tf

# The γ constants are DeepMind's, copied from the `nonlinearities` table of the reference NFNet
# code (deepmind-research/nfnets/base.py), not the exact values. They are numerical estimates
# (the code gives no derivation) and sit slightly above the exact 1/sqrt(Var[f(x)]), x ~ N(0, 1):
#   relu  exact sqrt(2/(1 − 1/π)) = 1.7128585504…   reference 1.7139588594436646 (+0.064%)
#   gelu  exact (quadrature)       = 1.7009165616…   reference 1.7015043497085571 (+0.035%)
# We use the reference values so that a network built here computes what the published
# checkpoints (F{n}_haiku.npz) were trained with, up to float rounding. Var(γ·f(x)) is then
# 1.0013 (relu) / 1.0007 (gelu) instead of 1, a negligible difference at init.
GELU_GAMMA = 1.7015043497085571
"""DeepMind's γ for the tanh-approximate GELU (Var(γ·gelu(x)) ≈ 1 for x ~ N(0, 1))."""
RELU_GAMMA = 1.7139588594436646
"""DeepMind's γ for ReLU (the exact value, sqrt(2/(1 − 1/π)) = 1.71286, is 0.064% smaller)."""

_GAMMAS = {"gelu": GELU_GAMMA, "relu": RELU_GAMMA, "identity": 1.0}

_serializable = keras.saving.register_keras_serializable(package="tfdpfair")


def scaled_gelu(x: tf.Tensor) -> tf.Tensor:
    """γ_gelu · gelu(x), gelu with the tanh approximation (the NFNet reference uses it)."""
    return GELU_GAMMA * tf.nn.gelu(x, approximate=True)


def scaled_relu(x: tf.Tensor) -> tf.Tensor:
    """γ_relu · max(x, 0), with DeepMind's γ_relu = 1.7139588594436646 (see RELU_GAMMA)."""
    return RELU_GAMMA * tf.nn.relu(x)


def scaled_activation(name: str, x: tf.Tensor) -> tf.Tensor:
    """Variance-preserving activation by name: "gelu", "relu" or "identity"."""
    if name == "gelu":
        return scaled_gelu(x)
    if name == "relu":
        return scaled_relu(x)
    if name == "identity":
        return x
    raise ValueError(f"Unknown activation '{name}'; expected one of {sorted(_GAMMAS)}.")


@_serializable
class ScaledActivation(keras.layers.Layer):
    """y = γ · f(x), γ chosen so that Var(y) = 1 when x ~ N(0, 1); f ∈ {gelu, relu, identity}."""

    def __init__(self, activation: str = "gelu", **kwargs: Any):
        super().__init__(**kwargs)
        if activation not in _GAMMAS:
            raise ValueError(f"Unknown activation '{activation}'; expected {sorted(_GAMMAS)}.")
        self.activation = activation

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return scaled_activation(self.activation, inputs)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "activation": self.activation}


def standardization_moments(kernel: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(c, N·var) of an HWIO kernel: c[..., o] = w[..., o] − mean_o and N·var_o = Σ c[..., o]²,
    per output filter o over its N = kh·kw·c_in fan-in entries; float32 (float64 for a float64
    kernel), whatever the kernel's dtype.

    Computed so that c is accurate to float32 rounding *of c itself* for every kernel state
    (docs/ghost_clipping.md, "Conditioning"): each filter is first shifted by its own first
    entry w_0 (an exact-input subtraction, relative error ≤ 2⁻²⁴ of the difference), then
    centred by the mean of the shifted values. The textbook w·scale − mean·scale instead
    cancels two numbers of size |mean|·scale: for mean 1e6, std 0.1 its error was as large as
    the standardised kernel itself (float32 spacing at 1e6 is 0.0625). Mathematically c = Πw
    with Π = I − 11ᵀ/N for any shift, so the shift carries no gradient (stop_gradient) and
    ∂c/∂w = Π exactly, as the ghost rule's closed form assumes.
    """
    dtype = tf.float64 if kernel.dtype == tf.float64 else tf.float32
    w = tf.cast(kernel, dtype)
    shifted = w - tf.stop_gradient(w[:1, :1, :1, :])
    c = shifted - tf.reduce_mean(shifted, axis=(0, 1, 2), keepdims=True)
    return c, tf.reduce_sum(tf.square(c), axis=(0, 1, 2))


def standardize_kernel(
    kernel: tf.Tensor, gain: tf.Tensor, eps: float = 1e-4
) -> tf.Tensor:
    """Scaled weight standardisation of an HWIO kernel.

    ŵ[..., o] = gain[o] · (w[..., o] − mean_o) / sqrt(max(N · var_o, eps)), where mean_o and
    var_o are the mean and (biased) variance of output filter o over its N = kh·kw·c_in fan-in
    entries. Each filter then has Σ ŵ² = gain², so a unit-variance input gives a unit-variance
    output. Computed in float32 by :func:`standardization_moments` (accurate for any kernel
    state) and returned in the kernel's dtype (bf16 under a mixed_bfloat16 policy).
    """
    c, n_var = standardization_moments(kernel)
    scale = tf.math.rsqrt(tf.maximum(n_var, eps)) * tf.cast(gain, c.dtype)
    return tf.cast(c * scale, kernel.dtype)


def _same_padding(size: Any, kernel_size: int, stride: int) -> tuple[Any, Any]:
    """TF "SAME" padding (before, after) along one axis: total = max((⌈n/s⌉−1)s + k − n, 0).

    Works on Python ints (static shapes) and on scalar tensors (dynamic shapes).
    """
    out = (size + stride - 1) // stride
    total = (out - 1) * stride + kernel_size - size
    total = max(total, 0) if isinstance(total, int) else tf.maximum(total, 0)
    return total // 2, total - total // 2


def _spatial_dims(x: tf.Tensor) -> tuple[Any, Any]:
    """(H, W) as Python ints when static, else as scalar tensors."""
    h, w = x.shape[1], x.shape[2]
    dynamic = tf.shape(x)
    return (h if h is not None else dynamic[1]), (w if w is not None else dynamic[2])


def extract_patches(x: tf.Tensor, kernel_size: int, stride: int, padding: str) -> tf.Tensor:
    """im2col: [B, H', W', k·k·C] with depth ordered (row, col, channel), like an HWIO kernel.

    Built from a pad and strided slices only, which ``tf.vectorized_map`` vectorises.
    """
    k = kernel_size
    if padding.upper() == "SAME":
        h, w = _spatial_dims(x)
        (top, bottom), (left, right) = _same_padding(h, k, stride), _same_padding(w, k, stride)
        x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    h, w = _spatial_dims(x)
    span_h, span_w = ((h - k) // stride) * stride + 1, ((w - k) // stride) * stride + 1
    cols = [x[:, di:di + span_h:stride, dj:dj + span_w:stride, :]
            for di in range(k) for dj in range(k)]
    return tf.concat(cols, axis=-1) if len(cols) > 1 else cols[0]


_PER_EXAMPLE_MODE = threading.local()


@contextlib.contextmanager
def vectorizable_conv_gradients() -> Iterator[None]:
    """Inside this context (while a per-example function is traced for ``tf.vectorized_map``),
    :func:`conv2d` differentiates its kernel by an im2col einsum that vectorises per example.

    Outside it, :func:`conv2d` is the plain ``tf.nn.conv2d`` with TensorFlow's native gradient
    (Conv2DBackpropFilter), which is faster for a batched backward pass: non-private training,
    ghost clipping (which never forms a kernel gradient in the backward pass) and evaluation.
    """
    previous = getattr(_PER_EXAMPLE_MODE, "on", False)
    _PER_EXAMPLE_MODE.on = True
    try:
        yield
    finally:
        _PER_EXAMPLE_MODE.on = previous


def conv2d(x: tf.Tensor, kernel: tf.Tensor, stride: int, padding: str) -> tf.Tensor:
    """tf.nn.conv2d (NHWC, HWIO kernel); a kernel gradient that vectorises per example inside
    :func:`vectorizable_conv_gradients`.

    Forward: the native convolution. Backward: dL/dx by the native input backprop. Inside the
    context, dL/dW[p, o] = Σ_{b,h,w} patches(x)[b,h,w,p] · dL/dy[b,h,w,o] (an einsum over
    im2col patches), instead of TF's Conv2DBackpropFilter, which ``tf.vectorized_map`` can only
    run as a sequential while-loop (slow to trace and to run); outside it, the native gradient.
    """
    if not getattr(_PER_EXAMPLE_MODE, "on", False):
        return tf.nn.conv2d(x, kernel, strides=stride, padding=padding.upper())
    pad = padding.upper()

    @tf.custom_gradient
    def _conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides=stride, padding=pad)

        def grad(dy):
            dx = tf.nn.conv2d_transpose(dy, kernel, tf.shape(x), stride, pad)
            k = kernel.shape[0]
            if k == 1:
                patches = x[:, ::stride, ::stride, :] if stride > 1 else x
            else:
                patches = extract_patches(x, k, stride, pad)
            dk = tf.einsum("bhwp,bhwo->po", patches, dy)
            return dx, tf.reshape(dk, tf.shape(kernel))

        return y, grad

    return _conv(x, kernel)


@_serializable
class WSConv2D(keras.layers.Layer):
    """2-D convolution with scaled weight standardisation, learnable gain and bias.

    y = conv(x, standardize_kernel(w, gain)) + bias, with gain initialised to 1 and bias to 0.
    ``groups`` > 1 gives a grouped convolution (kernel input depth c_in / groups). The kernel is
    stored in HWIO layout (the same as the published Haiku checkpoints).
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 3,
        strides: int = 1,
        padding: str = "same",
        groups: int = 1,
        eps: float = 1e-4,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.padding = padding.lower()
        self.groups = int(groups)
        self.eps = float(eps)
        if self.filters % self.groups:
            raise ValueError(f"filters={filters} is not divisible by groups={groups}.")

    def build(self, input_shape: tuple) -> None:
        in_ch = int(input_shape[-1])
        if in_ch % self.groups:
            raise ValueError(f"Input channels {in_ch} not divisible by groups={self.groups}.")
        k = self.kernel_size
        self.kernel = self.add_weight(
            name="kernel",
            shape=(k, k, in_ch // self.groups, self.filters),
            initializer=keras.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal"),
        )
        self.gain = self.add_weight(name="gain", shape=(self.filters,), initializer="ones")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def standardized_kernel(self) -> tf.Tensor:
        """The effective kernel ŵ used in the convolution (see :func:`standardize_kernel`)."""
        return standardize_kernel(self.kernel, self.gain, self.eps)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        kernel = self.standardized_kernel()
        conv = lambda x, k: conv2d(x, k, self.strides, self.padding)  # noqa: E731
        if self.groups == 1:
            return conv(inputs, kernel) + self.bias
        # Grouped conv as `groups` ordinary convs: TF's native grouped Conv2DBackpropFilter
        # breaks under tf.vectorized_map (per-example gradients), this form does not.
        outs = [conv(x, k) for x, k in zip(
            tf.split(inputs, self.groups, axis=-1), tf.split(kernel, self.groups, axis=-1))]
        return tf.concat(outs, axis=-1) + self.bias

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        def out_dim(d):
            if d is None:
                return None
            if self.padding == "same":
                return -(-d // self.strides)
            return (d - self.kernel_size) // self.strides + 1

        return (input_shape[0], out_dim(input_shape[1]), out_dim(input_shape[2]), self.filters)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
            "strides": self.strides, "padding": self.padding, "groups": self.groups,
            "eps": self.eps,
        }


@_serializable
class SqueezeExcite(keras.layers.Layer):
    """NFNet squeeze-and-excite, returning the gated input (×2 so its scale is ≈ preserved).

    s = sigmoid(fc1(relu(fc0(mean_{h,w} x)))), hidden width max(1, int(c · ratio));
    output = 2 · s · x (s broadcast over H and W).
    """

    def __init__(self, ratio: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.ratio = float(ratio)

    def build(self, input_shape: tuple) -> None:
        channels = int(input_shape[-1])
        hidden = max(1, int(channels * self.ratio))
        init = keras.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
        self.fc0 = keras.layers.Dense(hidden, kernel_initializer=init, name="fc0")
        self.fc1 = keras.layers.Dense(channels, kernel_initializer=init, name="fc1")
        self.fc0.build((None, channels))
        self.fc1.build((None, hidden))

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        pooled = tf.reduce_mean(inputs, axis=(1, 2))
        gate = tf.sigmoid(self.fc1(tf.nn.relu(self.fc0(pooled))))
        return 2.0 * gate[:, None, None, :] * inputs

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "ratio": self.ratio}


def _keep_mask(shape: tf.Tensor, rate: float, dtype: tf.DType) -> tf.Tensor:
    """Bernoulli(1 − rate) 0/1 mask, floor(keep + U[0,1)), drawn with a stateful op."""
    return tf.floor((1.0 - rate) + tf.random.uniform(shape, dtype=dtype))


@_serializable
class StochasticDepth(keras.layers.Layer):
    """Drops a residual branch per example: y_i = b_i · x_i, b_i ~ Bernoulli(1 − rate).

    No rescaling by 1/(1 − rate) (as in the NFNet reference). Identity when not training.
    One draw per example (per row of axis 0), so it never couples examples.
    """

    def __init__(self, rate: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Stochastic depth rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if not training or self.rate == 0.0:
            return inputs
        rank = len(inputs.shape)
        shape = tf.concat([tf.shape(inputs)[:1], tf.ones([rank - 1], tf.int32)], axis=0)
        return inputs * _keep_mask(shape, self.rate, inputs.dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rate": self.rate}


@_serializable
class PerExampleDropout(keras.layers.Layer):
    """Inverted dropout y = x · m / (1 − rate), m ~ Bernoulli(1 − rate) elementwise.

    Same maths as ``keras.layers.Dropout``, but drawn with a stateful TF op so that under
    ``tf.vectorized_map`` each example gets its own mask (Keras' Dropout gives all examples of a
    vectorised micro-batch the same mask).
    """

    def __init__(self, rate: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if not training or self.rate == 0.0:
            return inputs
        mask = _keep_mask(tf.shape(inputs), self.rate, inputs.dtype)
        return inputs * mask / (1.0 - self.rate)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rate": self.rate}
