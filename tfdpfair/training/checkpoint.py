"""Checkpoints of a DP run that resume with the same privacy accounting (DESIGN.md invariant 4).

A checkpoint directory holds
  dp_state.json   the privacy plan (N, B, σ, T, δ, accountant, target ε), the number of logical
                  steps already taken, ε so far, and the sampler / noise / augmentation seeds;
  variables.npz   the model's weights, the optimizer's variables and the step counters.

Resuming restores the plan instead of re-planning, so the accountant continues from the steps
taken and a resumed run reports the same ε as an uninterrupted one; with the same seeds it also
samples the same batches and draws the same noise. A partial logical step is never saved: it
was not released, and the resumed run re-runs that step from its start.

The seeds make this file as sensitive as the training data: whoever has them can remove the
noise. Keep checkpoints with the private data; release only the final model weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from tfdpfair.privacy.accounting import PrivacyPlan
from tfdpfair.training.dp_model import DPModel

STATE_FILE = "dp_state.json"
ARRAYS_FILE = "variables.npz"
FORMAT_VERSION = 1


def _state_variables(dp_model: DPModel) -> dict[str, list]:
    return {
        "model": list(dp_model.inner.weights),
        "optimizer": list(dp_model.optimizer.variables),
        "counters": [dp_model._accumulator.logical_steps, dp_model._microbatch_counter],
    }


def save_dp_checkpoint(dp_model: DPModel, directory: str | os.PathLike) -> pathlib.Path:
    """Writes the run's weights, optimizer state, plan, step count and seeds to ``directory``."""
    if dp_model.plan is None:
        raise ValueError("nothing to save: this DPModel has not started training (no plan).")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"{group}/{i}": np.asarray(v.numpy())
              for group, variables in _state_variables(dp_model).items()
              for i, v in enumerate(variables)}
    np.savez(directory / ARRAYS_FILE, **arrays)
    state = {
        "format": FORMAT_VERSION,
        "plan": dataclasses.asdict(dp_model.plan),
        "logical_steps": dp_model.logical_steps_done,
        "epsilon": dp_model.epsilon_spent(),
        "seeds": dp_model.seeds,
    }
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
    return directory


def restore_dp_checkpoint(dp_model: DPModel, directory: str | os.PathLike) -> PrivacyPlan:
    """Restores a checkpoint into a compiled, not yet trained DPModel of the same architecture.

    Returns the restored plan; ``dp_model.fit(x, y)`` then continues from the saved step.
    """
    directory = pathlib.Path(directory)
    for name in (STATE_FILE, ARRAYS_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} is missing: not a tfdpfair DP checkpoint.")
    state = json.loads((directory / STATE_FILE).read_text())
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory / STATE_FILE}: unsupported format {state.get('format')!r}.")
    if dp_model.plan is not None:
        raise ValueError("restore into a fresh DPModel, before it has trained.")
    plan = PrivacyPlan(**state["plan"])
    if dp_model.dp_config.expected_batch_size != plan.expected_batch_size:
        raise ValueError(f"checkpoint expected batch {plan.expected_batch_size} differs from "
                         f"DPConfig.expected_batch_size {dp_model.dp_config.expected_batch_size}.")
    dp_model._prepare(plan.num_examples, None, None, plan=plan,
                      seeds={k: int(v) for k, v in state["seeds"].items()})
    with np.load(directory / ARRAYS_FILE) as arrays:
        for group, variables in _state_variables(dp_model).items():
            saved = sorted((k for k in arrays.files if k.startswith(group + "/")),
                           key=lambda k: int(k.split("/")[1]))
            if len(saved) != len(variables):
                raise ValueError(f"checkpoint has {len(saved)} {group} variables, the model "
                                 f"{len(variables)}: different architecture or optimizer?")
            for key, variable in zip(saved, variables):
                if tuple(arrays[key].shape) != tuple(variable.shape):
                    raise ValueError(f"{group} variable {key}: checkpoint shape "
                                     f"{arrays[key].shape} != model shape {variable.shape}.")
                variable.assign(arrays[key])
    return plan
