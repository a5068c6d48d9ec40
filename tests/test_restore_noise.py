"""Restores never replay noise (issue 19 case 1, DESIGN.md "State" and invariant 7).

The attack: step t's sample and noise were pure functions of the seeds every resume file
carries, so two continuations of one stored state released the same noise draw for step t; the
difference of their releases cancelled the noise and exposed B·Δ = the clipped gradient of the
one example in which their data differed. Each test measures B·(w' − w'')/lr after one SGD step
(lr = 1, no momentum) from one restored state and compares its per-coordinate spread with the
independent value √2·σC that two independent N(0, σ²C²) draws give (0 if the draw is shared).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.checkpoint import restore_dp_checkpoint, save_dp_checkpoint
from tfdpfair.training.dp_model import make_private

REPO = pathlib.Path(__file__).resolve().parents[1]
N, B, SIGMA, CLIP, INPUTS, UNITS = 40, 8, 1.0, 1.0, 50, 40  # 2,040 noisy coordinates
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(replace_first: bool = False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, INPUTS)).astype(np.float32)
    y = rng.integers(0, UNITS, N).astype(np.int32)
    if replace_first:  # a neighbouring dataset: example 0 replaced (e.g. consent withdrawn)
        x[0] = 10.0
        y[0] = (y[0] + 1) % UNITS
    return x, y


def new_dp(seeded: bool = True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((INPUTS,)), keras.layers.Dense(UNITS, name="head")])
    seeds = dict(noise_seed=3, sampling_seed=4) if seeded else {}
    dp = make_private(model, DPConfig(l2_norm_clip=CLIP, expected_batch_size=B,
                                      micro_batch_size=8, noise_multiplier=SIGMA, delta=1e-3,
                                      **seeds))
    dp.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
    return dp


def flat(model) -> np.ndarray:
    return np.concatenate([w.ravel() for w in model.get_weights()])


class AtStep(keras.callbacks.Callback):
    """Records the flat inner weights after every logical step; runs ``action`` at ``step``."""

    def __init__(self, step=None, action=None, stop_after=None):
        super().__init__()
        self.step, self.action, self.stop_after, self.weights = step, action, stop_after, {}

    def on_train_begin(self, logs=None):
        self.weights[self.model.logical_steps_done] = flat(self.model.inner)

    def on_train_batch_end(self, batch, logs=None):
        done = self.model.logical_steps_done
        self.weights[done] = flat(self.model.inner)
        if done == self.step and self.action is not None:
            self.action(self.model)
        if self.stop_after is not None and done >= self.stop_after:
            self.model.stop_training = True


def noise_spread(update_a: np.ndarray, update_b: np.ndarray) -> float:
    """std over coordinates of B·(Δ_a − Δ_b)/lr, in units of σC·√2."""
    return float(np.std(B * (update_a - update_b))) / (np.sqrt(2.0) * SIGMA * CLIP)


def first_run(tmp_path, action_at_3):
    dp = new_dp()
    recorder = AtStep(3, action_at_3)
    dp.fit(*data(), steps=6, verbose=0, callbacks=[recorder])
    return dp, recorder.weights


def test_load_model_then_fit_draws_fresh_noise_for_the_released_step(tmp_path):
    """(a) One process: keras.models.load_model("step3.keras") + fit re-released step 3 with
    bit-identical noise; now its step-3 release differs from the first by independent noise."""
    path = tmp_path / "step3.keras"
    _, first = first_run(tmp_path, lambda m: m.save(path))
    loaded = keras.models.load_model(path)
    assert loaded.logical_steps_done == 3
    again = AtStep(stop_after=4)
    loaded.fit(*data(), verbose=0, callbacks=[again])
    assert np.array_equal(again.weights[3], first[3])  # the same restored weights θ_3
    assert noise_spread(first[4] - first[3], again.weights[4] - again.weights[3]) == \
        pytest.approx(1.0, abs=0.08)


def test_restore_dp_checkpoint_then_fit_draws_fresh_noise(tmp_path):
    """(b) A new DPModel + restore_dp_checkpoint(step 3) + fit: same property."""
    directory = tmp_path / "ck3"
    _, first = first_run(tmp_path, lambda m: save_dp_checkpoint(m, directory))
    resumed = new_dp(seeded=False)
    restore_dp_checkpoint(resumed, directory)
    again = AtStep(stop_after=4)
    resumed.fit(*data(), verbose=0, callbacks=[again])
    assert resumed.logical_steps_done == 4
    assert np.array_equal(again.weights[3], first[3])
    assert noise_spread(first[4] - first[3], again.weights[4] - again.weights[3]) == \
        pytest.approx(1.0, abs=0.08)


def test_uninterrupted_fit_keeps_its_own_noise_seed():
    """Only a restore refreshes the noise seed: a run that continues in its own process (a
    second fit on the same object, a second wrapper) keeps its seed."""
    dp = new_dp()
    dp.fit(*data(), steps=6, verbose=0, callbacks=[AtStep(stop_after=2)])
    seed = dp.seeds["noise"]
    dp.fit(*data(), verbose=0)
    assert dp.seeds["noise"] == seed == 3
    assert dp.logical_steps_done == 6


CONTINUE_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
import test_restore_noise as t
from tfdpfair.training.checkpoint import restore_dp_checkpoint
dp = t.new_dp(seeded=False)
restore_dp_checkpoint(dp, {checkpoint!r})
recorder = t.AtStep(stop_after=4)
dp.fit(*t.data(replace_first={neighbour}), verbose=0, callbacks=[recorder])
np.save({out!r}, recorder.weights[4] - recorder.weights[3])
"""


def test_two_processes_on_neighbouring_data_do_not_share_noise(tmp_path):
    """(c) Two processes resume from one checkpoint on datasets that differ in one example (a
    patient withdrew consent) and both publish: B·(release_D − release_D′) used to be exactly
    that example's clipped gradient (norm ≤ C); it must carry two independent σC draws."""
    directory = tmp_path / "ck3"
    first_run(tmp_path, lambda m: save_dp_checkpoint(m, directory))
    procs, outputs = [], []
    for neighbour in (False, True):
        out = tmp_path / f"update_{int(neighbour)}.npy"
        script = CONTINUE_SCRIPT.format(tests=str(REPO / "tests"), checkpoint=str(directory),
                                        neighbour=neighbour, out=str(out))
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs.append(out)
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()[-3000:]
    update_d, update_d_prime = (np.load(o) for o in outputs)
    difference = B * (update_d - update_d_prime)
    assert np.linalg.norm(difference) > 10 * CLIP  # not just one clipped gradient
    assert noise_spread(update_d, update_d_prime) == pytest.approx(1.0, abs=0.08)
    assert json.loads((directory / "dp_state.json").read_text())["logical_steps"] == 3


def test_cost_of_publishing_continuations_matches_dp_accounting():
    """k published continuations from step s: s steps at σ, then T − s steps at σ/√k."""
    import dp_accounting
    from dp_accounting import rdp
    from dp_reference import reference_epsilon

    from tfdpfair.privacy.accounting import plan_dp_sgd
    from tfdpfair.privacy.continuations import epsilon_of_continuations

    plan = plan_dp_sgd(num_examples=1000, expected_batch_size=50, steps=200,
                       noise_multiplier=1.5, delta=1e-5)
    assert epsilon_of_continuations(plan, 80, 1) == pytest.approx(
        reference_epsilon(1.5, 0.05, 200, 1e-5), rel=1e-9)
    assert epsilon_of_continuations(plan, 0, 2) == pytest.approx(
        reference_epsilon(1.5 / np.sqrt(2), 0.05, 200, 1e-5), rel=1e-9)
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation
                            .ADD_OR_REMOVE_ONE)
    sampled = lambda sigma: dp_accounting.PoissonSampledDpEvent(
        0.05, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(sampled(1.5), 80)
    acc.compose(sampled(1.5 / np.sqrt(3)), 120)
    two_more = epsilon_of_continuations(plan, 80, 3)
    assert two_more == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert plan.epsilon() < epsilon_of_continuations(plan, 80, 2) < two_more
