"""The DP transform: noise std σC once per logical step, normalisation by the expected batch,
and DESIGN.md invariant 1 across micro-batches."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.privacy.clipping import clipped_grad_sum
from tfdpfair.privacy.dp_sgd import DPConfig, DPGradientAccumulator
from tfdpfair.privacy.sampling import PoissonSampler

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_noise_std_is_sigma_times_c_on_the_sum():
    sigma, clip, batch = 1.7, 0.3, 50.0
    variable = tf.Variable(tf.zeros([200_000]))
    acc = DPGradientAccumulator([variable], clip, sigma, batch)
    noise_on_sum = acc.noisy_mean_gradient(11, 0)[0].numpy() * batch
    assert abs(noise_on_sum.mean()) < 4 * sigma * clip / np.sqrt(noise_on_sum.size)
    assert noise_on_sum.std() == pytest.approx(sigma * clip, rel=0.01)


def test_noise_is_drawn_once_per_logical_step_not_per_microbatch():
    sigma, clip, batch = 2.0, 1.0, 10.0
    variable = tf.Variable(tf.zeros([100_000]))
    acc = DPGradientAccumulator([variable], clip, sigma, batch)
    for _ in range(8):  # eight micro-batches of padding: they add nothing, and no noise
        acc.accumulate(_clipped([tf.zeros([100_000])]))
    out = acc.noisy_mean_gradient(3, 0)[0].numpy() * batch
    assert out.std() == pytest.approx(sigma * clip, rel=0.01)  # not sqrt(8)·σC


def test_steps_and_variables_get_independent_noise():
    a, b = tf.Variable(tf.zeros([50_000])), tf.Variable(tf.zeros([50_000]))
    acc = DPGradientAccumulator([a, b], 1.0, 1.0, 1.0)
    first = acc.noisy_mean_gradient(5, 0)
    second = acc.noisy_mean_gradient(5, 1)
    for x, y in [(first[0], first[1]), (first[0], second[0])]:
        assert abs(np.corrcoef(x.numpy(), y.numpy())[0, 1]) < 0.03


@pytest.mark.parametrize("rescale", [False, True])
def test_output_is_sum_plus_noise_over_expected_batch(rescale):
    """Same seed with and without a signal: the difference is exactly sum/(B·s)."""
    clip, batch = 0.5, 40.0
    signal = np.random.default_rng(0).normal(size=[7, 3]).astype(np.float32)
    outputs = []
    for total in (signal, np.zeros_like(signal)):
        acc = DPGradientAccumulator([tf.Variable(tf.zeros([7, 3]))], clip, 1.3, batch,
                                    rescale_to_unit_norm=rescale)
        acc.accumulate(_clipped([tf.constant(total)]))
        outputs.append(acc.noisy_mean_gradient(9, 0)[0].numpy())
    scale = batch * (clip if rescale else 1.0)
    np.testing.assert_allclose(outputs[0] - outputs[1], signal / scale, rtol=1e-5, atol=1e-6)


def test_accumulator_resets_after_each_step():
    acc = DPGradientAccumulator([tf.Variable(tf.zeros([4]))], 1.0, 1.0, 1.0)
    acc.accumulate(_clipped([tf.ones([4])]))
    acc.noisy_mean_gradient(1, 0)
    assert np.all(acc.grad_sums[0].numpy() == 0)


@pytest.mark.parametrize("micro_batch_size", [1, 3, 8, 64])
def test_logical_step_sum_is_independent_of_microbatching(micro_batch_size):
    """Invariant 1 across micro-batches: accumulating a Poisson logical batch in micro-batches
    of any size gives the brute-force Σ clip(g_i) over the step, so adding or removing one
    example moves it by at most C however many micro-batches the step spans."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(3)])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int32)
    clip = 0.1
    sampler = PoissonSampler(40, 0.5, micro_batch_size, seed=4)
    batch = sampler.logical_batch(0)

    def step_sum(drop_index=None):
        acc = DPGradientAccumulator(model.trainable_variables, clip, 1.0, 20.0)
        for k in range(batch.num_microbatches):
            idx, mask = batch.indices[k], batch.mask[k].copy()
            if drop_index is not None:
                mask[idx == drop_index] = 0.0
            acc.accumulate(clipped_grad_sum(
                lambda e: LOSS(e[1][None], model(e[0][None])), model.trainable_variables,
                (tf.constant(x[idx]), tf.constant(y[idx])), tf.constant(mask), clip))
        return [v.numpy().copy() for v in acc.grad_sums]

    chosen = batch.indices[batch.mask > 0]
    brute = [np.zeros(v.shape) for v in model.trainable_variables]
    for i in chosen:
        with tf.GradientTape() as tape:
            loss = LOSS(y[i:i + 1], model(x[i:i + 1]))
        grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        for b, g in zip(brute, grads):
            b += g * min(1.0, clip / norm)
    full = step_sum()
    for got, want in zip(full, brute):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    without = step_sum(drop_index=chosen[0])
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(full, without)))
    assert 0 < diff <= clip * (1 + 1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(l2_norm_clip=0.0, noise_multiplier=1.0), "l2_norm_clip"),
    (dict(noise_multiplier=None, target_epsilon=None), "noise_multiplier, a target_epsilon"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, augmult=0), "augmult"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPConfig(**kwargs)


def _clipped(grad_sum):
    from tfdpfair.privacy.clipping import ClippedGradients
    zero = tf.constant(0.0)
    return ClippedGradients(grad_sum, zero, zero, zero, tf.zeros([0]))
