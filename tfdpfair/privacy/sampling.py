"""Poisson sampling of logical batches into fixed-shape, padded, masked micro-batches.

At logical step t every one of the N examples joins the batch independently with probability q
(a Bernoulli(q) draw per example). The batch size is therefore Binomial(N, q): mean qN,
variance q(1−q)N. This is the sampling that the accountant (privacy/accounting.py) assumes;
shuffling into fixed-size batches, or drawing a size first and then a subset, is a different
mechanism and would make the reported ε wrong.

The sampled indices are packed into ceil(b/m) micro-batches of a fixed size m (the physical
batch that fits in memory), padded with index 0 and a mask of 0, so compiled step functions
see one static shape. A step that samples no example still yields one all-padding micro-batch:
its noise is added and the step is accounted, like every other step.

Secrecy: amplification by subsampling holds only if nobody learns which examples were sampled.
The default seed is therefore drawn from the OS's entropy source; a fixed seed is for tests and
reproductions only.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class LogicalBatch:
    """The sampled examples of one logical step, packed into padded micro-batches.

    Attributes:
      step: index t of the logical step (0-based).
      indices: int64 [num_microbatches, micro_batch_size]; padding rows hold index 0.
      mask: float32 [num_microbatches, micro_batch_size]; 1 for a sampled example, 0 for padding.
    """

    step: int
    indices: np.ndarray
    mask: np.ndarray

    @property
    def size(self) -> int:
        """Number of sampled examples (the realised logical batch size)."""
        return int(self.mask.sum())

    @property
    def num_microbatches(self) -> int:
        return int(self.indices.shape[0])


def random_seed() -> int:
    """A seed from the OS entropy source, for sampling/noise randomness that must stay secret."""
    return secrets.randbits(62)


class PoissonSampler:
    """Deterministic (given the seed) Poisson sampler over logical steps.

    Step t uses its own generator seeded by (seed, t), so any step can be re-drawn on its own
    (e.g. after resuming from a checkpoint) and steps never share random state.
    """

    def __init__(self, num_examples: int, sampling_rate: float, micro_batch_size: int,
                 seed: int | None = None):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}.")
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
        self.num_examples = int(num_examples)
        self.sampling_rate = float(sampling_rate)
        self.micro_batch_size = int(micro_batch_size)
        self.seed = random_seed() if seed is None else int(seed)

    def sample_indices(self, step: int) -> np.ndarray:
        """Indices of the examples in logical step ``step``: each kept with probability q."""
        rng = np.random.default_rng([self.seed, int(step)])
        return np.flatnonzero(rng.random(self.num_examples) < self.sampling_rate).astype(np.int64)

    def num_microbatches(self, step: int) -> int:
        """Micro-batches that step ``step`` fills: max(1, ceil(|sample| / m))."""
        return max(1, math.ceil(self.sample_indices(step).size / self.micro_batch_size))

    def logical_batch(self, step: int) -> LogicalBatch:
        """Step ``step``'s sample, padded to whole micro-batches (at least one)."""
        chosen = self.sample_indices(step)
        m = self.micro_batch_size
        num_micro = max(1, math.ceil(chosen.size / m))  # as in num_microbatches()
        indices = np.zeros(num_micro * m, np.int64)
        mask = np.zeros(num_micro * m, np.float32)
        indices[:chosen.size] = chosen
        mask[:chosen.size] = 1.0
        return LogicalBatch(int(step), indices.reshape(num_micro, m), mask.reshape(num_micro, m))

    def logical_batches(self, start_step: int, end_step: int) -> Iterator[LogicalBatch]:
        """Logical batches for steps start_step <= t < end_step."""
        for step in range(int(start_step), int(end_step)):
            yield self.logical_batch(step)
