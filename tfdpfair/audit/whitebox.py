"""One audited DP-SGD run with gradient canaries, end to end (TensorFlow; see canaries.py).

:func:`audit_gradient_canaries` takes a compiled DPModel (SGD, the papers' optimizer), adds m
gradient canaries, trains through the ordinary ``DPModel.fit`` path, scores every canary from
the released updates and returns the one-run audit's ε lower bounds (Steinke et al.; f-DP)
next to the accountant's ε.
The canaries are extra "examples" of the run: train an audit run for the audit, and release
the model of a run without canaries.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import keras
import numpy as np

from tfdpfair.audit import epsilon_lower_bound as bound_lib
from tfdpfair.audit import fdp_lower_bound as fdp_lib
from tfdpfair.audit import scores as scores_lib
from tfdpfair.audit.canaries import GradientCanaries, UpdateProjectionRecorder

SCORES = ("llr", "total")


def default_ks(num_canaries: int) -> tuple[int, ...]:
    """Guess counts tried (Bonferroni-corrected): m/20, m/10, m/4, m/2 guesses each way."""
    return tuple(sorted({max(1, num_canaries // d) for d in (20, 10, 4, 2)}))


@dataclasses.dataclass(frozen=True)
class CanaryAudit:
    """Outcome of one audited run: the bounds (Steinke et al.; f-DP in ``audit_fdp``), the
    run's privacy plan, and the raw scores."""

    audit: bound_lib.AuditResult
    score: str
    accountant_epsilon: float
    noise_multiplier: float
    sampling_rate: float
    steps: int
    scores: np.ndarray
    included: np.ndarray
    audit_fdp: fdp_lib.FdpAuditResult | None = None

    def as_dict(self) -> dict:
        a = self.audit
        fdp = self.audit_fdp.report_fields() if self.audit_fdp is not None else {}
        return {"mode": "gradient_canaries", "score": self.score, "m": a.m, "k": a.k, "r": a.r,
                "v": a.v, "delta": a.delta, "epsilon_lower_bound": a.epsilon, **fdp,
                "p_threshold": a.p_threshold, "ks_tried": list(a.ks_tried),
                "accountant_epsilon": self.accountant_epsilon,
                "noise_multiplier": self.noise_multiplier, "sampling_rate": self.sampling_rate,
                "steps": self.steps, "num_included": int(self.included.sum())}


def _sgd_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    if not isinstance(optimizer, keras.optimizers.SGD) or float(optimizer.momentum) != 0.0:
        raise ValueError("the 'llr' score reads the noisy sums back from the updates, which "
                         "needs SGD without momentum; use score='total' for other optimizers.")
    lr = optimizer.learning_rate
    if not isinstance(lr, keras.Variable) and callable(lr):
        raise ValueError("the 'llr' score needs a constant learning rate; use score='total'.")
    return float(np.asarray(lr))


def audit_gradient_canaries(dp_model, x, y, *, num_canaries: int, seed: int,
                            epochs: float | None = None, steps: int | None = None,
                            score: str = "llr", ks: int | Sequence[int] | None = None,
                            score_noise_multiplier: float | None = None,
                            p_threshold: float = bound_lib.DEFAULT_P_VALUE,
                            verbose=0) -> CanaryAudit:
    """Trains ``dp_model`` on (x, y) with m gradient canaries and audits the run.

    Args:
      dp_model: a compiled, untrained DPModel (steps_per_execution=1).
      num_canaries: m. Each is included with probability ½ (seeded by ``seed``).
      epochs, steps: the run's length, as in DPModel.fit.
      score: "llr" (per-step likelihood ratio; SGD without momentum) or "total".
      ks: guess count(s) k (k "in" + k "out"); several are Bonferroni-corrected.
        Default :func:`default_ks`.
      score_noise_multiplier: σ the llr score assumes (default: the plan's). The bound is
        valid for any value; e.g. an auditor checking a claim uses the claimed σ.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    lr = _sgd_learning_rate(dp_model.optimizer) if score == "llr" else None
    if dp_model.logical_steps_done:
        raise ValueError("audit an untrained model: the canaries must be in every step.")
    model, cfg = dp_model.inner, dp_model.dp_config
    # The canaries are units of the run: the plan counts N + m (q = B / (N + m)).
    rate = dp_model.plan_privacy(len(x) + num_canaries, epochs=epochs, steps=steps).sampling_rate
    canaries = GradientCanaries(model.trainable_variables, num_canaries, cfg.l2_norm_clip,
                                rate, seed)
    recorder = UpdateProjectionRecorder(canaries, model.trainable_variables)
    dp_model.set_audit_canaries(canaries)
    dp_model.fit(x, y, epochs=epochs, steps=steps, callbacks=[recorder], verbose=verbose)
    values = (recorded_llr(recorder, dp_model, lr, score_noise_multiplier) if score == "llr"
              else recorder.total_score())
    return canary_audit(dp_model, score, values, canaries.included,
                        default_ks(num_canaries) if ks is None else ks, p_threshold)


def recorded_llr(recorder: UpdateProjectionRecorder, dp_model, learning_rate: float,
                 score_noise_multiplier: float | None = None) -> np.ndarray:
    """scores.llr_score of the recorded per-step projections of a finished SGD run at η: [m]."""
    cfg, plan = dp_model.dp_config, dp_model.plan
    return scores_lib.llr_score(
        recorder.projections,
        scores_lib.sgd_update_scale(learning_rate, cfg.expected_batch_size, cfg.l2_norm_clip,
                                    cfg.rescale_to_unit_norm),
        cfg.l2_norm_clip, score_noise_multiplier or plan.noise_multiplier,
        min(plan.sampling_rate, 1 - 1e-12))


def canary_audit(dp_model, score: str, values, included, ks: int | Sequence[int],
                 p_threshold: float) -> CanaryAudit:
    """Both one-run bounds (Steinke et al.; f-DP) of a finished run's canary scores, with its
    plan (ε after the steps done, σ, q, T)."""
    plan = dp_model.plan
    audit = bound_lib.audit_from_scores(values, included, ks, plan.delta, p_threshold)
    audit_fdp = fdp_lib.fdp_audit_from_scores(values, included, ks, plan.delta, p_threshold)
    return CanaryAudit(audit, score, float(plan.epsilon(dp_model.logical_steps_done)),
                       float(plan.noise_multiplier), float(plan.sampling_rate),
                       int(dp_model.logical_steps_done), np.asarray(values), included,
                       audit_fdp)
