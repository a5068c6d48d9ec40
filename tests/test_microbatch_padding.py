"""Trimmed micro-batch padding (DPConfig.microbatch_padding, privacy/sampling.py): the last
micro-batch of a step at (about) its real size changes how much padding is computed, never what
is released; and the realised batch size |S| of a step reaches no log (DESIGN invariant 7).

* packing: the trimmed layout holds the step's sample in order, k_t as with full padding, and
  the last micro-batch's rows follow the documented formula (numpy reference);
* expected padding: exact at q = 1, and equal to a simulation of Binomial batch sizes;
* an unknown batch size: vectorized and ghost clipping traced with a None batch dimension match
  the brute-force per-example loop (conv, WS-conv, GroupNorm, NFNet blocks);
* training: "trim" and "full" give the numpy DP-SGD's weights (softmax model, vectorized and
  ghost), the same weights on a conv model with augmentation multiplicity, and the custom-loop
  API with trimmed padding gives fit's weights with full padding;
* logs: two runs whose steps sample different numbers of (identical) examples produce the same
  logs, History and callback values, so no logged value is a function of |S| or k_t.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import numpy_dp_sgd_softmax_regression
from test_ghost_clipping import LOSS, brute_force, data, nfnet_nano, ws_gn_net

import tfdpfair
from tfdpfair.privacy import sampling
from tfdpfair.privacy.clipping import clipped_grad_sum
from tfdpfair.privacy.ghost_clipping import batch_example_loss_fn, ghost_clipped_grad_sum
from tfdpfair.training import callback_logs
from tfdpfair.training.custom_loop import DPOptimizer
from tfdpfair.training.example_loss import example_loss_fn

# ---- packing and expected padding -------------------------------------------------------


def numpy_trimmed(b: int, m: int, replicas: int, multiple: int):
    """Reference layout: (full rows [k-1, R·m], last rows [R·s]) of indices 0..b-1."""
    per_step = m * replicas
    k = max(1, -(-b // per_step))
    rest = b - (k - 1) * per_step
    s = -(-max(1, -(-rest // replicas)) // multiple) * multiple
    s = s if 2 * s <= m else m  # more than half full: padded to m
    sample = np.arange(b)
    last = np.zeros(replicas * s, np.int64)
    last[:rest] = sample[(k - 1) * per_step:]
    return sample[:(k - 1) * per_step].reshape(k - 1, per_step), last, rest


@pytest.mark.parametrize("m,replicas,multiple", [(12, 1, 8), (20, 2, 8), (5, 4, 2), (3, 3, 8)])
def test_trimmed_packing_keeps_the_sample_in_order(m, replicas, multiple):
    for b in [0, 1, 7, m * replicas - 1, m * replicas, m * replicas + 1, 3 * m * replicas + 5]:
        indices = tf.range(b, dtype=tf.int64)
        full, full_mask, last, last_mask = sampling.pack_sample_trimmed(
            indices, m, replicas, multiple)
        want_full, want_last, rest = numpy_trimmed(b, m, replicas, multiple)
        np.testing.assert_array_equal(full.numpy(), want_full)
        np.testing.assert_array_equal(last.numpy(), want_last)
        assert full_mask.numpy().all() and last_mask.numpy().sum() == rest
        assert np.all(last_mask.numpy()[:rest] == 1) and np.all(last.numpy()[rest:] == 0)
        padded, _ = sampling.pack_sample(indices, m * replicas)
        assert padded.shape[0] == full.shape[0] + 1  # the same k_t


def test_expected_padding_is_exact_at_q_1_and_matches_a_simulation():
    # q = 1: b = N = 100 always; m = 32: k = 4; full 128 rows; trimmed 96 + 8 (rest 4);
    # N = 120: rest 24 -> 24 > 32/2, the last micro-batch stays at 32 rows.
    full = sampling.expected_padding(100, 1.0, 32)
    trim = sampling.expected_padding(100, 1.0, 32, trim_multiple=8)
    assert full.microbatches == pytest.approx(4) and trim.microbatches == pytest.approx(4)
    assert full.padded_share == pytest.approx(28 / 128) and full.rows == pytest.approx(128)
    assert trim.padded_share == pytest.approx(4 / 104) and trim.rows == pytest.approx(104)
    assert sampling.expected_padding(120, 1.0, 32, trim_multiple=8).rows == pytest.approx(128)
    rng = np.random.default_rng(0)
    sizes = rng.binomial(640, 0.1, size=200_000)
    for replicas, multiple in [(1, None), (1, 8), (2, 8)]:
        rows = []
        for b in np.unique(sizes):
            full_rows, last, _ = numpy_trimmed(int(b), 32, replicas, multiple or 10**9)
            if multiple is None:
                n_rows = max(1, -(-int(b) // (32 * replicas))) * 32 * replicas
            else:
                n_rows = full_rows.size + last.size
            rows.append(np.full(np.sum(sizes == b), n_rows))
        rows = np.concatenate(rows)
        share = 1.0 - sizes.sum() / rows.sum()
        got = sampling.expected_padding(640, 0.1, 32, replicas, multiple)
        assert got.padded_share == pytest.approx(share, abs=2e-3), (replicas, multiple)
        assert got.rows == pytest.approx(rows.mean(), rel=5e-3)


# ---- clipping with an unknown batch size ----------------------------------------------


@pytest.mark.parametrize("make_model,shape,method", [
    (ws_gn_net, (6, 6, 4), "vectorized"), (ws_gn_net, (6, 6, 4), "ghost"),
    pytest.param(nfnet_nano, (8, 8, 3), "ghost", marks=pytest.mark.slow)])  # ≈ 30 s
def test_clipping_with_an_unknown_batch_size_matches_brute_force(make_model, shape, method):
    """Traced once with batch dimension None and run at 5 rows (one of them padding, one a
    sampled example with a NaN pixel), as the trimmed last micro-batch is: the clipped sum of
    the per-example loop, where the NaN example contributes exactly zero."""
    model = make_model()
    x, y = data(shape, n=5)
    x[2, 0, 0, 0] = np.nan
    mask = np.array([1, 1, 1, 0, 1], np.float32)
    spec = [tf.TensorSpec((None,) + shape), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None])]
    if method == "ghost":
        loss_fn = batch_example_loss_fn(model, LOSS)
        clip = tf.function(lambda x, y, m: ghost_clipped_grad_sum(
            model, loss_fn, model.trainable_variables, (x, y), m, 0.5, has_aux=True).grad_sum,
            input_signature=spec)
    else:
        unit = example_loss_fn(model, LOSS)
        clip = tf.function(lambda x, y, m: clipped_grad_sum(
            unit, model.trainable_variables, (x, y), m, 0.5, has_aux=True).grad_sum,
            input_signature=spec)
    got = clip(x, y, mask)
    want, _ = brute_force(model, x, y, mask, 0.5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=2e-4, atol=2e-4 * max(np.abs(w).max(), 1e-6))


# ---- training: trim = full = numpy DP-SGD ----------------------------------------------

N, D, K = 60, 5, 3
SOFTMAX_DP = dict(l2_norm_clip=0.7, expected_batch_size=20, micro_batch_size=16,
                  noise_multiplier=0.3, delta=1e-3, noise_seed=3, sampling_seed=4)
STEPS, LR = 5, 0.5


def softmax_problem():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(N, D)).astype(np.float32), rng.integers(0, K, N).astype(np.int32),
            [(0.3 * rng.normal(size=(D, K))).astype(np.float32),
             (0.1 * rng.normal(size=(K,))).astype(np.float32)])


def softmax_model(weights):
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K)])
    model.set_weights(weights)
    return model


def fit_weights(model, dp_config, x, y, steps, lr=LR):
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(**dp_config))
    dp.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    dp.fit(x, y, steps=steps, verbose=0)
    return model.get_weights(), dp


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - v))) for u, v in zip(a, b))


@pytest.mark.parametrize("clipping,paddings", [("vectorized", ("trim", "full")),
                                               ("ghost", ("trim",))])
def test_trimmed_and_full_padding_give_the_numpy_dp_sgd_weights(clipping, paddings):
    x, y, weights = softmax_problem()
    q = SOFTMAX_DP["expected_batch_size"] / N
    sizes = [int(tf.size(sampling.poisson_sample(SOFTMAX_DP["sampling_seed"], t, N, q)))
             for t in range(STEPS)]
    lasts = {numpy_trimmed(b, 16, 1, sampling.TRIM_MULTIPLE)[1].size for b in sizes}
    assert lasts == {8, 16}, sizes  # trimmed last micro-batches, and ones padded to m
    reference = numpy_dp_sgd_softmax_regression(
        x, y, *weights, steps=STEPS, sampling_seed=SOFTMAX_DP["sampling_seed"],
        noise_seed=SOFTMAX_DP["noise_seed"], sampling_rate=q, clip=SOFTMAX_DP["l2_norm_clip"],
        sigma=SOFTMAX_DP["noise_multiplier"], expected_batch=SOFTMAX_DP["expected_batch_size"],
        lr=LR)
    for padding in paddings:
        got, dp = fit_weights(softmax_model(weights), dict(
            SOFTMAX_DP, clipping=clipping, microbatch_padding=padding), x, y, STEPS)
        assert dp._runtime["loop"].config.trim_multiple == (
            sampling.TRIM_MULTIPLE if padding == "trim" else None)
        assert max_abs_diff(got, reference) < 1e-6, padding


def test_trimmed_padding_trains_a_conv_model_like_full_padding(augmult=2):
    """Ghost clipping of WS convs and GroupNorm (static [m] for full micro-batches, an unknown
    size for the trimmed last one), with K views per example: the weights of full padding."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6, 6, 4)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int32)
    config = dict(expected_batch_size=20, micro_batch_size=16, noise_multiplier=0.5,
                  delta=1e-3, l2_norm_clip=0.3, augmult=augmult, augment_pad=1,
                  clipping="ghost", noise_seed=1, sampling_seed=2)
    results = {}
    for padding in ("trim", "full"):
        results[padding], _ = fit_weights(ws_gn_net(), dict(config, microbatch_padding=padding),
                                          x, y, steps=3, lr=0.3)
    assert max_abs_diff(results["trim"], results["full"]) < 2e-5


def test_custom_loop_with_trimmed_padding_gives_fit_weights_with_full_padding():
    x, y, weights = softmax_problem()
    config = dict(SOFTMAX_DP, clipping="ghost")
    want, _ = fit_weights(softmax_model(weights), dict(config, microbatch_padding="full"),
                          x, y, STEPS)
    model = softmax_model(weights)
    opt = DPOptimizer(model, keras.optimizers.SGD(LR), LOSS,
                      tfdpfair.DPConfig(**config, microbatch_padding="trim"), x=x, y=y,
                      steps=STEPS)
    iterator, strategy = iter(opt.distribute_dataset()), opt.strategy

    @tf.function
    def step(iterator):
        for _ in tf.range(opt.microbatches_in_step()):
            strategy.run(opt.accumulate, args=(next(iterator),))
        strategy.run(opt.release)

    while opt.steps_remaining:
        opt.run(step, iterator)
    assert max_abs_diff(model.get_weights(), want) < 1e-6


def test_padding_mode_follows_xla_and_is_validated():
    x, y, weights = softmax_problem()
    dp = tfdpfair.make_private(softmax_model(weights), tfdpfair.DPConfig(**SOFTMAX_DP))
    dp.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS, jit_compile=True)
    dp.fit(x, y, steps=1, verbose=0)
    assert dp._runtime["loop"].config.trim_multiple is None  # auto + XLA: full padding
    with pytest.raises(ValueError, match="microbatch_padding"):
        tfdpfair.DPConfig(**SOFTMAX_DP, microbatch_padding="none")


# ---- |S| reaches no log -----------------------------------------------------------------


class Recorder(keras.callbacks.Callback):
    """Every hook's logs, in order."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(("batch", batch, dict(logs or {})))

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(("epoch", epoch, dict(logs or {})))

    def on_train_end(self, logs=None):
        self.seen.append(("end", 0, dict(logs or {})))


def logged_run(sampling_seed: int, padding: str):
    """fit on 40 identical examples with lr = 0: every per-example statistic is the same
    number whatever the sample, so a logged value can differ between seeds only through |S_t|
    (or k_t)."""
    x = np.tile(np.array([[0.5, -1.0, 2.0, 0.1, 0.3]], np.float32), (40, 1))
    y = np.ones(40, np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K)])
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        l2_norm_clip=0.5, expected_batch_size=10, micro_batch_size=16, noise_multiplier=1.0,
        delta=1e-3, noise_seed=1, sampling_seed=sampling_seed, microbatch_padding=padding))
    dp.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS,
               metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    everything = callback_logs.allow_nonprivate_logs(Recorder())
    public = Recorder()
    history = dp.fit(x, y, steps=8, verbose=0, callbacks=[everything, public])
    return everything.seen, public.seen, history.history


@pytest.mark.parametrize("padding", ["trim", "full"])
def test_the_realised_batch_size_reaches_no_log(padding):
    q, seeds = 10 / 40, (3, 6)
    sizes = {s: [int(tf.size(sampling.poisson_sample(s, t, 40, q))) for t in range(8)]
             for s in seeds}
    assert sum(sizes[3][:4]) != sum(sizes[6][:4]) and sum(sizes[3]) != sum(sizes[6]), sizes
    rows = {s: [numpy_trimmed(b, 16, 1, 8)[1].size for b in sizes[s]] for s in seeds}
    assert rows[3] != rows[6]  # and so do the trimmed micro-batches' sizes
    (all_a, public_a, history_a), (all_b, public_b, history_b) = (
        logged_run(s, padding) for s in seeds)
    assert any("nonprivate_loss" in logs for _, _, logs in all_a)  # the test sees them
    for a, b in [(all_a, all_b), (public_a, public_b)]:
        assert [(h, i, sorted(logs)) for h, i, logs in a] == \
            [(h, i, sorted(logs)) for h, i, logs in b]
        for (_, _, logs_a), (_, _, logs_b) in zip(a, b):
            for key in logs_a:
                assert logs_a[key] == pytest.approx(logs_b[key], rel=1e-5, abs=1e-7), key
    assert sorted(history_a) == sorted(history_b)
    for key in history_a:
        np.testing.assert_allclose(history_a[key], history_b[key], rtol=1e-5, atol=1e-7)
    public_keys = {k for _, _, logs in public_a for k in logs}
    assert public_keys <= {"epsilon", "logical_steps"}, public_keys  # review any addition
