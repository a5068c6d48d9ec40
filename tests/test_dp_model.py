"""DPModel.fit end to end: invariants 2 (noise once per step) and 3 (every step accounted),
the budget stop, and refusal of example-mixing models."""

import keras
import numpy as np
import pytest
from dp_reference import reference_epsilon as rdp_epsilon

from tfdpfair.models.validate import DPIncompatibleModelError, replace_batch_norm_with_group_norm
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.privacy.sampling import PoissonSampler
from tfdpfair.training.dp_model import PrivacyBudgetExhaustedError, make_private


def small_model(units=3, inputs=4):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(units, name="head")])


def toy_data(n=30, inputs=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, inputs)).astype(np.float32),
            rng.integers(0, 3, n).astype(np.int32))


def compiled(model, config, lr=0.1):
    dp = make_private(model, config)
    dp.compile(optimizer=keras.optimizers.SGD(lr),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return dp


def test_every_logical_step_is_accounted_including_empty_ones():
    x, y = toy_data(n=20)
    config = DPConfig(expected_batch_size=1, micro_batch_size=2, noise_multiplier=2.0,
                      delta=1e-3, noise_seed=0, sampling_seed=0)
    dp = compiled(small_model(), config)
    history = dp.fit(x, y, steps=25, verbose=0)
    sampler = PoissonSampler(20, 1 / 20, 2, seed=dp.seeds["sampling"])
    batches = [sampler.logical_batch(t) for t in range(25)]
    assert any(b.size == 0 for b in batches), "q = 1/20: some steps sample nobody"
    assert dp.logical_steps_done == 25
    assert int(dp.optimizer.iterations.numpy()) == 25  # one update per logical step
    expected = rdp_epsilon(2.0, 1 / 20, 25, 1e-3)
    assert dp.epsilon_spent() == pytest.approx(expected, rel=1e-9)
    assert history.history["epsilon"][-1] == pytest.approx(expected, rel=1e-9)


def test_noise_is_added_once_per_step_across_microbatches():
    """Zero-gradient loss: each update is pure noise, -lr·N(0, σ²C²)/B. With micro-batches of
    one example a step spans ~B micro-batches; per-micro-batch noise would be √B larger."""
    x, y = toy_data(n=40, inputs=50)
    sigma, clip, batch, lr = 1.5, 2.0, 8, 1.0
    config = DPConfig(l2_norm_clip=clip, expected_batch_size=batch, micro_batch_size=1,
                      noise_multiplier=sigma, delta=1e-3, noise_seed=1, sampling_seed=1)
    model = keras.Sequential([keras.Input((50,)), keras.layers.Dense(200, use_bias=False)])
    dp = make_private(model, config)
    dp.compile(optimizer=keras.optimizers.SGD(lr), loss=lambda yt, yp: 0.0 * keras.ops.sum(yp))
    before = model.get_weights()[0].copy()
    dp.fit(x, y, steps=3, verbose=0)
    delta = (model.get_weights()[0] - before).ravel()
    # Three independent steps: total std = lr·σC/B·√3.
    assert delta.std() == pytest.approx(lr * sigma * clip / batch * np.sqrt(3), rel=0.03)


def test_budget_stops_training_and_refuses_more():
    x, y = toy_data(n=50)
    config = DPConfig(expected_batch_size=10, micro_batch_size=5, noise_multiplier=2.0,
                      target_epsilon=3.0, delta=1e-4, noise_seed=0, sampling_seed=0)
    dp = compiled(small_model(), config)
    dp.fit(x, y, epochs=1000, verbose=0)
    steps = dp.logical_steps_done
    assert steps == dp.plan.steps < 1000 * 5
    assert rdp_epsilon(2.0, 0.2, steps, 1e-4) <= 3.0 < rdp_epsilon(2.0, 0.2, steps + 1, 1e-4)
    with pytest.raises(PrivacyBudgetExhaustedError, match="planned logical steps"):
        dp.fit(x, y, epochs=1, verbose=0)


def test_target_epsilon_calibrates_sigma():
    x, y = toy_data(n=60)
    config = DPConfig(expected_batch_size=12, micro_batch_size=6, target_epsilon=3.0,
                      delta=1e-4, noise_seed=0, sampling_seed=0)
    dp = compiled(small_model(), config)
    dp.fit(x, y, epochs=3, verbose=0)
    eps = rdp_epsilon(dp.plan.noise_multiplier, 0.2, dp.logical_steps_done, 1e-4)
    assert 0.99 * 3.0 <= eps <= 3.0
    assert dp.logical_steps_done == 15


def test_dp_training_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    config = DPConfig(expected_batch_size=100, micro_batch_size=50, noise_multiplier=1.0,
                      noise_seed=0, sampling_seed=0, delta=1e-4)
    model = small_model(units=2)
    dp = compiled(model, config, lr=1.0)
    dp.fit(x, y, epochs=5, verbose=0)
    accuracy = np.mean(model.predict(x, verbose=0).argmax(1) == y)
    assert accuracy > 0.9


def test_batch_norm_model_is_refused_with_layer_name():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.BatchNormalization(name="bn_here")])
    with pytest.raises(DPIncompatibleModelError, match="bn_here"):
        make_private(model, DPConfig(noise_multiplier=1.0))


def test_fit_rejects_keras_batching_arguments():
    x, y = toy_data()
    dp = compiled(small_model(), DPConfig(expected_batch_size=5, noise_multiplier=1.0))
    with pytest.raises(TypeError, match="batch_size"):
        dp.fit(x, y, epochs=1, batch_size=32)


def test_augmentation_multiplicity_runs_through_fit():
    rng = np.random.default_rng(0)
    x = rng.random((24, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 24).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    config = DPConfig(expected_batch_size=6, micro_batch_size=4, noise_multiplier=1.0,
                      augmult=3, delta=1e-3, noise_seed=0, sampling_seed=0)
    dp = compiled(model, config)
    history = dp.fit(x, y, steps=4, verbose=0)
    assert dp.logical_steps_done == 4
    assert np.isfinite(history.history["nonprivate_loss"][-1])
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        compiled(small_model(), config).fit(*toy_data(), steps=1, verbose=0)


def test_batch_norm_model_fixed_with_group_norm_trains():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.ReLU()(h)))
    model = keras.Model(inputs, outputs)
    config = DPConfig(expected_batch_size=8, micro_batch_size=4, noise_multiplier=1.0,
                      delta=1e-3, noise_seed=0, sampling_seed=0)
    with pytest.raises(DPIncompatibleModelError, match="GroupNorm"):
        make_private(model, config)
    fixed = replace_batch_norm_with_group_norm(model, groups=2)
    rng = np.random.default_rng(0)
    x = rng.random((32, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    before = [w.copy() for w in fixed.get_weights()]
    dp = compiled(fixed, config)
    dp.fit(x, y, steps=3, verbose=0)
    assert dp.logical_steps_done == 3
    assert any(not np.allclose(a, b) for a, b in zip(before, fixed.get_weights()))
