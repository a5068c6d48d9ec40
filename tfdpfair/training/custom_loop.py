"""DP-SGD in your own training loop (``tf.GradientTape`` style / ``strategy.run``).

:class:`DPOptimizer` wraps a Keras 3 optimizer and owns everything the guarantee depends on: the
privacy plan (σ, q, T, δ), the logical step counter, the secret seeds and the per-replica
accumulators. It is built from the very parts ``DPModel.fit`` uses (one implementation, not
two): a :class:`~tfdpfair.training.dp_model.DPModel` fixes the plan and validates the data, its
:class:`~tfdpfair.training.loop.DPStepLoop` supplies the two replica functions, and the DP state
is the model's :class:`~tfdpfair.training.dp_state.DPState`. For the same model, data, seeds and
plan the weights equal ``DPModel.fit``'s (tests/test_custom_loop.py).

One logical step t, with sampled set S_t (Poisson, rate q = B/N), spread over k_t global
micro-batches of m examples per replica × R replicas::

    for _ in tf.range(dp_opt.microbatches_in_step()):             # k_t, a plan value
        strategy.run(dp_opt.accumulate, args=(next(iterator),))   # L_r += Σ_i m_i clip_C(g_i)
    strategy.run(dp_opt.release)                                  # θ ← opt(θ, (Σ_r L_r + n)/(B·s))

``accumulate`` clips each example's gradient of its own loss l_i (per-example, never a batch
mean) to L2 norm C and adds the masked sum to the replica's local accumulator, with no
communication. ``release`` draws n ~ N(0, σ²C² I) once per logical step from (noise seed, t)
(replica 0 adds it), divides by the public constant B·s (s = C with ``rescale_to_unit_norm``,
else 1), hands it to the wrapped optimizer (whose all-reduce SUM combines the replicas), and
counts the step. Units: gradients of the per-example loss, summed over examples, then averaged
by the *expected* batch size B.

Refused, before any budget is spent, with a message that says what to do: a loss that returns
a batch mean instead of per-example losses; an element that did not come from
:meth:`DPOptimizer.distribute_dataset` (or from another step); a micro-batch beyond the step's
k_t; a release before all k_t micro-batches were accumulated (hence also two releases in one
step); a release beyond the plan's T. Host-side, wrap each compiled call in
:meth:`DPOptimizer.run`: it applies DPModel.fit's rules around it (restores never replay noise,
weights changed outside DP-SGD are refused, the release fingerprint is recorded, TensorFlow's
error text is withheld because it can echo private values).
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from tfdpfair.privacy.accounting import PrivacyPlan
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.privacy.statement import privacy_statement
from tfdpfair.training import fit_loop, guards, input_pipeline, release_binding
from tfdpfair.training.dp_model import DPModel
from tfdpfair.training.fit_loop import PrivacyBudgetExhaustedError
from tfdpfair.training.loop import ERROR_PREFIX

ELEMENT_MESSAGE = (
    "DPOptimizer.accumulate takes the elements of DPOptimizer.distribute_dataset() (or "
    "dataset_fn()) as they come: (step, x, y, mask), a Poisson-sampled micro-batch with its "
    "padding mask and logical step. A batch from anywhere else (a shuffled or fixed-size "
    "tf.data batch, a slice of the arrays) is not what the accountant counts: build the "
    "iterator with iter(dp_opt.distribute_dataset()) and pass next(iterator) unchanged.")


_TRACED_REFUSAL = f"{guards.DPUsageError.__name__}: "


class _Runtime:
    """Untracked parts (a tf.train.Checkpoint of a DPOptimizer never saves these): the wrapper
    DPModel, the step loop with its transient accumulators, the data, and the per-replica count
    of micro-batches accumulated in the current step (always 0 between steps)."""

    def __init__(self, dp_model, loop, data, counter):
        self.dp_model, self.loop, self.data, self.counter = dp_model, loop, data, counter


class DPOptimizer(tf.Module):
    """A DP-SGD optimizer for custom training loops (see the module docstring).

    Create it inside ``strategy.scope()`` (with the model), like ``make_private``. Trackable:
    ``tf.train.Checkpoint(dp_optimizer=dp_opt)`` saves the model, the wrapped optimizer and the
    DP state (step counter, plan, seeds, release fingerprint) under the same restore rules as
    DPModel: the plan must match, released steps cannot be rolled back, and a state restored
    from storage continues with a fresh secret noise seed (sampling is unchanged, so ε is).

    Args:
      model: a built Keras model; its trainable variables are trained.
      optimizer: any Keras 3 optimizer (it receives the privatised mean gradient).
      loss: per-example loss: a ``keras.losses.Loss`` (its reduction is removed), a name, or a
        function ``loss(y_true, y_pred) -> [batch]`` returning one value per example.
      dp_config: the same DPConfig as for ``make_private``.
      x, y: the N private training examples: numpy arrays, or an IndexedSource as ``x``.
      epochs, steps: fix T (only when the plan is fixed for the first time).
      patient_ids: with ``DPConfig(privacy_unit="patient")``, one id per example (default:
        the source's ``patient_ids``); the sampled and clipped units are then patients.
      audit_canaries: for privacy audits only, gradient canaries as for
        ``DPModel.set_audit_canaries`` (tfdpfair/audit): the plan counts N + m units and every
        release adds the included canaries that its own Poisson draw picks, clipped to C,
        before the noise (the same loop code as fit). The run is then an audit run.
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, loss: Any,
                 dp_config: DPConfig, *, x: Any, y: Any = None, epochs: float | None = None,
                 steps: int | None = None, patient_ids: Any = None,
                 audit_canaries: Any = None, name: str = "dp_optimizer"):
        super().__init__(name=name)
        if dp_config.ema_decay is not None or dp_config.polyak:
            raise guards.DPUsageError(
                "DPOptimizer does not keep EMA/Polyak averages yet; set ema_decay=None and "
                "polyak=False, and average the released weights yourself after each release "
                "(post-processing, no privacy cost), or train with make_private(...).fit().")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"optimizer must be a Keras 3 optimizer instance, got "
                            f"{type(optimizer).__name__}.")
        dp_model = DPModel(model, dp_config)
        dp_model.set_audit_canaries(audit_canaries)
        data = dp_model._training_data(x, y, patient_ids)
        dp_model.compile(optimizer=optimizer, loss=_checked_loss(model, loss, data))
        dp_model._check_ready(data)  # every check DPModel.fit makes before budget is spent
        with dp_model.distribute_strategy.scope():
            plan = dp_model.prepare(data.num_units + dp_model._num_canaries(), epochs=epochs,
                                    steps=steps)
            loop = dp_model._loop(plan, data)
            counter = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  synchronization=tf.VariableSynchronization.ON_READ,
                                  aggregation=tf.VariableAggregation.SUM,
                                  name="microbatches_in_step")
        self.model, self.optimizer, self.dp_state = model, optimizer, dp_model.dp_state
        self._runtime = _Runtime(dp_model, loop, data, counter)

    # ---- tf.train.Checkpoint hooks -------------------------------------------------------

    def _serialize_to_tensors(self) -> dict[str, tf.Tensor]:
        """A marker, so that every restore of this object reaches :meth:`_restore_from_tensors`
        (the model, optimizer and DP state are saved as tracked children)."""
        return {"restore_marker": tf.constant(1, tf.int64)}

    def _restore_from_tensors(self, restored_tensors: dict[str, tf.Tensor]) -> Any:
        """A restore from storage: the next step must draw its noise from a fresh seed, even
        when the restored (steps, seeds) equal what this object held (DPState docstring)."""
        self.dp_state._own_snapshot = None
        return tf.no_op()

    # ---- accounting views ----------------------------------------------------------------

    @property
    def strategy(self) -> tf.distribute.Strategy:
        return self._runtime.dp_model.distribute_strategy

    @property
    def plan(self) -> PrivacyPlan:
        return self.dp_state.plan()

    @property
    def logical_steps_done(self) -> int:
        """Logical steps released (noise draws) so far, over all loops and restores."""
        return self.dp_state.steps_done

    @property
    def steps_remaining(self) -> int:
        """T minus the steps done: how many more releases the plan allows."""
        return max(0, self.plan.steps - self.logical_steps_done)

    def epsilon_spent(self) -> float:
        """ε (at the plan's δ) after the logical steps done so far."""
        return self.plan.epsilon(self.logical_steps_done)

    def privacy_statement(self) -> str:
        """The plain-language statement of the steps done so far (as DPModel's export)."""
        return privacy_statement(self.plan, self.logical_steps_done)

    def export_release(self, directory, weights: str = "last") -> Any:
        """The publishable artefact (model, privacy.json, PRIVACY.md; no seeds), as
        ``DPModel.export_release``; refused if the weights changed outside the releases."""
        return self._runtime.dp_model.export_release(directory, weights)

    # ---- data ----------------------------------------------------------------------------

    def dataset_fn(self) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
        """The per-host dataset function of the remaining steps (as DPModel.fit's pipeline).

        Elements are per-replica micro-batches ``(t, x [m, ...], y [m, ...], mask [m])`` for
        t = steps done, ..., T − 1, each step's k_t micro-batches in a row. Call it after any
        restore: it applies the restore rules first (fresh noise seed, see :meth:`run`).
        """
        rt = self._runtime
        start = fit_loop.continue_from_state(rt.dp_model, self.plan,
                                             "a custom DP loop after a change of the weights")
        rt.loop.drop_partial_step()
        self._zero_counter()
        plan = self.plan
        return input_pipeline.dataset_fn(
            rt.data, sampling_seed=self.dp_state.seeds()["sampling"],
            sampling_rate=plan.sampling_rate,
            micro_batch_size=rt.dp_model.dp_config.micro_batch_size, start_step=start,
            end_step=plan.steps, trim_multiple=rt.loop.config.trim_multiple)

    def distribute_dataset(self) -> tf.distribute.DistributedDataset:
        """``strategy.distribute_datasets_from_function(self.dataset_fn())``."""
        return self.strategy.distribute_datasets_from_function(self.dataset_fn())

    # ---- inside the user's tf.function ----------------------------------------------------

    def microbatches_in_step(self) -> tf.Tensor:
        """k_t (int64): global micro-batches of the current step t, the same on every host.

        k_t = max(1, ⌈|S_t|/(m·R)⌉) is a function of the un-noised sample size |S_t|: use it to
        drive the loop, never log, print or return it (docs/privacy.md, "What step times and
        shapes reveal")."""
        return self._runtime.loop._num_microbatches(self._current_step())

    def accumulate(self, element: Any) -> None:
        """Replica context: adds Σ_i mask_i · clip_C(∇ l_i) of this micro-batch to the local sum.

        Clipping is DPConfig.clipping's method (vectorized or ghost), exactly as in fit.
        """
        _check_element(element)
        rt = self._runtime
        step = self._current_step()
        done = tf.convert_to_tensor(rt.counter)
        check = tf.debugging.assert_less(
            done, rt.loop._num_microbatches(step), message=(
                f"{ERROR_PREFIX} accumulate() was called for more micro-batches than logical "
                "step t has (k_t = dp_opt.microbatches_in_step()); call release() once after "
                "exactly k_t accumulate() calls"))
        with tf.control_dependencies([check]):
            rt.loop.accumulate_element(element, step, done)
        rt.counter.assign_add(1)

    def release(self) -> None:
        """Replica context: noise once, divide by B·s, apply, count the step (once per step)."""
        rt = self._runtime
        step = self._current_step()
        checks = rt.loop._release_checks(step)  # in order; within the plan's T
        with tf.control_dependencies(checks):
            complete = tf.debugging.assert_equal(
                tf.convert_to_tensor(rt.counter), rt.loop._num_microbatches(step), message=(
                    f"{ERROR_PREFIX} release() before all k_t micro-batches of logical step t "
                    "were accumulated (or a second release in one step); run exactly "
                    "dp_opt.microbatches_in_step() accumulate() calls, then one release()"))
        with tf.control_dependencies([complete]):
            rt.loop._release(step)
        rt.counter.assign(0)

    def _zero_counter(self) -> None:
        for local in self.strategy.experimental_local_results(self._runtime.counter):
            local.assign(0)

    def _current_step(self) -> tf.Tensor:
        return tf.convert_to_tensor(self.dp_state.logical_steps)

    # ---- host side -----------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls ``fn(*args, **kwargs)`` (your compiled DP steps) under DPModel.fit's rules.

        Before: the plan must have steps left (else PrivacyBudgetExhaustedError), a restored
        state is checked and gets a fresh noise seed, the weights must be those the last
        release left. After: the release fingerprint is recorded (export_release needs it).
        Our in-graph refusals become DPUsageError; other TensorFlow errors are withheld and the
        failed step is counted (its failure can depend on the sample).
        """
        rt = self._runtime
        plan = self.plan
        fit_loop.continue_from_state(rt.dp_model, plan, "the next custom-loop DP step")
        if self.logical_steps_done >= plan.steps:
            raise PrivacyBudgetExhaustedError(
                f"all {plan.steps} planned logical steps were already taken (ε = "
                f"{plan.epsilon(plan.steps):.3f}); releasing another would exceed the plan.")
        before = (self.logical_steps_done, int(self.optimizer.iterations.numpy()))

        def call():
            result = fn(*args, **kwargs)
            self._check_only_releases_applied(before)  # before the weights are bound
            return result

        try:
            return fit_loop.guarded_call(rt.dp_model, rt.loop, call)
        except guards.DPUsageError:
            raise
        except RuntimeError:  # a failed step (counted by guarded_call): drop its partial sums
            rt.loop.drop_partial_step()
            self._zero_counter()
            raise
        except Exception as error:
            if _TRACED_REFUSAL in str(error):  # autograph re-wraps a trace-time refusal
                raise guards.DPUsageError(
                    str(error).split(_TRACED_REFUSAL, 1)[1].strip()) from None
            raise
        finally:
            self.dp_state.note_released()


    def _check_only_releases_applied(self, before: tuple[int, int]) -> None:
        """The wrapped optimizer must have applied exactly one update per DP release."""
        releases = self.logical_steps_done - before[0]
        updates = int(self.optimizer.iterations.numpy()) - before[1]
        if updates != releases:
            raise release_binding.ReleaseBindingError(
                f"the wrapped optimizer applied {updates} update(s) during this call but only "
                f"{releases} were DP releases: an update from gradients that were not clipped and "
                "noised is not covered by the privacy statement, so these weights cannot be "
                "released or trained further as this DP run. Apply updates only through "
                "dp_opt.release() (use a separate optimizer for public data), and restore the "
                "last checkpoint.")


def _checked_loss(model: keras.Model, loss: Any, data: input_pipeline.TrainingData) -> Any:
    """Refuses a loss function that reduces over the batch: clipping needs one loss per example.

    Probed on a batch of two all-zero inputs and labels (public values, no private data).
    """
    if loss is None or isinstance(loss, (str, keras.losses.Loss)) or not callable(loss):
        return loss  # DPModel removes a Loss object's reduction; compile refuses None
    x = tf.zeros((2,) + tuple(data.x_spec.shape), data.x_spec.dtype)
    y = tf.zeros((2,) + tuple(data.y_spec.shape), data.y_spec.dtype)
    value = tf.convert_to_tensor(loss(y, model(x, training=False)))
    if value.shape.rank == 0 or (value.shape.rank and value.shape[0] != 2):
        raise guards.DPUsageError(
            "the loss returns one number for the whole batch (a mean or sum), but DP-SGD clips "
            "each example's gradient: return one loss per example, shape [batch] (e.g. "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None), or "
            "drop the final reduce_mean of your function).")
    return loss


def _check_element(element: Any) -> None:
    """Trace-time structure check: (step int64 [], x, y, mask float32 [m])."""
    ok = isinstance(element, (tuple, list)) and len(element) == 4
    if ok:
        step, _, _, mask = element
        ok = (getattr(step, "dtype", None) == tf.int64 and step.shape.rank == 0
              and getattr(mask, "dtype", None) == tf.float32 and mask.shape.rank == 1)
    if not ok:
        raise guards.DPUsageError(ELEMENT_MESSAGE)
