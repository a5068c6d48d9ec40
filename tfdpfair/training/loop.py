"""The distributed DP-SGD step loop: one code path for no strategy, Mirrored, MultiWorker, TPU.

One call of :meth:`DPStepLoop.train_call` runs s logical steps. For step t it

1. computes k_t, the number of global micro-batches of the step, from (sampling seed, t): the
   same number the input pipeline emits on every host (training/input_pipeline.py), so all
   replicas agree where the step ends and no collective sits inside a data-dependent branch;
2. runs k_t ``strategy.run(accumulate)`` calls: each replica clips its micro-batch's per-example
   gradients and adds the clipped sum to its *local* accumulator (no communication). With
   trimmed padding (``LoopConfig.trim_multiple``) the element's batch size is unknown at trace
   time; a micro-batch of m rows runs a branch traced for the static shape [m], a trimmed last
   micro-batch one traced for an unknown size: two traces, never one per batch size;
3. runs one ``strategy.run(release)``: after in-graph checks that t is the next step and within
   the plan's T, the step counter moves first (a step that fails later is still counted), then
   each replica passes (L_r + [r = 0]·n)/(B·s) to ``optimizer.apply``, whose all-reduce SUM gives
   (Σ_r L_r + n)/(B·s): the noise is added once (privacy/dp_sgd.py).

Host-side logging reads the monitoring metrics once per call, never per micro-batch.
The custom-loop API (training/custom_loop.py) runs the same two replica functions
(``_accumulate``, ``_release``) from the user's own ``strategy.run`` calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from tfdpfair.data import augment
from tfdpfair.privacy import sampling
from tfdpfair.privacy.clipping import (clipped_coordinates_sum, clipped_grad_sum,
                                       clipped_rows_sum)
from tfdpfair.privacy.dp_sgd import DPGradientAccumulator
from tfdpfair.privacy.ghost_clipping import ghost_clipped_grad_sum
from tfdpfair.training.dp_state import DPState

NONPRIVATE_PREFIX = "nonprivate_"
ERROR_PREFIX = "tfdpfair:"


class TrainingMonitors:
    """Un-noised statistics of the training micro-batches, for monitoring only.

    They are computed from private data without noise: shown in the progress bar and history
    under ``nonprivate_*`` names, never to be published or acted on (DPModel refuses callbacks
    that monitor them). Held outside Keras tracking, so they are not saved with the model.
    """

    def __init__(self):
        self.loss = keras.metrics.Mean(name="loss")
        self.clipped_fraction = keras.metrics.Mean(name="clipped_fraction")
        self.nonfinite_examples = keras.metrics.Sum(name="nonfinite_examples")

    def all(self) -> list[keras.metrics.Metric]:
        return [self.loss, self.clipped_fraction, self.nonfinite_examples]


@dataclasses.dataclass
class LoopConfig:
    """Static settings of the compiled loop (all public; no seeds or data)."""

    num_examples: int
    sampling_rate: float
    micro_batch_size: int
    l2_norm_clip: float
    augmult: int
    jit_compile: bool
    clipping: str = "vectorized"  # "vectorized" or "ghost" (resolved by DPModel)
    views: dict = dataclasses.field(default_factory=dict)  # augment.make_views options
    trim_multiple: int | None = None  # trimmed last micro-batches (M), or None: full padding


class DPStepLoop:
    """Compiled DP-SGD steps over a distributed micro-batch iterator (see module docstring)."""

    def __init__(self, model: keras.Model, state: DPState, optimizer: keras.optimizers.Optimizer,
                 accumulator: DPGradientAccumulator, example_loss: Callable[[Any], Any],
                 compile_metrics: Any, config: LoopConfig, strategy: tf.distribute.Strategy,
                 averages: Any = None):
        self.model, self.state, self.optimizer = model, state, optimizer
        self.accumulator, self.example_loss = accumulator, example_loss
        self.compile_metrics, self.config, self.strategy = compile_metrics, config, strategy
        self.averages = averages  # training/averaging.py, or None
        self.canaries = None  # tfdpfair/audit gradient canaries (audit runs only), or None
        self.canary_sampling_rate = 0.0  # the plan's q (set with the canaries)
        self.monitors = TrainingMonitors()
        self.variables = list(model.trainable_variables)
        self.train_call = tf.function(self._train_call)
        # With trimmed padding, no XLA (it would compile once per size): DPModel refuses both.
        self._accumulate_fn = tf.function(self.accumulate_element,
                                          jit_compile=config.jit_compile)
        self._release_fn = tf.function(self._release, jit_compile=False)

    # ---- replica functions ---------------------------------------------------------------

    def _accumulate(self, element, step, microbatch):
        """Replica context: clip this replica's micro-batch and add it to the local sum."""
        element_step, x, y, mask = element
        check = tf.debugging.assert_equal(
            element_step, step, message=f"{ERROR_PREFIX} the input pipeline and the step loop "
            "disagree on where a logical step ends (different seeds, data sizes or micro-batch "
            "counts on different hosts?)")
        with tf.control_dependencies([check]):
            if self.config.augmult > 1:
                # Fresh views for every (step, micro-batch, replica), statelessly.
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                column = microbatch * self.strategy.num_replicas_in_sync + tf.cast(replica,
                                                                                    tf.int64)
                seed = tf.random.experimental.stateless_fold_in(
                    tf.stack([self.state.seed_values[2], step]), column)
                x = _views(x, self.config.augmult, seed, self.config.views)
            if self.config.clipping == "ghost":
                clipped = ghost_clipped_grad_sum(
                    self.model, self.example_loss, self.variables, (x, y), mask,
                    self.config.l2_norm_clip, has_aux=True)
            else:
                clipped = clipped_grad_sum(self.example_loss, self.variables, (x, y), mask,
                                           self.config.l2_norm_clip, has_aux=True)
        self.accumulator.accumulate(clipped)
        n = clipped.num_examples
        self.monitors.loss.update_state(clipped.loss_sum / tf.maximum(n, 1.0), sample_weight=n)
        self.monitors.clipped_fraction.update_state(
            clipped.num_clipped / tf.maximum(n, 1.0), sample_weight=n)
        self.monitors.nonfinite_examples.update_state(clipped.num_nonfinite)
        if self.compile_metrics is not None:
            labels, predictions = clipped.aux
            _update_masked(self.compile_metrics, labels, predictions, clipped.kept)

    def _accumulate_full(self, element, step, microbatch):
        """:meth:`_accumulate` for a full micro-batch, its batch dimension pinned to m (static
        shapes for the clipping code, e.g. ghost clipping's chunks, when the element spec
        leaves it unknown because of trimmed padding).

        Pinned as ensure_shape(t[:m]), not ensure_shape(t): in a ``tf.cond`` whose other branch
        takes the same tensor at its real size (:meth:`accumulate_element`), Grappler would
        otherwise propagate the static [m] to that branch's ``tf.shape`` (observed in TF 2.21).
        """
        step_tag, *rest = element
        m = self.config.micro_batch_size
        pinned = tf.nest.map_structure(
            lambda t: tf.ensure_shape(t[:m], [m] + t.shape[1:].as_list()), rest)
        self._accumulate((step_tag, *pinned), step, microbatch)

    def accumulate_element(self, element, step, microbatch) -> None:
        """Replica context: micro-batch ``microbatch`` of step ``step`` (fit's loop and the
        custom-loop API). Trimmed padding: [m] rows take the static-shape branch, fewer rows
        (a trimmed last micro-batch) the branch traced for an unknown batch size."""
        if self.config.trim_multiple is None:
            self._accumulate_full(element, step, microbatch)
            return

        def full():
            self._accumulate_full(element, step, microbatch)

        def trimmed():
            self._accumulate(element, step, microbatch)

        rows = tf.shape(element[3], out_type=tf.int64)[0]
        tf.cond(tf.equal(rows, self.config.micro_batch_size), full, trimmed)

    def _release_checks(self, step) -> list[tf.Operation]:
        """In-graph refusal of a release that is out of order or beyond the plan's T."""
        planned_steps = tf.cast(self.state.plan_values[3], tf.int64)
        return [
            tf.debugging.assert_equal(
                tf.convert_to_tensor(self.state.logical_steps), step,
                message=f"{ERROR_PREFIX} release of a step out of order refused"),
            tf.debugging.assert_less(
                step, planned_steps, message=f"{ERROR_PREFIX} the privacy plan's steps are used "
                "up; releasing another step would exceed the budget"),
        ]

    def _release(self, step):
        """Replica context: checks, count the step, add the noise once, apply the update."""
        with tf.control_dependencies(self._release_checks(step)):
            counted = self.state.logical_steps.assign_add(1)
        with tf.control_dependencies([counted]):
            seed = self.state.seed_values[1]
            extra = None if self.canaries is None else self._canary_sum(step)
            update = self.accumulator.replica_update(seed, step, extra)
        self.optimizer.apply(update, self.variables)

    def set_canaries(self, canaries: Any, sampling_rate: float) -> None:
        """Audit canaries (DPModel.set_audit_canaries) joining every step at the plan's q.

        Dirac canaries (``coordinates`` set) are checked here, before any step: m integer
        coordinates in [0, P) of the P trainable coordinates, and m values.
        """
        coordinates = getattr(canaries, "coordinates", None)
        if coordinates is not None:
            k, m = np.asarray(coordinates), int(canaries.num_canaries)
            size = sum(int(np.prod(v.shape)) for v in self.variables)
            if (k.shape != (m,) or not np.issubdtype(k.dtype, np.integer)
                    or np.shape(canaries.values) != (m,) or not 0 <= k.min() <= k.max() < size):
                raise ValueError(
                    f"Dirac canaries need {m} integer coordinates in [0, {size}) (the trainable "
                    f"coordinates of the model) and {m} values; got coordinates of shape "
                    f"{k.shape}, dtype {k.dtype}, values of shape {np.shape(canaries.values)}.")
        self.canaries, self.canary_sampling_rate = canaries, float(sampling_rate)

    def _canary_sum(self, step):
        """Σ_j clip_C(u_j) over the included canaries that step t's Poisson draw (rate q) picks.

        The loop draws and clips itself, whatever the canary object holds: each canary is one
        more unit of the plan's N, with the same sensitivity C and sampling rate q as an example.
        Canaries come as dense ``gradient_blocks`` (one [m, *shape] tensor per variable) or as
        one-coordinate "Dirac" gradients ``coordinates`` [m] (flat index into the concatenated
        trainable variables) with ``values`` [m] (tfdpfair/audit/dirac.py).
        """
        c = self.canaries
        present = tf.logical_and(
            sampling.poisson_mask(c.sampling_seed, step, c.num_canaries,
                                  self.canary_sampling_rate),
            tf.cast(c.included, tf.bool))
        if getattr(c, "coordinates", None) is not None:
            return clipped_coordinates_sum([v.shape for v in self.variables], c.coordinates,
                                           c.values, present, self.config.l2_norm_clip)
        return clipped_rows_sum(c.gradient_blocks, present, self.config.l2_norm_clip)

    # ---- the call ------------------------------------------------------------------------

    def _num_microbatches(self, step):
        replicas = self.strategy.num_replicas_in_sync
        sample = sampling.poisson_sample(self.state.seed_values[0], step,
                                         self.config.num_examples, self.config.sampling_rate)
        return sampling.num_global_microbatches(
            tf.size(sample, out_type=tf.int64), self.config.micro_batch_size * replicas)

    def _train_call(self, iterator, first_step, num_steps):
        """Runs ``num_steps`` logical steps from ``first_step``; returns the monitor values."""
        for i in tf.range(num_steps):
            step = first_step + i
            for microbatch in tf.range(self._num_microbatches(step)):
                self.strategy.run(self._accumulate_fn, args=(next(iterator), step, microbatch))
            # The same checks on the host as well: XLA (TPU, jit_compile) drops Assert ops
            # inside compiled replica functions, but this outer loop runs as ordinary TF.
            with tf.control_dependencies(self._release_checks(step)):
                self.strategy.run(self._release_fn, args=(step,))
            if self.averages is not None:  # post-processing of the released weights
                self.averages.update(self.variables, step)
        return self.results()

    def drop_partial_step(self) -> None:
        """Zeroes every replica's accumulated sums (the partial step of a failed call)."""
        for total in [*self.accumulator.grad_sums, self.accumulator.num_examples]:
            for local in self.strategy.experimental_local_results(total):
                local.assign(tf.zeros_like(local))

    def results(self) -> dict[str, tf.Tensor]:
        """Monitoring values, named ``nonprivate_*`` (read in cross-replica context)."""
        logs = {NONPRIVATE_PREFIX + m.name: m.result() for m in self.monitors.all()}
        if self.compile_metrics is not None:
            for name, value in self.compile_metrics.result().items():
                logs[NONPRIVATE_PREFIX + name] = value
        return logs

    def reset(self) -> None:
        for metric in self.monitors.all():
            metric.reset_state()
        if self.compile_metrics is not None:
            self.compile_metrics.reset_state()



def _update_masked(compile_metrics: Any, y: tf.Tensor, prediction: tf.Tensor,
                   kept: tf.Tensor) -> None:
    """Updates every compiled metric with padding rows weighted 0.

    Keras's CompileMetrics passes sample weights only to ``weighted_metrics``; plain
    ``metrics`` would count the padding rows of a micro-batch (their number depends on the
    replica count), so both lists are updated here with the mask as weight (single output).
    """
    groups = [getattr(compile_metrics, "_flat_metrics", None),
              getattr(compile_metrics, "_flat_weighted_metrics", None)]
    if any(g is None for g in groups):
        compile_metrics.update_state(y, prediction, sample_weight=kept)
        return
    for group in groups:
        for metric in group:
            if metric:
                metric.update_state(y, prediction, sample_weight=kept)


def _views(x: tf.Tensor, augmult: int, seed: tf.Tensor, options: dict) -> tf.Tensor:
    """K augmented views per image: [m, H, W, C] -> [m, K, H, W, C]; patient micro-batches
    [m, k, H, W, C] -> [m, k, K, H, W, C]. ``options``: make_views's pad/crop/flip."""
    if x.shape.rank == 4:
        return augment.make_views(x, augmult, seed, **options)
    images = tf.reshape(x, [-1] + x.shape[2:].as_list())
    views = augment.make_views(images, augmult, seed, **options)
    return tf.reshape(views, [-1, x.shape[1]] + views.shape[1:].as_list())
