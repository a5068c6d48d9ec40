"""DP-safety validation: example-mixing layers are refused, with the layer path and the fix."""

import keras
import numpy as np
import pytest

from tfdpfair.models import nfnet, validate
from tfdpfair.models.validate import (
    DPIncompatibleModelError, check_dp_compatible, find_example_mixing_layers)


def sequential_with_bn():
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(16, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, name="head"),
    ], name="seq")


def nested_functional_with_bn():
    inner = sequential_with_bn()
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(32, 1, name="outer_conv")(x)
    h = keras.layers.BatchNormalization(name="outer_bn")(h)
    h = keras.layers.Conv2D(3, 1, name="to_rgb")(h)
    y = inner(h)
    return keras.Model(x, y, name="outer")


def test_error_is_a_value_error():
    assert issubclass(DPIncompatibleModelError, ValueError)


def test_sequential_with_batch_norm_is_refused():
    model = sequential_with_bn()
    with pytest.raises(DPIncompatibleModelError) as info:
        check_dp_compatible(model)
    message = str(info.value)
    assert "seq/bn" in message and "BatchNormalization" in message
    assert "GroupNormalization" in message and "freeze" in message and "nfnet" in message


def test_nested_model_lists_every_offender_with_its_path():
    model = nested_functional_with_bn()
    offenders = find_example_mixing_layers(model)
    assert [o.path for o in offenders] == ["outer/outer_bn", "outer/seq/bn"]
    with pytest.raises(DPIncompatibleModelError, match="2 layer"):
        check_dp_compatible(model)


def test_group_norm_replacement_passes_and_keeps_weights():
    model = nested_functional_with_bn()
    fixed = validate.replace_batch_norm_with_group_norm(model, groups=16)
    assert find_example_mixing_layers(fixed) == []
    check_dp_compatible(fixed)
    group_norms = [layer for _, layer in validate.iter_layers_with_paths(fixed)
                   if isinstance(layer, keras.layers.GroupNormalization)]
    # 32 channels -> 16 groups; 16 channels -> 16 groups.
    assert sorted(g.groups for g in group_norms) == [16, 16]
    np.testing.assert_array_equal(
        fixed.get_layer("outer_conv").kernel.numpy(), model.get_layer("outer_conv").kernel.numpy())
    assert fixed.get_layer("outer_conv") is not model.get_layer("outer_conv")
    x = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
    assert fixed(x, training=True).shape == (2, 2)
    # The original model is untouched.
    assert len(find_example_mixing_layers(model)) == 2


def test_group_count_falls_back_to_a_divisor():
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(12, 1),
                              keras.layers.BatchNormalization(name="bn")])
    fixed = validate.replace_batch_norm_with_group_norm(model, groups=16)
    assert fixed.get_layer("bn_gn").groups == 12
    fixed = validate.replace_batch_norm_with_group_norm(model, groups=8)
    assert fixed.get_layer("bn_gn").groups == 6


def test_frozen_batch_norm_passes():
    model = nested_functional_with_bn()
    assert validate.freeze_batch_norm(model) == 2
    check_dp_compatible(model)
    # Frozen BN uses moving statistics, so examples no longer interact in training mode.
    x = np.random.RandomState(0).randn(4, 8, 8, 3).astype(np.float32)
    together = model(x, training=True).numpy()
    alone = np.concatenate([model(x[i:i + 1], training=True).numpy() for i in range(4)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    model.trainable = False
    model.trainable = True  # propagates to the BN layers: un-frozen again
    assert len(find_example_mixing_layers(model)) == 2


def test_keras_applications_backbone_is_inspected_and_fixed():
    app = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, include_top=False)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in app.layers)
    x = keras.Input((32, 32, 3))
    y = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(app(x)))
    model = keras.Model(x, y, name="clf")
    offenders = find_example_mixing_layers(model)
    assert n_bn > 10 and len(offenders) == n_bn
    assert all(o.path.startswith(f"clf/{app.name}/") for o in offenders)
    fixed = validate.replace_batch_norm_with_group_norm(model)
    check_dp_compatible(fixed)
    assert fixed(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 3)


def test_other_example_mixing_layers_are_refused():
    x = keras.Input((8, 8, 3))
    model = keras.Model(x, keras.layers.MixUp(name="mixup")(x), name="aug")
    with pytest.raises(DPIncompatibleModelError, match="aug/mixup"):
        check_dp_compatible(model)
    rnn = keras.Sequential([keras.Input((5, 3), batch_size=4),
                            keras.layers.LSTM(4, stateful=True, name="lstm")], name="rnn")
    assert [o.path for o in find_example_mixing_layers(rnn)] == ["rnn/lstm"]


def test_per_example_normalisers_and_nfnet_pass():
    x = keras.Input((8, 8, 16))
    h = keras.layers.GroupNormalization(4)(x)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.UnitNormalization()(h)
    check_dp_compatible(keras.Model(x, h))
    check_dp_compatible(nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 1)))


class SubclassedWithBN(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.conv = keras.layers.Conv2D(4, 3)
        self.norm = keras.layers.BatchNormalization(name="norm")

    def call(self, x, training=None):
        return self.norm(self.conv(x), training=training)


def test_subclassed_model_is_inspected_but_not_rebuilt():
    model = SubclassedWithBN()
    model(np.zeros((1, 6, 6, 3), np.float32))
    assert [o.path for o in find_example_mixing_layers(model)] == ["sub/norm"]
    with pytest.raises(TypeError, match="subclassed"):
        validate.replace_batch_norm_with_group_norm(model)
    validate.freeze_batch_norm(model)
    check_dp_compatible(model)
