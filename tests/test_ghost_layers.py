"""Ghost rules for DepthwiseConv2D, SeparableConv2D, Conv1D, EinsumDense and Embedding against
a brute-force loop (one GradientTape per example, clipped, summed in float64): per-example
norms and clipped sums with padding rows, a NaN example, repeated ids / mask_zero, augmult
views, one-example chunks and mixed bf16; plus "auto" mixing ghost with per-variable fallback."""

import logging
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.privacy import ghost_linear
from tfdpfair.privacy.ghost_clipping import (
    batch_example_loss_fn, describe_plan, ghost_clipped_grad_sum)
from tfdpfair.privacy.ghost_depthwise import depthwise_per_example_gradients
from tfdpfair.privacy.ghost_rules_tokens import einsum_layout

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MASK = np.array([1, 1, 0, 1, 1, 1], np.float32)


def depthwise_net():
    return keras.Sequential([
        keras.Input((7, 7, 4)),
        L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same", activation="relu"),
        L.DepthwiseConv2D(3, dilation_rate=2, padding="same", use_bias=False),
        L.DepthwiseConv2D((3, 2), padding="valid"),
        L.Flatten(), L.Dense(3)])


def separable_net():
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        L.SeparableConv2D(5, 3, depth_multiplier=2, padding="same", activation="tanh"),
        L.SeparableConv2D(4, 3, strides=2, use_bias=False),
        L.GlobalAveragePooling2D(), L.Dense(3)])


def conv1d_net():
    return keras.Sequential([
        keras.Input((9, 4)),
        L.Conv1D(6, 3, padding="causal", dilation_rate=2, activation="tanh"),
        L.Conv1D(6, 3, strides=2, padding="same"),
        L.Conv1D(4, 2, padding="valid", groups=2), L.Flatten(), L.Dense(3)])


def einsum_net():  # ellipsis, positions, heads (G), P/O split, an input-only (summed) label
    return keras.Sequential([
        keras.Input((5, 6)),
        L.EinsumDense("...c,cd->...d", 6, bias_axes="d"),
        L.EinsumDense("abc,cd->abd", (5, 7), bias_axes="d", activation="gelu"),
        L.EinsumDense("abc,cde->abde", (5, 2, 3), bias_axes="de"),
        L.EinsumDense("abcd,cde->abce", (5, 2, 4), bias_axes="e", activation="tanh"),
        L.EinsumDense("abcd,ecd->ae", 3, bias_axes="e")])


def embedding_net():  # mask_zero + masked mean, a second table, a float input (for NaN)
    ids, scale = keras.Input((8,), dtype="int32"), keras.Input((1,))
    a = L.Embedding(11, 4, mask_zero=True)(ids)
    b = L.Embedding(5, 4)(keras.ops.mod(ids, 5))
    h = L.GlobalAveragePooling1D()(a) + L.GlobalAveragePooling1D()(b)
    return keras.Model([ids, scale], L.Dense(3)(h * scale))


def token_net():  # one int input (augmult views of a multi-input model are not supported)
    ids = keras.Input((8,), dtype="int32")
    h = L.GlobalAveragePooling1D()(L.Embedding(11, 4, mask_zero=True)(ids))
    return keras.Model(ids, L.Dense(3)(h))


def build(make, seed=0):
    keras.utils.set_random_seed(seed)
    model = make()
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:  # zero biases too
        v.assign(v.numpy() + 0.3 * rng.normal(size=v.shape).astype(np.float32))
    return model


def inputs(model, n=6, views=0, seed=0):
    """Random inputs for ``model`` (ids with repeats and zeros for int inputs), [n, K, ...]
    with ``views`` = K > 0."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in model.inputs:
        shape = (n,) + ((views,) if views else ()) + tuple(spec.shape[1:])
        if "int" in str(spec.dtype):
            out.append(rng.integers(0, 4, shape).astype(np.int32))  # ids 0..3: repeated
        else:
            out.append(rng.normal(size=shape).astype(np.float32))
    return out[0] if len(out) == 1 else out


def set_nan(x, i):
    """Example i's float input becomes NaN (a real example with a non-finite gradient)."""
    floats = [t for t in (x if isinstance(x, list) else [x]) if t.dtype == np.float32]
    floats[-1][i] = np.nan


def brute_force(model, x, y, mask, clip, views=0):
    """(Σ_i m_i·clip_C(g_i) in float64, ‖g_i‖) by one tape per real example; an example
    with a non-finite gradient (or padding) contributes 0 and has norm 0."""
    variables = model.trainable_variables
    total = [np.zeros(v.shape, np.float64) for v in variables]
    norms = np.zeros(len(y))
    for i in range(len(y)):
        if mask[i] == 0:
            continue
        xi = tf.nest.map_structure(lambda t: tf.constant(t[i] if views else t[i:i + 1]), x)
        with tf.GradientTape() as tape:
            loss = LOSS(np.repeat(y[i:i + 1], max(views, 1)), model(xi, training=True))
        grads = [tf.convert_to_tensor(g).numpy().astype(np.float64) for g in tape.gradient(
            loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)]
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        if not np.isfinite(norm):
            continue
        norms[i] = norm
        for t, g in zip(total, grads):
            t += g * min(1.0, clip / norm)
    return total, norms


def run_ghost(model, x, y, mask, clip, mode="auto", views=0):
    examples = (tf.nest.map_structure(tf.constant, x), tf.constant(y))
    return ghost_clipped_grad_sum(
        model, batch_example_loss_fn(model, LOSS, augmult=max(views, 1)),
        model.trainable_variables, examples, tf.constant(mask), clip, has_aux=True,
        conv_mode=mode)


def assert_matches(result, expected, norms, rtol=2e-4):
    np.testing.assert_allclose(result.grad_norms.numpy(), norms, rtol=rtol, atol=1e-6)
    for got, want in zip(result.grad_sum, expected):
        scale = max(np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=rtol * scale)


NETS = [depthwise_net, separable_net, conv1d_net, einsum_net, embedding_net]


@pytest.mark.parametrize("make", NETS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["direct", "ghost"])
def test_rules_match_brute_force_with_padding_and_nan(make, mode):
    model = build(make)
    assert describe_plan(model)["fallback"] == []
    x, y = inputs(model), np.array([0, 1, 2, 0, 1, 2], np.int32)
    set_nan(x, 4)
    _, norms = brute_force(model, x, y, MASK, 1e9)
    clip = float(np.median(norms[norms > 0]))  # some examples clipped, some not
    expected, norms = brute_force(model, x, y, MASK, clip)
    result = run_ghost(model, x, y, MASK, clip, mode)
    assert_matches(result, expected, norms)
    assert result.num_nonfinite.numpy() == 1
    assert result.kept.numpy().tolist() == [1, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("make", NETS[:-1] + [token_net], ids=lambda f: f.__name__)
def test_augmult_views_and_one_example_chunks(make, monkeypatch):
    """K = 2 views per example are K·T positions of one example; chunks of one example."""
    monkeypatch.setattr(ghost_linear, "CHUNK_BYTES", 1)
    monkeypatch.setattr(ghost_linear, "NATIVE_CHUNK_BYTES", 1)
    model = build(make, seed=1)
    x, y = inputs(model, views=2, seed=1), np.array([2, 1, 0, 0, 1, 2], np.int32)
    expected, norms = brute_force(model, x, y, MASK, 0.1, views=2)
    assert_matches(run_ghost(model, x, y, MASK, 0.1, views=2), expected, norms)


@pytest.mark.parametrize("make", [depthwise_net, token_net], ids=lambda f: f.__name__)
def test_xla_gives_the_same_clipped_sum(make):
    """jit_compile=True over the shifted-window depthwise route and the sorted-id embedding
    norms (static shapes): the same result as the brute-force loop."""
    model = build(make)
    x, y = inputs(model), np.array([0, 1, 2, 0, 1, 2], np.int32)
    expected, norms = brute_force(model, x, y, MASK, 0.2)
    xla = tf.function(lambda: run_ghost(model, x, y, MASK, 0.2), jit_compile=True)()
    assert_matches(xla, expected, norms)


@pytest.mark.parametrize("config", [
    dict(shape=(1, 7, 7, 3), k=(3, 3), s=(2, 2), pad="same", d=(1, 1), m=2),
    dict(shape=(1, 8, 5, 2), k=(3, 2), s=(2, 2), pad="same", d=(1, 1), m=1),
    dict(shape=(1, 9, 9, 2), k=(3, 3), s=(3, 3), pad="valid", d=(1, 1), m=1),
    dict(shape=(1, 8, 8, 2), k=(2, 3), s=(1, 1), pad="same", d=(3, 2), m=3),
    dict(shape=(1, 6, 7, 2), k=(3, 3), s=(1, 1), pad="valid", d=(2, 1), m=1)])
def test_depthwise_per_example_gradients_equal_autodiff(config):
    rng = np.random.default_rng(0)
    layer = L.DepthwiseConv2D(config["k"], strides=config["s"], padding=config["pad"],
                              dilation_rate=config["d"], depth_multiplier=config["m"],
                              use_bias=False)
    x = tf.constant(rng.normal(size=config["shape"]).astype(np.float32))
    with tf.GradientTape() as tape:
        z = layer(x)
        dz = tf.constant(rng.normal(size=z.shape).astype(np.float32))
        loss = tf.reduce_sum(z * dz)
    want = tape.gradient(loss, layer.kernel).numpy()  # [kh, kw, C, M]
    got = depthwise_per_example_gradients(x, dz, config["k"], config["s"], config["pad"],
                                          config["d"], 1)[0].numpy()  # [C, kh·kw, M]
    got = np.transpose(got, [1, 0, 2]).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_einsum_layouts_and_refusals():
    layout = einsum_layout("abcd,ecd->ae", 4)
    assert (layout.to_a, layout.to_d, layout.kernel_perm) == ("abcd->acd", "ae->ae", (2, 0, 1))
    assert einsum_layout("...b,bc->...c", 3).to_a.endswith("b")
    for refused in ("ab,bb->ab", "ba,bc->ac", "ab,abc->ac", "abc,cd->ad..."):
        assert einsum_layout(refused, 2 + refused.startswith("abc")) is None
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 3)), L.EinsumDense("abc,bc->ab", 4)])
    assert describe_plan(model)["fallback"] == []  # kernel of positions × inputs: G = b


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("make", [depthwise_net, einsum_net, embedding_net],
                         ids=lambda f: f.__name__)
def test_mixed_bfloat16_norms_and_exact_sensitivity(make, bfloat16_policy):
    """bf16 compute, float32 norms and sums: norms equal the bf16 loop to bf16 accuracy;
    removing one example moves the float32 sum by exactly min(‖g_i‖, C) ≤ C."""
    model = build(make)
    x, y = inputs(model), np.array([0, 1, 2, 0, 1, 2], np.int32)
    _, norms = brute_force(model, x, y, MASK, 1e9)
    clip = float(np.median(norms[norms > 0]))
    full = run_ghost(model, x, y, MASK, clip)
    np.testing.assert_allclose(full.grad_norms.numpy(), norms, rtol=3e-2, atol=1e-4)
    for i in (0, 3):
        mask = MASK.copy()
        mask[i] = 0.0
        without = run_ghost(model, x, y, mask, clip)
        moved = np.sqrt(sum(np.sum((a.numpy().astype(np.float64) - b.numpy()) ** 2)
                            for a, b in zip(full.grad_sum, without.grad_sum)))
        assert moved == pytest.approx(min(float(full.grad_norms[i]), clip), rel=1e-4)


class Scale(L.Layer):
    """No rule: its variable falls back to per-example gradients."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w


def mixed_net():
    return keras.Sequential([keras.Input((6, 6, 2)), L.DepthwiseConv2D(3), Scale(),
                             L.Flatten(), L.Dense(3)])


def test_fallback_variable_joins_the_ghost_norm():
    model = build(mixed_net)
    scale = next(layer for layer in model.layers if isinstance(layer, Scale))
    assert describe_plan(model)["fallback"] == [scale.w.path]  # the rule-less layer only
    x, y = inputs(model), np.array([0, 1, 2, 0, 1, 2], np.int32)
    expected, norms = brute_force(model, x, y, MASK, 0.3)
    assert_matches(run_ghost(model, x, y, MASK, 0.3), expected, norms)


@pytest.mark.parametrize("make,method", [(mixed_net, "ghost"),
                                         (lambda: keras.Sequential([keras.Input((3,)), Scale()]),
                                          "vectorized")], ids=["some_rules", "no_rule"])
def test_auto_uses_ghost_with_per_variable_fallback(make, method, caplog):
    """clipping="auto": ghost as soon as a trained variable has a rule, the others fall back
    (logged by path); vectorized only when no trained variable has a rule."""
    import tfdpfair
    model = build(make)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16,) + tuple(model.inputs[0].shape[1:])).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        expected_batch_size=8, micro_batch_size=8, noise_multiplier=1.0, delta=1e-3,
        l2_norm_clip=1.0, noise_seed=1, sampling_seed=2))
    dp.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    with caplog.at_level(logging.INFO):
        dp.fit(x, y, steps=1, verbose=0)
    assert dp.clipping_method == method
    if method == "ghost":
        assert any(re.search(r"fall back.*/scale(_\d+)?/w", r.getMessage())
                   for r in caplog.records)
