"""Poisson sampling: batch-size moments, independence, padding, determinism."""

import numpy as np
import pytest

from tfdpfair.privacy.sampling import PoissonSampler


def test_batch_size_mean_and_variance_are_binomial():
    n, q, steps = 2000, 0.05, 3000
    sampler = PoissonSampler(n, q, micro_batch_size=16, seed=0)
    sizes = np.array([sampler.sample_indices(t).size for t in range(steps)])
    mean, var = q * n, q * (1 - q) * n
    assert abs(sizes.mean() - mean) < 4 * np.sqrt(var / steps)
    # Var of the sample variance of ~normal data: 2σ⁴/(n−1); allow 4 standard errors.
    assert abs(sizes.var(ddof=1) - var) < 4 * var * np.sqrt(2 / (steps - 1))
    # A fixed-size sampler (shuffle + cut) would have variance 0: the "Poisson in name only" bug.
    assert sizes.var() > 0.5 * var


def test_each_example_included_independently_with_rate_q():
    n, q, steps = 50, 0.2, 4000
    sampler = PoissonSampler(n, q, micro_batch_size=8, seed=1)
    inclusion = np.zeros((steps, n), bool)
    for t in range(steps):
        inclusion[t, sampler.sample_indices(t)] = True
    rates = inclusion.mean(axis=0)
    assert np.all(np.abs(rates - q) < 4.5 * np.sqrt(q * (1 - q) / steps))
    # Pairwise independence: the correlation between two examples' inclusions is ~0. A sampler
    # that draws a size and then samples without replacement is also ~0 here, but one that
    # cuts a fixed-size batch from a shuffled list gives -1/(n-1) < 0 systematically.
    corr = np.corrcoef(inclusion.T.astype(float))
    off_diag = corr[~np.eye(n, dtype=bool)]
    assert abs(off_diag.mean()) < 4 / np.sqrt(steps * n)


def test_logical_batch_padding_and_mask():
    sampler = PoissonSampler(1000, 0.1, micro_batch_size=32, seed=2)
    for t in range(20):
        chosen = sampler.sample_indices(t)
        batch = sampler.logical_batch(t)
        assert batch.indices.shape == batch.mask.shape == (batch.num_microbatches, 32)
        assert batch.num_microbatches == max(1, -(-chosen.size // 32))
        assert sampler.num_microbatches(t) == batch.num_microbatches
        assert batch.size == chosen.size
        np.testing.assert_array_equal(np.sort(batch.indices[batch.mask > 0]), chosen)
        assert set(np.unique(batch.mask)) <= {0.0, 1.0}


def test_empty_step_still_yields_one_padding_microbatch():
    sampler = PoissonSampler(3, 0.01, micro_batch_size=4, seed=3)
    empties = [b for b in sampler.logical_batches(0, 50) if b.size == 0]
    assert empties, "with q=0.01 and N=3 most steps are empty"
    for batch in empties:
        assert batch.num_microbatches == 1 and batch.mask.sum() == 0


def test_deterministic_under_seed_and_steps_differ():
    a = PoissonSampler(500, 0.1, 8, seed=7)
    b = PoissonSampler(500, 0.1, 8, seed=7)
    np.testing.assert_array_equal(a.sample_indices(5), b.sample_indices(5))
    assert not np.array_equal(a.sample_indices(5), a.sample_indices(6))


def test_default_seed_is_secret_and_random():
    assert PoissonSampler(10, 0.5, 2).seed != PoissonSampler(10, 0.5, 2).seed


@pytest.mark.parametrize("args", [(0, 0.1, 4), (10, 0.0, 4), (10, 1.5, 4), (10, 0.1, 0)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        PoissonSampler(*args)
