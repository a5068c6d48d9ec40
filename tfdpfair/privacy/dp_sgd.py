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
      delta: δ; None means 1/N.
      accountant: "rdp" or "pld".
      rescale_to_unit_norm: divide the update by C as well (see module docstring).
      augmult: K views per example (1 = no augmentation multiplicity). With K > 1, images
        [B, H, W, C] get K random crops/flips each per step (data/augment.py) and the
        per-example loss is the mean over the K views, so one example is still clipped once.
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


class DPGradientAccumulator(tf.Module):
    """Accumulates clipped gradient sums over micro-batches and privatises them once per step.

    State (all tf.Variables, so it is checkpointed with the model):
      ``grad_sums``: Σ clip_C(g_i) over the micro-batches of the current logical step.
      ``num_examples``: real examples accumulated in the current step (diagnostics only).
      ``logical_steps``: noise draws so far = logical steps released = what the accountant
        must count.
    """

    def __init__(self, variables: Sequence[tf.Variable], l2_norm_clip: float,
                 noise_multiplier: float, expected_batch_size: float,
                 noise_seed: int, rescale_to_unit_norm: bool = False,
                 name: str = "dp_gradient_accumulator"):
        super().__init__(name=name)
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}.")
        self.l2_norm_clip = float(l2_norm_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.rescale_to_unit_norm = bool(rescale_to_unit_norm)
        self.noise_seed = int(noise_seed)
        with self.name_scope:
            self.grad_sums = [
                tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                            name=f"grad_sum_{i}") for i, v in enumerate(variables)]
            self.num_examples = tf.Variable(0.0, trainable=False, name="num_examples")
            self.logical_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="logical_steps")

    @property
    def noise_stddev(self) -> float:
        """σ·C: the noise std per coordinate on the *sum* of clipped gradients."""
        return self.noise_multiplier * self.l2_norm_clip

    def accumulate(self, clipped: ClippedGradients) -> None:
        """Adds one micro-batch's clipped sum to the running sum of the current step."""
        if len(clipped.grad_sum) != len(self.grad_sums):
            raise ValueError(f"expected {len(self.grad_sums)} gradients, "
                             f"got {len(clipped.grad_sum)}.")
        for total, part in zip(self.grad_sums, clipped.grad_sum):
            total.assign_add(part)
        self.num_examples.assign_add(clipped.num_examples)

    def noisy_mean_gradient(self) -> list[tf.Tensor]:
        """ĝ = (Σ clip + N(0, σ²C²)) / (B·s) for the current step; then resets the sums.

        Increments ``logical_steps``: call exactly once per logical step, also for a step that
        sampled no example (its update is pure noise, and it is accounted).
        """
        seed = noise_lib.step_seed(self.noise_seed, self.logical_steps)
        noise = noise_lib.gaussian_noise_like(self.grad_sums, self.noise_stddev, seed)
        scale = self.expected_batch_size * (
            self.l2_norm_clip if self.rescale_to_unit_norm else 1.0)
        # Read the sums into tensors before resetting the variables they came from.
        noisy = [tf.identity(total) + n for total, n in zip(self.grad_sums, noise)]
        with tf.control_dependencies(noisy):
            self.reset()
            self.logical_steps.assign_add(1)
        return [g / scale for g in noisy]

    def reset(self) -> None:
        """Zeroes the running sums (not the step counter)."""
        for total in self.grad_sums:
            total.assign(tf.zeros_like(total))
        self.num_examples.assign(0.0)
