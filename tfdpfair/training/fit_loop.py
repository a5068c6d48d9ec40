"""DPModel.fit's host loop: Keras callbacks around compiled calls of whole logical steps.

Order of one fit (DESIGN.md "State"):
set-up (plan fixed, loop built) -> ``on_train_begin`` (BackupAndRestore may restore the DP state
with the weights) -> reconcile the restored state (same plan, no rollback of released steps) ->
hosts agree -> a fresh noise seed if the state was restored from storage (restores never replay
noise) -> the weights must be those the last release left (training/release_binding.py) ->
epochs of calls {weights checked; call; fingerprint taken; on_train_batch_*; ε in the logs}
-> validation -> ``on_epoch_end`` (checkpoints: the accumulators are always empty here) ->
``on_train_end`` (the fingerprint of the last release stored before it).

Callbacks see ``nonprivate_*`` statistics only if they display or record them
(training/callback_logs.py); every other callback gets the public logs.

A Keras epoch is ceil(N/B) logical steps; epoch e covers steps [e·E, (e+1)·E), so a resumed run
continues in the epoch its step counter falls in.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from tfdpfair.privacy import sampling
from tfdpfair.privacy.accounting import PrivacyPlan
from tfdpfair.training import (callback_logs, distributed, guards, input_pipeline,
                               release_binding)
from tfdpfair.training.loop import ERROR_PREFIX, DPStepLoop


class PrivacyBudgetExhaustedError(RuntimeError):
    """fit() was asked to train further than the privacy budget allows."""


class EpsilonLog:
    """ε after n steps, cached; with PLD (≈0.5 s per evaluation) refreshed ~50 times per run."""

    PLD_REFRESHES_PER_RUN = 50

    def __init__(self, plan: PrivacyPlan):
        self.plan = plan
        self.interval = 1 if plan.accountant == "rdp" else max(
            1, plan.steps // self.PLD_REFRESHES_PER_RUN)
        self.last = (-1, 0.0)

    def epsilon(self, steps: int, force: bool = False) -> float:
        if steps != self.last[0] and (force or steps % self.interval == 0
                                      or steps == self.plan.steps):
            self.last = (steps, self.plan.epsilon(steps))
        return self.last[1]


def run_fit(dp_model, loop: DPStepLoop, plan: PrivacyPlan, data: input_pipeline.TrainingData,
            callbacks: list, verbose: Any, validation_data: Any, validation_freq: int):
    """The body of DPModel.fit after set-up; returns the History."""
    state, strategy = dp_model.dp_state, dp_model.distribute_strategy
    steps_per_epoch = max(1, math.ceil(plan.num_examples / plan.expected_batch_size))
    per_call = max(1, int(getattr(dp_model, "steps_per_execution", 1) or 1))
    num_epochs = math.ceil(plan.steps / steps_per_epoch)
    callbacks = callback_logs.public_logs_only(callbacks)
    if verbose not in (0, "0") and not any(
            isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks):
        callbacks.append(LogicalStepProgbar())
    callback_list = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=False, model=dp_model,
        verbose=1 if verbose == "auto" else verbose, epochs=num_epochs,
        steps=math.ceil(steps_per_epoch / per_call), logical_steps_per_epoch=steps_per_epoch,
        planned_steps=plan.steps)
    dp_model.stop_training = False
    callback_list.on_train_begin()
    start = continue_from_state(dp_model, plan, "fit() after a change of the weights")
    if start >= plan.steps:
        raise PrivacyBudgetExhaustedError(
            f"all {plan.steps} planned logical steps were already taken (ε = "
            f"{plan.epsilon(start):.3f}); training further would exceed the plan. The spent "
            "budget belongs to the model: a new wrapper cannot reset it.")
    if dp_model.averages is not None and not int(dp_model.averages.initialized.numpy()):
        dp_model.averages.start_from(loop.variables)  # θ_0, before this run's first step
        release_binding.record(dp_model)
    seeds = state.seeds()
    iterator = iter(strategy.distribute_datasets_from_function(input_pipeline.dataset_fn(
        data, sampling_seed=seeds["sampling"], sampling_rate=plan.sampling_rate,
        micro_batch_size=dp_model.dp_config.micro_batch_size, start_step=start,
        end_step=plan.steps, trim_multiple=loop.config.trim_multiple)))
    loop.drop_partial_step()  # of a failed call
    eps_log, logs, step = EpsilonLog(plan), {}, start
    try:
        for epoch in range(start // steps_per_epoch, num_epochs):
            epoch_end = min(plan.steps, (epoch + 1) * steps_per_epoch)
            logs = _run_epoch(dp_model, loop, callback_list, iterator, epoch, step, epoch_end,
                              per_call, eps_log)
            step = state.steps_done
            if validation_data is not None and (epoch + 1) % validation_freq == 0:
                logs.update(_validate(dp_model, validation_data))
            logs.update(epsilon=eps_log.epsilon(step, force=True), logical_steps=step)
            callback_list.on_epoch_end(epoch, logs)
            if dp_model.stop_training or step >= plan.steps:
                break
    finally:  # Keras saves inside the loop flush themselves (DPState.save_own_variables)
        release_binding.flush(dp_model)
    callback_list.on_train_end(logs)
    return dp_model.history


def continue_from_state(dp_model, plan: PrivacyPlan, what: str) -> int:
    """Before DP steps run (fit, or the custom-loop API): returns the start step.

    Checks a restored state (same plan, no rollback of released steps), that all hosts agree,
    replaces the noise seed with fresh OS entropy if the state was restored from storage
    (restores never replay noise), and that the weights are those the last release left.
    """
    state = dp_model.dp_state
    start = _reconcile_restored_state(dp_model, plan)
    restored = state.restored_from_elsewhere()
    distributed.check_hosts_agree(dp_model.distribute_strategy, {
        "num_examples": plan.num_examples, "planned_steps": plan.steps, "start_step": start,
        "micro_batch_size": dp_model.dp_config.micro_batch_size,
        "seed_checksum": sum(state.seeds().values()) % (2**61), "restored": int(restored)})
    if restored:
        _refresh_noise_seed(dp_model)
    release_binding.verify(dp_model, what)
    return start


class LogicalStepProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar in logical steps: it shows the steps that ran in this epoch, out of
    the steps the epoch can still run (a resumed or last epoch is shorter), and ends at the
    steps that ran when training stops early (e.g. 6/11; Keras's own bar jumps to its
    target)."""

    def set_params(self, params):
        super().set_params(params)
        self._per_epoch, self._planned = params["logical_steps_per_epoch"], params["planned_steps"]

    def on_epoch_begin(self, epoch, logs=None):
        self._first = self.model.logical_steps_done
        per_epoch, planned = self._per_epoch, self._planned
        self.target = max(1, min(planned, (epoch + 1) * per_epoch) - self._first)
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        ran = int((logs or {}).get("logical_steps", self._first + batch + 1)) - self._first
        super().on_train_batch_end(ran - 1, logs)

    def _finalize_progbar(self, logs):
        self._maybe_init_progbar()
        self.progbar.update(self.seen, list((logs or {}).items()), finalize=True)


def _run_epoch(dp_model, loop, callback_list, iterator, epoch, step, epoch_end, per_call,
               eps_log) -> dict:
    state = dp_model.dp_state
    callback_list.on_epoch_begin(epoch)
    loop.reset()
    logs, batch = {}, 0
    while step < epoch_end and not dp_model.stop_training:
        count = min(per_call, epoch_end - step)
        callback_list.on_train_batch_begin(batch)
        release_binding.check_unchanged(dp_model, "the next DP step")
        values = _call(dp_model, loop, iterator, step, count)
        state.note_released()
        step = state.steps_done
        logs = {k: float(np.asarray(v)) for k, v in values.items()}
        logs.update(epsilon=eps_log.epsilon(step), logical_steps=step)
        callback_list.on_train_batch_end(batch, logs)
        batch += 1
    return dict(logs)


def _call(dp_model, loop: DPStepLoop, iterator, step: int, count: int) -> dict:
    """One compiled call of ``count`` logical steps (see :func:`guarded_call`)."""
    return guarded_call(dp_model, loop, lambda: loop.train_call(
        iterator, tf.constant(step, tf.int64), tf.constant(count, tf.int64)), pending=True)


def guarded_call(dp_model, loop: DPStepLoop, call: Callable[[], Any],
                 pending: bool = False) -> Any:
    """Runs ``call`` (compiled DP steps); TensorFlow's own error text is withheld (it may echo
    private values). Shared by fit and the custom-loop API (training/custom_loop.py).

    An in-graph refusal of ours (message starting "tfdpfair:") becomes a DPUsageError. A step
    that fails after touching data is counted (invariant 3): the failure itself can depend on
    which examples were sampled, so it is treated as a released step. The weights' fingerprint
    is recorded after the call either way (they are what the releases left): stored at once,
    or with ``pending`` (fit, which flushes it) as a fast pending fingerprint
    (release_binding.mark_released).
    """
    bind = release_binding.mark_released if pending else release_binding.record
    try:
        values = call()
        bind(dp_model)
        return values
    except tf.errors.OpError as error:
        message = error.message or ""
        if ERROR_PREFIX in message:  # refused before its step; earlier releases of the call
            bind(dp_model)  # stand, and their weights are bound
            ours = message[message.index(ERROR_PREFIX):].splitlines()[0]
            raise guards.DPUsageError(ours) from None
        _count_failed_step(loop)
        bind(dp_model)
        op = getattr(error.op, "type", None) if error.op is not None else None
        in_input = op in _INPUT_OPS or any(m in message for m in _INPUT_MARKERS)
        raise RuntimeError(
            f"a DP training step failed inside TensorFlow ({type(error).__name__} in "
            f"{'the input pipeline' if in_input else 'op ' + (op or '?')}). Its message is "
            "withheld because it can contain values of private examples; the step counter "
            "already counts the failed step. " + (
                "An input file could not be read or decoded (corrupt, truncated or not an "
                "image): TensorFlow's log above (stderr) may name it; run the image check "
                "(tfdpfair.data.image_check.check_images(source.paths), or load the data with "
                "verify_images=True), fix or drop the file (on_bad='skip') and start a new run."
                if in_input else
                "Inputs were validated before training, so check the model and the loss on "
                "public data (e.g. model.evaluate on a public batch).")
        ) from None


# Ops and error-text markers (matched, never echoed) of reading and decoding training inputs.
_INPUT_OPS = ("IteratorGetNext", "IteratorGetNextAsOptional",
              "MultiDeviceIteratorGetNextFromShard", "ReadFile", "DecodeImage", "DecodeJpeg",
              "DecodePng", "DecodeAndCropJpeg")
_INPUT_MARKERS = ("Iterator::", "IteratorGetNext", "jpeg::", "png::", "DecodeJpeg", "DecodePng",
                  "DecodeImage", "ReadFile", "Not a JPEG/PNG image")


def _count_failed_step(loop: DPStepLoop) -> None:
    """Counts the step in progress when a call failed (unless its release already counted it)."""
    state, planned = loop.state, int(loop.state.plan_values.numpy()[3])
    failed = state.steps_done  # steps before it were released and counted by the release
    state.logical_steps.assign(min(planned, failed + 1))
    state.note_released()


def _refresh_noise_seed(dp_model) -> None:
    """A fresh secret noise seed (OS entropy, the chief's on every host) after a restore."""
    fresh = distributed.broadcast_from_chief(dp_model.distribute_strategy,
                                             {"noise": sampling.random_seed()})["noise"]
    dp_model.dp_state.refresh_noise_seed(fresh)


def _validate(dp_model, validation_data) -> dict:
    if isinstance(validation_data, (tuple, list)) and len(validation_data) >= 2:
        results = dp_model.evaluate(validation_data[0], validation_data[1], verbose=0,
                                    return_dict=True)
    else:
        results = dp_model.evaluate(validation_data, verbose=0, return_dict=True)
    return {"val_" + k: float(v) for k, v in results.items()}


def _reconcile_restored_state(dp_model, plan: PrivacyPlan) -> int:
    """After on_train_begin: a callback may have restored the DP state; check and return start."""
    state = dp_model.dp_state
    restored = state.plan()
    if restored != plan:
        dp_model._check_plan_matches(restored, plan.num_examples)
        raise guards.DPUsageError(
            "a callback restored a DP state with a different plan "
            f"({restored.steps} steps, σ = {restored.noise_multiplier:g}) than this fit() fixed "
            f"({plan.steps} steps, σ = {plan.noise_multiplier:g}); resume with the same "
            "settings as the interrupted run.")
    if state.steps_done < state.released_high_water:
        raise guards.DPUsageError(
            f"the DP state was restored to step {state.steps_done} after this process released "
            f"step {state.released_high_water}; re-running released steps would release them "
            "twice while the accountant counts them once. Resume from the newest checkpoint or "
            "start a new run.")
    return state.steps_done
