"""Poisson sampling of logical batches into fixed-shape, padded, masked micro-batches.

At logical step t every one of the N examples joins the batch independently with probability q
(a Bernoulli(q) draw per example). The batch size is therefore Binomial(N, q): mean qN,
variance q(1−q)N. This is the sampling that the accountant (privacy/accounting.py) assumes;
shuffling into fixed-size batches, or drawing a size first and then a subset, is a different
mechanism and would make the reported ε wrong.

The draw is done in TensorFlow (:func:`poisson_sample`): example i joins step t iff
u_i < q with u = stateless_uniform([N], seed = (sampling seed, t)), so the sample of any step is a
pure function of (seed, t), computable on every host and inside a tf.data pipeline (no Python on
the training path, as TPU hosts need).

The sampled indices are packed into k_t = max(1, ceil(b / (m·R))) *global* micro-batches of
m examples per replica for R replicas (m is the physical batch that fits in memory), padded with
index 0 and a mask of 0, so compiled step functions see one static shape. k_t is the same on
every host and replica (it depends only on the seed and t), so they all agree on where a logical
step ends. A step that samples no example still yields one all-padding micro-batch: its noise is
added and the step is accounted, like every other step.

Trimmed padding (:func:`pack_sample_trimmed`, ``DPConfig.microbatch_padding="trim"``): the same
k_t micro-batches hold the same examples, but only the first k_t − 1 are full [m] per replica;
the last carries the remainder ρ = b − (k_t − 1)·m·R in s rows per replica: s = ⌈⌈ρ/R⌉/M⌉·M
with M = :data:`TRIM_MULTIPLE` (at least M rows when ρ = 0) if that is at most m/2, else m.
A last micro-batch more than half full stays padded to m: the step loop runs [m] micro-batches
through a function traced for that static shape, and others through one traced for an unknown
batch size, which was up to 2× slower per row (ghost clipping's static-shape paths;
benchmarks/last_microbatch.py). Padding then costs < M rows per replica in a step whose last
micro-batch is at most half full, instead of up to m − 1 (not for XLA/TPU: every shape would
be compiled).

Secrecy: amplification by subsampling holds only if nobody learns which examples were sampled.
The default seed is therefore drawn from the OS's entropy source; a fixed seed is for tests and
reproductions only.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Iterator

import numpy as np
import tensorflow as tf


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


def poisson_mask(seed: int | tf.Tensor, step: int | tf.Tensor, num_examples: int,
                 sampling_rate: float) -> tf.Tensor:
    """bool [N]: which of N units join logical step ``step``, each independently with rate q.

    u_i < q for u = stateless_uniform([N]) in float64, seeded by (seed, step).
    """
    draw_seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    u = tf.random.stateless_uniform([num_examples], seed=draw_seed, dtype=tf.float64)
    return u < sampling_rate


def poisson_sample(seed: int | tf.Tensor, step: int | tf.Tensor, num_examples: int,
                   sampling_rate: float) -> tf.Tensor:
    """Indices (int64, ascending) of the examples in logical step ``step`` (:func:`poisson_mask`)."""
    return tf.where(poisson_mask(seed, step, num_examples, sampling_rate))[:, 0]


def num_global_microbatches(sample_size: int | tf.Tensor, examples_per_microbatch: int):
    """k_t = max(1, ceil(b / (m·R))): global micro-batches of a step that sampled b examples."""
    return tf.maximum(tf.constant(1, tf.int64),
                      (tf.cast(sample_size, tf.int64) + examples_per_microbatch - 1)
                      // examples_per_microbatch)


TRIM_MULTIPLE = 8
"""M: with trimmed padding the last micro-batch of a step has a multiple of M rows per replica
(or m). A bound on the number of distinct shapes (≤ ⌈m/M⌉), for kernels and caches that are
built per shape (oneDNN primitives, cuDNN autotuning); a trimmed last micro-batch carries < M
padding rows per replica."""


def last_microbatch_rows(remainder: int | tf.Tensor, micro_batch_size: int, num_replicas: int,
                         multiple: int = TRIM_MULTIPLE):
    """s = ⌈max(1, ⌈ρ/R⌉)/M⌉·M if that is <= m/2, else m: rows per replica of a step's last
    micro-batch under trimmed padding (see the module docstring).

    ``remainder`` ρ (0 <= ρ <= m·R) is the number of sampled examples left after the step's
    full micro-batches. Returns an int64 scalar tensor.
    """
    per_replica = (tf.cast(remainder, tf.int64) + num_replicas - 1) // num_replicas
    rounded = (tf.maximum(per_replica, 1) + multiple - 1) // multiple * multiple
    m = tf.constant(micro_batch_size, tf.int64)
    return tf.where(2 * rounded <= m, rounded, m)


def pack_sample_trimmed(indices: tf.Tensor, micro_batch_size: int, num_replicas: int,
                        multiple: int = TRIM_MULTIPLE
                        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """A step's indices [b] as k_t − 1 full micro-batches and one trimmed last micro-batch.

    Returns (full indices [k_t − 1, R·m], full mask, last indices [R·s], last mask [R·s]): the
    same k_t = max(1, ⌈b/(m·R)⌉) as :func:`pack_sample` and the same examples in the same
    order; the remainder ρ fills the last micro-batch row-major over R replicas of s rows
    (:func:`last_microbatch_rows`), padded with index 0 / mask 0. Replica r's share of the last
    micro-batch is entries r·s ... (r+1)·s − 1.
    """
    m, replicas = micro_batch_size, num_replicas
    size = tf.shape(indices, out_type=tf.int64)[0]
    k = num_global_microbatches(size, m * replicas)
    cut = (k - 1) * m * replicas
    rest = size - cut
    rows = last_microbatch_rows(rest, m, replicas, multiple) * replicas
    full = tf.reshape(indices[:cut], [-1, m * replicas])
    pad = rows - rest
    last = tf.concat([indices[cut:], tf.zeros([pad], tf.int64)], 0)
    last_mask = tf.concat([tf.ones([rest], tf.float32), tf.zeros([pad], tf.float32)], 0)
    return full, tf.ones_like(full, tf.float32), last, last_mask


def pack_sample(indices: tf.Tensor, examples_per_microbatch: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Pads a step's indices [b] with index 0 / mask 0 to [k_t, m·R] (indices, float32 mask)."""
    size = tf.shape(indices, out_type=tf.int64)[0]
    k = num_global_microbatches(size, examples_per_microbatch)
    pad = k * examples_per_microbatch - size
    padded = tf.concat([indices, tf.zeros([pad], tf.int64)], 0)
    mask = tf.concat([tf.ones([size], tf.float32), tf.zeros([pad], tf.float32)], 0)
    shape = tf.stack([k, examples_per_microbatch])
    return tf.reshape(padded, shape), tf.reshape(mask, shape)


@dataclasses.dataclass(frozen=True)
class PaddingCost:
    """Expected padding of Poisson-sampled steps (from N, q, m, R only: public quantities).

    Attributes:
      microbatches: E[k_t], global micro-batches per step.
      rows: E[rows processed per step] over all replicas (real + padding).
      padded_share: E[padding rows] / E[rows]: the share of processed rows that are padding.
    """

    microbatches: float
    rows: float
    padded_share: float


def expected_padding(num_examples: int, sampling_rate: float, micro_batch_size: int,
                     num_replicas: int = 1, trim_multiple: int | None = None) -> PaddingCost:
    """E over b ~ Binomial(N, q) of the padding :func:`pack_sample` (``trim_multiple`` None)
    or :func:`pack_sample_trimmed` (M = ``trim_multiple``) adds to a step.

    A plan-time figure (no data involved): e.g. N = 10·B, q = 0.1, m = B = 256 gives
    E[k_t] ≈ 1.5 and a padded share ≈ 33% with full padding, ≈ 3% when trimmed.
    """
    from scipy import stats  # noqa: PLC0415  (dp_accounting's dependency; only needed here)

    dist = stats.binom(int(num_examples), float(sampling_rate))
    lo, hi = (int(v) for v in dist.ppf([1e-12, 1.0 - 1e-12]))
    b = np.arange(max(0, lo - 1), min(int(num_examples), hi + 1) + 1)
    p = dist.pmf(b)
    p = p / p.sum()
    per_step = micro_batch_size * num_replicas
    k = np.maximum(1, -(-b // per_step))
    if trim_multiple is None:
        rows = k * per_step
    else:
        rest = b - (k - 1) * per_step
        per_replica = np.maximum(1, -(-rest // num_replicas))
        last = -(-per_replica // trim_multiple) * trim_multiple
        last = np.where(2 * last <= micro_batch_size, last, micro_batch_size)
        rows = (k - 1) * per_step + last * num_replicas
    mean_rows = float(np.dot(p, rows))
    return PaddingCost(float(np.dot(p, k)), mean_rows,
                       float(np.dot(p, rows - b)) / mean_rows)


class PoissonSampler:
    """Deterministic (given the seed) Poisson sampler over logical steps.

    Step t uses its own stateless draw seeded by (seed, t) (:func:`poisson_sample`, the same
    function the training input pipeline runs), so any step can be re-drawn on its own (e.g.
    after resuming from a checkpoint) and steps never share random state. ``micro_batch_size``
    is the per-replica m; ``num_replicas`` R packs steps into global micro-batches of m·R.
    """

    def __init__(self, num_examples: int, sampling_rate: float, micro_batch_size: int,
                 seed: int | None = None, num_replicas: int = 1):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}.")
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
        self.num_examples = int(num_examples)
        self.sampling_rate = float(sampling_rate)
        self.micro_batch_size = int(micro_batch_size)
        self.num_replicas = int(num_replicas)
        self.seed = random_seed() if seed is None else int(seed)

    @property
    def examples_per_microbatch(self) -> int:
        """m·R: examples in one global micro-batch (over all replicas)."""
        return self.micro_batch_size * self.num_replicas

    def sample_indices(self, step: int) -> np.ndarray:
        """Indices of the examples in logical step ``step``: each kept with probability q."""
        return poisson_sample(self.seed, step, self.num_examples, self.sampling_rate).numpy()

    def num_microbatches(self, step: int) -> int:
        """Global micro-batches that step ``step`` fills: max(1, ceil(|sample| / (m·R)))."""
        return int(num_global_microbatches(self.sample_indices(step).size,
                                           self.examples_per_microbatch))

    def logical_batch(self, step: int) -> LogicalBatch:
        """Step ``step``'s sample, padded to whole global micro-batches (at least one).

        Columns r·m ... (r+1)·m − 1 of each micro-batch belong to replica r.
        """
        indices, mask = pack_sample(
            poisson_sample(self.seed, step, self.num_examples, self.sampling_rate),
            self.examples_per_microbatch)
        return LogicalBatch(int(step), indices.numpy(), mask.numpy())

    def logical_batches(self, start_step: int, end_step: int) -> Iterator[LogicalBatch]:
        """Logical batches for steps start_step <= t < end_step."""
        for step in range(int(start_step), int(end_step)):
            yield self.logical_batch(step)
