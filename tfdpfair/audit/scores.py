"""White-box canary scores from the released updates (numpy only).

Input: ``projections`` [T, m], p_{t,j} = −⟨θ_{t+1} − θ_t, u_j⟩, the released update of logical
step t projected on canary direction u_j (‖u_j‖ = C), as recorded by
canaries.UpdateProjectionRecorder. Only the released weights enter, never the canaries'
sampling (which step sampled which canary is secret randomness of the mechanism: a score that
used it would not be a function of the output and its bound would not be valid).

For SGD without momentum at learning rate η, θ_{t+1} − θ_t = −η·(Σ clip + n_t + canaries)/(B·s),
so with ``update_scale`` = η/(B·s) (:func:`sgd_update_scale`)

    y_{t,j} = p_{t,j} / (update_scale · C) = ⟨noisy clipped sum of step t, u_j/C⟩,

which is C·[canary j sampled at t] + N(0, σ²C²) + (projection of the examples' gradients).

Scores (higher = "more likely included"):
  total   Σ_t p_{t,j} = ⟨θ_0 − θ_T, u_j⟩: the inner product of the whole training displacement
          with the canary; needs nothing but θ_0 and θ_T (any optimizer).
  llr     Σ_t log(1 − q + q·exp((y_{t,j}/C − ½)/σ²)): the log-likelihood ratio of "canary
          included" (each step a Poisson(q) mixture of N(C, σ²C²) and N(0, σ²C²)) against
          "excluded" (N(0, σ²C²)), summed over steps. Optimal when the examples' gradients are
          orthogonal to u_j; far stronger than ``total`` when σ is small, because a canary is in
          only ~qT of the T steps. Any σ, q may be plugged in: the audit stays valid (a score is
          any function of the released output), only its power changes.

>>> import numpy as np
>>> p = np.array([[1.0, 0.0], [0.0, 0.1], [1.0, -0.1]])  # 3 steps, 2 canaries, update_scale·C = 1
>>> total_score(p).tolist()
[2.0, 0.0]
>>> s = llr_score(p, update_scale=1.0, l2_norm_clip=1.0, noise_multiplier=0.5, sampling_rate=0.5)
>>> bool(s[0] > s[1])
True
"""

from __future__ import annotations

import numpy as np


def sgd_update_scale(learning_rate: float, expected_batch_size: float, l2_norm_clip: float,
                     rescale_to_unit_norm: bool) -> float:
    """η/(B·s): weight change per unit of the noisy clipped sum (s = C with unit-norm rescaling)."""
    return learning_rate / (expected_batch_size * (l2_norm_clip if rescale_to_unit_norm else 1.0))


def total_score(projections: np.ndarray) -> np.ndarray:
    """Σ_t p_{t,j} = ⟨θ_0 − θ_T, u_j⟩ for each canary j: array [m]."""
    return np.asarray(projections, np.float64).sum(axis=0)


def llr_score(projections: np.ndarray, update_scale: float, l2_norm_clip: float,
              noise_multiplier: float, sampling_rate: float) -> np.ndarray:
    """Σ_t log(1 − q + q·exp((y_{t,j}/C − ½)/σ²)) for each canary j (module docstring): [m]."""
    if not (noise_multiplier > 0 and 0 < sampling_rate < 1 and update_scale > 0):
        raise ValueError("need noise_multiplier > 0, 0 < sampling_rate < 1, update_scale > 0; "
                         f"got {noise_multiplier}, {sampling_rate}, {update_scale}.")
    c = float(l2_norm_clip)
    y = np.asarray(projections, np.float64) / (update_scale * c)  # in clipped-sum units
    z = (y / c - 0.5) / noise_multiplier**2
    q = float(sampling_rate)
    return np.logaddexp(np.log1p(-q), np.log(q) + z).sum(axis=0)
