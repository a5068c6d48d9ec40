"""DESIGN.md invariant 9: ghost clipping keeps the sensitivity bound and exact per-example norms
for every parameter state, not only typical ones (issue 19, case 4).

WSConv2D kernels (grouped, strided, SAME and VALID padding) are set to ill-conditioned states:
a huge mean with a tiny spread (float32 spacing at 1e6 is 0.0625), quantised (few distinct
values), constant (zero variance), N·var exactly at the eps floor and below it, plus a normal
kernel, in float32 and under the mixed_bfloat16 policy. For each:

1. the ghost per-example norms equal an independent brute-force loop of batch-of-1
   GradientTape gradients: in float32 against the same network evaluated in float64 (the
   reference is then well-defined); under bf16 against the per-example loop of the same bf16
   model, to bf16 accuracy;
2. removing any one example moves the clipped sum by at most C·(1 + 1e-5).

The rules without a standardisation (Conv2D/Dense Gram and ‖a‖²‖δ‖² forms, GroupNorm affines,
SkipInit gains) are checked the same way under extreme scales of their parameters.

Before the fix (float32, kernel mean 1e6, std 0.1) the norms were 55% off and one removal
moved the sum by 1.040·C; mean 1e2, std 5e-2: 4e-4 and 1.0000676·C.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.models.layers import WSConv2D
from tfdpfair.models.wide_resnet import build_wide_resnet
from tfdpfair.privacy.ghost_clipping import batch_example_loss_fn, ghost_clipped_grad_sum

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
WS_LAYERS = ("ws0", "ws_s2", "ws_valid", "ws1")
STATES = ["normal", "mean1e6_std0.1", "mean1e2_std5e-2", "quantised", "constant",
          "var_at_eps", "var_below_eps"]
SLACK = 1 + 1e-5


def ws_net():
    keras.utils.set_random_seed(4)
    return keras.Sequential([
        keras.Input((6, 6, 4)), WSConv2D(8, 3, groups=2, name="ws0"),
        keras.layers.GroupNormalization(4, name="gn"), keras.layers.Activation("relu"),
        WSConv2D(8, 3, strides=2, name="ws_s2"),  # 6 -> 3, SAME pads (0, 1)
        WSConv2D(4, 3, strides=2, padding="valid", groups=2, name="ws_valid"),  # 3 -> 1
        WSConv2D(6, 1, strides=2, name="ws1"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])


def set_kernel_state(model, state, seed=1):
    """Random other weights; every WS kernel (and, for the floor cases, eps) in ``state``."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v.numpy() + 0.3 * rng.normal(size=v.shape).astype(np.float32))
    for name in WS_LAYERS:
        layer = model.get_layer(name)
        shape = tuple(layer.kernel.shape)
        n = int(np.prod(shape[:-1]))  # fan-in N (even for every layer here)
        if state == "normal":
            k = rng.normal(size=shape) / np.sqrt(n)
        elif state == "mean1e6_std0.1":
            k = 1e6 + 0.1 * rng.normal(size=shape)
        elif state == "mean1e2_std5e-2":
            k = 1e2 + 5e-2 * rng.normal(size=shape)
        elif state == "quantised":
            k = 3.0 + 0.5 * rng.integers(-1, 2, size=shape)
        elif state == "constant":
            k = np.full(shape, 0.7)
        else:  # 2 ± 2⁻⁸, half each: Σ(w − mean)² = N·2⁻¹⁶ exactly, in float32 and float64
            signs = np.tile([1.0, -1.0], n // 2)
            k = 2.0 + 2.0 ** -8 * np.repeat(signs[:, None], shape[-1], 1).reshape(shape)
            layer.eps = n * 2.0 ** -16 * (1.0 if state == "var_at_eps" else 4.0)
        layer.kernel.assign(k.astype(np.float32))
    return model


def data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6, 6, 4)).astype(np.float32),
            rng.integers(0, 3, n).astype(np.int32))


def brute_force_norms(model, x, y):
    """‖g_i‖ from one GradientTape per example (batch of 1), accumulated in float64."""
    norms = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i:i + 1], model(x[i:i + 1], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        norms.append(np.sqrt(sum(np.sum(np.square(g.numpy().astype(np.float64)))
                                 for g in grads)))
    return np.array(norms)


def float64_twin(model):
    """The same network and weights (and eps), evaluated in float64."""
    keras.mixed_precision.set_global_policy("float64")
    try:
        twin = ws_net()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    for name in WS_LAYERS:
        twin.get_layer(name).eps = model.get_layer(name).eps
    return twin


def ghost(model, x, y, mask, clip, mode):
    return ghost_clipped_grad_sum(
        model, batch_example_loss_fn(model, LOSS), model.trainable_variables,
        (tf.constant(x), tf.constant(y)), tf.constant(mask), clip, has_aux=True,
        conv_mode=mode)


def worst_removal(model, x, y, clip, mode):
    """max_i ‖clipped_sum(all) − clipped_sum(all but i)‖ / C (float64 difference)."""
    mask = np.ones(len(x), np.float32)
    full = ghost(model, x, y, mask, clip, mode)
    worst = 0.0
    for i in range(len(x)):
        without = mask.copy()
        without[i] = 0.0
        part = ghost(model, x, y, without, clip, mode)
        moved = np.sqrt(sum(np.sum((a.numpy().astype(np.float64) - b.numpy()) ** 2)
                            for a, b in zip(full.grad_sum, part.grad_sum)))
        worst = max(worst, moved / clip)
    return full, worst


@pytest.fixture(params=["float32", "mixed_bfloat16"])
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("state", STATES)
def test_ws_norms_and_sensitivity_hold_for_every_kernel_state(state, policy):
    model = set_kernel_state(ws_net(), state)
    x, y = data()
    if policy == "float32":
        reference, rtol = brute_force_norms(float64_twin(model), x.astype(np.float64), y), 1e-5
    else:
        reference, rtol = brute_force_norms(model, x, y), 3e-2  # bf16 forward and backward
    assert np.all(np.isfinite(reference)) and np.all(reference > 0)
    clip = 0.5 * float(np.median(reference))  # about half the examples clipped hard
    for mode in ("ghost", "direct"):
        full, worst = worst_removal(model, x, y, clip, mode)
        np.testing.assert_allclose(full.grad_norms.numpy(), reference, rtol=rtol)
        assert worst <= SLACK, (state, policy, mode, worst)


@pytest.mark.parametrize("offset", [1e2, 1e4])
def test_ws_input_offset_keeps_sensitivity(offset):
    """GroupNorm beta = offset, gamma = 1/offset: the next WS conv sees inputs ≈ offset with a
    spread of 1, so its raw gradient h is almost parallel to 1 and the closed form subtracts
    (1ᵀh)²/N from a nearly equal ‖h‖². Only that layer's kernel is clipped, so its norm is the
    whole norm."""
    model = set_kernel_state(ws_net(), "normal")
    gn = model.get_layer("gn")
    gn.beta.assign(np.full(gn.beta.shape, offset, np.float32))
    gn.gamma.assign(gn.gamma.numpy() / offset)
    x, y = data()
    variables = [model.get_layer("ws_s2").kernel]
    loss_fn = batch_example_loss_fn(model, LOSS)
    mask = np.ones(len(x), np.float32)
    for mode in ("ghost", "direct"):
        run = lambda m, c: ghost_clipped_grad_sum(  # noqa: E731
            model, loss_fn, variables, (tf.constant(x), tf.constant(y)), tf.constant(m), c,
            has_aux=True, conv_mode=mode)
        norms = run(mask, 1e30).grad_norms.numpy()
        clip = 0.5 * float(np.median(norms[norms > 0]))
        full = run(mask, clip)
        for i in range(len(x)):
            without = mask.copy()
            without[i] = 0.0
            moved = np.sqrt(np.sum((full.grad_sum[0].numpy().astype(np.float64)
                                    - run(without, clip).grad_sum[0].numpy()) ** 2))
            assert moved <= clip * SLACK, (offset, mode, i, moved / clip)


def small_wrn():  # Conv2D kernels, GroupNorm affines, SkipInit gains, Dense head
    keras.utils.set_random_seed(6)
    return build_wide_resnet((10, 1), 3, (8, 8, 3), groups=4, use_skip_init=True)


def extreme_parameters(model, state, seed=0):
    """Random weights, then one extreme-but-valid scaling of a family of variables."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        w = v.numpy() + 0.2 * rng.normal(size=v.shape).astype(np.float32)
        if state == "norm_offset" and "beta" in v.path:
            w = w + 1e3  # GroupNorm beta 1e3, gamma 1e-3: next conv inputs ≈ 1e3 ± 1
        elif state == "norm_offset" and "gamma" in v.path:
            w = w * 1e-3
        elif state == "big_gains" and ("gamma" in v.path or "skip_gain" in v.path):
            w = w * 1e3
        elif state == "tiny_kernels" and "kernel" in v.path:
            w = w * 1e-4
        elif state == "huge_kernels" and "kernel" in v.path:
            w = w * 1e4
        v.assign(w.astype(np.float32))
    return model


@pytest.mark.parametrize("state", ["norm_offset", "big_gains", "tiny_kernels", "huge_kernels"])
def test_other_closed_forms_hold_for_extreme_parameters(state):
    """Conv2D/Dense (‖a‖²‖δ‖², Gram or direct), GroupNorm affine and SkipInit gain rules do not
    subtract, so extreme scales leave them exact: norms vs a float64 loop (where its norm is
    finite and nonzero; zero gradients, e.g. dead ReLUs, must stay zero) and removal ≤ C."""
    model = extreme_parameters(small_wrn(), state)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 3, 6).astype(np.int32)
    keras.mixed_precision.set_global_policy("float64")
    try:
        twin = small_wrn()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    reference = brute_force_norms(twin, x.astype(np.float64), y)
    ok = np.isfinite(reference) & (reference > 0)
    assert ok.sum() >= 3
    clip = 0.5 * float(np.median(reference[ok]))
    full, worst = worst_removal(model, x, y, clip, "ghost")  # Gram forms (direct has none)
    norms = full.grad_norms.numpy()
    np.testing.assert_allclose(norms[ok], reference[ok], rtol=1e-5)
    assert np.all(norms[reference == 0] == 0)
    assert worst <= SLACK, (state, worst)
