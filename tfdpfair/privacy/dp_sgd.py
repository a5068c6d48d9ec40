"""The DP gradient transform: accumulate clipped sums -> add noise once -> normalise.

For one logical step with sampled set S (Poisson, expected size B = qN), spread over any number
of micro-batches, the privatised gradient handed to the optimizer is

    ĝ = ( Σ_{i∈S} clip_C(g_i) + N(0, σ²C² I) ) / (B · s),

where s = C if ``rescale_to_unit_norm`` (jax_privacy's convention: the update is then
independent of C and the learning rate keeps its meaning when C changes) and s = 1 otherwise.
The divisor is the *expected* batch size B, a public constant; dividing by the realised |S|
would make the update depend on the batch size, which is not privatised.

:class:`DPGradientAccumulator` holds the running sum in variables, so a logical step can span
many compiled calls (micro-batches); :meth:`noisy_mean_gradient` is called once per logical
step and is the only place noise is drawn (privacy/noise.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import tensorflow as tf

from tfdpfair.privacy import noise as noise_lib
from tfdpfair.privacy.clipping import ClippedGradients


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """User-facing DP-SGD settings.

    Attributes:
      l2_norm_clip: C, per-example clipping norm in gradient units.
      expected_batch_size: B, expected logical batch size (q = B/N).
      micro_batch_size: physical batch per compiled call; any value gives the same ε.
      noise_multiplier: σ; if None it is calibrated from ``target_epsilon``.
      target_epsilon: the privacy budget ε; training never exceeds it.
      delta: δ; None means N^-1.1 (accounting.default_delta).
      accountant: "rdp" or "pld".
      rescale_to_unit_norm: divide the update by C as well (see module docstring).
      augmult: K views per example (1 = no augmentation multiplicity). With K > 1, images
        [B, H, W, C] get K random views each per step (data/augment.py) and the
        per-example loss is the mean over the K views, so one example is still clipped once.
      augment_pad: pixels of reflection padding per side before the random crop (the crop's
        shift range is ±pad); keep it small against the image (the papers: 4 for 32×32).
      augment_crop: random crops of the padded image (False: views are not shifted).
      augment_flip: random left-right flips (False for images whose meaning is not
        mirror-symmetric: digits, text, chest X-rays with their anatomy).
      privacy_unit: "example" (one image) or "patient" (all of a patient's images:
        Poisson sampling over patients, up to ``max_examples_per_patient`` images per sampled
        patient per step, their mean loss clipped as one; expected_batch_size counts patients).
      max_examples_per_patient: k, the cap on one patient's images per step ("patient" only).
      clipping: how per-example clipped sums are computed, with the same result and the same
        ε: "vectorized" (per-example gradients by tf.vectorized_map, any model), "ghost"
        (per-example norms from layer inputs and output gradients of one batched pass plus a
        book-keeping sum: privacy/ghost_clipping.py), or "auto" (ghost when every trained
        variable has a ghost rule, else vectorized). Both serve either privacy unit: with
        patients, ghost clipping treats a patient's k images × K views as the positions of one
        unit (training/example_loss.batch_patient_loss_fn).
      ema_decay: keep an EMA of the released weights with this decay (warm-up
        min(decay, (1+t)/(10+t))); None keeps none. Post-processing: no privacy cost.
      polyak: keep the Polyak average (running mean) of the released weights.
      noise_seed: seed of the Gaussian noise; None draws a secret one. Fix only for tests.
      sampling_seed: seed of the Poisson sampler; None draws a secret one. Fix only for tests.
    """

    l2_norm_clip: float = 1.0
    expected_batch_size: int = 256
    micro_batch_size: int = 64
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str = "rdp"
    rescale_to_unit_norm: bool = False
    augmult: int = 1
    augment_pad: int = 4
    augment_crop: bool = True
    augment_flip: bool = True
    privacy_unit: str = "example"
    max_examples_per_patient: int = 1
    clipping: str = "auto"
    ema_decay: float | None = None
    polyak: bool = False
    noise_seed: int | None = None
    sampling_seed: int | None = None

    def __post_init__(self):
        if not self.l2_norm_clip > 0:
            raise ValueError(f"l2_norm_clip must be > 0, got {self.l2_norm_clip}.")
        if not self.expected_batch_size >= 1:
            raise ValueError(f"expected_batch_size must be >= 1, got {self.expected_batch_size}.")
        if not self.micro_batch_size >= 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}.")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("DPConfig needs a noise_multiplier, a target_epsilon, or both.")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}.")
        if not self.augmult >= 1:
            raise ValueError(f"augmult must be >= 1, got {self.augmult}.")
        if not self.augment_pad >= 0:
            raise ValueError(f"augment_pad must be >= 0, got {self.augment_pad}.")
        if self.privacy_unit not in ("example", "patient"):
            raise ValueError(f"privacy_unit must be 'example' or 'patient', got "
                             f"{self.privacy_unit!r}.")
        if self.clipping not in ("auto", "vectorized", "ghost"):
            raise ValueError(f"clipping must be 'auto', 'vectorized' or 'ghost', got "
                             f"{self.clipping!r}.")
        if not self.max_examples_per_patient >= 1:
            raise ValueError("max_examples_per_patient must be >= 1, got "
                             f"{self.max_examples_per_patient}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}.")


class DPGradientAccumulator(tf.Module):
    """Accumulates clipped gradient sums over micro-batches and privatises them once per step.

    Works with and without a tf.distribute strategy (one code path). Create it inside
    ``strategy.scope()``; the running sums are then SyncOnRead variables with SUM aggregation:
    each replica adds its own micro-batches' clipped sums L_r locally, with no communication per
    micro-batch, and a read in cross-replica context returns Σ_r L_r.

    Release (:meth:`replica_update`, called once per logical step in replica context): the noise
    n ~ N(0, σ²C²) is a stateless draw from (noise seed, step t), identical on every replica;
    replica 0 alone adds it, so each replica r hands (L_r + [r = 0]·n) / (B·s) to the optimizer,
    whose all-reduce (SUM) yields exactly ( Σ_r L_r + n ) / (B·s): one draw per logical step,
    whatever the number of replicas or micro-batches (DESIGN.md invariant 2).

    State: ``grad_sums`` (Σ clip_C(g_i) of the current step, per replica) and ``num_examples``.
    Both are transient: the training loop releases whole logical steps per call, so they are
    zero whenever a checkpoint can be written, and they are not part of the saved state.
    """

    def __init__(self, variables: Sequence[tf.Variable], l2_norm_clip: float,
                 noise_multiplier: float, expected_batch_size: float,
                 rescale_to_unit_norm: bool = False, name: str = "dp_gradient_accumulator"):
        super().__init__(name=name)
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}.")
        self.l2_norm_clip = float(l2_norm_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.rescale_to_unit_norm = bool(rescale_to_unit_norm)
        sync = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.SUM)
        with self.name_scope:
            self.grad_sums = [tf.Variable(tf.zeros(v.shape, tf.float32), name=f"grad_sum_{i}",
                                          **sync) for i, v in enumerate(variables)]
            self.num_examples = tf.Variable(0.0, name="num_examples", **sync)

    @property
    def noise_stddev(self) -> float:
        """σ·C: the noise std per coordinate on the *sum* of clipped gradients."""
        return self.noise_multiplier * self.l2_norm_clip

    @property
    def update_divisor(self) -> float:
        """B·s: the public constant the noisy sum is divided by (s = C with unit-norm rescaling)."""
        return self.expected_batch_size * (
            self.l2_norm_clip if self.rescale_to_unit_norm else 1.0)

    def accumulate(self, clipped: ClippedGradients) -> None:
        """Adds one micro-batch's clipped sum to this replica's running sum of the step."""
        if len(clipped.grad_sum) != len(self.grad_sums):
            raise ValueError(f"expected {len(self.grad_sums)} gradients, "
                             f"got {len(clipped.grad_sum)}.")
        for total, part in zip(self.grad_sums, clipped.grad_sum):
            total.assign_add(tf.cast(part, tf.float32))
        self.num_examples.assign_add(clipped.num_examples)

    def replica_update(self, noise_seed: tf.Tensor | int, step: tf.Tensor | int,
                       extra: Sequence[tf.Tensor] | None = None) -> list[tf.Tensor]:
        """This replica's share (L_r + [r = 0]·(n + e)) / (B·s) of step ``step``; resets the sums.

        Call exactly once per logical step and replica, in replica context (or with no
        strategy), also for a step that sampled no example: its update is pure noise, and it is
        accounted. The caller all-reduces the shares (``optimizer.apply`` does). ``extra`` (e)
        is a pre-noise contribution added once, by replica 0: the summed clipped gradients of
        audit canaries (tfdpfair/audit), each of norm <= C like any example's.
        """
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0) if context is not None else True
        seed = noise_lib.step_seed(noise_seed, step)
        noise = noise_lib.gaussian_noise_like(self.grad_sums, self.noise_stddev, seed)
        # Read the sums into tensors before resetting the variables they came from.
        if extra is not None:
            noise = [n + tf.cast(e, tf.float32) for n, e in zip(noise, extra)]
        noisy = [tf.identity(total) + tf.where(first, n, tf.zeros_like(n))
                 for total, n in zip(self.grad_sums, noise)]
        with tf.control_dependencies(noisy):
            self.reset()
        return [g / self.update_divisor for g in noisy]

    def noisy_mean_gradient(self, noise_seed: tf.Tensor | int, step: tf.Tensor | int
                            ) -> list[tf.Tensor]:
        """ĝ = (Σ clip + N(0, σ²C²)) / (B·s) for step ``step`` without a strategy."""
        if tf.distribute.in_cross_replica_context() and tf.distribute.has_strategy():
            raise RuntimeError("under a strategy, call replica_update inside strategy.run.")
        return self.replica_update(noise_seed, step)

    def reset(self) -> None:
        """Zeroes this replica's running sums."""
        for total in self.grad_sums:
            total.assign(tf.zeros_like(total))
        self.num_examples.assign(0.0)
