"""What publishing several continuations of one stored DP state costs (docs/privacy.md).

A run restored from a checkpoint at step s keeps its sampling seed and draws fresh noise
(training/dp_state.py). If k continuations of that checkpoint are all published, a unit that is
in all of them was in the s shared prefix steps once, and in each later step t it was in the
same Poisson sample S_t of every continuation (the sampler is reproducible), with k independent
noise draws. The k releases of step t are then one Poisson-sampled Gaussian mechanism on the
concatenation of the k clipped sums: sensitivity √k·C (each part ≤ C), noise σC per coordinate,
i.e. noise multiplier σ/√k. So publishing them costs

    ε of  Compose( SelfCompose(PoissonSampled(q, Gaussian(σ)), s),
                   SelfCompose(PoissonSampled(q, Gaussian(σ/√k)), T − s) )

for continuations of T − s steps each (k = 1 is the plain run). A unit present in only one
continuation (e.g. a patient removed from the others' data) costs at most that much.
"""

from __future__ import annotations

import math

import dp_accounting

from tfdpfair.privacy import accounting


def continuations_event(noise_multiplier: float, sampling_rate: float, shared_steps: int,
                        steps_after: int, continuations: int) -> dp_accounting.DpEvent:
    """The DpEvent of ``continuations`` published runs sharing their first ``shared_steps``."""
    if continuations < 1:
        raise ValueError(f"continuations must be >= 1, got {continuations}.")
    if shared_steps < 0 or steps_after < 0:
        raise ValueError("shared_steps and steps_after must be >= 0.")
    shared = accounting.dp_sgd_event(noise_multiplier, sampling_rate, shared_steps)
    after = accounting.dp_sgd_event(noise_multiplier / math.sqrt(continuations), sampling_rate,
                                    steps_after)
    return dp_accounting.ComposedDpEvent([shared, after])


def epsilon_of_continuations(plan: accounting.PrivacyPlan, restore_step: int,
                             continuations: int, steps_after: int | None = None) -> float:
    """ε(δ of the plan) of publishing ``continuations`` runs resumed from step ``restore_step``.

    ``steps_after`` defaults to the rest of the plan (T − restore_step).
    """
    after = plan.steps - restore_step if steps_after is None else steps_after
    event = continuations_event(plan.noise_multiplier, plan.sampling_rate, restore_step, after,
                                continuations)
    acc = accounting.make_accountant(plan.accountant)
    acc.compose(event)
    return float(acc.get_epsilon(plan.delta))
