"""Keras entry point: ``make_private(model, DPConfig(...))`` returns a model whose ``fit()`` runs
DP-SGD with Poisson sampling, exact accounting, and a hard stop at the privacy budget.

How one Keras ``fit`` maps onto DP-SGD:

* The data are the N private examples, as numpy arrays or an index-addressable source
  (tfdpfair.data). Each logical step t draws its batch by Poisson sampling
  (privacy/sampling.py) and is fed to Keras as fixed-shape micro-batches with a mask and an
  ``end_of_step`` flag (training/microbatches.py).
* ``train_step`` (one compiled call per micro-batch) adds the micro-batch's clipped gradient sum
  to accumulator variables; on the last micro-batch of a logical step it draws the noise once,
  divides by the expected batch size and calls ``optimizer.apply`` (privacy/dp_sgd.py).
* The plan (σ, q, T, δ) is fixed before any example is read (privacy/accounting.py); the data
  stream ends after the last step the budget affords, so the budget cannot be exceeded, and
  ``history`` / the progress bar show ε as training goes (every step with RDP).

A Keras "epoch" here is about ceil(N/B) logical steps, one pass over the data in expectation.
Training-set loss and clip fraction are shown for monitoring; they are computed from private
data without noise, so do not publish them as part of a DP release.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfdpfair.data import augment
from tfdpfair.models.validate import check_dp_compatible
from tfdpfair.privacy import accounting, sampling
from tfdpfair.privacy.clipping import clipped_grad_sum
from tfdpfair.privacy.dp_sgd import DPConfig, DPGradientAccumulator
from tfdpfair.training import microbatches


class PrivacyBudgetExhaustedError(RuntimeError):
    """fit() was asked to train further than the privacy budget allows."""


class DPModel(keras.Model):
    """Wraps a Keras model (sharing its variables) and trains it with DP-SGD in ``fit()``."""

    def __init__(self, model: keras.Model, dp_config: DPConfig, **kwargs: Any):
        super().__init__(**kwargs)
        check_dp_compatible(model)
        self.inner = model
        self.dp_config = dp_config
        self.plan: accounting.PrivacyPlan | None = None
        self._accumulator: DPGradientAccumulator | None = None
        self._dp_sampler: sampling.PoissonSampler | None = None
        self._per_example_loss: keras.losses.Loss | None = None
        self._loss_tracker = keras.metrics.Mean(name="loss")
        self._clip_tracker = keras.metrics.Mean(name="clipped_fraction")

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def compile(self, optimizer="sgd", loss=None, metrics=None, jit_compile=False, **kwargs):
        """Like keras.Model.compile; ``loss`` must be a Keras loss (averaged over a batch)."""
        if loss is None:
            raise ValueError("DPModel.compile needs a loss, e.g. "
                             "keras.losses.SparseCategoricalCrossentropy(from_logits=True).")
        self._per_example_loss = keras.losses.get(loss)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics,
                        jit_compile=jit_compile, **kwargs)

    @property
    def metrics(self):
        return [self._loss_tracker, self._clip_tracker]

    @property
    def logical_steps_done(self) -> int:
        """Logical steps (noise draws) taken so far, over all fit() calls."""
        return 0 if self._accumulator is None else int(self._accumulator.logical_steps.numpy())

    def epsilon_spent(self) -> float:
        """ε after the logical steps done so far (0 before training)."""
        if self.plan is None:
            return 0.0
        return self.plan.epsilon(self.logical_steps_done)

    # ---- planning ------------------------------------------------------------------------

    def plan_privacy(self, num_examples: int, epochs: float | None = None,
                     steps: int | None = None) -> accounting.PrivacyPlan:
        """Fixes σ, q, T, δ for a run over ``num_examples`` private examples (see accounting)."""
        cfg = self.dp_config
        return accounting.plan_dp_sgd(
            num_examples=num_examples, expected_batch_size=cfg.expected_batch_size,
            steps=steps, epochs=epochs, noise_multiplier=cfg.noise_multiplier,
            target_epsilon=cfg.target_epsilon, delta=cfg.delta, accountant=cfg.accountant)

    def prepare(self, num_examples: int, epochs: float | None = None,
                steps: int | None = None) -> accounting.PrivacyPlan:
        """Fixes the privacy plan for N examples before training (fit() does it otherwise).

        Lets a caller log or check σ, T and the planned ε before any data is read; a later
        fit() uses this plan and ignores its own epochs/steps.
        """
        self._prepare(num_examples, epochs, steps)
        return self.plan

    def _prepare(self, num_examples: int, epochs: float | None, steps: int | None,
                 plan: accounting.PrivacyPlan | None = None,
                 seeds: dict[str, int] | None = None) -> None:
        """Fixes the plan and builds the sampler, accumulator and optimizer state (once).

        ``plan`` and ``seeds`` are given when resuming from a checkpoint (training/checkpoint.py).
        """
        if self.plan is not None:
            if self.plan.num_examples != num_examples:
                raise ValueError(
                    f"this DPModel was planned for N = {self.plan.num_examples} examples; got "
                    f"{num_examples}. Privacy accounting assumes one fixed dataset.")
            return
        if not self.compiled:
            raise RuntimeError("call compile() before fit().")
        check_dp_compatible(self.inner)  # again: trainability may have changed since __init__
        self.plan = plan or self.plan_privacy(num_examples, epochs=epochs, steps=steps)
        cfg = self.dp_config
        self.seeds = seeds or {
            "sampling": sampling.random_seed() if cfg.sampling_seed is None else cfg.sampling_seed,
            "noise": sampling.random_seed() if cfg.noise_seed is None else cfg.noise_seed,
            "augment": sampling.random_seed() if cfg.noise_seed is None else cfg.noise_seed + 1,
        }
        self._dp_sampler = sampling.PoissonSampler(
            num_examples, self.plan.sampling_rate, cfg.micro_batch_size, self.seeds["sampling"])
        variables = self.inner.trainable_variables
        if not variables:
            raise ValueError("the model has no trainable variables.")
        self._accumulator = DPGradientAccumulator(
            variables, cfg.l2_norm_clip, self.plan.noise_multiplier, cfg.expected_batch_size,
            noise_seed=self.seeds["noise"], rescale_to_unit_norm=cfg.rescale_to_unit_norm)
        self.optimizer.build(variables)
        self._augment_seed = self.seeds["augment"]
        self._microbatch_counter = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._multiview_loss = augment.multiview_loss_fn(self.inner, self._per_example_loss)

    # ---- training ------------------------------------------------------------------------

    def _example_loss(self, example):
        """Loss of ONE example: x [H, W, C] without augmult, or its views [K, H, W, C]."""
        if self.dp_config.augmult > 1:
            return self._multiview_loss(example)
        x, y = example
        return self._per_example_loss(y[None], self.inner(x[None], training=True))

    def train_step(self, data):
        x, y, mask, end_of_step = data
        if self.dp_config.augmult > 1:
            # K fresh random views per example and micro-batch; the per-example loss averages
            # over them before clipping, so the sensitivity stays C.
            seed = tf.stack([tf.constant(self._augment_seed, tf.int64),
                             self._microbatch_counter.assign_add(1)])
            x = augment.make_views(x, self.dp_config.augmult, seed)
        clipped = clipped_grad_sum(self._example_loss, self.inner.trainable_variables,
                                   (x, y), mask, self.dp_config.l2_norm_clip)
        self._accumulator.accumulate(clipped)
        self._loss_tracker.update_state(clipped.loss_sum / tf.maximum(clipped.num_examples, 1.0),
                                        sample_weight=clipped.num_examples)
        self._clip_tracker.update_state(
            clipped.num_clipped / tf.maximum(clipped.num_examples, 1.0),
            sample_weight=clipped.num_examples)
        tf.cond(tf.reshape(end_of_step, []), self._release_step, lambda: tf.constant(False))
        return {m.name: m.result() for m in self.metrics}

    def _release_step(self):
        grads = self._accumulator.noisy_mean_gradient()
        self.optimizer.apply(grads, self.inner.trainable_variables)
        return tf.constant(True)

    def fit(self, x=None, y=None, epochs: float | None = None, steps: int | None = None,
            callbacks=None, verbose="auto", validation_data=None, **kwargs):
        """Runs DP-SGD over N private examples.

        Args:
          x: numpy inputs [N, ...] with labels ``y`` [N, ...]; or an IndexedSource
            (tfdpfair.data: CheXpert, MIMIC-CXR, TFDS arrays) with ``y=None``, whose examples'
            "image" and "label" are used.
          epochs: expected passes over the data (T = ceil(epochs·N/B)); or give ``steps``.
            Only the first call's epochs/steps set the plan; a later call continues the same
            plan (same σ, q, δ) until its T steps are used up.
          steps: number of logical steps T.
          callbacks, verbose, validation_data: as in keras.Model.fit.

        Returns:
          The Keras History; ``history.history["epsilon"]`` holds ε after each Keras epoch.
        """
        if kwargs:
            raise TypeError(f"DPModel.fit does not support {sorted(kwargs)}: batching, "
                            "shuffling and step counts are set by the DP plan.")
        m = self.dp_config.micro_batch_size
        if microbatches.is_indexed_source(x):
            if y is not None:
                raise ValueError("with an IndexedSource the labels come from the source; "
                                 "pass y=None.")
            num_examples, image_rank = len(x), len(x.element_spec["image"].shape) + 1
            make_stream = functools.partial(microbatches.source_stream, x, micro_batch_size=m)
        else:
            x, y = np.asarray(x), np.asarray(y)
            if len(x) != len(y):
                raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}.")
            num_examples, image_rank = len(x), x.ndim
            make_stream = functools.partial(microbatches.array_stream, x, y, micro_batch_size=m)
        if self.dp_config.augmult > 1 and image_rank != 4:
            raise ValueError("augmult > 1 needs images [N, H, W, C]; got rank "
                             f"{image_rank} inputs.")
        self._prepare(num_examples, epochs, steps)
        # A previous fit() may have been stopped in the middle of a logical step. Its partial
        # sum was never released, so dropping it costs nothing; keeping it would count the
        # re-sampled examples of that step twice (sensitivity 2C).
        self._accumulator.reset()
        start = self.logical_steps_done
        if start >= self.plan.steps:
            raise PrivacyBudgetExhaustedError(
                f"all {self.plan.steps} planned logical steps were already taken (ε = "
                f"{self.epsilon_spent():.3f}); training further would exceed the plan.")
        # Count the micro-batches up front (Keras needs steps_per_epoch) but sample the index
        # sets lazily inside the stream, so memory stays O(one step) however long the run is.
        total_micro = sum(self._dp_sampler.num_microbatches(t)
                          for t in range(start, self.plan.steps))
        steps_per_pass = max(1, math.ceil(self.plan.num_examples / self.dp_config.expected_batch_size))
        keras_epochs = math.ceil((self.plan.steps - start) / steps_per_pass)
        # Keras epochs are display units of ~one data pass; they need not align with logical
        # steps, because the accumulator carries a step across calls. PrivacyMonitor stops
        # training right after the last planned step is released.
        micro_per_epoch = math.ceil(total_micro / keras_epochs)
        batches = self._dp_sampler.logical_batches(start, self.plan.steps)
        return super().fit(make_stream(batches), epochs=keras_epochs,
                           steps_per_epoch=micro_per_epoch,
                           callbacks=[PrivacyMonitor(self)] + list(callbacks or []),
                           verbose=verbose, validation_data=validation_data, shuffle=False)


class PrivacyMonitor(keras.callbacks.Callback):
    """Adds ``epsilon`` and ``logical_steps`` to the logs and stops at the end of the plan.

    With the PLD accountant one ε evaluation costs ~0.5 s, so ε is refreshed about 50 times per
    run (and always at the end of an epoch and of the run) instead of after every step.
    """

    PLD_REFRESHES_PER_RUN = 50

    def __init__(self, dp_model: DPModel):
        super().__init__()
        self._dp_model = dp_model
        self._epsilon = (-1, 0.0)  # (steps, ε) last computed

    def _current_epsilon(self, steps: int, force: bool) -> float:
        plan = self._dp_model.plan
        interval = 1 if plan.accountant == "rdp" else max(
            1, plan.steps // self.PLD_REFRESHES_PER_RUN)
        if steps != self._epsilon[0] and (force or steps % interval == 0 or steps == plan.steps):
            self._epsilon = (steps, plan.epsilon(steps))
        return self._epsilon[1]

    def _annotate(self, logs, force: bool) -> int:
        """Writes steps and ε into ``logs``; returns the steps (one variable read per batch)."""
        steps = self._dp_model.logical_steps_done
        if logs is not None:
            logs["logical_steps"] = steps
            logs["epsilon"] = self._current_epsilon(steps, force)
        return steps

    def on_train_batch_end(self, batch, logs=None):
        steps = self._annotate(logs, force=False)
        if steps >= self._dp_model.plan.steps:
            self._dp_model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self._annotate(logs, force=True)


def make_private(model: keras.Model, dp_config: DPConfig) -> DPModel:
    """Returns a :class:`DPModel` that trains ``model``'s variables with DP-SGD.

    Raises ``DPIncompatibleModelError`` if the model mixes examples (e.g. BatchNormalization in
    training mode), naming the layer and the fix.
    """
    return DPModel(model, dp_config)
