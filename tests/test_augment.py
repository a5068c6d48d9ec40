"""Augmentation multiplicity: the views, and DP sensitivity with K views per example.

Expected values come from independent computations: numpy padding + brute-force search over
crop offsets and flips, and a per-example Python loop over views with GradientTape.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.data.augment import make_views, multiview_loss_fn
from tfdpfair.privacy.clipping import clipped_grad_sum

PAD = 4


def _find_crop(padded, view):
    """All (dy, dx, flipped) with view == flip?(padded[dy:dy+H, dx:dx+W]).

    For images narrower than 2*PAD+2 a reflect-padded crop can equal another crop flipped, so
    the tests use images at least 12 pixels wide, where the match is unique.
    """
    h, w = view.shape[:2]
    hits = []
    for dy, dx, flip in itertools.product(range(2 * PAD + 1), range(2 * PAD + 1), (0, 1)):
        crop = padded[dy:dy + h, dx:dx + w]
        if np.array_equal(crop[:, ::-1] if flip else crop, view):
            hits.append((dy, dx, flip))
    return hits


def test_views_are_reflect_padded_crops_and_flips():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 12, 13, 2)).astype(np.float32)
    views = make_views(images, num_views=5, seed=(1, 2)).numpy()
    assert views.shape == (3, 5, 12, 13, 2) and views.dtype == np.float32
    for i in range(3):
        padded = np.pad(images[i], [(PAD, PAD), (PAD, PAD), (0, 0)], mode="reflect")
        for k in range(5):
            assert len(_find_crop(padded, views[i, k])) == 1, (i, k)


def test_offsets_cover_the_range_and_both_flips():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 12, 12, 1)).astype(np.float32)
    views = make_views(image, num_views=300, seed=7).numpy()[0]
    padded = np.pad(image[0], [(PAD, PAD), (PAD, PAD), (0, 0)], mode="reflect")
    found = [_find_crop(padded, v) for v in views]
    assert all(len(hits) == 1 for hits in found)  # images >= 2*PAD+2 wide: no ambiguity
    found = [hits[0] for hits in found]
    dys, dxs, flips = map(set, zip(*found))
    assert dys == set(range(9)) and dxs == set(range(9)) and flips == {0, 1}


def test_deterministic_under_seed_and_view0_policy():
    images = tf.random.stateless_uniform([4, 8, 8, 3], seed=(0, 0), maxval=255, dtype=tf.int32)
    images = tf.cast(images, tf.uint8)
    a = make_views(images, 4, seed=(3, 10))
    b = make_views(images, 4, seed=(3, 10))
    c = make_views(images, 4, seed=(3, 11))
    assert a.dtype == tf.uint8
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())
    # Default (as jax_privacy): every view is augmented, so view 0 is usually not the image.
    assert not all(np.array_equal(a[i, 0], images[i]) for i in range(4))
    original = make_views(images, 4, seed=(3, 10), include_original=True)
    for i in range(4):
        np.testing.assert_array_equal(original[i, 0].numpy(), images[i].numpy())
    plain = make_views(images, 2, seed=5, random_crop=False, random_flip=False)
    np.testing.assert_array_equal(plain.numpy(), np.repeat(images.numpy()[:, None], 2, 1))


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3),
                             keras.layers.Flatten(), keras.layers.Dense(4)])


def _brute_force(model, views, labels, mask, clip):
    """Per example: mean over views of the single-view gradients, clip to C, sum."""
    variables = model.trainable_variables
    total = [np.zeros(v.shape, np.float64) for v in variables]
    norms = []
    for i in range(views.shape[0]):
        grads = [np.zeros(v.shape, np.float64) for v in variables]
        for k in range(views.shape[1]):
            with tf.GradientTape() as tape:
                logits = model(views[i, k][None], training=True)
                loss = keras.losses.sparse_categorical_crossentropy(
                    labels[i][None], logits, from_logits=True)[0]
            for acc, g in zip(grads, tape.gradient(loss, variables)):
                acc += g.numpy() / views.shape[1]
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        norms.append(norm)
        factor = mask[i] * min(1.0, clip / norm)
        for acc, g in zip(total, grads):
            acc += factor * g
    return total, np.array(norms)


def _flat(grads):
    return np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in grads])


@pytest.fixture(scope="module")
def setup():
    model = _model()
    rng = np.random.default_rng(2)
    images = rng.normal(size=(5, 6, 6, 2)).astype(np.float32)
    views = make_views(images, num_views=3, seed=(0, 1)).numpy()
    labels = np.array([0, 3, 1, 2, 3], np.int64)
    mask = np.array([1, 1, 0, 1, 1], np.float32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, views, labels, mask, multiview_loss_fn(model, loss)


def test_multiview_loss_is_mean_over_views(setup):
    model, views, labels, _, loss_fn = setup
    want = np.mean([keras.losses.sparse_categorical_crossentropy(
        labels[1], model(views[1, k][None])[0], from_logits=True).numpy() for k in range(3)])
    np.testing.assert_allclose(loss_fn((tf.constant(views[1]), tf.constant(labels[1]))).numpy(),
                               want, rtol=1e-5)
    as_dict = loss_fn({"image": tf.constant(views[1]), "label": tf.constant(labels[1])})
    np.testing.assert_allclose(as_dict.numpy(), want, rtol=1e-5)


def test_multilabel_loss_is_mean_over_views_and_labels():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    views = np.random.default_rng(4).normal(size=(2, 4, 4, 1)).astype(np.float32)
    target = np.array([1.0, 0.0, 0.8], np.float32)  # a smoothed CheXpert-style target
    loss_fn = multiview_loss_fn(model, keras.losses.BinaryCrossentropy(from_logits=True))
    z = model(views).numpy().astype(np.float64)
    bce = np.maximum(z, 0) - z * target + np.log1p(np.exp(-np.abs(z)))  # stable BCE of logits
    got = loss_fn({"image": tf.constant(views), "label": tf.constant(target)})
    np.testing.assert_allclose(got.numpy(), bce.mean(), rtol=1e-5)


def test_clipped_sum_matches_brute_force_loop(setup):
    model, views, labels, mask, loss_fn = setup
    clip = 6.0  # between the per-example norms: some examples clipped, some not
    want, norms = _brute_force(model, views, labels, mask, clip)
    real = norms[mask > 0]
    assert np.sum(real > clip) >= 1 and np.sum(real < clip) >= 1
    got = clipped_grad_sum(loss_fn, model.trainable_variables,
                           (tf.constant(views), tf.constant(labels)), tf.constant(mask), clip)
    np.testing.assert_allclose(_flat(got.grad_sum), _flat(want), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got.grad_norms.numpy(), norms * mask, rtol=2e-4)


def test_one_example_with_k_views_moves_the_sum_by_at_most_c(setup):
    model, views, labels, mask, loss_fn = setup
    clip, variables = 0.05, model.trainable_variables
    ones = np.ones_like(mask)
    without_0 = ones.copy()
    without_0[0] = 0.0

    def clipped(v, m):
        out = clipped_grad_sum(loss_fn, variables, (tf.constant(v), tf.constant(labels)),
                               tf.constant(m), clip)
        return _flat(out.grad_sum)

    base = clipped(views, without_0)
    rng = np.random.default_rng(3)
    for scale in (1.0, 100.0):  # all K views of example 0 replaced, then added
        changed = views.copy()
        changed[0] = scale * rng.normal(size=views[0].shape)
        moved = np.linalg.norm(clipped(changed, ones) - base)
        assert moved <= clip * (1 + 1e-5)
        assert moved >= clip * (1 - 1e-3)  # the example is clipped: the bound is attained
        # Replacing (rather than adding) the example is bounded by 2C.
        assert np.linalg.norm(clipped(changed, ones) - clipped(views, ones)) <= 2 * clip * 1.0001
    # The mistake this guards against: clipping each view as if it were an example lets one
    # example move the sum by up to K*C.
    single = multiview_loss_fn(model, keras.losses.SparseCategoricalCrossentropy(True))
    flat_views = views[0][:, None]  # K "examples" with one view each
    per_view = clipped_grad_sum(single, variables,
                                (tf.constant(flat_views), tf.constant(labels[[0, 0, 0]])),
                                tf.ones([3]), clip)
    assert np.linalg.norm(_flat(per_view.grad_sum)) > 1.5 * clip


def _fit_weights(augmult, **views):
    """Weights after 3 DP steps on a small conv net with fixed seeds."""
    import keras

    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.training.dp_model import make_private

    rng = np.random.default_rng(0)
    x = rng.random((24, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 24).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    dp = make_private(model, DPConfig(expected_batch_size=8, micro_batch_size=4,
                                      noise_multiplier=0.5, delta=1e-3, augmult=augmult,
                                      noise_seed=1, sampling_seed=2, **views))
    dp.compile(optimizer=keras.optimizers.SGD(0.3),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dp.fit(x, y, steps=3, verbose=0)
    return model.get_weights()


def test_view_options_reach_the_training_views():
    """DPConfig(augment_pad=0, augment_crop=False, augment_flip=False): every view is the image,
    so K = 3 views give exactly the K = 1 run (the mean of identical view losses); with flips
    on, the run differs. Issue 20 item 5: the views are configurable."""
    reference = _fit_weights(1)
    identical = _fit_weights(3, augment_pad=0, augment_crop=False, augment_flip=False)
    for a, b in zip(reference, identical):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    flipped = _fit_weights(3, augment_pad=0, augment_crop=False, augment_flip=True)
    assert any(not np.allclose(a, b, atol=1e-4) for a, b in zip(reference, flipped))


def test_label_preserving_view_defaults_of_the_configs():
    """Digits and chest X-rays are not mirror-symmetric: their configs never flip, and the
    8×8 digits shift by at most one pixel."""
    from tfdpfair.configs import chexpert_nfnet_f0, demo, mimic_cxr_nfnet_f0

    digits = demo.get_config().dp
    assert digits.augment_flip is False and digits.augment_pad <= 1
    for module in (chexpert_nfnet_f0, mimic_cxr_nfnet_f0):
        assert module.get_config().dp.augment_flip is False
