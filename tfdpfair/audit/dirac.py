"""Dirac canaries: one-coordinate gradient canaries in coordinates no example touches (TF).

Design. The audited model carries a :class:`~tfdpfair.models.canary_slots.CanarySlots` layer
(identity; ``slots`` [m] trainable, never read by the forward pass), so every real example's
gradient is exactly zero on the m slot coordinates. Canary j is the gradient u_j = C·e_{k_j},
k_j the flat index of slot j in the concatenated trainable variables: norm exactly C, like a
clipped example at the clip norm. It goes through the public path like any canary
(``DPModel.set_audit_canaries`` + ``fit``, or ``DPOptimizer(audit_canaries=...)``): included
with probability ½ (bit S_j), and at each logical step the loop itself Poisson-samples it at the
plan's q, clips it to C and adds it before the noise (training/loop.py); the plan counts
N + m units. Why one coordinate each, in slots of their own: in coordinate k_j the released
step is, in noisy-sum units,

    y_{t,j} = C·S_j·[j sampled at t] + N(0, σ²C²)      (nothing else: no example, no other
                                                         canary, no clipping interaction),

which is exactly the worst case the accountant bounds for one unit. Random directions over the
real parameters (canaries.py) see the examples' gradients as extra noise; crafted directions in
the real parameters would too, unless the data never reaches them. The price is m extra
parameters (cheap: one float each) and m extra units in N.

Scores (higher = "included"), from released weights only:

* last iterate (white-box, final model only): ⟨θ_0 − θ_T, u_j⟩ = C·(θ_0 − θ_T)_{k_j}. With SGD
  it is (η/(B·s))·C·Σ_t y_{t,j}, and Σ_t y_{t,j} = C·S_j·Binomial(T, q) + N(0, T·σ²C²); the
  likelihood ratio of "included" is increasing in it, so it is the optimal last-iterate test.
* all steps (white-box, every release seen; SGD without momentum, constant learning rate):
  the per-step y_{t,j} read back from the updates and scored by the llr of scores.llr_score,
  the exact likelihood ratio of "included" (per step a q-mixture of N(C, σ²C²) and N(0, σ²C²))
  against "excluded": the optimal test of the canary's membership from all releases.

Both the Steinke–Nasr–Jagielski (ε, δ) bound (epsilon_lower_bound.py) and the f-DP bound
(fdp_lower_bound.py, Gaussian trade-off curve) are computed from the same guesses.

Usage::

    audited, slots = with_canary_slots(model, 20_000)
    dp = make_private(audited, config); dp.compile(optimizer=keras.optimizers.SGD(lr), ...)
    result = audit_dirac_canaries(dp, x, y, seed=1, steps=50, score="all_steps")
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfdpfair.audit import epsilon_lower_bound as steinke_lib
from tfdpfair.audit import whitebox
from tfdpfair.audit.canaries import UpdateProjectionRecorder, flatten
from tfdpfair.models.canary_slots import CanarySlots
from tfdpfair.models.layer_paths import iter_layers_with_paths
from tfdpfair.privacy import sampling

SCORES = ("last_iterate", "all_steps")


class DiracCanaries:
    """m canaries u_j = value_j·e_{k_j} (value C) with ½-inclusion bits (module docstring).

    Attributes (the loop reads ``coordinates``, ``values``, ``included``, ``sampling_seed``):
      coordinates: int64 [m], k_j, flat indices into the concatenated trainable variables.
      values: float32 [m], all C.
      included: bool [m], the secret membership bits S_j (the audit's ground truth).
    """

    def __init__(self, coordinates: Sequence[int], l2_norm_clip: float, sampling_rate: float,
                 seed: int, inclusion_probability: float = 0.5):
        self.coordinates = np.asarray(coordinates, np.int64)
        if self.coordinates.ndim != 1 or len(self.coordinates) < 1:
            raise ValueError(f"give >= 1 coordinates as a 1-D list, got shape "
                             f"{self.coordinates.shape}.")
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
        self.num_canaries = len(self.coordinates)
        self.l2_norm_clip, self.sampling_rate = float(l2_norm_clip), float(sampling_rate)
        self.values = np.full(self.num_canaries, self.l2_norm_clip, np.float32)
        rng = np.random.default_rng(seed)
        self.included = rng.random(self.num_canaries) < inclusion_probability
        self.sampling_seed = int(rng.integers(0, 2**62))

    @classmethod
    def in_slots(cls, variables: Sequence, slots: CanarySlots, l2_norm_clip: float,
                 sampling_rate: float, seed: int, num_canaries: int | None = None
                 ) -> "DiracCanaries":
        """One canary in each of the first ``num_canaries`` (default all) slots of ``slots``,
        whose variable must be one of ``variables`` (the trainable variables, in order)."""
        ids = [id(v) for v in variables]
        if id(slots.slots) not in ids:
            raise ValueError("the CanarySlots variable is not among the trainable variables.")
        where = ids.index(id(slots.slots))
        offset = sum(int(np.prod(v.shape)) for v in variables[:where])
        m = slots.num_slots if num_canaries is None else int(num_canaries)
        if not 1 <= m <= slots.num_slots:
            raise ValueError(f"num_canaries must be in [1, {slots.num_slots}], got {m}.")
        return cls(offset + np.arange(m), l2_norm_clip, sampling_rate, seed)

    def sampled(self, step) -> tf.Tensor:
        """bool [m]: which canaries step t's Poisson draw selects (the loop's own draw)."""
        return sampling.poisson_mask(self.sampling_seed, step, self.num_canaries,
                                     self.sampling_rate)

    def project(self, flat_vector: np.ndarray) -> np.ndarray:
        """⟨u_j, v⟩ = value_j·v_{k_j} for every canary j, v flattened in variable order: [m]."""
        return self.values * np.asarray(flat_vector, np.float32)[self.coordinates]


def find_canary_slots(model: keras.Model) -> CanarySlots:
    """The one CanarySlots layer of ``model`` (searched recursively)."""
    found = [layer for _, layer in iter_layers_with_paths(model)
             if isinstance(layer, CanarySlots)]
    if len(found) != 1:
        raise ValueError(f"the audited model needs exactly one CanarySlots layer, found "
                         f"{len(found)}: build it with models.canary_slots.with_canary_slots("
                         "model, m).")
    return found[0]


def default_ks(num_canaries: int) -> tuple[int, ...]:
    """Guess counts tried (Bonferroni): m/1000, m/300, m/100, m/30, m/10 each way. Dirac
    canaries make m large and cheap; few, confident guesses then give the tightest bound."""
    return tuple(sorted({max(1, num_canaries // d) for d in (1000, 300, 100, 30, 10)}))


def audit_dirac_canaries(dp_model, x, y, *, seed: int, epochs: float | None = None,
                         steps: int | None = None, score: str = "all_steps",
                         num_canaries: int | None = None,
                         ks: int | Sequence[int] | None = None,
                         score_noise_multiplier: float | None = None,
                         p_threshold: float = steinke_lib.DEFAULT_P_VALUE,
                         verbose=0) -> whitebox.CanaryAudit:
    """Trains ``dp_model`` on (x, y) with Dirac canaries in its CanarySlots and audits the run.

    Args:
      dp_model: a compiled, untrained DPModel of a model with one CanarySlots layer. For
        "all_steps": SGD without momentum, constant learning rate, steps_per_execution=1.
      seed: seeds the inclusion bits and the canaries' sampling seed.
      epochs, steps: the run's length, as in DPModel.fit.
      score: "last_iterate" (θ_0 and θ_T only) or "all_steps" (every release, llr).
      num_canaries: m (default: every slot).
      ks: guess count(s) k each way; several are Bonferroni-corrected. Default
        :func:`default_ks`.
      score_noise_multiplier: σ the llr assumes (default the plan's; any value is valid).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    lr = whitebox._sgd_learning_rate(dp_model.optimizer) if score == "all_steps" else None
    if dp_model.logical_steps_done:
        raise ValueError("audit an untrained model: the canaries must be in every step.")
    model, cfg = dp_model.inner, dp_model.dp_config
    slots = find_canary_slots(model)
    m = slots.num_slots if num_canaries is None else int(num_canaries)
    rate = dp_model.plan_privacy(len(x) + m, epochs=epochs, steps=steps).sampling_rate
    variables = model.trainable_variables
    canaries = DiracCanaries.in_slots(variables, slots, cfg.l2_norm_clip, rate, seed, m)
    dp_model.set_audit_canaries(canaries)
    callbacks = [UpdateProjectionRecorder(canaries, variables)] if score == "all_steps" else []
    initial = flatten([v.numpy() for v in variables])
    dp_model.fit(x, y, epochs=epochs, steps=steps, callbacks=callbacks, verbose=verbose)
    if score == "all_steps":
        values = whitebox.recorded_llr(callbacks[0], dp_model, lr, score_noise_multiplier)
    else:
        values = canaries.project(initial - flatten([v.numpy() for v in variables]))
    return whitebox.canary_audit(dp_model, score, values, canaries.included,
                                 default_ks(m) if ks is None else ks, p_threshold)
