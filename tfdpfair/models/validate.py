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
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Iterator

import keras

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
    """The model mixes examples in training mode, so per-example clipping bounds nothing."""


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


def _child_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Direct sub-layers of ``layer`` (layers of a model, or layers tracked by a custom layer)."""
    if hasattr(layer, "_flatten_layers"):
        return list(layer._flatten_layers(include_self=False, recursive=False))
    return list(getattr(layer, "layers", []))


def iter_layers_with_paths(
    model: keras.layers.Layer, prefix: str = ""
) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yields (path, layer) for every layer inside ``model``, depth first, nested models too.

    Each layer object is yielded once, under the first path it is found at (shared layers).
    """
    seen: set[int] = set()

    def walk(layer: keras.layers.Layer, path: str):
        for child in _child_layers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}/{child.name}" if path else child.name
            yield child_path, child
            yield from walk(child, child_path)

    root = prefix or model.name
    yield from walk(model, root)


def is_batch_norm(layer: keras.layers.Layer) -> bool:
    """True for Keras BatchNormalization and batch-norm-like layers (by class or moving stats)."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return True
    if "BatchNorm" in type(layer).__name__:
        return True
    return hasattr(layer, "moving_mean") and hasattr(layer, "moving_variance")


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


def check_dp_compatible(model: keras.layers.Layer) -> None:
    """Raises :class:`DPIncompatibleModelError` listing every example-mixing layer, if any."""
    offenders = find_example_mixing_layers(model)
    if not offenders:
        return
    lines = "\n".join(f"  - {o.describe()}" for o in offenders)
    raise DPIncompatibleModelError(
        f"Model '{model.name}' is not compatible with DP-SGD: {len(offenders)} layer(s) make an "
        "example's training-mode output depend on other examples, so per-example gradient "
        f"clipping would not bound any single example's influence:\n{lines}"
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


def _num_groups(channels: int, groups: int) -> int:
    """Largest g ≤ ``groups`` that divides ``channels`` (GroupNorm needs channels % g == 0)."""
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _group_norm_like(bn: keras.layers.Layer, groups: int) -> keras.layers.Layer:
    """A GroupNormalization with the same axis/epsilon/center/scale as ``bn``."""
    axis = bn.axis[0] if isinstance(bn.axis, (list, tuple)) else bn.axis
    channels = None
    if bn.built and getattr(bn, "gamma", None) is not None:
        channels = int(bn.gamma.shape[0])
    elif bn.built and getattr(bn, "moving_mean", None) is not None:
        channels = int(bn.moving_mean.shape[0])
    if channels is None:
        raise ValueError(f"Batch-norm layer '{bn.name}' is not built; build the model first.")
    return keras.layers.GroupNormalization(
        groups=_num_groups(channels, groups),
        axis=axis,
        epsilon=getattr(bn, "epsilon", 1e-3),
        center=getattr(bn, "center", True),
        scale=getattr(bn, "scale", True),
        name=f"{bn.name}_gn",
    )


def _copy_weights(pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]]) -> None:
    """Copies weights old→new; for BN→GN only γ and β (batch statistics have no GN analogue)."""
    for old, new in pairs:
        if isinstance(new, keras.layers.GroupNormalization) and is_batch_norm(old):
            if getattr(old, "gamma", None) is not None and new.gamma is not None:
                new.gamma.assign(old.gamma)
            if getattr(old, "beta", None) is not None and new.beta is not None:
                new.beta.assign(old.beta)
        elif old.weights and len(old.weights) == len(new.weights):
            new.set_weights(old.get_weights())


def replace_batch_norm_with_group_norm(
    model: keras.Model, groups: int = 16, copy_weights: bool = True
) -> keras.Model:
    """Rebuilds a Sequential/functional model with every BN replaced by GroupNormalization.

    GroupNorm normalises each example over (H, W, C/g) within each of g channel groups, so it
    never mixes examples. ``g`` is the largest divisor of the channel count not above ``groups``.
    Nested Sequential/functional models (e.g. keras.applications backbones) are rebuilt too.

    Args:
      model: a built Sequential or functional model (subclassed models cannot be rebuilt).
      groups: the preferred number of groups.
      copy_weights: copy all other weights, and BN's γ/β into GroupNorm's γ/β.

    Returns:
      A new model; the original is unchanged.
    """
    if not isinstance(model, keras.Sequential) and not _is_functional(model):
        raise TypeError(
            f"Cannot rebuild subclassed model '{model.name}' ({type(model).__name__}); replace "
            "its BatchNormalization layers with GroupNormalization in its code, or freeze them "
            "with freeze_batch_norm(model)."
        )
    pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []
    clone_fn = _make_clone_fn(groups, pairs)
    call_fn = None if isinstance(model, keras.Sequential) else _call_with_supported_kwargs
    new_model = keras.models.clone_model(
        model, clone_function=clone_fn, call_function=call_fn, recursive=True)
    if copy_weights:
        _copy_weights(pairs)
    return new_model


def _is_functional(model: keras.layers.Layer) -> bool:
    """True for functional-API models (they have a graph of inputs and outputs)."""
    return isinstance(model, keras.Model) and hasattr(model, "_operations") and hasattr(
        model, "_inputs_struct")


def _call_with_supported_kwargs(layer: keras.layers.Layer, *args, **kwargs):
    """Calls ``layer`` dropping recorded call kwargs its ``call`` does not accept (e.g. BN's
    ``mask`` when the layer is now a GroupNormalization)."""
    params = inspect.signature(layer.call).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return layer(*args, **kwargs)


def _make_clone_fn(
    groups: int, pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]]
) -> Callable[[keras.layers.Layer], keras.layers.Layer]:
    """clone_function for keras.models.clone_model that swaps BN for GN and records pairs."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if is_batch_norm(layer):
            new = _group_norm_like(layer, groups)
        else:
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    return clone
