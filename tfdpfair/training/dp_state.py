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
* ``weight_digests`` / ``averages_digest``: the fingerprint of the weights (and of the EMA/Polyak
  averages) as the last DP-SGD release left them (training/release_binding.py). Every release
  and every export checks it, so weights changed outside DP-SGD cannot carry the statement.
* ``audit_canaries``: m > 0 marks an audit run trained with m gradient canaries (their
  exports say so; tfdpfair/audit).

Restores never replay noise (DESIGN.md "State", invariant 7). The sample of step t stays a pure
function of (sampling seed, t), so a resumed run samples what an uninterrupted one would; the
noise seed does not: whenever this object's state did not come from this process's own
releases (``load_weights``/``load_model``/BackupAndRestore, ``set_weights``, or any assignment),
:meth:`DPState.restored_from_elsewhere` is true and the fit loop replaces the noise seed with
fresh OS entropy (broadcast from the chief) before the next step. Two continuations of one
stored state, in one process or in two, on the same or on neighbouring data, therefore never
share a noise draw, so the difference of their releases keeps the full σC noise.

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
NOISE_SEED_INDEX = SEED_FIELDS.index("noise")


@keras.saving.register_keras_serializable(package="tfdpfair")
class DPState(keras.layers.Layer):
    """Tracked DP state: step counter, privacy plan and secret seeds (see module docstring).

    Create it inside the strategy scope the model is trained under: ``logical_steps`` is then a
    mirrored variable whose value every replica agrees on.
    """

    def __init__(self, num_weights: int = 0, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.num_weights = int(num_weights)
        self.logical_steps = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                             trainable=False, name="logical_steps",
                                             aggregation="only_first_replica")
        self.plan_values = self.add_weight(shape=(len(PLAN_FIELDS),), dtype="float64",
                                           initializer="zeros", trainable=False, name="plan",
                                           aggregation="only_first_replica")
        self.seed_values = self.add_weight(shape=(len(SEED_FIELDS),), dtype="int64",
                                           initializer="zeros", trainable=False, name="seeds",
                                           aggregation="only_first_replica")
        self.weight_digests = self.add_weight(shape=(max(1, self.num_weights),), dtype="int64",
                                              initializer="zeros", trainable=False,
                                              name="weight_digests",
                                              aggregation="only_first_replica")
        self.averages_digest = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                               trainable=False, name="averages_digest",
                                               aggregation="only_first_replica")
        self.audit_canaries = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                              trainable=False, name="audit_canaries",
                                              aggregation="only_first_replica")
        self.built = True
        # Highest step count this Python object has ever held: a restore to an earlier step in
        # the same process would re-release steps already published (not saved).
        self.released_high_water = 0
        # (steps, seeds) as this process's own plan fixing or releases left them; None until
        # then and after a load from storage (see restored_from_elsewhere).
        self._own_snapshot: tuple | None = None

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
        self.mark_own()

    @property
    def steps_done(self) -> int:
        return int(self.logical_steps.numpy())

    def note_released(self) -> None:
        """Records the current step count as released by this process (monotonic)."""
        self.released_high_water = max(self.released_high_water, self.steps_done)
        self.mark_own()

    # ---- restores -------------------------------------------------------------------------

    def _snapshot(self) -> tuple:
        return (self.steps_done, tuple(int(v) for v in self.seed_values.numpy()))

    def mark_own(self) -> None:
        """Records the current (steps, seeds) as written by this process (plan, release)."""
        self._own_snapshot = self._snapshot()

    def restored_from_elsewhere(self) -> bool:
        """True if the state is not what this process's own plan fixing or releases left.

        That is the case after any load from storage (this object's variables were loaded, or
        the object itself was made by ``load_model``) and after any assignment from outside
        the loop (``set_weights`` of an older state). The next step must then draw its noise
        from a fresh seed (:meth:`refresh_noise_seed`).
        """
        return self._own_snapshot is None or self._own_snapshot != self._snapshot()

    def refresh_noise_seed(self, fresh_seed: int) -> None:
        """Replaces the secret noise seed by ``fresh_seed`` (OS entropy, same on every host).

        The sampling and augmentation seeds are kept: a resumed run samples the batches an
        uninterrupted run would (accounting unchanged); only the noise draws differ.
        """
        values = self.seed_values.numpy().copy()
        values[NOISE_SEED_INDEX] = int(fresh_seed)
        self.seed_values.assign(values)
        self.mark_own()

    def save_own_variables(self, store) -> None:
        """Keras's save path: a pending release fingerprint is stored first."""
        pending = PENDING_BINDING.get(self)
        if pending is not None and pending[1] is not None:
            pending[1]()  # release_binding.flush
        super().save_own_variables(store)

    def load_own_variables(self, store) -> None:
        """Keras's load path (``load_weights``, ``load_model``, BackupAndRestore)."""
        super().load_own_variables(store)
        PENDING_BINDING.pop(self, None)  # the loaded fingerprint describes the loaded weights
        self._own_snapshot = None

    def get_config(self) -> dict:
        return {**super().get_config(), "num_weights": self.num_weights}


PENDING_BINDING: "weakref.WeakKeyDictionary[DPState, tuple]" = weakref.WeakKeyDictionary()
"""DPState -> (fast fingerprint, flush or None) inside DPModel.fit (training/release_binding.py):
with a flush, the last release is fingerprinted only by the fast pass and the stored digests
are invalid until the flush; with None, the stored digests are current."""

_STATE_OF_MODEL: "weakref.WeakKeyDictionary[keras.Model, DPState]" = weakref.WeakKeyDictionary()


def state_for_model(model: keras.Model) -> DPState:
    """The DPState of ``model``: the one an earlier wrapper created, or a new one.

    Must be called inside the strategy scope the model trains under (the variables are created
    there on first use).
    """
    state = _STATE_OF_MODEL.get(model)
    if state is None:
        state = DPState(num_weights=len(model.weights), name="dp_state")
        _STATE_OF_MODEL[model] = state
    return state
