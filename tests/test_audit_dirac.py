"""Dirac canaries (audit/dirac.py, models/canary_slots.py): real examples never touch the slot
coordinates, the loop samples and clips each canary itself (fit and the custom loop), and the
one-run audit flags a σ/10 mechanism while a correct run stays below its accountant's ε."""

import importlib.util
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import reference_epsilon

from tfdpfair.audit import dirac
from tfdpfair.audit.canaries import flatten
from tfdpfair.models.canary_slots import CanarySlots, with_canary_slots
from tfdpfair.privacy import ghost_clipping
from tfdpfair.privacy.clipping import clipped_grad_sum
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training import example_loss
from tfdpfair.training.custom_loop import DPOptimizer
from tfdpfair.training.dp_model import make_private

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def slotted_model(m: int, seed: int = 0):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(3)])
    return with_canary_slots(base, m)


def toy_data(n: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def test_real_examples_have_exactly_zero_gradient_on_the_slots():
    """Brute force (one tape per example): the slots are unconnected to every loss; both
    clipping methods give exactly 0 there and agree with the brute-force sum elsewhere; "auto"
    keeps ghost clipping (no fallback variable); the layer is an identity and serialisable."""
    model, slots = slotted_model(7)
    x, y = toy_data()
    x[3] *= 1e4  # a clipped example
    variables = model.trainable_variables
    assert variables[-1] is slots.slots and ghost_clipping.describe_plan(model)["fallback"] == []
    brute = [np.zeros(v.shape) for v in variables]
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i:i + 1], model(x[i:i + 1], training=True))
        grads = tape.gradient(loss, variables)
        assert grads[-1] is None  # no path from any example's loss to the slots
        norm = np.sqrt(sum(np.sum(g.numpy() ** 2) for g in grads[:-1]))
        for b, g in zip(brute[:-1], grads[:-1]):
            b += g.numpy() * min(1.0, 1.0 / norm)
    mask, examples = tf.ones([len(x)]), (tf.constant(x), tf.constant(y))
    vectorized = clipped_grad_sum(example_loss.example_loss_fn(model, LOSS), variables,
                                  examples, mask, 1.0, has_aux=True).grad_sum
    ghost = ghost_clipping.ghost_clipped_grad_sum(
        model, ghost_clipping.batch_example_loss_fn(model, LOSS), variables, examples, mask, 1.0,
        has_aux=True).grad_sum
    for method in (vectorized, ghost):
        assert np.all(method[-1].numpy() == 0.0)
        for b, g in zip(brute[:-1], method[:-1]):
            np.testing.assert_allclose(g.numpy(), b, atol=1e-5)
    base = next(layer for layer in model.layers if isinstance(layer, keras.Sequential))
    np.testing.assert_array_equal(model(x), base(x))  # identity on the outputs
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(slots))
    assert isinstance(again, CanarySlots) and again.num_slots == 7


class HostileDirac:
    """Dirac canaries of norm 10·C (one NaN), every one included, one in a real kernel entry."""

    def __init__(self, coordinates, q):
        self.coordinates = np.asarray(coordinates, np.int64)
        self.num_canaries, self.sampling_rate, self.sampling_seed = len(coordinates), q, 77
        self.values = np.full(self.num_canaries, 10.0, np.float32)
        self.values[1] = np.nan
        self.included = np.ones(self.num_canaries, bool)


class WeightsPerStep(keras.callbacks.Callback):
    def __init__(self, variables):
        super().__init__()
        self.variables, self.rows = variables, []

    def on_train_begin(self, logs=None):
        self.rows.append(flatten([v.numpy() for v in self.variables]))

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append(flatten([v.numpy() for v in self.variables]))


def independent_inclusion(seed: int, step: int, m: int, q: float) -> np.ndarray:
    """Poisson inclusion redrawn with raw TF ops: stateless uniform (seed, t) in float64 < q."""
    u = tf.random.stateless_uniform([m], seed=tf.constant([seed, step], tf.int64),
                                    dtype=tf.float64)
    return u.numpy() < q


def test_the_loop_samples_and_clips_dirac_canaries_in_fit_and_the_custom_loop():
    """Zero-gradient loss, σ ≈ 0: step t moves coordinate k_j by −η·C·[j in step t]/(B·s) for a
    10·C canary (clipped to C), by 0 for a NaN one; the inclusion equals an independent
    redraw; the plan counts N + m; DPOptimizer(audit_canaries=...) gives fit's weights."""
    m, n, steps, lr, batch = 6, 8, 5, 0.5, 7
    x, y = toy_data(n)
    zero_loss = lambda yt, yp: 0.0 * keras.ops.sum(yp, axis=-1)  # noqa: E731
    config = DPConfig(l2_norm_clip=1.0, expected_batch_size=batch, micro_batch_size=4,
                      noise_multiplier=1e-6, delta=1e-3, noise_seed=0, sampling_seed=0)
    model, slots = slotted_model(m)
    dp = make_private(model, config)
    dp.compile(optimizer=keras.optimizers.SGD(lr), loss=zero_loss)
    q = dp.plan_privacy(n + m, steps=steps).sampling_rate
    offset = sum(int(np.prod(v.shape)) for v in model.trainable_variables[:-1])
    canaries = HostileDirac([offset + j for j in range(m - 1)] + [0], q)  # last: kernel[0, 0]
    dp.set_audit_canaries(canaries)
    recorder = WeightsPerStep(model.trainable_variables)
    dp.fit(x, y, steps=steps, callbacks=[recorder], verbose=0)
    assert dp.plan.num_examples == n + m and dp.audit_canaries == m
    moved = np.diff(np.stack(recorder.rows), axis=0)[:, canaries.coordinates]
    present = np.stack([independent_inclusion(77, t, m, q) for t in range(steps)])
    expected = -lr * 1.0 * present * np.isfinite(canaries.values) / batch
    assert 0 < present.sum() < present.size
    np.testing.assert_allclose(moved, expected, atol=1e-5)

    custom, _ = slotted_model(m)
    opt = DPOptimizer(custom, keras.optimizers.SGD(lr), zero_loss, config, x=x, y=y,
                      steps=steps, audit_canaries=canaries)
    iterator = iter(opt.distribute_dataset())

    @tf.function
    def train_step(iterator):
        for _ in tf.range(opt.microbatches_in_step()):
            opt.strategy.run(opt.accumulate, args=(next(iterator),))
        opt.strategy.run(opt.release)

    while opt.steps_remaining:
        opt.run(train_step, iterator)
    assert opt.plan.num_examples == n + m
    np.testing.assert_allclose(flatten(custom.get_weights()), flatten(model.get_weights()),
                               atol=1e-6)


def test_dirac_canaries_out_of_range_are_refused_before_any_step():
    model, _ = slotted_model(3)
    x, y = toy_data()
    dp = make_private(model, DPConfig(l2_norm_clip=1.0, expected_batch_size=4,
                                      noise_multiplier=1.0, delta=1e-3))
    dp.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    q = dp.plan_privacy(len(x) + 3, steps=2).sampling_rate
    size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    dp.set_audit_canaries(HostileDirac([0, 1, size], q))
    with pytest.raises(ValueError, match=r"integer coordinates in \[0, "):
        dp.fit(x, y, steps=2, verbose=0)
    assert dp.logical_steps_done == 0


def small_audit(score, score_noise_multiplier=None, m=4000, steps=20, rate=0.5, **dp):
    """A tiny model with m Dirac canaries, q = 0.5: one audited run (rdp accountant)."""
    x, y = toy_data(64)
    model, _ = slotted_model(m)
    config = DPConfig(l2_norm_clip=1.0, expected_batch_size=round(rate * (64 + m)),
                      micro_batch_size=64, delta=1e-5, noise_seed=5, sampling_seed=6, **dp)
    run = make_private(model, config)
    run.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS,
                steps_per_execution=1 if score == "all_steps" else 5)
    return run, dirac.audit_dirac_canaries(run, x, y, seed=9, steps=steps, score=score,
                                           score_noise_multiplier=score_noise_multiplier)


@pytest.mark.parametrize("score", ["all_steps", "last_iterate"])
def test_broken_mechanism_is_flagged_and_a_correct_run_is_not(score):
    """σ calibrated to ε = 4: both bounds ≤ the accountant's ε (checked with dp_accounting).
    The same run with σ/10 while claiming that ε: both bounds above the claim."""
    _, honest = small_audit(score, target_epsilon=4.0)
    reference = reference_epsilon(honest.noise_multiplier, honest.sampling_rate, honest.steps,
                                  1e-5)
    assert honest.accountant_epsilon == pytest.approx(reference, rel=1e-3) and reference <= 4.0
    assert 0 < honest.audit.epsilon <= reference
    assert 0 < honest.audit_fdp.epsilon <= reference
    assert 0 < honest.audit_fdp.epsilon_eps_delta <= reference
    broken_sigma = honest.noise_multiplier / 10
    _, broken = small_audit(score, score_noise_multiplier=honest.noise_multiplier,
                            noise_multiplier=broken_sigma)
    assert broken.noise_multiplier == pytest.approx(broken_sigma)
    print(f"\n{score}: ε_LB correct run {honest.audit.epsilon:.2f} / f-DP "
          f"{honest.audit_fdp.epsilon:.2f} (accountant {reference:.2f}); σ/10 run "
          f"{broken.audit.epsilon:.2f} / {broken.audit_fdp.epsilon:.2f}")
    assert broken.audit.epsilon > reference and broken.audit_fdp.epsilon > reference
    assert broken.audit_fdp.epsilon_eps_delta > reference


# ---- the benchmark's ε = 4 case (benchmarks/audit_table.py) ----------------------------------

def _audit_table():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "audit_table.py"
    spec = importlib.util.spec_from_file_location("audit_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("design", ["dirac_all", "dirac_last"])
def test_audit_table_case_at_epsilon_4(design):
    """Demo digits, MLP, 40 000 Dirac canaries, q = 0.5, T = 50, PLD ε = 4: the f-DP bound is at
    least half the accountant's ε and no bound exceeds it; the σ/10 control is flagged."""
    table = _audit_table()
    args = table.parse_args([])
    x, y = table.demo_xy()
    dp_case = table.run_case(design, 4.0, x, y, args)
    reference = reference_epsilon(dp_case["noise_multiplier"], dp_case["sampling_rate"],
                                  dp_case["steps"], table.DELTA, kind="pld")
    assert reference == pytest.approx(dp_case["claimed_epsilon"], rel=1e-2)
    assert dp_case["steinke_lb"] <= reference and dp_case["fdp_lb"] <= reference
    assert dp_case["fdp_lb"] >= 0.5 * reference
    broken = table.run_case(design, 4.0, x, y, args, broken=True)
    assert dp_case["fdp_eps_delta_lb"] <= reference
    assert broken["flagged_steinke"] and broken["flagged_fdp"] and broken["flagged_fdp_eps_delta"]
