"""Is a Keras model DP-safe? Find (and fix) layers that mix examples during training.

DP-SGD bounds the influence of one example on a logical step by clipping that example's own
gradient g_i = ∇_θ l_i(θ). This is only an L2 sensitivity bound if l_i depends on example i
alone. A layer whose *training-mode* output for example i depends on the other examples of the
batch breaks that: batch normalisation in training mode normalises with the batch mean and
variance μ_B = (1/B) Σ_j x_j, so every l_i depends on every x_j and the per-example gradients
no longer add up to the batch gradient (and clipping them bounds nothing). This module refuses
such models (DESIGN.md invariant 5) with a message that names each offending layer by its path
inside the (possibly nested) model and says how to fix it.

Layers refused:
  * ``BatchNormalization`` (including ``synchronized=True``) and any batch-norm-like layer
    (class name containing "BatchNorm", or with ``moving_mean`` / ``moving_variance``) that is
    trainable: in Keras 3 a BN layer uses batch statistics iff ``training and layer.trainable``.
    A frozen BN (``trainable=False``) uses its moving statistics, a per-example affine map, so
    it is accepted.
  * Batch-level augmentations that combine examples: ``MixUp``, ``CutMix``, ``Mosaic`` (the
    Keras / KerasCV layers of those names): the output for example i contains pixels and labels
    of example j.
  * Stateful recurrent layers (``stateful=True``): the state carried from one batch into the
    next makes l_i at step t+1 depend on the example that occupied row i at step t.

Layers that normalise one example at a time (GroupNormalization, LayerNormalization,
UnitNormalization, RMSNormalization, our NFNet layers) are safe, as is the adapted
``Normalization`` preprocessing layer (fixed statistics).

The checks above are a deny-list of known layers. :func:`check_training_call_is_stateless` is
a behavioural second line of defence: it runs one training-mode call on a random batch and
refuses the model if any variable changed (custom running statistics, a BN the deny-list did
not recognise), since such state is computed from private data without noise and ships with
the model. Keras random layers' seed-generator states are exempt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import keras
import numpy as np

from tfdpfair.models.group_norm import (  # noqa: F401 (re-exported)
    GroupNormChange, GroupNormReport, replace_batch_norm_with_group_norm)
from tfdpfair.models.layer_paths import (  # noqa: F401 (re-exported)
    format_names, is_batch_norm, iter_layers_with_paths)

BN_FIX = (
    "replace it with GroupNormalization (tfdpfair.models.validate."
    "replace_batch_norm_with_group_norm(model)), freeze it so it uses its moving statistics "
    "(tfdpfair.models.validate.freeze_batch_norm(model), i.e. layer.trainable = False), or use "
    "a normaliser-free network (tfdpfair.models.nfnet)"
)
MIX_FIX = (
    "remove it from the model and augment each example independently (augmentation "
    "multiplicity averages K views of ONE example before clipping)"
)
STATEFUL_FIX = "build the recurrent layer with stateful=False"

_BATCH_MIXING_AUGMENTATIONS = ("MixUp", "CutMix", "Mosaic")


class DPIncompatibleModelError(ValueError):
    """The model is unsafe for DP-SGD: it mixes examples in training mode (so per-example
    clipping bounds nothing), or it updates state from the training batch without noise."""


@dataclasses.dataclass(frozen=True)
class ExampleMixingLayer:
    """One offending layer.

    Attributes:
      path: "/"-joined names from the outer model down to the layer, e.g. "net/resnet50/bn1".
      class_name: the layer's class name.
      reason: why its training-mode output for one example depends on other examples.
      fix: what to do about it.
      layer: the layer object itself (not compared or printed).
    """

    path: str
    class_name: str
    reason: str
    fix: str
    layer: keras.layers.Layer = dataclasses.field(compare=False, repr=False)

    def describe(self) -> str:
        """One human-readable line: path, class, reason and fix."""
        return f"{self.path} ({self.class_name}): {self.reason}; fix: {self.fix}."


def _classify(layer: keras.layers.Layer) -> tuple[str, str] | None:
    """(reason, fix) if ``layer`` itself mixes examples in training mode, else None."""
    name = type(layer).__name__
    if is_batch_norm(layer):
        if not layer.trainable:
            return None
        sync = " and across replicas" if getattr(layer, "synchronized", False) else ""
        return (
            "trainable batch normalisation normalises with the mean and variance of the whole "
            f"batch{sync} in training mode, so one example's output depends on all the others",
            BN_FIX,
        )
    if name in _BATCH_MIXING_AUGMENTATIONS:
        return ("batch augmentation that blends pixels/labels of different examples", MIX_FIX)
    if getattr(layer, "stateful", False) is True and isinstance(layer, keras.layers.RNN):
        return ("stateful RNN carries state from one batch's example into the next", STATEFUL_FIX)
    return None


def find_example_mixing_layers(model: keras.layers.Layer) -> list[ExampleMixingLayer]:
    """Every layer of ``model`` (nested models included) that mixes examples in training mode.

    Args:
      model: any Keras model or layer (Sequential, functional, subclassed, or a model that
        contains e.g. a ``keras.applications`` backbone).

    Returns:
      The offending layers in depth-first order; empty if the model is DP-safe.
    """
    found = []
    candidates = [(model.name, model)] + list(iter_layers_with_paths(model))
    for path, layer in candidates:
        verdict = _classify(layer)
        if verdict is not None:
            found.append(ExampleMixingLayer(path, type(layer).__name__, *verdict, layer=layer))
    return found


def _describe_offenders(offenders: list[ExampleMixingLayer]) -> str:
    """Offenders grouped by (reason, fix): each reason and fix once, at most 10 paths each."""
    groups: dict[tuple[str, str], list[ExampleMixingLayer]] = {}
    for offender in offenders:
        groups.setdefault((offender.reason, offender.fix), []).append(offender)
    parts = []
    for (reason, fix), members in groups.items():
        names = [f"{o.path} ({o.class_name})" for o in members]
        parts.append(f"{len(members)} layer(s): {reason}:\n{format_names(names)}\n"
                     f"  Fix: {fix}.")
    return "\n".join(parts)


def check_dp_compatible(model: keras.layers.Layer) -> None:
    """Raises :class:`DPIncompatibleModelError` naming the example-mixing layers, if any.

    The message gives each reason and fix once, with the paths of the offending layers (the
    first 10 of each kind, then "... and N more"; all of them are in
    :func:`find_example_mixing_layers`).
    """
    offenders = find_example_mixing_layers(model)
    if not offenders:
        return
    raise DPIncompatibleModelError(
        f"Model '{model.name}' is not compatible with DP-SGD: {len(offenders)} layer(s) make an "
        "example's training-mode output depend on other examples, so per-example gradient "
        f"clipping would not bound any single example's influence.\n"
        f"{_describe_offenders(offenders)}"
    )


def freeze_batch_norm(model: keras.layers.Layer) -> int:
    """Sets ``trainable = False`` on every batch-norm layer, so it uses its moving statistics.

    A frozen BN computes y = γ (x − μ_moving)/sqrt(σ²_moving + ε) + β per example. Setting
    ``trainable`` on a parent model afterwards propagates to its BN layers and can un-freeze
    them: call :func:`check_dp_compatible` again after changing trainability.

    Returns:
      The number of layers frozen.
    """
    count = 0
    for _, layer in iter_layers_with_paths(model):
        if is_batch_norm(layer) and layer.trainable:
            layer.trainable = False
            count += 1
    return count


STATE_FIX = (
    "make the layer stateless (compute what it needs from the current example only); or "
    "compute the statistic once on public data and store it as a constant that call() never "
    "assigns. Freezing (layer.trainable = False) only helps Keras BatchNormalization-like "
    "layers, which switch to inference mode when frozen; it does not stop a custom layer whose "
    "call() assigns its variables"
)
PROBE_BATCH_SIZE = 2
PROBE_SEED = 1234
"""The probe batch: PROBE_BATCH_SIZE examples drawn from N(0, 1) with this numpy seed."""

ShapeArg = tuple[int, ...] | Sequence[tuple[int, ...]] | None


def _probe_shapes(model: keras.Model, input_shape: ShapeArg) -> list[tuple[int, ...]]:
    """Per-example shape of every model input (from ``input_shape`` or ``model.inputs``)."""
    symbolic = getattr(model, "inputs", None)
    if input_shape is None:
        if not symbolic:
            raise ValueError(
                f"Model '{model.name}' has no symbolic inputs (subclassed model?): pass "
                "input_shape=, the shape of one example without the batch dimension.")
        shapes = [tuple(t.shape[1:]) for t in symbolic]
        if any(d is None for shape in shapes for d in shape):
            raise ValueError(
                f"Model '{model.name}' has unknown input dimensions {shapes}: pass "
                "input_shape=, the shape of one example without the batch dimension, e.g. "
                "(32, 32, 3) (a list of shapes for several inputs).")
        return shapes
    flat = all(d is None or isinstance(d, (int, np.integer)) for d in input_shape)
    shapes = [tuple(input_shape)] if flat else [tuple(shape) for shape in input_shape]
    if any(d is None for shape in shapes for d in shape):
        raise ValueError(f"input_shape must be fully known (no None), got {input_shape}.")
    shapes = [tuple(int(d) for d in shape) for shape in shapes]
    if symbolic and len(shapes) != len(symbolic):
        raise ValueError(f"Model '{model.name}' has {len(symbolic)} inputs but "
                         f"{len(shapes)} input shapes were given.")
    return shapes


def _probe_batch(model: keras.Model, input_shape: ShapeArg, dtype: str) -> Any:
    """A seeded random batch (not derived from any data) in the model's input structure.

    Float inputs get N(0, 1) values cast to ``dtype``; integer/bool inputs (e.g. token ids)
    get 0/1 values of their own dtype.
    """
    shapes = _probe_shapes(model, input_shape)
    symbolic = getattr(model, "inputs", None) or [None] * len(shapes)
    rng = np.random.default_rng(PROBE_SEED)
    arrays = []
    for shape, tensor in zip(shapes, symbolic):
        full = (PROBE_BATCH_SIZE, *shape)
        own = str(tensor.dtype) if tensor is not None else str(dtype)
        if own.startswith(("int", "uint", "bool")):
            arrays.append(rng.integers(0, 2, full).astype(own))
        else:
            arrays.append(rng.standard_normal(full).astype(dtype))
    try:
        structure = model.input  # a tensor, list or dict of the functional inputs
    except (AttributeError, ValueError):  # subclassed, or a Sequential never called
        structure = None
    if structure is not None:
        return keras.tree.pack_sequence_as(structure, arrays)
    return arrays[0] if len(arrays) == 1 else arrays


def _owners(model: keras.Model) -> dict[int, tuple[str, keras.layers.Layer]]:
    """id(weight) → (path, layer) of the innermost layer owning it."""
    owners: dict[int, tuple[str, keras.layers.Layer]] = {}
    for path, layer in [(model.name, model)] + list(iter_layers_with_paths(model)):
        for weight in layer.weights:  # parents come first: children overwrite them
            owners[id(weight)] = (path, layer)
    return owners


def _seed_state_ids(model: keras.Model) -> set[int]:
    """ids of the state variables of every keras.random.SeedGenerator in the model.

    Keras' own random layers (Dropout, RandomFlip, GaussianNoise, …) advance a SeedGenerator
    state on every training call without looking at the data. Keras lists these states in
    ``variables`` but not in ``weights``; the layers' tracked generators are added too.
    """
    ids = {id(v) for v in model.variables} - {id(v) for v in model.weights}
    for _, layer in [(model.name, model)] + list(iter_layers_with_paths(model)):
        for generator in getattr(layer, "_seed_generators", ()):
            ids.add(id(generator.state))
    return ids


def _snapshot(variables: list[Any]) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in variables]


def _changed_layers(model: keras.Model, batch: Any) -> dict[str, tuple[keras.layers.Layer, list]]:
    """Runs ``model(batch, training=True)`` once and restores every variable afterwards.

    Returns:
      {layer path: (layer, [names of its changed variables])} for the non-RNG variables
      (trainable or not) whose bytes differ after the call.
    """
    if not model.built:
        model(batch, training=False)  # creates the variables; changes no state
    variables = list({id(v): v for v in model.variables}.values())
    before = _snapshot(variables)
    try:
        model(batch, training=True)
        after = _snapshot(variables)
    finally:
        for variable, value in zip(variables, before):
            variable.assign(value)
    skip, owners = _seed_state_ids(model), _owners(model)
    changed: dict[str, tuple[keras.layers.Layer, list]] = {}
    for variable, old, new in zip(variables, before, after):
        if id(variable) in skip or (old.shape == new.shape and old.tobytes() == new.tobytes()):
            continue
        path, layer = owners.get(id(variable), (model.name, model))
        changed.setdefault(path, (layer, []))[1].append(variable.name)
    return changed


def check_training_call_is_stateless(
    model: keras.Model,
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None = None,
    dtype: str = "float32",
) -> None:
    """Behavioural check: one training-mode call must not change the model's state.

    :func:`check_dp_compatible` recognises known layers; this probe catches any layer, custom
    ones included, that updates a variable in training mode (e.g. a running mean
    ``self.mean.assign(0.9 * self.mean + 0.1 * ops.mean(x))``, or a trainable BatchNorm's
    moving statistics). Such state is computed from the private batch without clipping or
    noise and ships with the model, outside the DP guarantee.

    The probe snapshots every variable, runs ONE ``model(batch, training=True)`` on a seeded
    random batch of PROBE_BATCH_SIZE examples (public noise, never data), compares, and
    restores the snapshot, so the model's weights are bit-identical afterwards. The
    SeedGenerator states of Keras random layers (Dropout, RandomFlip, …) advance without
    touching data and are ignored (but restored too). Layers drawing from TensorFlow's global
    random state (our PerExampleDropout, StochasticDepth) advance it as any training call
    would. A layer whose updates do not depend on the data (e.g. SpectralNormalization's
    power iteration) is refused too: the probe cannot tell the difference.

    Args:
      model: a Keras model (functional, Sequential or subclassed).
      input_shape: the shape of one example, without the batch dimension (a list of shapes
        for a model with several inputs). Default: ``model.inputs``; required when those have
        unknown dimensions or the model has no symbolic inputs.
      dtype: dtype of the float inputs (integer inputs keep their own dtype and get 0/1).

    Raises:
      ValueError: the input shape is unknown (pass ``input_shape``).
      DPIncompatibleModelError: some variable changed; names each layer once, the fixes once.
    """
    changed = _changed_layers(model, _probe_batch(model, input_shape, dtype))
    if not changed:
        return
    names = [f"{path} ({type(layer).__name__}): {', '.join(variables)}"
             for path, (layer, variables) in changed.items()]
    bn_note = ""
    if any(is_batch_norm(layer) for layer, _ in changed.values()):
        bn_note = f"\nFor batch normalisation: {BN_FIX}."
    raise DPIncompatibleModelError(
        f"Model '{model.name}' is not compatible with DP-SGD: one training-mode call on a "
        f"random batch changed the variables of {len(changed)} layer(s). State updated from "
        "the training batch (e.g. a running mean) is computed without clipping or noise and "
        "ships with the model, outside the privacy guarantee:\n"
        f"{format_names(names)}\nFix: {STATE_FIX}.{bn_note}")
