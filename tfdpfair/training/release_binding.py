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

Cost inside DPModel.fit (issue 23): the BLAKE2b pass (~0.45 GB/s on a loaded core, plus one
readback per variable: 25 ms for MobileNetV2, 260 ms for ResNet50) is not paid per step.
After each compiled call the loop takes a *pending* fingerprint (:func:`mark_released`: one
compiled FarmHash64 pass over the serialized variables, ~2 GB/s: ~5 ms / ~50 ms) and sets the
stored digests to an invalid value (:data:`STALE`); before the next call the same pass is
compared with it (:func:`check_unchanged`), which refuses any change a callback made in between.
FarmHash is not collision resistant; it guards the steps of one fit() against edits by
callbacks, while every check that outlives the call (exports, the next fit(), a restored
state) compares BLAKE2b digests. Those are computed (:func:`flush`) only where the stored
fingerprint can be read: before every :func:`verify` (fit's start, every export), before
every Keras save of the DP state (``DPState.save_own_variables``: save/save_weights,
ModelCheckpoint, BackupAndRestore, training/checkpoint.py), before ``DPModel.get_weights``
(EarlyStopping's snapshots) and when fit returns or fails. A
variable whose fast fingerprint no longer matches at a flush keeps STALE, which no digest
equals, so the change is refused at the next fit call or export. A DP state saved mid-fit by
a path that bypasses both (a tf.train.Checkpoint, or reading the variables directly) holds
STALE and is refused when restored: it fails closed. The custom-loop API records at once.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfdpfair.training.dp_state import PENDING_BINDING

DIGEST_MASK = (1 << 63) - 1
STALE = -1  # stored while a fingerprint is pending: equals no digest (they are >= 0)


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
    PENDING_BINDING.pop(state, None)
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
    flush(dp_model)
    PENDING_BINDING.pop(state, None)  # the stored digests decide; the next fast check restarts
    weights = dp_model.inner.weights
    _check_count(state, weights)
    stored = np.asarray(state.weight_digests.numpy())
    current = digests(weights)
    changed = [w.path for w, a, b in zip(weights, current, stored) if a != b]
    if int(state.averages_digest.numpy()) != combined_digest(_averages_variables(dp_model)):
        changed.append("the EMA/Polyak averages")
    if changed:
        _refuse(what, state.steps_done, changed)


def _refuse(what: str, step: int, changed: list) -> None:
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8
                                       else "")
    raise ReleaseBindingError(
        f"{what} refused: {len(changed)} weight variable(s) differ from what the last DP-SGD "
        f"release (step {step}) left: {shown}. They were changed outside "
        "DP-SGD (e.g. inner.fit, optimizer.apply, set_weights or a callback that assigns "
        "weights), so this run's privacy statement does not describe them (or this DP state "
        "was saved mid-fit by a path that bypasses Keras saving, before its fingerprint was "
        "stored). Restore the last checkpoint of the DP run (or export before the change); "
        "training on private data outside DPModel.fit is not covered by any statement.")


def mark_released(dp_model) -> None:
    """After a compiled call of DP steps: takes the pending (fast) fingerprint of the weights
    and averages the releases left, and invalidates the stored digests until :func:`flush`."""
    state = dp_model.dp_state
    _check_count(state, dp_model.inner.weights)
    PENDING_BINDING[state] = (_fast_digests(dp_model), lambda: flush(dp_model))
    state.weight_digests.assign(np.full(state.weight_digests.shape, STALE, np.int64))
    state.averages_digest.assign(STALE)


def check_unchanged(dp_model, what: str) -> None:
    """Before the next compiled call: the weights and averages must still be those the last
    call's releases left (the fast fingerprint of the last call or flush); without one,
    :func:`verify`."""
    pending = PENDING_BINDING.get(dp_model.dp_state)
    if pending is None:
        verify(dp_model, what)
        return
    changed = _fast_digests(dp_model) != pending[0]
    if changed.any():
        weights = dp_model.inner.weights
        names = [w.path for w, c in zip(weights, changed) if c]
        if changed[len(weights):].any():
            names.append("the EMA/Polyak averages")
        _refuse(what, dp_model.dp_state.steps_done, names)


def flush(dp_model) -> None:
    """Stores the BLAKE2b fingerprint of a pending release (see module docstring); variables
    changed since the release keep :data:`STALE`, so the change stays detectable. Afterwards
    the fast fingerprint is kept for :func:`check_unchanged` (the stored one is current)."""
    state = dp_model.dp_state
    pending = PENDING_BINDING.get(state)
    if pending is None or pending[1] is None:
        return
    fast = _fast_digests(dp_model)
    same = fast == pending[0]
    weights, averages = dp_model.inner.weights, _averages_variables(dp_model)
    values = np.where(same[:len(weights)], digests(weights), STALE)
    state.weight_digests.assign(values if len(values) else np.zeros([1], np.int64))
    state.averages_digest.assign(combined_digest(averages) if same[len(weights):].all()
                                 else STALE)
    if same.all():
        PENDING_BINDING[state] = (fast, None)
    else:
        PENDING_BINDING.pop(state, None)


def _fast_digests(dp_model) -> np.ndarray:
    """uint64 [weights + averages]: FarmHash64 of each serialized variable (dtype, shape and
    bytes), in one compiled call (change detection between calls, never stored)."""
    variables = list(dp_model.inner.weights) + _averages_variables(dp_model)
    key = tuple(id(v) for v in variables)
    cached = _FAST_DIGEST_FNS.get(dp_model.dp_state)
    if cached is None or cached[0] != key:
        def fingerprints():
            return tf.stack([tf.fingerprint(tf.reshape(tf.io.serialize_tensor(
                tf.convert_to_tensor(v)), [1]))[0] for v in variables])
        cached = (key, tf.function(fingerprints))
        _FAST_DIGEST_FNS[dp_model.dp_state] = cached
    return np.asarray(cached[1]()).view(np.uint64)[:, 0]


_FAST_DIGEST_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _check_count(state, weights: Sequence) -> None:
    if max(1, len(weights)) != int(state.weight_digests.shape[0]):
        raise ReleaseBindingError(
            f"the model has {len(weights)} weight variables but its DP state was made for "
            f"{state.num_weights}: the architecture changed since make_private.")
