"""Independent reference for the tests: dp_accounting called directly, event by event."""

import dp_accounting
from dp_accounting import pld, rdp

RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def reference_epsilon(sigma: float, q: float, steps: int, delta: float,
                      kind: str = "rdp") -> float:
    """ε of T Poisson-sampled Gaussian steps, composing the one-step event T times."""
    accountant = (rdp.RdpAccountant(neighboring_relation=RELATION) if kind == "rdp"
                  else pld.PLDAccountant(neighboring_relation=RELATION))
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(step, steps)
    return accountant.get_epsilon(delta)


def numpy_dp_sgd_softmax_regression(x, y, kernel, bias, *, steps, sampling_seed, noise_seed,
                                    sampling_rate, clip, sigma, expected_batch, lr,
                                    skip_rows=()):
    """DP-SGD for a Dense softmax-regression model, written out in numpy.

    Per-example gradients of cross-entropy(softmax(x W + b), y): dW = x ⊗ (p − onehot(y)),
    db = p − onehot(y); each clipped to global L2 norm C, summed over the Poisson sample, plus
    the noise draw of the step, divided by B, and one SGD step. Rows in ``skip_rows`` contribute
    nothing (as the library must do for non-finite examples). Sampling and noise come from the
    library's stateless primitives (a pure function of seed and step), everything else is
    independent of the library.
    """
    import numpy as np
    import tensorflow as tf

    from tfdpfair.privacy import noise as noise_lib
    from tfdpfair.privacy.sampling import poisson_sample

    kernel, bias = np.array(kernel, np.float64), np.array(bias, np.float64)
    classes = bias.shape[0]
    for step in range(steps):
        chosen = poisson_sample(sampling_seed, step, len(x), sampling_rate).numpy()
        total_w, total_b = np.zeros_like(kernel), np.zeros_like(bias)
        for i in chosen:
            if i in skip_rows:
                continue
            logits = x[i].astype(np.float64) @ kernel + bias
            p = np.exp(logits - logits.max())
            p /= p.sum()
            delta = p - np.eye(classes)[y[i]]
            grad_w, grad_b = np.outer(x[i], delta), delta
            norm = np.sqrt(np.sum(grad_w ** 2) + np.sum(grad_b ** 2))
            factor = min(1.0, clip / norm)
            total_w += factor * grad_w
            total_b += factor * grad_b
        draws = noise_lib.gaussian_noise_like(
            [tf.zeros(kernel.shape), tf.zeros(bias.shape)], sigma * clip,
            noise_lib.step_seed(noise_seed, step))
        kernel -= lr * (total_w + draws[0].numpy()) / expected_batch
        bias -= lr * (total_b + draws[1].numpy()) / expected_batch
    return kernel, bias
