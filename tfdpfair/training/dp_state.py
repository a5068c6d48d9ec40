"""The DP state of a run, as Keras-tracked variables (DESIGN.md "State").

Everything that decides what the accountant must count lives here, in variables that Keras saves
and restores with the model (``save_weights``/``load_weights``, ``save``/``load_model``,
BackupAndRestore, ModelCheckpoint) and that a ``tf.train.Checkpoint`` tracks:

* ``logical_steps``: logical steps released so far (one noise draw each). This is also the
  sampler's position: step t's sample and noise are stateless functions of (seed, t).
* ``plan``: the privacy plan (N, B, σ, T, δ, accountant, target ε, C) fixed before the first
  step; all zeros while no plan is fixed.
* ``seeds``: the secret sampling, noise and augmentation seeds (62-bit, from OS entropy unless a
  test fixes them). Whoever knows them can remove the noise: a file holding this state is a
  *resume checkpoint*, as sensitive as the data, never a release (see DPModel.export_release).

The accumulated clipped sums are not here: the training loop releases whole logical steps per
call, so they are always zero when a callback or checkpoint can run.

The state belongs to the model, not to the wrapper: :func:`state_for_model` hands the same
:class:`DPState` to every ``make_private`` of one Keras model object in this process, so a second
wrapper continues the first one's accounting instead of starting a fresh budget.
"""

from __future__ import annotations

import math
import weakref

import keras
import numpy as np

from tfdpfair.privacy.accounting import PrivacyPlan

_ACCOUNTANT_CODES = {"rdp": 1.0, "pld": 2.0}
PLAN_FIELDS = ("num_examples", "expected_batch_size", "noise_multiplier", "steps", "delta",
               "accountant", "target_epsilon", "l2_norm_clip", "unit")
_UNIT_CODES = {"example": 0.0, "patient": 1.0}
SEED_FIELDS = ("sampling", "noise", "augment")


@keras.saving.register_keras_serializable(package="tfdpfair")
class DPState(keras.layers.Layer):
    """Tracked DP state: step counter, privacy plan and secret seeds (see module docstring).

    Create it inside the strategy scope the model is trained under: ``logical_steps`` is then a
    mirrored variable whose value every replica agrees on.
    """

    def __init__(self, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.logical_steps = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                             trainable=False, name="logical_steps",
                                             aggregation="only_first_replica")
        self.plan_values = self.add_weight(shape=(len(PLAN_FIELDS),), dtype="float64",
                                           initializer="zeros", trainable=False, name="plan",
                                           aggregation="only_first_replica")
        self.seed_values = self.add_weight(shape=(len(SEED_FIELDS),), dtype="int64",
                                           initializer="zeros", trainable=False, name="seeds",
                                           aggregation="only_first_replica")
        self.built = True
        # Highest step count this Python object has ever held: a restore to an earlier step in
        # the same process would re-run released steps with the same noise (not saved).
        self.released_high_water = 0

    def call(self, inputs):  # a container of state, never called on data
        raise TypeError("DPState holds DP bookkeeping and is not a layer to call on data.")

    # ---- plan -------------------------------------------------------------------------------

    @property
    def has_plan(self) -> bool:
        return float(self.plan_values.numpy()[3]) > 0

    def plan(self) -> PrivacyPlan | None:
        """The fixed plan, or None before one was fixed."""
        if not self.has_plan:
            return None
        values = dict(zip(PLAN_FIELDS, self.plan_values.numpy().tolist()))
        accountant = {v: k for k, v in _ACCOUNTANT_CODES.items()}[values["accountant"]]
        target = values["target_epsilon"]
        return PrivacyPlan(
            num_examples=int(values["num_examples"]),
            expected_batch_size=values["expected_batch_size"],
            noise_multiplier=values["noise_multiplier"], steps=int(values["steps"]),
            delta=values["delta"], accountant=accountant,
            target_epsilon=None if math.isnan(target) else target,
            unit={v: k for k, v in _UNIT_CODES.items()}[values["unit"]])

    @property
    def l2_norm_clip(self) -> float:
        return float(self.plan_values.numpy()[PLAN_FIELDS.index("l2_norm_clip")])

    def set_plan(self, plan: PrivacyPlan, l2_norm_clip: float) -> None:
        values = [plan.num_examples, plan.expected_batch_size, plan.noise_multiplier,
                  plan.steps, plan.delta, _ACCOUNTANT_CODES[plan.accountant],
                  math.nan if plan.target_epsilon is None else plan.target_epsilon,
                  l2_norm_clip, _UNIT_CODES[plan.unit]]
        self.plan_values.assign(np.asarray(values, np.float64))

    # ---- seeds and steps ------------------------------------------------------------------

    def seeds(self) -> dict[str, int]:
        return dict(zip(SEED_FIELDS, (int(v) for v in self.seed_values.numpy())))

    def set_seeds(self, seeds: dict[str, int]) -> None:
        self.seed_values.assign(np.asarray([seeds[k] for k in SEED_FIELDS], np.int64))

    @property
    def steps_done(self) -> int:
        return int(self.logical_steps.numpy())

    def note_released(self) -> None:
        """Records the current step count as released by this process (monotonic)."""
        self.released_high_water = max(self.released_high_water, self.steps_done)

    def get_config(self) -> dict:
        return super().get_config()


_STATE_OF_MODEL: "weakref.WeakKeyDictionary[keras.Model, DPState]" = weakref.WeakKeyDictionary()


def state_for_model(model: keras.Model) -> DPState:
    """The DPState of ``model``: the one an earlier wrapper created, or a new one.

    Must be called inside the strategy scope the model trains under (the variables are created
    there on first use).
    """
    state = _STATE_OF_MODEL.get(model)
    if state is None:
        state = DPState(name="dp_state")
        _STATE_OF_MODEL[model] = state
    return state
