"""White-box gradient canaries for the one-run audit, injected through DPModel (TensorFlow).

m canaries, each a fixed "clipped gradient": u_j = C·g_j/‖g_j‖ with g_j ~ N(0, I) over the joint
space of the trainable variables (‖u_j‖ = C exactly, like a clipped example at the clip norm).
Canary j is *included* with probability ½ (bit S_j, drawn from ``seed`` and recorded). An
included canary behaves like one more training example: at every logical step t it joins the
batch independently with the run's rate q, from its own stateless draw
stateless_uniform([m], (canary sampling seed, t)) < q. DPModel (``set_audit_canaries``) draws
that sample itself, clips each canary to C like an example (whatever the object holds) and adds
Σ_j S_j·[j sampled at t]·clip_C(u_j) once, before the noise, to the step's clipped sum
(training/loop.py, privacy/dp_sgd.py replica_update(extra=...)). The m canaries count in the
plan's N (N + m units, q = B/(N + m)), so the accountant's ε for (q, σ, T, δ) covers each canary
exactly as it covers an example; the run's DP state records m, and its exports are marked as an
audit run (training/release.py).

After training, the auditor scores canary j from the released weights only (audit/scores.py),
guesses in/out for the top/bottom k scores and turns the number of correct guesses into an ε
lower bound (audit/epsilon_lower_bound.py). :class:`UpdateProjectionRecorder` records, after
every logical step, the projection of the released update on every u_j (the per-step score
needs it; the ``total`` score needs only θ_0 and θ_T).

Usage::

    dp = make_private(model, config); dp.compile(...)
    q = dp.plan_privacy(len(x) + 500, epochs=...).sampling_rate   # canaries count in N
    canaries = GradientCanaries(model.trainable_variables, num_canaries=500,
                                l2_norm_clip=config.l2_norm_clip, sampling_rate=q, seed=1)
    dp.set_audit_canaries(canaries)                 # before the plan is fixed
    recorder = UpdateProjectionRecorder(canaries, model.trainable_variables)
    dp.fit(x, y, callbacks=[recorder])          # steps_per_execution must be 1
    scores = recorder.total_score()             # or scores.llr_score(recorder.projections, ...)

An audit run is a run with m extra "examples": audit a copy of the recipe, not the release.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfdpfair.privacy import sampling


class GradientCanaries:
    """m seeded canary gradients of norm C with ½-inclusion bits (module docstring).

    Attributes:
      included: bool [m], the secret membership bits S_j (the audit's ground truth).
      directions: float32 [m, P], the u_j flattened in trainable-variable order (‖u_j‖ = C).
    """

    def __init__(self, variables: Sequence[tf.Variable], num_canaries: int, l2_norm_clip: float,
                 sampling_rate: float, seed: int, inclusion_probability: float = 0.5):
        if num_canaries < 1:
            raise ValueError(f"num_canaries must be >= 1, got {num_canaries}.")
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
        self.shapes = [tuple(v.shape) for v in variables]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.num_canaries, self.l2_norm_clip = int(num_canaries), float(l2_norm_clip)
        self.sampling_rate = float(sampling_rate)
        rng = np.random.default_rng(seed)
        g = rng.standard_normal((self.num_canaries, sum(self.sizes)))
        g *= self.l2_norm_clip / np.linalg.norm(g, axis=1, keepdims=True)
        self.directions = g.astype(np.float32)
        self.included = rng.random(self.num_canaries) < inclusion_probability
        self.sampling_seed = int(rng.integers(0, 2**62))
        # TF copies (plain tensors, not tracked variables: nothing of the audit is saved with
        # the model), one [m, *shape] block per variable.
        splits = np.split(self.directions, np.cumsum(self.sizes)[:-1], axis=1)
        self._blocks = [tf.constant(b.reshape((self.num_canaries,) + s))
                        for b, s in zip(splits, self.shapes)]
        self._included = tf.constant(self.included)

    @property
    def gradient_blocks(self) -> list[tf.Tensor]:
        """The u_j as one [m, *shape] tensor per trainable variable (DPModel clips each row)."""
        return self._blocks

    def sampled(self, step: int | tf.Tensor) -> tf.Tensor:
        """bool [m]: which canaries (included or not) the Poisson draw of step t selects (the
        draw DPModel makes, privacy/sampling.poisson_mask)."""
        return sampling.poisson_mask(self.sampling_seed, step, self.num_canaries,
                                     self.sampling_rate)

    def project(self, flat_vector: np.ndarray) -> np.ndarray:
        """⟨u_j, v⟩ for every canary j, v flattened in trainable-variable order: [m]."""
        return self.directions @ np.asarray(flat_vector, np.float32)


def flatten(values: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenates arrays (e.g. variable values) into one flat float32 vector."""
    return np.concatenate([np.asarray(v, np.float32).ravel() for v in values])


class UpdateProjectionRecorder(keras.callbacks.Callback):
    """Keras callback: after every logical step, p_{t,j} = −⟨θ_{t+1} − θ_t, u_j⟩ for all j.

    ``projections`` is [T, m] after fit. DPModel calls ``on_train_batch_end`` once per compiled
    call, so compile with ``steps_per_execution=1`` (checked): one call, one logical step.
    """

    def __init__(self, canaries: GradientCanaries, variables: Sequence[tf.Variable]):
        super().__init__()
        self.canaries, self.variables = canaries, list(variables)
        self._rows: list[np.ndarray] = []
        self._previous: np.ndarray | None = None
        self.initial: np.ndarray | None = None

    def on_train_begin(self, logs=None):
        per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if per_call != 1:
            raise ValueError("UpdateProjectionRecorder needs steps_per_execution=1 (one logical "
                             f"step per callback), got {per_call}.")
        self._previous = flatten([v.numpy() for v in self.variables])
        if self.initial is None:
            self.initial = self._previous

    def on_train_batch_end(self, batch, logs=None):
        current = flatten([v.numpy() for v in self.variables])
        self._rows.append(-self.canaries.project(current - self._previous))
        self._previous = current

    @property
    def projections(self) -> np.ndarray:
        """[T, m] projections of the released updates on the canary directions."""
        return np.stack(self._rows) if self._rows else np.zeros((0, self.canaries.num_canaries))

    def total_score(self) -> np.ndarray:
        """⟨θ_0 − θ_T, u_j⟩ for every canary: [m] (scores.total_score, from θ_0 and θ_T)."""
        return -self.canaries.project(flatten([v.numpy() for v in self.variables]) - self.initial)
