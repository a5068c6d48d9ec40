"""Per-example clipping against a brute-force loop of batch-size-1 gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.privacy.clipping import clipped_grad_sum

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def dense_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(3)])


def conv_model():
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((6, 6, 2)),
                             keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(3, name="head")])


def brute_force(model, x, y, mask, clip):
    """Σ_i m_i · g_i · min(1, C/||g_i||) with one GradientTape per example, in numpy."""
    variables = model.trainable_variables
    total = [np.zeros(v.shape, np.float64) for v in variables]
    norms = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i:i + 1], model(x[i:i + 1], training=True))
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        norms.append(norm)
        for t, g in zip(total, grads):
            t += mask[i] * g * min(1.0, clip / norm)
    return total, np.array(norms)


def run_clipping(model, x, y, mask, clip):
    def loss_fn(example):
        xi, yi = example
        return LOSS(yi[None], model(xi[None], training=True))
    return clipped_grad_sum(loss_fn, model.trainable_variables, (tf.constant(x), tf.constant(y)),
                            tf.constant(mask), clip)


def data(shape, n=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n,) + shape).astype(np.float32),
            rng.integers(0, 3, n).astype(np.int32))


@pytest.mark.parametrize("make_model,shape", [(dense_model, (6,)), (conv_model, (6, 6, 2))])
@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e3])  # all clipped, mixed, none clipped
def test_matches_brute_force(make_model, shape, clip):
    model = make_model()
    x, y = data(shape)
    mask = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1, 1], np.float32)
    expected, norms = brute_force(model, x, y, mask, clip)
    result = run_clipping(model, x, y, mask, clip)
    for got, want in zip(result.grad_sum, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(result.grad_norms.numpy(), mask * norms, rtol=2e-4)
    assert result.num_examples.numpy() == mask.sum()
    assert result.num_clipped.numpy() == np.sum(mask * (norms > clip))


def test_padding_contributes_exactly_zero_even_if_not_finite():
    model = conv_model()
    x, y = data((6, 6, 2))
    mask = np.array([1] * 6 + [0] * 4, np.float32)
    reference = run_clipping(model, x[:6], y[:6], mask[:6], 0.5)
    garbage = x.copy()
    garbage[6:] = np.nan
    padded = run_clipping(model, garbage, y, mask, 0.5)
    for a, b in zip(reference.grad_sum, padded.grad_sum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)
        assert np.all(np.isfinite(b.numpy()))


def test_only_trainable_variables_are_differentiated():
    model = conv_model()
    model.get_layer("conv").trainable = False
    x, y = data((6, 6, 2))
    mask = np.ones(10, np.float32)
    result = run_clipping(model, x, y, mask, 0.5)
    assert len(result.grad_sum) == len(model.trainable_variables) == 2
    expected, _ = brute_force(model, x, y, mask, 0.5)
    for got, want in zip(result.grad_sum, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-7)


def test_one_example_moves_the_sum_by_at_most_c():
    """Invariant 1 within a micro-batch: add-or-remove one example -> ||Δ|| <= C."""
    model = dense_model()
    clip = 0.05
    for seed in range(5):
        x, y = data((6,), seed=seed)
        x[0] *= 100.0  # an outlier with a huge gradient
        with_all = run_clipping(model, x, y, np.ones(10, np.float32), clip)
        without_first = run_clipping(model, x, y, np.array([0] + [1] * 9, np.float32), clip)
        diff = np.sqrt(sum(np.sum((a.numpy() - b.numpy()) ** 2)
                           for a, b in zip(with_all.grad_sum, without_first.grad_sum)))
        assert diff <= clip * (1 + 1e-5)


def test_rejects_non_positive_clip():
    model = dense_model()
    x, y = data((6,))
    with pytest.raises(ValueError, match="l2_norm_clip"):
        run_clipping(model, x, y, np.ones(10, np.float32), 0.0)
