"""Binds a privacy statement to the weights DP-SGD produced (DESIGN.md invariant 8).

The privacy statement of a run describes the weights its releases produced: θ_T after T noisy
steps from the public starting point θ_0, plus post-processing of those releases (EMA, Polyak).
Weights trained or edited afterwards by any other path (``dp.inner.fit``, a direct
``optimizer.apply``, a callback that assigns weights, ``set_weights``) are not covered by it.

So the DP state keeps a fingerprint: one 63-bit BLAKE2b digest per weight variable of the inner
model (trainable and non-trainable, over dtype, shape and bytes) and one over all average
variables, recorded after every compiled call of DP steps and when the plan is fixed. Before the
next compiled call and before every export the current weights are hashed again and compared;
a mismatch is refused with the names of the changed variables. Before the first release
(step 0) the weights are the public starting point, so they may still be changed: the
fingerprint is then simply taken again.

Cost: one pass over the weights' bytes (BLAKE2b, ~1 GB/s on one core; ~10 ms for 2.7 M float32
parameters), twice per compiled call.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

DIGEST_MASK = (1 << 63) - 1


class ReleaseBindingError(ValueError):
    """The weights differ from what the last DP-SGD release left: the statement does not apply."""


def variable_digest(value: np.ndarray) -> int:
    """63-bit BLAKE2b digest of an array's dtype, shape and bytes (a non-negative int64)."""
    array = np.ascontiguousarray(value)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return int.from_bytes(h.digest(), "little") & DIGEST_MASK


def digests(variables: Sequence) -> np.ndarray:
    """int64 [len(variables)]: :func:`variable_digest` of each variable's current value."""
    return np.asarray([variable_digest(np.asarray(v.numpy())) for v in variables], np.int64)


def combined_digest(variables: Sequence) -> int:
    """One digest over several variables (the averages): digest of their digests."""
    return variable_digest(digests(variables)) if variables else 0


def _averages_variables(dp_model) -> list:
    averages = getattr(dp_model, "averages", None)
    if averages is None:
        return []
    return [a for name in averages.names for a in averages.averages[name]]


def record(dp_model) -> None:
    """Stores the current weights' fingerprint in the DP state (after a release, or at step 0)."""
    state, weights = dp_model.dp_state, dp_model.inner.weights
    _check_count(state, weights)
    values = digests(weights)
    state.weight_digests.assign(values if len(values) else np.zeros([1], np.int64))
    state.averages_digest.assign(combined_digest(_averages_variables(dp_model)))


def verify(dp_model, what: str) -> None:
    """Raises :class:`ReleaseBindingError` unless the weights match the last release's.

    ``what`` names the action refused (e.g. "export_release", "the next DP step").
    Before any release (0 steps) nothing is certified yet: the fingerprint is taken anew.
    """
    state = dp_model.dp_state
    if state.steps_done == 0:
        record(dp_model)
        return
    weights = dp_model.inner.weights
    _check_count(state, weights)
    stored = np.asarray(state.weight_digests.numpy())
    current = digests(weights)
    changed = [w.path for w, a, b in zip(weights, current, stored) if a != b]
    if int(state.averages_digest.numpy()) != combined_digest(_averages_variables(dp_model)):
        changed.append("the EMA/Polyak averages")
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8
                                           else "")
        raise ReleaseBindingError(
            f"{what} refused: {len(changed)} weight variable(s) differ from what the last DP-SGD "
            f"release (step {state.steps_done}) left: {shown}. They were changed outside "
            "DP-SGD (e.g. inner.fit, optimizer.apply, set_weights or a callback that assigns "
            "weights), so this run's privacy statement does not describe them. Restore the "
            "last checkpoint of the DP run (or export before the change); training on private "
            "data outside DPModel.fit is not covered by any statement.")


def _check_count(state, weights: Sequence) -> None:
    if max(1, len(weights)) != int(state.weight_digests.shape[0]):
        raise ReleaseBindingError(
            f"the model has {len(weights)} weight variables but its DP state was made for "
            f"{state.num_weights}: the architecture changed since make_private.")
