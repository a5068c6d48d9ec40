"""Ghost clipping against a brute-force loop of batch-size-1 gradients (and the vectorized
method): per-example norms and the clipped sum, for every layer rule and whole models, with
masks, clip norms above and below ‖g_i‖, non-finite examples and the WS variance floor."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.models.layers import WSConv2D
from tfdpfair.models.nfnet import build_nfnet
from tfdpfair.models.wide_resnet import build_wide_resnet
from tfdpfair.privacy.clipping import clipped_grad_sum
from tfdpfair.privacy.ghost_clipping import (
    batch_example_loss_fn, describe_plan, ghost_clipped_grad_sum)
from tfdpfair.privacy import ghost_linear
from tfdpfair.privacy.ghost_linear import choose_mode
from tfdpfair.training.example_loss import example_loss_fn

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MASK = np.array([1, 1, 0, 1, 1, 1], np.float32)


def perturb(model, seed=0, scale=0.3):
    """Random weights everywhere (zero-initialised heads and SkipInit gains included)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v.numpy() + scale * rng.normal(size=v.shape).astype(np.float32))
    return model


def mlp():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(3)])


def sequence_net():  # Dense on rank-3 inputs (Gram trick) and LayerNormalization
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((5, 6)), keras.layers.Dense(7, activation="gelu"),
                             keras.layers.LayerNormalization(), keras.layers.Flatten(),
                             keras.layers.Dense(3)])


def grouped_conv_net():
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((7, 7, 4)), keras.layers.Conv2D(6, 3, groups=2, activation="relu"),
        keras.layers.Conv2D(4, (3, 2), strides=2, padding="same"),
        keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", use_bias=False),
        keras.layers.Flatten(), keras.layers.Dense(3)])


def ws_gn_net():  # grouped and strided WS convs (both paddings), GroupNorm affine parameters
    keras.utils.set_random_seed(4)
    return keras.Sequential([
        keras.Input((6, 6, 4)), WSConv2D(8, 3, groups=2, name="ws0"),
        keras.layers.GroupNormalization(4), keras.layers.Activation("relu"),
        WSConv2D(8, 3, strides=2, name="ws_s2"),  # 6 -> 3, SAME pads (0, 1)
        WSConv2D(4, 3, strides=2, padding="valid", groups=2, name="ws_valid"),  # 3 -> 1
        WSConv2D(6, 1, strides=2, name="ws1"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])


def nfnet_nano():  # grouped WS convs, squeeze-excite, SkipInit gains
    keras.utils.set_random_seed(5)
    return build_nfnet("nano", 3, (8, 8, 3), drop_rate=0.0, stochdepth_rate=0.0)


def small_wrn():  # WRN-10-1 with GroupNorm(4) and SkipInit
    keras.utils.set_random_seed(6)
    return build_wide_resnet((10, 1), 3, (8, 8, 3), groups=4, use_skip_init=True)


def data(shape, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n,) + shape).astype(np.float32),
            rng.integers(0, 3, n).astype(np.int32))


def per_example_grads(model, x, y, mask):
    """g_i (float64) and ‖g_i‖ with one GradientTape per real, finite example (else 0)."""
    variables = model.trainable_variables
    grads, norms = [], np.zeros(len(x))
    for i in range(len(x)):
        if mask[i] == 0 or not np.all(np.isfinite(x[i])):
            grads.append(None)
            continue
        with tf.GradientTape() as tape:
            loss = LOSS(y[i:i + 1], model(x[i:i + 1], training=True))
        grads.append([g.numpy().astype(np.float64) for g in tape.gradient(
            loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)])
        norms[i] = np.sqrt(sum(np.sum(g ** 2) for g in grads[-1]))
    return grads, norms


def clipped_sum(grads, norms, variables, clip):
    """Σ_i m_i·g_i·min(1, C/‖g_i‖) over the examples that have a gradient."""
    total = [np.zeros(v.shape, np.float64) for v in variables]
    for g_i, n_i in zip(grads, norms):
        for t, g in zip(total, g_i or []):
            t += g * min(1.0, clip / n_i)
    return total


def brute_force(model, x, y, mask, clip):
    grads, norms = per_example_grads(model, x, y, mask)
    return clipped_sum(grads, norms, model.trainable_variables, clip), norms


def run_ghost(model, x, y, mask, clip, mode="auto"):
    return ghost_clipped_grad_sum(
        model, batch_example_loss_fn(model, LOSS), model.trainable_variables,
        (tf.constant(x), tf.constant(y)), tf.constant(mask), clip, has_aux=True,
        conv_mode=mode)


def assert_matches(result, expected, norms, mask, clip, rtol=2e-4):
    np.testing.assert_allclose(result.grad_norms.numpy(), norms, rtol=rtol, atol=1e-6)
    for got, want in zip(result.grad_sum, expected):
        scale = max(np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=rtol * scale)
    assert result.num_examples.numpy() == np.sum(mask * np.isfinite(norms))
    assert result.num_clipped.numpy() == np.sum(norms > clip)


def middle_norm(norms):
    real = np.sort(norms[(MASK > 0) & np.isfinite(norms) & (norms > 0)])
    return float(0.5 * (real[len(real) // 2 - 1] + real[len(real) // 2]))  # between two norms


CASES = [(mlp, (6,)), (sequence_net, (5, 6)), (grouped_conv_net, (7, 7, 4)),
         (ws_gn_net, (6, 6, 4))]


@pytest.fixture(params=["whole_batch", "native", "one_example_chunks"])
def chunking(request, monkeypatch):
    """How the per-example products and the clipped sums are formed:

    * whole_batch: the defaults (these small layers: im2col patches over the whole batch, the
      direct-mode sums from the kept per-example gradients, the ghost-mode ones by one batched
      native kernel gradient);
    * native: the native per-example kernel gradients whatever T is (where this TF has a
      grouped Conv2DBackpropFilter, e.g. with oneDNN), nothing kept, every conv sum native;
    * one_example_chunks: one example per chunk, native per-example gradients kept for the
      sums, the ghost-mode sums from im2col patches (NATIVE_WEIGHTED_SUM off).
    """
    if request.param in ("native", "one_example_chunks"):
        monkeypatch.setattr(ghost_linear, "NATIVE_MIN_POSITIONS", 0)
    if request.param == "native":
        monkeypatch.setattr(ghost_linear, "KEEP_PER_EXAMPLE_BYTES", 0)
    if request.param == "one_example_chunks":
        monkeypatch.setattr(ghost_linear, "CHUNK_BYTES", 1)
        monkeypatch.setattr(ghost_linear, "NATIVE_CHUNK_BYTES", 1)
        monkeypatch.setattr(ghost_linear, "NATIVE_WEIGHTED_SUM", False)
    return request.param


@pytest.mark.parametrize("make_model,shape", CASES, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("mode", ["ghost", "direct"])
def test_layer_rules_match_brute_force(make_model, shape, mode, chunking):
    model = perturb(make_model())
    assert describe_plan(model)["fallback"] == []
    x, y = data(shape)
    grads, norms = per_example_grads(model, x, y, MASK)
    mid = middle_norm(norms)
    for clip in (1e-3 * mid, mid, 1e3 * mid):  # all clipped, mixed, none clipped
        expected = clipped_sum(grads, norms, model.trainable_variables, clip)
        assert_matches(run_ghost(model, x, y, MASK, clip, mode), expected, norms, MASK, clip)


@pytest.mark.parametrize("make_model", [nfnet_nano, small_wrn], ids=["nfnet_nano", "wrn_10_1"])
def test_whole_models_match_brute_force(make_model, chunking):
    model = perturb(make_model(), scale=0.2)
    assert describe_plan(model)["fallback"] == []
    x, y = data((8, 8, 3))
    x[4] = np.nan  # a real example with a non-finite gradient: factor 0, counted
    grads, norms = per_example_grads(model, x, y, MASK)
    clip = middle_norm(norms)
    expected = clipped_sum(grads, norms, model.trainable_variables, clip)
    for mode in ("ghost", "direct", "auto"):
        result = run_ghost(model, x, y, MASK, clip, mode)
        norms_ok = np.where(np.isfinite(x).all(axis=(1, 2, 3)), norms, 0.0)
        assert_matches(result, expected, norms_ok, MASK * (norms_ok > 0), clip, rtol=5e-4)
        assert result.num_nonfinite.numpy() == 1
        assert result.kept.numpy().tolist() == [1, 1, 0, 1, 0, 1]


def test_ws_variance_floor_is_exact():
    """A filter with N·var < eps (standardisation floor active) and one exactly at the
    ordinary branch: the kernel gradient is still exact w.r.t. the raw kernel."""
    model = perturb(ws_gn_net())
    kernel = model.get_layer("ws0").kernel
    k = kernel.numpy()
    k[..., 0] = 0.3 + 1e-4 * np.random.default_rng(1).normal(size=k[..., 0].shape)
    kernel.assign(k)
    x, y = data((6, 6, 4))
    expected, norms = brute_force(model, x, y, MASK, 1e3)
    for mode in ("ghost", "direct"):
        assert_matches(run_ghost(model, x, y, MASK, 1e3, mode), expected, norms, MASK, 1e3,
                       rtol=1e-3)


def test_padding_and_nonfinite_contribute_exactly_zero():
    model = perturb(grouped_conv_net())
    x, y = data((7, 7, 4), n=8)
    reference = run_ghost(model, x[:5], y[:5], np.ones(5, np.float32), 0.5)
    garbage = x.copy()
    garbage[5] = np.nan  # real but non-finite
    garbage[6:] = np.inf  # padding
    mask = np.array([1] * 6 + [0, 0], np.float32)
    result = run_ghost(model, garbage, y, mask, 0.5)
    for a, b in zip(reference.grad_sum, result.grad_sum):
        assert np.all(np.isfinite(b.numpy()))
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-8)
    assert result.num_nonfinite.numpy() == 1 and result.num_examples.numpy() == 5
    np.testing.assert_allclose(result.loss_sum.numpy(), reference.loss_sum.numpy(), rtol=1e-6)


class Scale(keras.layers.Layer):
    """A layer without a rule: its variable falls back to vectorized per-example gradients."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w


def test_fallback_variables_join_the_global_norm():
    keras.utils.set_random_seed(7)
    model = perturb(keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), Scale(),
                                      keras.layers.Dense(3)]))
    assert len(describe_plan(model)["fallback"]) == 1
    x, y = data((6,))
    expected, norms = brute_force(model, x, y, MASK, 0.3)
    assert_matches(run_ghost(model, x, y, MASK, 0.3), expected, norms, MASK, 0.3)


def test_augmult_and_tf_function_match_the_vectorized_method(chunking):
    """K = 2 views per example, compiled: same as clipping.clipped_grad_sum (per-example)."""
    model = perturb(ws_gn_net())
    x, y = data((2, 6, 6, 4))
    examples = (tf.constant(x), tf.constant(y))
    ghost_fn = batch_example_loss_fn(model, LOSS, augmult=2)
    ghost = tf.function(lambda: ghost_clipped_grad_sum(
        model, ghost_fn, model.trainable_variables, examples, MASK, 0.05, has_aux=True))()
    vectorized = clipped_grad_sum(example_loss_fn(model, LOSS, augmult=2),
                                  model.trainable_variables, examples, MASK, 0.05, has_aux=True)
    np.testing.assert_allclose(ghost.grad_norms.numpy(), vectorized.grad_norms.numpy(), rtol=2e-4)
    for a, b in zip(ghost.grad_sum, vectorized.grad_sum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(ghost.loss_sum.numpy(), vectorized.loss_sum.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ghost.aux[1].numpy(), vectorized.aux[1].numpy(), rtol=1e-4,
                               atol=1e-6)


def test_one_example_moves_the_sum_by_at_most_c():
    model = perturb(grouped_conv_net())
    clip = 0.05
    x, y = data((7, 7, 4))
    x[0] *= 100.0
    full = run_ghost(model, x, y, np.ones(6, np.float32), clip)
    without = run_ghost(model, x, y, np.array([0, 1, 1, 1, 1, 1], np.float32), clip)
    diff = np.sqrt(sum(np.sum((a.numpy() - b.numpy()) ** 2)
                       for a, b in zip(full.grad_sum, without.grad_sum)))
    assert diff <= clip * (1 + 1e-5)


@pytest.mark.parametrize("make_model,shape", [(ws_gn_net, (6, 6, 4)),
                                              (grouped_conv_net, (7, 7, 4))],
                         ids=["ws_gn_net", "grouped_conv_net"])
def test_xla_gives_the_same_clipped_sum(make_model, shape):
    """jit_compile=True (XLA) over the ghost path: native grouped kernel gradients, chunks
    ordered by control dependencies, patches; same result as without XLA."""
    model = perturb(make_model())
    x, y = data(shape)
    norms = per_example_grads(model, x, y, MASK)[1]
    clip = middle_norm(norms)
    plain = run_ghost(model, x, y, MASK, clip)
    xla = tf.function(lambda: run_ghost(model, x, y, MASK, clip), jit_compile=True)()
    np.testing.assert_allclose(xla.grad_norms.numpy(), plain.grad_norms.numpy(), rtol=1e-5)
    for a, b in zip(xla.grad_sum, plain.grad_sum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_bfloat16_computes_in_bf16_and_clips_in_float32(bfloat16_policy):
    """bf16 forward/backward (the speed option), fp32 norms and clipped sums: the norms equal
    the per-example loop on the same bf16 model to bf16 accuracy, and removing one example
    moves the float32 sum by at most C (sensitivity is exact for the vectors summed)."""
    model = perturb(ws_gn_net())
    assert model.get_layer("ws0").compute_dtype == "bfloat16"
    x, y = data((6, 6, 4))
    _, norms = per_example_grads(model, x, y, MASK)
    clip = middle_norm(norms)
    full = run_ghost(model, x, y, MASK, clip)
    assert all(g.dtype == tf.float32 for g in full.grad_sum)
    np.testing.assert_allclose(full.grad_norms.numpy(), norms, rtol=3e-2, atol=1e-4)
    for i in np.flatnonzero(MASK):
        mask = MASK.copy()
        mask[i] = 0.0
        without = run_ghost(model, x, y, mask, clip)
        moved = np.sqrt(sum(np.sum((a.numpy().astype(np.float64) - b.numpy()) ** 2)
                            for a, b in zip(full.grad_sum, without.grad_sum)))
        expected = min(float(full.grad_norms[i]), clip)  # ‖c_i·g_i‖ of the vector summed
        assert moved == pytest.approx(expected, rel=1e-4)
        assert moved <= clip * (1 + 1e-5)


def test_layer_wrappers_are_removed_and_errors_are_clear():
    model = mlp()
    x, y = data((6,))
    run_ghost(model, x, y, MASK, 0.5)
    assert all("call" not in layer.__dict__ for layer in model.layers)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        run_ghost(model, x, y, MASK, 0.0)
    assert choose_mode(64, 2304, 256) == "ghost" and choose_mode(1024, 576, 64) == "direct"


@pytest.mark.parametrize("augmult", [1, 2])
def test_dp_model_fit_is_the_same_with_ghost_and_vectorized_clipping(augmult):
    """DPConfig(clipping=...) changes how, not what: same seeds, same weights."""
    import tfdpfair
    from tfdpfair.privacy.ghost_linear import native_grouped_backprop_supported
    # TF's plain Eigen CPU kernels (no oneDNN, e.g. AVX2-only CPUs) cannot differentiate a
    # stock grouped Conv2D at all (not even without DP); grouped rules are tested above.
    groups = 2 if native_grouped_backprop_supported() else 1
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 3, 24).astype(np.int32)
    results = {}
    for method in ("vectorized", "ghost"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.GroupNormalization(groups=2), keras.layers.Activation("tanh"),
            keras.layers.Conv2D(4, 3, groups=groups), keras.layers.Flatten(),
            keras.layers.Dense(3)])
        dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
            expected_batch_size=8, micro_batch_size=4, noise_multiplier=0.5, delta=1e-3,
            l2_norm_clip=0.3, augmult=augmult, clipping=method, noise_seed=1, sampling_seed=2))
        dp.compile(optimizer=keras.optimizers.SGD(0.3),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        dp.fit(x, y, steps=4, verbose=0)
        results[method] = model.get_weights()
    for a, b in zip(results["vectorized"], results["ghost"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
