"""Keras entry point: ``make_private(model, DPConfig(...))`` returns a model whose ``fit()`` runs
DP-SGD with Poisson sampling, exact accounting, and a hard stop at the privacy budget.

How one Keras ``fit`` maps onto DP-SGD:

* The plan (σ, q, T, δ) is fixed before any example is read (privacy/accounting.py) and stored,
  with the step counter and the secret seeds, in a Keras-tracked :class:`DPState`
  (training/dp_state.py): every Keras save/restore path keeps ε right.
* DPModel drives its own loop (training/loop.py) and feeds Keras callbacks through
  ``keras.callbacks.CallbackList``. One compiled call runs ``steps_per_execution`` whole logical
  steps: Poisson-sampled micro-batches from a TF-only input pipeline
  (training/input_pipeline.py), clipped per example, summed across micro-batches and replicas,
  noised once, divided by the expected batch size and applied. It runs the same under no
  strategy, MirroredStrategy, MultiWorkerMirroredStrategy and TPUStrategy.
* A Keras "epoch" is ceil(N/B) logical steps, one pass over the data in expectation; a Keras
  "batch" (progress bar unit) is one compiled call.

Logged values: ``epsilon`` and ``logical_steps`` are public; ``nonprivate_*`` (training loss,
compiled metrics, clip fraction, non-finite examples) are computed from private data without
noise: monitor them, never publish them or let a callback act on them (refused).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import keras
import tensorflow as tf

from tfdpfair.data import augment
from tfdpfair.models.validate import check_dp_compatible
from tfdpfair.privacy import accounting, ghost_clipping, sampling
from tfdpfair.privacy.dp_sgd import DPConfig, DPGradientAccumulator
from tfdpfair.models import validate
from tfdpfair.training import (averaging, distributed, example_loss, guards, input_pipeline,
                               release, release_binding)
from tfdpfair.training.dp_state import DPState, state_for_model
from tfdpfair.training.loop import DPStepLoop, LoopConfig
from tfdpfair.training.fit_loop import PrivacyBudgetExhaustedError, run_fit

_log = logging.getLogger("tfdpfair")

REFUSED_FIT_KWARGS = {
    "batch_size": "the logical batch is Poisson-sampled with expected size "
                  "DPConfig.expected_batch_size; micro_batch_size sets the physical batch",
    "shuffle": "Poisson sampling replaces shuffling",
    "steps_per_epoch": "a Keras epoch is ceil(N/B) logical steps; use epochs= or steps=",
    "sample_weight": "per-example weights change each example's sensitivity",
    "class_weight": "per-example weights change each example's sensitivity",
    "validation_split": "split the data yourself and pass the held-out part as validation_data "
                        "(N must be the size of the private training set)",
    "initial_epoch": "the start is the DP state's step counter",
}


def _auto_with_fallback(fallback: list[str], num_trained: int) -> str:
    """clipping="auto" when the trained variables ``fallback`` (paths) have no ghost rule:
    "ghost" if any trained variable has one (the others get per-example gradients inside
    ghost clipping), "vectorized" if none has. Logs which variables fall back."""
    shown = ", ".join(fallback[:5]) + (f" and {len(fallback) - 5} more"
                                       if len(fallback) > 5 else "")
    if len(fallback) >= num_trained:
        _log.warning(
            "DP clipping: vectorized per-example gradients, because no trained variable belongs "
            "to a layer with a ghost-clipping rule (%s). Rules cover Dense, Conv1D/2D, "
            "DepthwiseConv2D, SeparableConv2D, EinsumDense, Embedding, WSConv2D, normalisation "
            "affines and NFNet/WRN blocks (docs/ghost_clipping.md).", shown)
        return "vectorized"
    _log.warning(
        "DP clipping: ghost norms; %d of %d trained variable(s) belong to layers without a "
        "ghost-clipping rule and fall back to per-example gradients (tf.vectorized_map of the "
        "one-example loss, an extra per-example forward and backward pass): %s. Freeze or "
        "replace those layers to avoid that cost (docs/ghost_clipping.md).",
        len(fallback), num_trained, shown)
    return "ghost"


@keras.saving.register_keras_serializable(package="tfdpfair")
class DPModel(keras.Model):
    """Wraps a Keras model (sharing its variables) and trains it with DP-SGD in ``fit()``."""

    def __init__(self, model: keras.Model, dp_config: DPConfig | dict, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(dp_config, dict):
            dp_config = DPConfig(**dp_config)
        if not model.built:
            raise ValueError("build the model before make_private (e.g. start it with "
                             "keras.Input(shape)), so its variables exist.")
        check_dp_compatible(model)
        guards.check_variables_in_scope(model, self.distribute_strategy)
        self.inner = model
        self.dp_config = dp_config
        with self.distribute_strategy.scope():
            self.dp_state: DPState = state_for_model(model)
            self.averages = averaging.ParameterAverages(
                [v.shape for v in model.trainable_variables], dp_config.ema_decay,
                dp_config.polyak, name="parameter_averages") if (
                    dp_config.ema_decay is not None or dp_config.polyak) else None
        self._runtime: dict[str, Any] = {}
        self._audit_canaries = None
        self.built = True

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def get_config(self) -> dict:
        return {"name": self.name, "model": keras.saving.serialize_keras_object(self.inner),
                "dp_config": dataclasses.asdict(self.dp_config)}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> "DPModel":
        inner = keras.saving.deserialize_keras_object(config["model"],
                                                      custom_objects=custom_objects)
        return cls(inner, DPConfig(**config["dp_config"]), name=config.get("name"))

    def compile(self, optimizer="sgd", loss=None, metrics=None, steps_per_execution=1,
                jit_compile=False, **kwargs):
        """Like keras.Model.compile. ``steps_per_execution`` = logical steps per compiled call."""
        if loss is None:
            raise ValueError("DPModel.compile needs a loss, e.g. "
                             "keras.losses.SparseCategoricalCrossentropy(from_logits=True).")
        if kwargs.get("loss_weights") is not None:
            raise guards.DPUsageError("loss_weights are not supported by DPModel.")
        check_dp_compatible(self.inner)  # again: trainability may have changed
        guards.check_precision_policy(self.inner, optimizer)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics,
                        steps_per_execution=steps_per_execution,
                        jit_compile=jit_compile is True, **kwargs)  # XLA only when asked
        guards.check_precision_policy(self.inner, self.optimizer)
        self._dp_loss = loss
        self._runtime = {}

    def compile_from_config(self, config: dict) -> None:
        """Re-compiles on ``keras.models.load_model`` (Keras skips custom compiles otherwise)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.inner.trainable_variables)  # so its state can be loaded

    # ---- accounting views --------------------------------------------------------------

    @property
    def plan(self) -> accounting.PrivacyPlan | None:
        """The fixed privacy plan (None before prepare()/fit())."""
        return self.dp_state.plan()

    @property
    def seeds(self) -> dict[str, int]:
        """The secret seeds of this run (resume state; never publish them)."""
        return self.dp_state.seeds()

    @property
    def logical_steps_done(self) -> int:
        """Logical steps (noise draws) taken so far, over all fit() calls and wrappers."""
        return self.dp_state.steps_done

    def epsilon_spent(self) -> float:
        """ε after the logical steps done so far (0 before training)."""
        plan = self.plan
        return 0.0 if plan is None else plan.epsilon(self.logical_steps_done)

    def export_release(self, directory, weights: str = "last", *,
                       allow_audit_run: bool = False) -> Any:
        """Writes the publishable artefact: the inner model and the privacy statement, no seeds.

        ``weights`` is "last", "ema" or "polyak". See training/release.py; a resume checkpoint
        (``save``, ``save_weights``) is not a release, because it holds the secret seeds.
        Refused when the weights were changed outside DP-SGD since the last release
        (training/release_binding.py), and for an audit run with canaries unless
        ``allow_audit_run`` (the export is then marked as one).
        """
        return release.export_release(self, directory, weights, allow_audit_run=allow_audit_run)

    @property
    def audit_canaries(self) -> int:
        """m > 0 if this run's DP state was planned with m audit canaries (an audit run)."""
        return int(self.dp_state.audit_canaries.numpy())

    def set_audit_canaries(self, canaries: Any) -> None:
        """For privacy audits only (tfdpfair/audit): m gradient canaries that join the run.

        ``canaries`` holds ``num_canaries`` (m), the canary gradients, ``included`` (bool [m])
        and ``sampling_seed``. The gradients are either ``gradient_blocks`` (one [m, *shape]
        tensor per trainable variable) or, for one-coordinate "Dirac" canaries,
        ``coordinates`` (int [m], flat indices into the concatenated trainable variables) and
        ``values`` (float [m]). At every logical step the loop draws which canaries join (Poisson,
        the plan's q), clips each to C like an example and adds them before the noise. The m
        canaries count in the plan's N, so set them before the plan is fixed (before
        ``prepare``/``fit``); the run is then an audit run for good (its exports say so).
        """
        if canaries is not None:
            m = int(canaries.num_canaries)
            if self.dp_state.has_plan and self.audit_canaries != m:
                raise guards.DPUsageError(
                    "set audit canaries before the privacy plan is fixed: the canaries are "
                    f"units of the run (N + m), and this model's plan was fixed with "
                    f"{self.audit_canaries} canaries. Audit a fresh copy of the recipe.")
        self._audit_canaries = canaries
        self._runtime = {}

    def _num_canaries(self) -> int:
        return 0 if self._audit_canaries is None else int(self._audit_canaries.num_canaries)

    # ---- averaged weights ------------------------------------------------------------

    def average_names(self) -> list[str]:
        """The weight averages this run keeps: a subset of ["ema", "polyak"]."""
        return [] if self.averages is None else self.averages.names

    def averaged_weights(self, name: str) -> list:
        """The ``name`` average of the trainable variables (numpy arrays, their order)."""
        if self.averages is None:
            raise ValueError("this run keeps no averages: set DPConfig.ema_decay or polyak.")
        return self.averages.values(name)

    def swapped_weights(self, name: str):
        """Context manager: the inner model holds the ``name`` ("last", "ema", "polyak")
        weights inside the block (evaluate, predict, export), the last ones after it."""
        if name == "last":
            return averaging.swapped([], [])
        return averaging.swapped(self.inner.trainable_variables, self.averaged_weights(name))

    # ---- planning ------------------------------------------------------------------------

    def plan_privacy(self, num_examples: int, epochs: float | None = None,
                     steps: int | None = None) -> accounting.PrivacyPlan:
        """σ, q, T, δ for a run over ``num_examples`` private units (not stored).

        The units are examples, or patients with ``DPConfig(privacy_unit="patient")``.
        """
        cfg = self.dp_config
        plan = accounting.plan_dp_sgd(
            num_examples=num_examples, expected_batch_size=cfg.expected_batch_size,
            steps=steps, epochs=epochs, noise_multiplier=cfg.noise_multiplier,
            target_epsilon=cfg.target_epsilon, delta=cfg.delta, accountant=cfg.accountant)
        return dataclasses.replace(plan, unit=cfg.privacy_unit)

    def prepare(self, num_examples: int, epochs: float | None = None,
                steps: int | None = None) -> accounting.PrivacyPlan:
        """Fixes the privacy plan for N examples before training (fit() does it otherwise).

        Lets a caller log or check σ, T and the planned ε before any data is read. A plan
        already in the DP state (an earlier fit, a restored checkpoint, an earlier wrapper of
        the same model) is kept, after checking that it matches N and this DPConfig.
        """
        if self.dp_state.has_plan:
            return self._check_plan_matches(self.dp_state.plan(), num_examples)
        if epochs is None and steps is None:
            raise ValueError("give epochs or steps: they fix the number of logical steps T.")
        plan = self.plan_privacy(num_examples, epochs=epochs, steps=steps)
        self.dp_state.set_plan(plan, self.dp_config.l2_norm_clip)
        self.dp_state.audit_canaries.assign(self._num_canaries())
        self.dp_state.set_seeds(self._initial_seeds())
        release_binding.record(self)  # θ_0: the public starting point
        return plan

    def _initial_seeds(self) -> dict[str, int]:
        cfg = self.dp_config
        seeds = {
            "sampling": sampling.random_seed() if cfg.sampling_seed is None else cfg.sampling_seed,
            "noise": sampling.random_seed() if cfg.noise_seed is None else cfg.noise_seed,
            "augment": sampling.random_seed() if cfg.noise_seed is None else cfg.noise_seed + 1,
        }
        return distributed.broadcast_from_chief(self.distribute_strategy, seeds)

    def _check_plan_matches(self, plan: accounting.PrivacyPlan, num_examples: int
                            ) -> accounting.PrivacyPlan:
        cfg = self.dp_config
        problems = []
        if plan.num_examples != num_examples:
            problems.append(f"N = {plan.num_examples} there, {num_examples} here")
        if plan.expected_batch_size != cfg.expected_batch_size:
            problems.append(f"expected batch {plan.expected_batch_size:g} there, "
                            f"{cfg.expected_batch_size} here")
        if self.dp_state.l2_norm_clip != cfg.l2_norm_clip:
            problems.append(f"C = {self.dp_state.l2_norm_clip:g} there, {cfg.l2_norm_clip:g} here")
        if self.audit_canaries != self._num_canaries():
            problems.append(f"{self.audit_canaries} audit canaries there, "
                            f"{self._num_canaries()} here")
        if cfg.noise_multiplier is not None and plan.noise_multiplier != cfg.noise_multiplier:
            problems.append(f"σ = {plan.noise_multiplier:g} there, {cfg.noise_multiplier:g} here")
        if plan.accountant != cfg.accountant:
            problems.append(f"accountant {plan.accountant} there, {cfg.accountant} here")
        if problems:
            raise ValueError(
                "this model already carries a DP plan (from an earlier fit, a restored "
                f"checkpoint or another wrapper; {plan.steps} steps, {self.logical_steps_done} "
                f"taken) that does not match this run: {'; '.join(problems)}. The spent budget "
                "stays with the model: continue with the same settings, or start from the "
                "pre-trained weights in a new model object with a new plan.")
        return plan

    # ---- Keras paths DP forbids ----------------------------------------------------------

    def train_step(self, data):
        raise guards.DPUsageError(
            "DPModel.train_step is not a DP-SGD step: a DP step needs Poisson sampling, noise "
            "once per logical step and accounting, which DPModel.fit() does. Call fit().")

    def make_train_function(self, force=False):
        self.train_step(None)

    def get_weights(self):
        """Like keras.Model.get_weights; a snapshot taken inside fit (EarlyStopping's
        restore_best_weights) holds the release fingerprint, not the pending invalid one."""
        release_binding.flush(self)
        return super().get_weights()

    def train_on_batch(self, *args, **kwargs):
        self.train_step(None)

    # ---- training ------------------------------------------------------------------------

    def fit(self, x=None, y=None, epochs: float | None = None, steps: int | None = None,
            callbacks=None, verbose="auto", validation_data=None, validation_freq: int = 1,
            patient_ids=None, **kwargs):
        """Runs DP-SGD over the N private examples ``x``, ``y`` (see module docstring).

        Args:
          x, y: numpy arrays [N, ...]; an IndexedSource as ``x`` (labels from the source); or
            a finite ``tf.data.Dataset`` of (x, y) as ``x``, read once into memory first
            (input_pipeline.materialize: Poisson sampling needs random access). Infinite or
            unknown-length datasets are refused.
          epochs: expected passes over the data (T = ceil(epochs·N/B)); or give ``steps``. Only
            the plan's first fixing uses them; later calls continue the same plan.
          steps: number of logical steps T.
          callbacks, verbose, validation_data, validation_freq: as in keras.Model.fit.
          patient_ids: with ``privacy_unit="patient"``, one id per example (default: the
            source's ``patient_ids``); epochs then count passes over the patients.

        Returns:
          The Keras History, with ``epsilon`` and ``logical_steps`` after each epoch.
        """
        for key in kwargs:
            reason = REFUSED_FIT_KWARGS.get(key, "not supported under DP-SGD")
            raise TypeError(f"DPModel.fit does not take {key}: {reason}.")
        if not self.compiled:
            raise RuntimeError("call compile() before fit().")
        callbacks = list(callbacks or [])
        guards.check_callbacks(callbacks)
        data = self._training_data(x, y, patient_ids)
        guards.check_validation_is_held_out(data, validation_data)
        self._check_ready(data)
        with self.distribute_strategy.scope():
            plan = self.prepare(data.num_units + self._num_canaries(), epochs=epochs,
                                steps=steps)
            loop = self._loop(plan, data)
        return run_fit(self, loop, plan, data, callbacks, verbose, validation_data,
                       validation_freq)

    def _training_data(self, x, y, patient_ids) -> input_pipeline.TrainingData:
        data = input_pipeline.training_data(x, y)
        if self.dp_config.privacy_unit == "example":
            if patient_ids is not None:
                raise ValueError("patient_ids given, but DPConfig.privacy_unit is 'example'; "
                                 "set privacy_unit='patient' for patient-level DP.")
            return data
        ids = patient_ids if patient_ids is not None else getattr(x, "patient_ids", None)
        if ids is None:
            raise ValueError("privacy_unit='patient' needs patient ids: pass fit(..., "
                             "patient_ids=...) or a source with patient_ids (CheXpert, MIMIC).")
        return input_pipeline.with_patients(data, ids, self.dp_config.max_examples_per_patient)

    def _check_ready(self, data: input_pipeline.TrainingData) -> None:
        """Every check that must pass before budget is spent (invariants 5 and 6)."""
        guards.validate_training_data(data, self.inner, self._dp_loss)
        check_dp_compatible(self.inner)
        validate.check_training_call_is_stateless(  # behaviour, not a deny-list
            self.inner, input_shape=tuple(data.x_spec.shape),
            dtype=data.x_spec.dtype.name if data.x_spec.dtype.is_floating else "float32")
        guards.check_precision_policy(self.inner, self.optimizer)
        guards.check_jit_placement(self.distribute_strategy, bool(self.jit_compile))
        if self.dp_config.augmult > 1 and data.x_spec.shape.rank != 3:
            raise ValueError("augmult > 1 needs images [N, H, W, C]; got rank "
                             f"{data.x_spec.shape.rank + 1} inputs.")
        if self.dp_state.steps_done < self.dp_state.released_high_water:
            raise guards.DPUsageError(_ROLLBACK_MESSAGE.format(
                now=self.dp_state.steps_done, high=self.dp_state.released_high_water))

    def _loop(self, plan: accounting.PrivacyPlan, data) -> DPStepLoop:
        """The compiled step loop for the current trainable set (rebuilt when it changes)."""
        variables = list(self.inner.trainable_variables)
        if not variables:
            raise ValueError("the model has no trainable variables.")
        key = (tuple(id(v) for v in variables), plan, data.x_spec, data.y_spec)
        if self._runtime.get("key") == key:
            return self._runtime["loop"]
        if self.optimizer.built and len(self.optimizer._trainable_variables) != len(variables):
            raise guards.DPUsageError("the set of trainable variables changed since the "
                                      "optimizer was built: call compile() again.")
        if self.averages is not None and self.averages.shapes != [tuple(v.shape) for v in variables]:
            raise guards.DPUsageError("the trainable variables changed since make_private, so "
                                      "the EMA/Polyak averages no longer match them; wrap the "
                                      "model again after changing what is trained.")
        self.optimizer.build(variables)
        cfg = self.dp_config
        accumulator = DPGradientAccumulator(variables, cfg.l2_norm_clip, plan.noise_multiplier,
                                            cfg.expected_batch_size, cfg.rescale_to_unit_norm)
        clipping = self._clipping_method()
        patient = data.patients is not None
        batch_loss = (example_loss.batch_patient_loss_fn if patient
                      else ghost_clipping.batch_example_loss_fn)
        unit_loss = (batch_loss(self.inner, self._dp_loss, cfg.augmult) if clipping == "ghost"
                     else example_loss.example_loss_fn(self.inner, self._dp_loss, cfg.augmult,
                                                       patient))
        loop = DPStepLoop(
            self.inner, self.dp_state, self.optimizer, accumulator, unit_loss,
            self._built_compile_metrics(data), LoopConfig(
                data.num_units, plan.sampling_rate, cfg.micro_batch_size, cfg.l2_norm_clip,
                cfg.augmult, bool(self.jit_compile), clipping, views=dict(
                    pad=cfg.augment_pad, random_crop=cfg.augment_crop,
                    random_flip=cfg.augment_flip),
                trim_multiple=self._trim_multiple(plan)), self.distribute_strategy,
            self.averages)
        if self._audit_canaries is not None:
            rate = getattr(self._audit_canaries, "sampling_rate", plan.sampling_rate)
            if abs(rate - plan.sampling_rate) > 1e-12:
                raise ValueError(f"the canaries were made for q = {rate:g}, the plan samples at "
                                 f"q = {plan.sampling_rate:g} (N counts the canaries: use "
                                 "plan_privacy(N + m, ...).sampling_rate).")
            loop.set_canaries(self._audit_canaries, plan.sampling_rate)
        self._runtime = {"key": key, "loop": loop}
        return loop

    def _trim_multiple(self, plan: accounting.PrivacyPlan) -> int | None:
        """M for trimmed last micro-batches, or None for full padding (DPConfig.microbatch_padding);
        logs the choice and its expected padding, computed from N, q, m, R only (public)."""
        strategy = self.distribute_strategy
        tpu = "TPU" in type(strategy).__name__
        mode = self.dp_config.microbatch_padding
        if mode == "trim" and (tpu or self.jit_compile):
            raise ValueError("microbatch_padding='trim' needs dynamic shapes, which XLA "
                             "(jit_compile=True, TPUs) compiles once per shape; use 'full' (or "
                             "'auto').")
        if mode == "auto":
            mode = "full" if tpu or self.jit_compile else "trim"
        multiple = sampling.TRIM_MULTIPLE if mode == "trim" else None
        cost = sampling.expected_padding(
            plan.num_examples, plan.sampling_rate, self.dp_config.micro_batch_size,
            strategy.num_replicas_in_sync, multiple)
        _log.info("DP micro-batches: %s padding; expected %.2f micro-batches and %.1f%% padding "
                  "rows per logical step (from N, q, m and the replica count).", mode,
                  cost.microbatches, 100.0 * cost.padded_share)
        return multiple

    def _clipping_method(self) -> str:
        """"vectorized" or "ghost" for DPConfig.clipping (see its docstring); logs the choice
        and, for "auto", the variables without a ghost rule (per-example fallback)."""
        requested = self.dp_config.clipping
        if requested != "auto":
            _log.info("DP clipping: %s (DPConfig.clipping=%r).", requested, requested)
            return requested
        fallback = ghost_clipping.describe_plan(self.inner)["fallback"]
        if fallback:
            return _auto_with_fallback(fallback, len(self.inner.trainable_variables))
        _log.info("DP clipping: ghost norms for all trained variables.")
        return "ghost"

    @property
    def clipping_method(self) -> str | None:
        """"ghost" or "vectorized": the method the last built step loop uses (None before)."""
        loop = self._runtime.get("loop")
        return None if loop is None else loop.config.clipping

    def _built_compile_metrics(self, data):
        metrics = self._compile_metrics
        if metrics is None:
            return None
        if not metrics.built:
            x = tf.zeros((1,) + tuple(data.x_spec.shape), data.x_spec.dtype)
            y = tf.zeros((1,) + tuple(data.y_spec.shape), data.y_spec.dtype)
            metrics.build(y, self.inner(x, training=False))
        return metrics


_ROLLBACK_MESSAGE = (
    "this model's DP state was restored to step {now}, but this process already released "
    "steps up to {high} from it. Re-running released steps would release them twice while "
    "the accountant counts them once. Resume from the newest checkpoint, or start a new run "
    "(new model object, new plan).")


def make_private(model: keras.Model, dp_config: DPConfig) -> DPModel:
    """Returns a :class:`DPModel` that trains ``model``'s variables with DP-SGD.

    Raises ``DPIncompatibleModelError`` if the model mixes examples (e.g. BatchNormalization in
    training mode), naming the layer and the fix. Wrapping the same model again continues its
    accounting (the budget belongs to the model).
    """
    return DPModel(model, dp_config)
