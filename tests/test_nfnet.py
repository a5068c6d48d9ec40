"""NFNet: published configuration, parameter counts, signal propagation, DP gradients."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.models import finetune, nfnet
from tfdpfair.models.validate import check_dp_compatible
from tfdpfair.privacy.clipping import clipped_grad_sum
from test_models_layers import numpy_conv2d_same, numpy_standardize  # tests/ is on sys.path

# Published parameter counts (NFNet paper, Table; deepmind-research/nfnets/README.md).
PAPER_PARAMS_M = {"F0": 71.5, "F1": 132.6, "F2": 193.8, "F3": 254.9, "F4": 316.1,
                  "F5": 377.2, "F6": 438.4}
# Published resolutions and dropout (REFERENCES.md / the paper's variant table).
PAPER_TABLE = {  # variant: (depths, train res, test res, dropout)
    "F0": ((1, 2, 6, 3), 192, 256, 0.2), "F1": ((2, 4, 12, 6), 224, 320, 0.3),
    "F2": ((3, 6, 18, 9), 256, 352, 0.4), "F3": ((4, 8, 24, 12), 320, 416, 0.4),
    "F4": ((5, 10, 30, 15), 384, 512, 0.5), "F5": ((6, 12, 36, 18), 416, 544, 0.5),
    "F6": ((7, 14, 42, 21), 448, 576, 0.5), "F7": ((8, 16, 48, 24), 480, 608, 0.5),
}


def ws_conv_params(cin, cout, k=1, groups=1):
    return k * k * (cin // groups) * cout + 2 * cout  # kernel + gain + bias


def analytic_nfnet_params(widths, depths, num_classes, in_channels=3, group_width=128,
                          stem=(16, 32, 64), ratio=0.5, se_ratio=0.5):
    """Parameter count re-derived from the paper's architecture description."""
    total, cin = 0, in_channels
    for cout in tuple(stem) + (widths[0] // 2,):
        total += ws_conv_params(cin, cout, 3)
        cin = cout
    for stage, (cout, depth) in enumerate(zip(widths, depths)):
        for b in range(depth):
            groups = max(1, int(cout * ratio) // group_width)
            width = groups * group_width
            total += ws_conv_params(cin, width) + 2 * ws_conv_params(width, width, 3, groups)
            total += ws_conv_params(width, cout)
            if b == 0:  # transition: stride 2 or channel change -> 1x1 projection
                total += ws_conv_params(cin, cout)
            hidden = int(cout * se_ratio)
            total += cout * hidden + hidden + hidden * cout + cout + 1  # SE + skip_gain
            cin = cout
    total += ws_conv_params(cin, 2 * cin)
    return total + 2 * cin * num_classes + num_classes


@pytest.fixture(scope="module")
def f0_model():
    return nfnet.build_nfnet("F0", 1000, input_shape=(None, None, 3))


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS_M))
def test_analytic_param_counts_match_paper(variant):
    config = nfnet.get_config(variant)
    count = analytic_nfnet_params(config.widths, config.depths, 1000)
    assert count / 1e6 == pytest.approx(PAPER_PARAMS_M[variant], rel=0.005)


def test_built_f0_param_count(f0_model):
    assert f0_model.count_params() == analytic_nfnet_params((256, 512, 1536, 1536),
                                                            (1, 2, 6, 3), 1000)
    assert f0_model.count_params() / 1e6 == pytest.approx(71.5, rel=0.005)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["F1", "F2", "F3", "F4", "F5", "F6"])
def test_built_param_counts_match_paper(variant):
    model = nfnet.build_nfnet(variant, 1000)
    assert model.count_params() / 1e6 == pytest.approx(PAPER_PARAMS_M[variant], rel=0.005)


@pytest.mark.parametrize("variant", ["nano", "micro"])
def test_small_variant_counts_match_formula(variant):
    config = nfnet.get_config(variant)
    model = nfnet.build_nfnet(variant, 10, input_shape=(16, 16, 1))
    assert model.count_params() == analytic_nfnet_params(
        config.widths, config.depths, 10, in_channels=1, group_width=config.group_width,
        stem=config.stem_widths)


@pytest.mark.parametrize("variant", sorted(PAPER_TABLE))
def test_published_variant_table(variant):
    depths, train_res, test_res, drop = PAPER_TABLE[variant]
    config = nfnet.get_config(variant)
    assert config.depths == depths and config.widths == (256, 512, 1536, 1536)
    assert (config.train_resolution, config.test_resolution, config.drop_rate) == (
        train_res, test_res, drop)
    assert (config.group_width, config.bottleneck_ratio, config.se_ratio) == (128, 0.5, 0.5)
    assert (config.alpha, config.stochdepth_rate, config.final_conv_mult) == (0.2, 0.1, 2)


def expected_schedule(depths, alpha=0.2):
    """(beta, expected var of the block input) per block, from the paper's rule."""
    out, var = [], 1.0
    for depth in depths:
        for b in range(depth):
            out.append((1 / math.sqrt(var), var))
            var = (1.0 if b == 0 else var) + alpha ** 2
    return out


def test_beta_and_stochastic_depth_schedule(f0_model):
    blocks = nfnet.nfnet_blocks(f0_model)
    schedule = expected_schedule((1, 2, 6, 3))
    assert len(blocks) == 12
    for i, (block, (beta, _)) in enumerate(zip(blocks, schedule)):
        assert block.beta == pytest.approx(beta, rel=1e-12)
        assert block.alpha == 0.2
        assert block.stochdepth_rate == pytest.approx(0.1 * i / 12)
        assert float(block.skip_gain.numpy()) == 0.0  # SkipInit
    assert [b.name for b in blocks[:4]] == [
        "stage0_block0", "stage1_block0", "stage1_block1", "stage2_block0"]


def test_signal_propagation_follows_schedule(f0_model):
    """With skip gains 1, a block fed N(0, σ_l²) outputs variance σ_{l+1}² (within 6%)."""
    rng = np.random.RandomState(0)
    schedule = expected_schedule((1, 2, 6, 3)) + [(None, None)]
    blocks = nfnet.nfnet_blocks(f0_model)
    in_channels = [128] + [b.out_channels for b in blocks[:-1]]
    try:
        for i, block in enumerate(blocks):
            block.skip_gain.assign(1.0)
            _, var_in = schedule[i]
            z = rng.randn(8, 4, 4, in_channels[i]).astype(np.float32)
            x = np.repeat(np.repeat(z, 2, 1), 2, 2) * math.sqrt(var_in)  # 2x2-constant cells
            out = block(x).numpy()
            measured = np.mean(np.var(out, axis=(0, 1, 2)))
            expected = schedule[i + 1][1] if i + 1 < len(blocks) else var_in + 0.04
            assert measured == pytest.approx(expected, rel=0.06), block.name
    finally:
        for block in blocks:
            block.skip_gain.assign(0.0)


def numpy_gelu(x):
    return 1.7015043497085571 * 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (
        x + 0.044715 * x ** 3)))


def numpy_avg_pool_same(x):
    """2x2 / stride 2 "SAME" average over the valid (unpadded) entries only."""
    b, h, w, c = x.shape
    out = np.zeros((b, -(-h // 2), -(-w // 2), c))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
    return out


def test_nf_block_matches_numpy_reference():
    """The published block: h = β·act(x); shortcut = conv_sc(avgpool(h)); branch = conv0 →
    act → grouped conv1 (stride) → act → grouped conv1b → act → conv2 → 2·SE gate;
    out = α · skip_gain · branch + shortcut."""
    rng = np.random.RandomState(0)
    x = rng.randn(2, 5, 5, 8).astype(np.float32)
    block = nfnet.NFBlock(16, stride=2, beta=0.8, alpha=0.2, group_width=4, se_ratio=0.5)
    block.build(x.shape)
    assert (block.groups, block.width) == (2, 8)
    for w in block.weights:
        w.assign(np.asarray(rng.randn(*w.shape) * (0.5 if w.shape else 1.0), np.float32))

    def conv(layer, h):
        kernel = numpy_standardize(layer.kernel.numpy(), layer.gain.numpy())
        return numpy_conv2d_same(h, kernel, layer.strides, layer.groups) + layer.bias.numpy()

    h = numpy_gelu(x.astype(np.float64)) * 0.8
    shortcut = conv(block.conv_shortcut, numpy_avg_pool_same(h))
    out = conv(block.conv0, h)
    out = conv(block.conv1, numpy_gelu(out))
    out = conv(block.conv1b, numpy_gelu(out))
    out = conv(block.conv2, numpy_gelu(out))
    se = block.se
    pooled = out.mean(axis=(1, 2))
    hidden = np.maximum(pooled @ se.fc0.kernel.numpy() + se.fc0.bias.numpy(), 0)
    gate = 1 / (1 + np.exp(-(hidden @ se.fc1.kernel.numpy() + se.fc1.bias.numpy())))
    out = 2 * gate[:, None, None, :] * out
    expected = 0.2 * float(block.skip_gain.numpy()) * out + shortcut
    np.testing.assert_allclose(block(x).numpy(), expected, rtol=1e-3, atol=1e-3)


def test_init_zero_head_and_identity_blocks():
    model = nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 1))
    x = np.random.RandomState(0).randn(4, 8, 8, 1).astype(np.float32)
    np.testing.assert_array_equal(model(x).numpy(), np.zeros((4, 10)))
    blocks = nfnet.nfnet_blocks(model)
    # A non-projection block with skip_gain 0 returns its input exactly.
    block = nfnet.NFBlock(16, stride=1, group_width=8)
    h = tf.random.normal([2, 4, 4, 16])
    np.testing.assert_array_equal(block(h).numpy(), h.numpy())
    assert all(float(b.skip_gain.numpy()) == 0.0 for b in blocks)
    check_dp_compatible(model)


def test_small_variants_run_on_digit_sizes():
    for size in (8, 16):
        model = nfnet.build_nfnet("nano", 10, input_shape=(size, size, 1))
        assert model(np.zeros((2, size, size, 1), np.float32)).shape == (2, 10)
    micro = nfnet.build_nfnet("micro", 10, input_shape=(32, 32, 3))
    assert micro(np.zeros((1, 32, 32, 3), np.float32), training=True).shape == (1, 10)


def _params(layers):
    return sum(int(np.prod(w.shape)) for layer in layers for w in layer.weights)


def test_set_trainable_modes():
    model = nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 1))
    head = model.get_layer("head")
    assert nfnet.set_trainable(model, "head") == 64 * 2 * 10 + 10 == _params([head])
    last = [layer for layer in model.layers if layer.name.startswith(("stage3_", "final_"))]
    assert nfnet.set_trainable(model, ("last_stages", 1)) == _params(last + [head])
    assert nfnet.set_trainable(model, ("last_stages", 0)) == _params(
        [model.get_layer("final_conv"), head])
    assert nfnet.set_trainable(model, "all") == model.count_params()
    with pytest.raises(ValueError, match="last_stages"):
        nfnet.set_trainable(model, ("last_stages", 5))
    with pytest.raises(ValueError, match="Unknown trainable mode"):
        nfnet.set_trainable(model, "body")


def test_backbone_and_reset_head():
    model = nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 1), head_init="normal")
    x = np.random.RandomState(0).randn(2, 8, 8, 1).astype(np.float32)
    features = finetune.backbone(model)(x).numpy()
    assert features.shape == (2, 128)
    head = model.get_layer("head")
    np.testing.assert_allclose(
        model(x).numpy(), features @ head.kernel.numpy() + head.bias.numpy(), atol=1e-5)
    new = finetune.reset_head(model, 3)
    assert new(x).shape == (2, 3)
    np.testing.assert_array_equal(new(x).numpy(), 0.0)
    assert new.get_layer("stage0_block0") is model.get_layer("stage0_block0")


def test_save_and_load_roundtrip(tmp_path):
    model = nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 1), head_init="normal")
    for block in nfnet.nfnet_blocks(model):
        block.skip_gain.assign(0.3)
    x = np.random.RandomState(0).randn(2, 8, 8, 1).astype(np.float32)
    path = str(tmp_path / "nano.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert [b.beta for b in nfnet.nfnet_blocks(loaded)] == [
        b.beta for b in nfnet.nfnet_blocks(model)]


# A 2-stage NFNet from the same code (grouped convs, SE, strided projection, stochastic depth,
# dropout): smaller graph than "nano", so tf.vectorized_map traces faster.
PICO = nfnet.NFNetConfig(
    name="pico", widths=(8, 16), depths=(1, 1), group_width=4, stem_widths=(4, 4, 8),
    stem_strides=(1, 1, 1, 1), stage_strides=(1, 2))


def _dp_test_model(drop_rate, stochdepth_rate, variant=PICO):
    keras.utils.set_random_seed(0)  # the weights must not depend on earlier tests
    model = nfnet.build_nfnet(variant, 10, input_shape=(8, 8, 1), drop_rate=drop_rate,
                              stochdepth_rate=stochdepth_rate, head_init="normal")
    for block in nfnet.nfnet_blocks(model):
        block.skip_gain.assign(0.5)  # so that every layer gets a non-zero gradient
    head = model.get_layer("head")
    head.kernel.assign(tf.random.normal(head.kernel.shape, stddev=0.3, seed=1))
    return model


def _loss_fn(model):
    def loss(example):
        x, y = example
        logits = model(x[None], training=True)
        return keras.losses.sparse_categorical_crossentropy(
            y[None], logits, from_logits=True)[0]
    return loss


def test_per_example_clipped_gradients_match_brute_force():
    model = _dp_test_model(0.0, 0.0)
    rng = np.random.RandomState(0)
    x = rng.randn(4, 8, 8, 1).astype(np.float32)
    y = np.array([1, 3, 5, 7], np.int32)
    mask = np.array([1, 1, 1, 0], np.float32)
    variables = model.trainable_variables
    per_example = []
    for i in range(4):
        with tf.GradientTape() as tape:
            loss = _loss_fn(model)((tf.constant(x[i]), tf.constant(y[i])))
        per_example.append([g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)])
    norms = np.array([math.sqrt(sum(np.sum(g ** 2) for g in gs)) for gs in per_example])
    assert np.all(norms > 0)
    clip = float(np.median(norms[:3]))
    factors = mask * np.minimum(1.0, clip / norms)
    expected = [sum(factors[i] * per_example[i][v] for i in range(4))
                for v in range(len(variables))]
    result = clipped_grad_sum(_loss_fn(model), variables, (tf.constant(x), tf.constant(y)),
                              tf.constant(mask), clip)
    for got, want in zip(result.grad_sum, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(result.grad_norms.numpy(), mask * norms, rtol=1e-4)
    # Every trained layer really received gradient from some real example (nothing silently
    # disconnected; a ReLU can be dead for one example, e.g. in the 1-unit SE hidden layer).
    assert all(any(np.any(gs[v] != 0) for gs in per_example[:3]) for v in range(len(variables)))


def test_per_example_gradients_with_dropout_and_stochastic_depth():
    """training=True with dropout and stochastic depth runs under vectorized_map, stays finite,
    and draws independent masks per example (identical inputs get different gradients)."""
    model = _dp_test_model(0.5, 0.5)
    x = tf.constant(np.tile(np.random.RandomState(0).randn(1, 8, 8, 1), (8, 1, 1, 1)),
                    tf.float32)
    y = tf.constant([2] * 8, tf.int32)
    result = clipped_grad_sum(_loss_fn(model), model.trainable_variables, (x, y),
                              tf.ones([8]), 1.0)
    assert all(np.all(np.isfinite(g.numpy())) for g in result.grad_sum)
    norms = result.grad_norms.numpy()
    assert np.all(np.isfinite(norms)) and len(np.unique(np.round(norms, 6))) > 1
