"""NFNet building blocks against independent numpy computations."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.models import layers


def numpy_standardize(w, gain, eps=1e-4):
    """ŵ = gain (w − mean) / sqrt(max(N var, eps)) per output filter (last axis), N = fan-in."""
    flat = w.reshape(-1, w.shape[-1]).astype(np.float64)
    n = flat.shape[0]
    mean = flat.mean(axis=0)
    var = ((flat - mean) ** 2).mean(axis=0)
    scale = gain / np.sqrt(np.maximum(var * n, eps))
    return ((flat - mean) * scale).reshape(w.shape)


def numpy_conv2d_same(x, w, stride, groups=1):
    """Direct-loop NHWC convolution with TF "SAME" padding and grouped channels."""
    b, h, wd, cin = x.shape
    k, _, cin_g, cout = w.shape
    out_h, out_w = -(-h // stride), -(-wd // stride)
    pad_h = max((out_h - 1) * stride + k - h, 0)
    pad_w = max((out_w - 1) * stride + k - wd, 0)
    xp = np.pad(x, [(0, 0), (pad_h // 2, pad_h - pad_h // 2),
                    (pad_w // 2, pad_w - pad_w // 2), (0, 0)])
    out = np.zeros((b, out_h, out_w, cout))
    cout_g = cout // groups
    for o in range(cout):
        g = o // cout_g
        xin = xp[..., g * cin_g:(g + 1) * cin_g]
        for i in range(out_h):
            for j in range(out_w):
                patch = xin[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
                out[:, i, j, o] = np.tensordot(patch, w[..., o], axes=([1, 2, 3], [0, 1, 2]))
    return out


@pytest.mark.parametrize("kernel_size,stride,groups,size", [
    (3, 1, 1, 6), (3, 2, 1, 7), (1, 1, 1, 5), (3, 1, 2, 6), (3, 2, 4, 8), (1, 2, 1, 6)])
def test_ws_conv_matches_numpy(kernel_size, stride, groups, size):
    rng = np.random.RandomState(0)
    cin, cout = 8, 12
    layer = layers.WSConv2D(cout, kernel_size, strides=stride, groups=groups)
    x = rng.randn(2, size, size, cin).astype(np.float32)
    layer.build(x.shape)
    w = rng.randn(kernel_size, kernel_size, cin // groups, cout).astype(np.float32)
    gain = rng.uniform(0.5, 2.0, cout).astype(np.float32)
    bias = rng.randn(cout).astype(np.float32)
    layer.kernel.assign(w)
    layer.gain.assign(gain)
    layer.bias.assign(bias)
    expected = numpy_conv2d_same(x, numpy_standardize(w, gain), stride, groups) + bias
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ws_variance_floor():
    """A filter with N·var < 1e-4 is scaled by 1/sqrt(1e-4) = 100, not by 1/sqrt(N var)."""
    layer = layers.WSConv2D(2, 1)
    layer.build((None, 1, 1, 4))
    w = np.zeros((1, 1, 4, 2), np.float32)
    w[0, 0, :, 0] = [1e-4, -1e-4, 1e-4, -1e-4]  # N var = 4e-8 < 1e-4: floored
    w[0, 0, :, 1] = [1.0, -1.0, 2.0, 0.0]
    layer.kernel.assign(w)
    got = layer.standardized_kernel().numpy()
    np.testing.assert_allclose(got[0, 0, :, 0], w[0, 0, :, 0] * 100.0, rtol=1e-5)
    np.testing.assert_allclose(got, numpy_standardize(w, np.ones(2)), rtol=1e-5, atol=1e-7)
    # A standardised (unfloored) filter has unit L2 norm times its gain.
    np.testing.assert_allclose(np.sum(got[0, 0, :, 1] ** 2), 1.0, rtol=1e-5)


def test_ws_conv_defaults_gain_one_bias_zero():
    layer = layers.WSConv2D(5, 3)
    layer.build((None, 4, 4, 3))
    np.testing.assert_array_equal(layer.gain.numpy(), np.ones(5))
    np.testing.assert_array_equal(layer.bias.numpy(), np.zeros(5))
    assert layer.kernel.shape == (3, 3, 3, 5)


@pytest.mark.parametrize("k,stride,size", [(3, 1, 5), (3, 2, 7), (3, 2, 8), (1, 2, 5)])
def test_conv2d_custom_gradient_matches_native(k, stride, size):
    rng = np.random.RandomState(1)
    x = tf.constant(rng.randn(2, size, size, 3), tf.float32)
    w = tf.constant(rng.randn(k, k, 3, 4), tf.float32)
    dy_w = tf.constant(rng.randn(2, -(-size // stride), -(-size // stride), 4), tf.float32)
    grads = []
    for fn in (lambda a, b: layers.conv2d(a, b, stride, "same"),
               lambda a, b: tf.nn.conv2d(a, b, stride, "SAME")):
        with tf.GradientTape() as tape, layers.vectorizable_conv_gradients():
            tape.watch([x, w])
            loss = tf.reduce_sum(fn(x, w) * dy_w)
        grads.append(tape.gradient(loss, [x, w]))
    for ours, native in zip(*grads):
        np.testing.assert_allclose(ours.numpy(), native.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vectorizable", [True, False])
def test_conv2d_uses_native_kernel_gradient_outside_per_example_mode(vectorizable):
    """Batched backward passes get TF's Conv2DBackpropFilter (fast); per-example tracing gets
    the im2col form that tf.vectorized_map vectorises."""
    x, w = tf.ones([2, 5, 5, 3]), tf.ones([3, 3, 3, 4])

    def kernel_grad(w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = tf.reduce_sum(layers.conv2d(x, w, 1, "same"))
        return tape.gradient(loss, w)

    fn = tf.function(kernel_grad)
    if vectorizable:
        with layers.vectorizable_conv_gradients():
            graph = fn.get_concrete_function(w).graph
    else:
        graph = fn.get_concrete_function(w).graph
    op_types = {op.type for op in graph.get_operations()}
    assert ("Conv2DBackpropFilter" in op_types) is not vectorizable


def test_scaled_activations_have_unit_variance():
    x = np.random.RandomState(0).randn(2_000_000).astype(np.float32)
    tanh_gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(
        layers.scaled_gelu(tf.constant(x)).numpy(), 1.7015043497085571 * tanh_gelu,
        rtol=1e-5, atol=1e-6)
    assert np.var(1.7015043497085571 * tanh_gelu) == pytest.approx(1.0, abs=0.01)
    relu = layers.scaled_relu(tf.constant(x)).numpy()
    np.testing.assert_allclose(relu, DEEPMIND_RELU_GAMMA * np.maximum(x, 0), rtol=1e-6)
    assert np.var(relu) == pytest.approx(1.0, abs=0.01)


DEEPMIND_RELU_GAMMA = 1.7139588594436646  # deepmind-research/nfnets/base.py, `nonlinearities`


def gaussian_moment(f, power):
    """E[f(x)^power] for x ~ N(0, 1), by adaptive quadrature."""
    from scipy import integrate  # noqa: PLC0415

    density = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    value, _ = integrate.quad(lambda x: f(x) ** power * density(x), -40, 40, points=[0.0],
                              epsabs=1e-13, epsrel=1e-12, limit=200)
    return value


def test_relu_gamma_is_the_reference_constant_not_the_analytic_one():
    """We ship DeepMind's γ_relu (what the published checkpoints were trained with). The exact
    1/sqrt(Var[relu(x)]) is sqrt(2/(1 − 1/π)); the reference value is 0.064% larger."""
    relu = lambda x: max(x, 0.0)  # noqa: E731
    variance = gaussian_moment(relu, 2) - gaussian_moment(relu, 1) ** 2
    exact = 1 / math.sqrt(variance)
    assert exact == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-10)
    assert DEEPMIND_RELU_GAMMA / exact - 1 == pytest.approx(6.42e-4, abs=0.02e-4)
    assert layers.RELU_GAMMA == DEEPMIND_RELU_GAMMA
    x = np.random.RandomState(1).randn(1_000_000).astype(np.float32)
    expected = np.float32(DEEPMIND_RELU_GAMMA) * np.maximum(x, 0)
    for out in (layers.scaled_relu(tf.constant(x)), layers.ScaledActivation("relu")(x),
                layers.scaled_activation("relu", tf.constant(x))):
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-7)  # 6e-4 would show
    # Var(γ_ref · relu(x)) = (γ_ref/γ_exact)² ≈ 1.0013: unit variance within sampling error.
    assert np.var(expected.astype(np.float64)) == pytest.approx(1.0, abs=0.01)


def test_squeeze_excite_matches_numpy():
    rng = np.random.RandomState(2)
    x = rng.randn(3, 4, 5, 6).astype(np.float32)
    se = layers.SqueezeExcite(0.5)
    se.build(x.shape)
    assert se.fc0.kernel.shape == (6, 3) and se.fc1.kernel.shape == (3, 6)
    for var in (se.fc0.kernel, se.fc0.bias, se.fc1.kernel, se.fc1.bias):
        var.assign(rng.randn(*var.shape).astype(np.float32))
    pooled = x.mean(axis=(1, 2))
    hidden = np.maximum(pooled @ se.fc0.kernel.numpy() + se.fc0.bias.numpy(), 0)
    gate = 1 / (1 + np.exp(-(hidden @ se.fc1.kernel.numpy() + se.fc1.bias.numpy())))
    expected = 2 * gate[:, None, None, :] * x
    np.testing.assert_allclose(se(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_stochastic_depth_drops_whole_examples():
    layer = layers.StochasticDepth(0.3)
    x = tf.ones([4000, 2, 2, 3])
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    y = layer(x, training=True).numpy()
    per_example = y.reshape(4000, -1)
    assert np.all((per_example == 0).all(axis=1) | (per_example == 1).all(axis=1))
    dropped = (per_example == 0).all(axis=1).mean()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)


def test_per_example_dropout_statistics():
    layer = layers.PerExampleDropout(0.25)
    x = tf.ones([200, 100])
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())
    y = layer(x, training=True).numpy()
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 1.0 / 0.75, rtol=1e-6)
    assert abs((y == 0).mean() - 0.25) < 0.01


@pytest.mark.parametrize("layer", [layers.StochasticDepth(0.5), layers.PerExampleDropout(0.5)])
def test_random_layers_draw_independently_inside_vectorized_map(layer):
    """Each example of a vectorised micro-batch must get its own random mask."""

    def one(x):
        return layer(x[None], training=True)[0]

    out = tf.vectorized_map(one, tf.ones([64, 2, 2, 8])).numpy().reshape(64, -1)
    assert len({row.tobytes() for row in out}) > 1


@pytest.mark.parametrize("layer", [
    layers.WSConv2D(4, 3, strides=2, groups=2, name="c"), layers.SqueezeExcite(0.25),
    layers.StochasticDepth(0.2), layers.PerExampleDropout(0.1),
    layers.ScaledActivation("relu")])
def test_layers_serialize(layer):
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()
