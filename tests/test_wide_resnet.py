"""WideResNet with GroupNorm(16) and WS convs (De et al. 2022)."""

import keras
import numpy as np
import pytest

from tfdpfair.models import finetune, wide_resnet
from tfdpfair.models.layers import WSConv2D
from tfdpfair.models.validate import check_dp_compatible
from test_models_layers import numpy_conv2d_same, numpy_standardize  # tests/ is on sys.path

# Zagoruyko & Komodakis 2016, Table 1 / 4 (millions, rounded to 0.1M).
PAPER_PARAMS_M = {"WRN-16-4": 2.7, "WRN-28-10": 36.5, "WRN-40-4": 8.9}


def analytic_wrn_params(depth, k, num_classes=10, in_channels=3):
    ws = lambda cin, cout, ks: ks * ks * cin * cout + 2 * cout  # noqa: E731
    total, cin = ws(in_channels, 16, 3), 16
    for c in (16 * k, 32 * k, 64 * k):
        for b in range((depth - 4) // 6):
            total += 2 * cin + ws(cin, c, 3) + 2 * c + ws(c, c, 3)  # 2 GroupNorms + 2 convs
            if b == 0:
                total += 2 * cin + ws(cin, c, 1)  # skip norm + 1x1 projection
            cin = c
    return total + 2 * cin + cin * num_classes + num_classes


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS_M))
def test_param_counts(variant):
    depth, k = wide_resnet.WRN_VARIANTS[variant]
    model = wide_resnet.build_wide_resnet(variant, 10)
    assert model.count_params() == analytic_wrn_params(depth, k)
    # GroupNorm/WS gains and biases add < 3% to the published (BatchNorm) counts.
    assert model.count_params() / 1e6 == pytest.approx(PAPER_PARAMS_M[variant], rel=0.03)


def test_structure_is_dp_safe():
    model = wide_resnet.build_wide_resnet("WRN-16-4", 10)
    check_dp_compatible(model)
    blocks = [layer for layer in model.layers if isinstance(layer, wide_resnet.WideResNetBlock)]
    assert [b.name for b in blocks] == [  # (16 - 4) / 6 = 2 blocks per stage
        f"stage{s}_block{b}" for s in range(3) for b in range(2)]
    sublayers = [l for b in blocks for l in b._flatten_layers(include_self=False)]
    assert not any(isinstance(l, keras.layers.Conv2D) for l in sublayers + model.layers)
    assert sum(isinstance(l, WSConv2D) for l in sublayers) == 6 * 2 + 3  # + 3 projections
    norms = [l for l in sublayers + model.layers if isinstance(l, keras.layers.GroupNormalization)]
    assert len(norms) == 6 * 2 + 3 + 1 and all(n.groups == 16 for n in norms)
    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    out = model(x, training=True).numpy()
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


def numpy_group_norm(x, groups, gamma, beta, eps=1e-3):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta


def test_block_is_preactivation_act_norm_conv():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 6, 6, 16).astype(np.float32)
    block = wide_resnet.WideResNetBlock(32, stride=2, project=True, groups=16)
    block.build(x.shape)
    for w in block.weights:
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "gamma" in w.path
                 else rng.randn(*w.shape).astype(np.float32) * 0.5)

    def conv(layer, h):
        k = numpy_standardize(layer.kernel.numpy(), layer.gain.numpy())
        return numpy_conv2d_same(h, k, layer.strides) + layer.bias.numpy()

    def norm(layer, h):
        return numpy_group_norm(h, 16, layer.gamma.numpy(), layer.beta.numpy())

    relu = lambda h: np.maximum(h, 0)  # noqa: E731
    skip = conv(block.skip_conv, norm(block.skip_norm, relu(x)))
    out = conv(block.conv0, norm(block.norm0, relu(x)))
    out = conv(block.conv1, norm(block.norm1, relu(out)))
    np.testing.assert_allclose(block(x).numpy(), out + skip, rtol=1e-3, atol=1e-3)


def test_finetune_modes_and_serialization(tmp_path):
    model = wide_resnet.build_wide_resnet("WRN-16-4", 5, input_shape=(16, 16, 3),
                                          head_init="normal")
    head_params = 256 * 5 + 5
    assert finetune.set_trainable(model, "head") == head_params
    last = [l for l in model.layers if l.name.startswith(("stage2_", "final_"))]
    assert finetune.set_trainable(model, ("last_stages", 1)) == head_params + sum(
        int(np.prod(w.shape)) for l in last for w in l.weights)
    finetune.set_trainable(model, "all")
    path = str(tmp_path / "wrn.keras")
    model.save(path)
    x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    np.testing.assert_allclose(keras.models.load_model(path)(x).numpy(), model(x).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="6n"):
        wide_resnet.build_wide_resnet((15, 2))
