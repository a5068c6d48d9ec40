"""Timing DP steps through the real Poisson path, shared by the benchmark scripts.

The benchmarks train on N = ``factor``·B synthetic examples (q = B/N = 0.1 by default), so each
logical step holds |S_t| ~ Binomial(N, q) examples, packed into k_t micro-batches as in a real
run; ``--q1`` (N = B) is the older mode where every step holds exactly B. Times are normalised
per *expected* example: mean logical-step time / B.

The padded-row share is computed here from the benchmark's own fixed sampling seed: it needs
|S_t|, an un-noised count of the private data that the library never logs (docs/privacy.md). A
benchmark on synthetic data may know it; a real run must not print it.
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import os
import statistics

import numpy as np


def machine() -> dict:
    """CPU model (/proc/cpuinfo), core count and the 1-minute load average, for the JSON."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "?")
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "onednn": tfdpfair.tf_cpu.onednn_setting()}


def training_set(x: np.ndarray, y: np.ndarray, batch: int, q1: bool, factor: int = 10):
    """N = B (``q1``) or N = factor·B examples, cycling through ``x``, ``y``."""
    n = batch if q1 else factor * batch
    return np.resize(x, (n,) + x.shape[1:]), np.resize(y, (n,))


def padding_of_steps(dp_model, steps: range) -> dict:
    """Padded rows / all rows processed over logical ``steps`` of a fitted DPModel, with the
    mean sampled size and micro-batch count (the layout its input pipeline used)."""
    from tfdpfair.privacy import sampling

    plan, config = dp_model.plan, dp_model._runtime["loop"].config
    m, replicas = config.micro_batch_size, dp_model.distribute_strategy.num_replicas_in_sync
    seed = dp_model.seeds["sampling"]
    sampled = rows = microbatches = 0
    for t in steps:
        indices = sampling.poisson_sample(seed, t, plan.num_examples, plan.sampling_rate)
        if config.trim_multiple is None:
            packed, _ = sampling.pack_sample(indices, m * replicas)
            step_rows, k = int(np.size(packed)), int(packed.shape[0])
        else:
            full, _, last, _ = sampling.pack_sample_trimmed(indices, m, replicas,
                                                            config.trim_multiple)
            step_rows, k = int(np.size(full) + np.size(last)), int(full.shape[0]) + 1
        sampled, rows, microbatches = sampled + int(indices.shape[0]), rows + step_rows, (
            microbatches + k)
    count = max(1, len(steps))
    return {"padding": "full" if config.trim_multiple is None else "trim",
            "padded_row_share": round(1.0 - sampled / max(rows, 1), 4),
            "mean_sampled_per_step": round(sampled / count, 2),
            "mean_microbatches_per_step": round(microbatches / count, 3)}


def per_expected_example(step_times: list[float], batch: int) -> dict:
    """Mean and median logical-step time, and mean time per expected example (mean / B)."""
    mean = statistics.fmean(step_times)
    return {"step_s_mean": round(mean, 4), "step_s_median": round(statistics.median(step_times), 4),
            "s_per_expected_example": round(mean / batch, 6),
            "expected_examples_per_s": round(batch / mean, 2), "timed_steps": len(step_times)}
