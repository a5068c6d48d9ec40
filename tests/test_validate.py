"""DP-safety validation: example-mixing layers are refused, with the layer path and the fix."""

import keras
import numpy as np
import pytest
from keras import ops

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
    assert isinstance(fixed, keras.Model)  # the default return value is unchanged
    assert fixed.get_layer("bn_gn").groups == 12
    fixed = validate.replace_batch_norm_with_group_norm(model, groups=8)
    assert fixed.get_layer("bn_gn").groups == 6


def largest_divisor_up_to(channels, groups):
    return max(g for g in range(1, groups + 1) if channels % g == 0)


def test_group_norm_report_lists_every_adjusted_layer_and_warns_once(caplog):
    x = keras.Input((4, 4, 3))
    h = x
    for channels in (24, 32, 14, 17, 8):
        h = keras.layers.Conv2D(channels, 1, name=f"conv{channels}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{channels}")(h)
    model = keras.Model(x, h, name="net")
    with caplog.at_level("WARNING"):
        fixed, report = validate.replace_batch_norm_with_group_norm(
            model, groups=16, return_report=True)
    expected = {f"net/bn{c}": largest_divisor_up_to(c, 16) for c in (24, 32, 14, 17, 8)}
    assert {c.path: c.groups for c in report.replaced} == expected
    for change in report.replaced:
        assert fixed.get_layer(change.new_name).groups == change.groups
        assert change.requested_groups == 16
    adjusted = {c.path: c for c in report.adjusted}
    assert sorted(adjusted) == sorted(p for p, g in expected.items() if g != 16)
    assert "24 channels are not divisible by 16" in adjusted["net/bn24"].reason
    assert "fewer than the 16 groups" in adjusted["net/bn8"].reason
    assert "LayerNormalization" in adjusted["net/bn17"].reason  # 17 is prime: 1 group
    assert {c.path: c for c in report.replaced}["net/bn32"].reason == ""  # 16 groups: as asked
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert all(path in warnings[0].getMessage() for path in adjusted)
    assert "net/bn32" not in warnings[0].getMessage()


def test_group_norm_report_is_quiet_when_nothing_is_adjusted(caplog):
    with caplog.at_level("WARNING"):
        _, report = validate.replace_batch_norm_with_group_norm(
            nested_functional_with_bn(), groups=16, return_report=True)
    assert len(report.replaced) == 2 and report.adjusted == ()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


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


def test_batch_norm_message_lists_layers_once_and_stays_short():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    bn_names = [layer.name for layer in model.layers
                if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bn_names) > 20
    with pytest.raises(DPIncompatibleModelError) as info:
        check_dp_compatible(model)
    message = str(info.value)
    assert len(message) < 2000
    assert f"{len(bn_names)} layer(s)" in message
    assert f"{model.name}/{bn_names[0]} (BatchNormalization)" in message
    assert f"... and {len(bn_names) - 10} more" in message
    assert bn_names[-1] not in message
    assert message.count(validate.BN_FIX) == 1  # the fix once, not once per layer
    assert message.count("normalises with the mean and variance") == 1


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


# --- behavioural probe: a training-mode call must not change the model's state ----------------

class RunningMean(keras.layers.Layer):
    """Subtracts a running mean of its inputs, updated from each training batch (not DP-safe)."""

    def build(self, input_shape):
        self.mean = self.add_weight(
            name="mean", shape=(input_shape[-1],), initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.mean.assign(0.9 * self.mean + 0.1 * ops.mean(x, axis=0))
        return x - self.mean


def all_state_bytes(model):
    """Every variable, random-seed states included, as raw bytes (bit-exact comparison)."""
    return [np.asarray(v).tobytes() for v in model.variables]


def running_mean_model():
    x = keras.Input((5,))
    h = keras.layers.Dense(5, name="dense")(x)
    h = keras.layers.Dropout(0.5, name="drop")(RunningMean(name="running_mean")(h))
    return keras.Model(x, keras.layers.Dense(2, name="head")(h), name="probe")


def test_probe_refuses_a_layer_that_updates_state_from_the_batch():
    model = running_mean_model()
    check_dp_compatible(model)  # the deny-list does not know this layer
    before = all_state_bytes(model)
    with pytest.raises(DPIncompatibleModelError) as info:
        validate.check_training_call_is_stateless(model)
    message = str(info.value)
    assert message.count("probe/running_mean (RunningMean): mean") == 1
    assert message.count("make the layer stateless") == 1
    assert "public data" in message and "trainable = False" in message
    assert "probe/drop" not in message  # Dropout's seed state changes but is not flagged
    assert all_state_bytes(model) == before  # the probe restored everything, bit for bit
    # Independently: one training call really does move the mean, by 0.1 · batch mean.
    x = np.random.RandomState(0).randn(3, 5).astype(np.float32)
    layer = model.get_layer("running_mean")
    layer(x, training=True)
    np.testing.assert_allclose(layer.mean.numpy(), 0.1 * x.mean(axis=0), rtol=1e-6)


def test_probe_accepts_random_layers_and_per_example_normalisers():
    x = keras.Input((8, 8, 4))
    h = keras.layers.RandomFlip(name="flip")(x)
    h = keras.layers.GaussianNoise(0.1, name="noise")(h)
    h = keras.layers.GroupNormalization(2, name="gn")(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    h = keras.layers.Dropout(0.5, name="drop")(keras.layers.Flatten()(h))
    model = keras.Model(x, keras.layers.Dense(3)(h), name="ok")
    seed_states = [v for v in model.variables if "seed_generator" in v.path]
    assert len(seed_states) >= 3  # the random layers do carry state that training advances
    before = all_state_bytes(model)
    model(np.zeros((2, 8, 8, 4), np.float32), training=True)
    assert all_state_bytes(model) != before  # ... as this plain training call shows
    before = all_state_bytes(model)
    validate.check_training_call_is_stateless(model)
    assert all_state_bytes(model) == before


def test_probe_accepts_nfnet_and_asks_for_unknown_input_shapes():
    model = nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 1), stochdepth_rate=0.5,
                              drop_rate=0.5)
    before = all_state_bytes(model)
    validate.check_training_call_is_stateless(model)
    assert all_state_bytes(model) == before
    flexible = nfnet.build_nfnet("nano", 10)  # input (None, None, 3)
    with pytest.raises(ValueError, match="input_shape"):
        validate.check_training_call_is_stateless(flexible)
    with pytest.raises(ValueError, match="fully known"):
        validate.check_training_call_is_stateless(flexible, input_shape=(None, 8, 3))
    validate.check_training_call_is_stateless(flexible, input_shape=(8, 8, 3))


def test_probe_catches_trainable_batch_norm_and_accepts_a_frozen_one():
    model = nested_functional_with_bn()
    before = all_state_bytes(model)
    with pytest.raises(DPIncompatibleModelError) as info:
        validate.check_training_call_is_stateless(model)
    message = str(info.value)
    for path in ("outer/outer_bn", "outer/seq/bn"):
        assert message.count(f"{path} (BatchNormalization): moving_mean, moving_variance") == 1
    assert "2 layer(s)" in message and message.count(validate.BN_FIX) == 1
    assert all_state_bytes(model) == before
    validate.freeze_batch_norm(model)
    validate.check_training_call_is_stateless(model)
    assert all_state_bytes(model) == before


def test_probe_handles_several_inputs_and_integer_inputs():
    image, tokens = keras.Input((4,), name="image"), keras.Input((3,), dtype="int32", name="ids")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(2, 4, name="emb")(tokens))
    h = keras.layers.Concatenate()([RunningMean(name="rm")(image), embedded])
    model = keras.Model({"image": image, "ids": tokens}, keras.layers.Dense(1)(h), name="multi")
    with pytest.raises(DPIncompatibleModelError, match="multi/rm"):
        validate.check_training_call_is_stateless(model)
    with pytest.raises(ValueError, match="2 inputs"):
        validate.check_training_call_is_stateless(model, input_shape=[(4,)])
    safe = keras.Model([image, tokens], keras.layers.Dense(1)(
        keras.layers.Concatenate()([image, embedded])))
    validate.check_training_call_is_stateless(safe)


def test_probe_on_subclassed_model_needs_and_uses_input_shape():
    model = SubclassedWithBN()
    with pytest.raises(ValueError, match="input_shape"):
        validate.check_training_call_is_stateless(model)
    with pytest.raises(DPIncompatibleModelError, match="sub/norm"):
        validate.check_training_call_is_stateless(model, input_shape=(6, 6, 3))
