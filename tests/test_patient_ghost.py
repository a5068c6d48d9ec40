"""Ghost clipping with patient-level units (issue 23): a patient's up to k images × K views are
the positions of one unit. References: a brute-force loop over patients (one GradientTape of
the patient's mean loss over its real images and views, clipped to C, summed in float64), and
dp_accounting directly for ε."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import reference_epsilon

import tfdpfair
from tfdpfair.models.layers import WSConv2D
from tfdpfair.models.wide_resnet import build_wide_resnet
from tfdpfair.privacy import ghost_linear
from tfdpfair.privacy.ghost_clipping import describe_plan, ghost_clipped_grad_sum
from tfdpfair.training.example_loss import batch_patient_loss_fn

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SHAPE = (6, 6, 2)
COUNTS = np.array([3, 1, 2, 0, 2, 3])  # images per patient slot row (k = 3; one has none)
MASK = np.array([1, 1, 0, 1, 1, 1], np.float32)  # patient 2 is not sampled (a padding row)


def perturb(model, seed=0, scale=0.3):
    """Random weights everywhere (GroupNorm affines and SkipInit gains included)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v.numpy() + scale * rng.normal(size=v.shape).astype(np.float32))
    return model


def conv_net():  # Conv2D, GroupNorm, WSConv2D (strided), Dense on vectors
    keras.utils.set_random_seed(3)
    return perturb(keras.Sequential([
        keras.Input(SHAPE), keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.GroupNormalization(2), keras.layers.Activation("tanh"),
        WSConv2D(4, 3, strides=2, name="ws"), keras.layers.Flatten(),
        keras.layers.Dense(3)]))


def small_wrn():  # WRN-10-1: WSConv2D, GroupNorm(4), SkipInit gains, Dense head
    keras.utils.set_random_seed(6)
    return perturb(build_wide_resnet((10, 1), 3, (8, 8, 3), groups=4, use_skip_init=True))


class Scale(keras.layers.Layer):
    """A layer without a ghost rule: its variable takes the per-unit fallback path."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w


def conv_net_with_fallback():  # Conv2D, a rule-less Scale, GroupNorm, Dense
    keras.utils.set_random_seed(4)
    return perturb(keras.Sequential([
        keras.Input(SHAPE), keras.layers.Conv2D(4, 3, strides=2), Scale(),
        keras.layers.GroupNormalization(2), keras.layers.Flatten(), keras.layers.Dense(3)]))


def patients(shape, augmult, seed=0, padding_value=1e3):
    """x [P, k, (K,) *shape], labels [P, k] in {0, 1}, image_mask [P, k] from COUNTS.

    Padding slots hold garbage (``padding_value`` × noise, label 2): the loss must ignore it.
    """
    rng = np.random.default_rng(seed)
    k = int(COUNTS.max())
    views = (augmult,) if augmult > 1 else ()
    x = rng.normal(size=(len(COUNTS), k) + views + shape).astype(np.float32)
    labels = rng.integers(0, 2, (len(COUNTS), k)).astype(np.int32)
    image_mask = (np.arange(k)[None, :] < COUNTS[:, None]).astype(np.float32)
    x[image_mask == 0] = padding_value * rng.normal(size=x[image_mask == 0].shape)
    labels[image_mask == 0] = 2
    return x, labels, image_mask


def brute_force(model, x, labels, image_mask, mask, clip):
    """Per patient (sampled, finite): g_p = ∇ mean loss over its real images × views (float64);
    returns Σ_p clip_C(g_p), the norms (0 when not counted), the loss sum, the units kept."""
    variables = model.trainable_variables
    total = [np.zeros(v.shape, np.float64) for v in variables]
    norms, loss_sum, kept = np.zeros(len(x)), 0.0, 0
    for p in range(len(x)):
        real = image_mask[p] > 0
        if mask[p] == 0:
            continue
        if not real.any():  # a patient without images: loss 0, gradient 0, still counted
            kept += 1
            continue
        images = x[p][real].reshape((-1,) + x.shape[-3:])
        ys = np.repeat(labels[p][real], images.shape[0] // real.sum())
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                ys, model(images, training=True), from_logits=True))
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(
            loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)]
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        if not np.isfinite(norm):
            continue
        norms[p], loss_sum, kept = norm, loss_sum + float(loss), kept + 1
        for t, g in zip(total, grads):
            t += g * min(1.0, clip / norm)
    return total, norms, loss_sum, kept


def run_ghost(model, x, labels, image_mask, mask, clip, augmult, loss=LOSS):
    y = {"labels": tf.constant(labels), "image_mask": tf.constant(image_mask)}
    return ghost_clipped_grad_sum(
        model, batch_patient_loss_fn(model, loss, augmult), model.trainable_variables,
        (tf.constant(x), y), tf.constant(mask), clip, has_aux=True)


def assert_matches(result, expected, mask, clip, rtol=2e-4):
    total, norms, loss_sum, kept = expected
    np.testing.assert_allclose(result.grad_norms.numpy(), norms, rtol=rtol, atol=1e-6)
    for got, want in zip(result.grad_sum, total):
        scale = max(np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=rtol * scale)
    assert result.num_examples.numpy() == kept
    assert result.num_clipped.numpy() == np.sum(norms > clip)
    np.testing.assert_allclose(result.loss_sum.numpy(), loss_sum, rtol=1e-5)


def middle_clip(norms):
    """A C between two patients' norms, so some patients are clipped and some are not."""
    real = np.sort(norms[norms > 0])
    return float(0.5 * (real[len(real) // 2 - 1] + real[len(real) // 2]))


@pytest.mark.parametrize("make_model,shape,augmult,chunks", [
    (conv_net, SHAPE, 1, "whole_batch"), (conv_net, SHAPE, 2, "one_patient_chunks"),
    (small_wrn, (8, 8, 3), 2, "whole_batch"), (conv_net_with_fallback, SHAPE, 2, "whole_batch")],
    ids=["conv_net", "conv_net_augmult2_chunked", "wrn_10_1_augmult2", "fallback_augmult2"])
def test_patient_norms_and_clipped_sum_match_brute_force(make_model, shape, augmult, chunks,
                                                          monkeypatch):
    """Padding slots (garbage inputs), a patient without images, an unsampled patient whose
    slots still hold images, k·K rows per unit; clip norm between the patients' norms."""
    if chunks == "one_patient_chunks":
        monkeypatch.setattr(ghost_linear, "CHUNK_BYTES", 1)
    model = make_model()
    assert bool(describe_plan(model)["fallback"]) == (make_model is conv_net_with_fallback)
    x, labels, image_mask = patients(shape, augmult)
    expected = brute_force(model, x, labels, image_mask, MASK, 1e9)
    clip = middle_clip(expected[1])
    expected = brute_force(model, x, labels, image_mask, MASK, clip)
    assert 0 < np.sum(expected[1] > clip) < np.sum(expected[1] > 0)
    result = run_ghost(model, x, labels, image_mask, MASK, clip, augmult)
    assert_matches(result, expected, MASK, clip)
    assert result.num_nonfinite.numpy() == 0
    labels_0, first = result.aux  # aux: slot 0's label and prediction (view 0)
    np.testing.assert_array_equal(labels_0.numpy(), labels[:, 0])
    image_0 = x[:1, 0, 0] if augmult > 1 else x[:1, 0]
    np.testing.assert_allclose(first.numpy()[0], model(image_0, training=True)[0], rtol=1e-4,
                               atol=1e-5)


def spiky_loss(y, logits):
    """Cross-entropy for labels 0/1; +inf, with a NaN gradient, for label 2 (padding slots)."""
    ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return ce / tf.cast(tf.not_equal(tf.reshape(y, tf.shape(ce)), 2), ce.dtype)


def test_nan_image_drops_only_its_patient_and_padding_never_leaks():
    """A NaN real image: its patient contributes 0 and counts as non-finite; the others are
    as if it were absent. NaN padding slots with an infinite loss (NaN gradient) change nothing."""
    model = conv_net()
    x, labels, image_mask = patients(SHAPE, 1, padding_value=np.nan)
    x[4, 1, 2, 3, 0] = np.nan  # patient 4's second (real) image
    clean = x.copy()
    clean[4] = 0.0
    expected = brute_force(model, clean, labels, image_mask, MASK * (np.arange(6) != 4), 0.05)
    result = run_ghost(model, x, labels, image_mask, MASK, 0.05, 1, loss=spiky_loss)
    for g in result.grad_sum:
        assert np.all(np.isfinite(g.numpy()))
    assert_matches(result, expected, MASK, 0.05)
    assert result.num_nonfinite.numpy() == 1 and result.grad_norms.numpy()[4] == 0


def test_one_patient_moves_the_sum_by_at_most_c():
    model = conv_net()
    x, labels, image_mask = patients(SHAPE, 2)
    x[0] *= 100.0
    full = run_ghost(model, x, labels, image_mask, np.ones(6, np.float32), 0.05, 2)
    without = run_ghost(model, x, labels, image_mask, np.array([0, 1, 1, 1, 1, 1], np.float32),
                        0.05, 2)
    diff = np.sqrt(sum(np.sum((a.numpy() - b.numpy()) ** 2)
                       for a, b in zip(full.grad_sum, without.grad_sum)))
    assert 0 < diff <= 0.05 * (1 + 1e-5)


def fit_patients(clipping, x, y, ids):
    model = conv_net()
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        expected_batch_size=5, micro_batch_size=3, noise_multiplier=0.8, delta=1e-3,
        l2_norm_clip=0.2, privacy_unit="patient", max_examples_per_patient=2, augmult=2,
        augment_pad=1, clipping=clipping, noise_seed=1, sampling_seed=2))
    dp.compile(optimizer=keras.optimizers.SGD(0.5),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dp.fit(x, y, steps=3, patient_ids=ids, verbose=0)
    return dp, model.get_weights()


def test_fit_with_patients_is_the_same_with_ghost_and_vectorized_clipping():
    """Same seeds: same weights (k = 2 of up to 4 images chosen per step, K = 2 views), same ε;
    "auto" picks ghost for patients when every trained variable has a rule."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 5, 12)  # 12 patients with 1..4 images each
    ids = rng.permutation(np.repeat(np.arange(12) * 3 + 7, counts))
    x = rng.normal(size=(ids.size,) + SHAPE).astype(np.float32)
    y = rng.integers(0, 3, ids.size).astype(np.int32)
    vectorized, weights_v = fit_patients("vectorized", x, y, ids)
    auto, weights_g = fit_patients("auto", x, y, ids)
    assert vectorized.clipping_method == "vectorized" and auto.clipping_method == "ghost"
    for a, b in zip(weights_v, weights_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.max([np.max(np.abs(a - b)) for a, b in zip(weights_v, fit_patients(
        "ghost", x, y, ids)[1])]) < 1e-5  # clipping="ghost" is accepted for patients
    want = reference_epsilon(0.8, 5 / 12, 3, 1e-3)
    assert vectorized.epsilon_spent() == pytest.approx(want, rel=1e-9)
    assert auto.epsilon_spent() == pytest.approx(want, rel=1e-9)
