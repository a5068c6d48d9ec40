"""Rebuild a Keras model with every batch-norm layer replaced by GroupNormalization.

GroupNorm normalises each example over (H, W, C/g) within each of g channel groups, so it never
mixes examples and is safe for DP-SGD. It needs ``channels % g == 0``: when the requested group
count does not divide a layer's channel count, the largest divisor below it is used, and the
returned :class:`GroupNormReport` (and one logged warning per rebuild) says which layers got
which count and why.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Callable, Literal, overload

import keras

from tfdpfair.models.layer_paths import format_names, is_batch_norm, iter_layers_with_paths

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GroupNormChange:
    """One batch-norm layer that was replaced.

    Attributes:
      path: the batch-norm layer's path in the original model (see iter_layers_with_paths).
      new_name: the name of the GroupNormalization layer that replaces it.
      channels: its number of channels.
      requested_groups: the ``groups`` passed to the rebuild.
      groups: the number of groups used (the largest divisor of ``channels`` ≤ requested).
      reason: why ``groups`` differs from ``requested_groups`` ("" when it does not).
    """

    path: str
    new_name: str
    channels: int
    requested_groups: int
    groups: int
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class GroupNormReport:
    """What :func:`replace_batch_norm_with_group_norm` did to each batch-norm layer."""

    requested_groups: int
    replaced: tuple[GroupNormChange, ...]

    @property
    def adjusted(self) -> tuple[GroupNormChange, ...]:
        """The layers whose group count differs from the requested one."""
        return tuple(c for c in self.replaced if c.groups != c.requested_groups)

    def summary(self) -> str:
        """A short human-readable summary (adjusted layers listed, at most 10 of them)."""
        head = (f"Replaced {len(self.replaced)} batch-norm layer(s) with GroupNormalization "
                f"(groups={self.requested_groups} requested)")
        if not self.adjusted:
            return head + "; every layer uses the requested group count."
        lines = [f"{c.path}: groups={c.groups} ({c.reason})" for c in self.adjusted]
        return (f"{head}; {len(self.adjusted)} layer(s) use a different group count because "
                f"GroupNorm needs channels divisible by groups:\n{format_names(lines)}")


def num_groups(channels: int, groups: int) -> int:
    """Largest g ≤ ``groups`` that divides ``channels`` (GroupNorm needs channels % g == 0)."""
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _adjustment_reason(channels: int, requested: int, used: int) -> str:
    """Why ``used`` groups instead of ``requested`` for a layer with ``channels`` channels."""
    if used == requested:
        return ""
    if channels < requested:
        return (f"only {channels} channels, fewer than the {requested} groups requested: "
                "one channel per group")
    why = (f"{channels} channels are not divisible by {requested}; {used} is the largest "
           f"divisor of {channels} not above {requested}")
    if used == 1:
        why += ", so 1 group: it normalises over H, W and all channels like LayerNormalization"
    return why


def _bn_channels(bn: keras.layers.Layer) -> int:
    """Number of channels of a built batch-norm layer (from γ or the moving mean)."""
    for attr in ("gamma", "moving_mean"):
        if bn.built and getattr(bn, attr, None) is not None:
            return int(getattr(bn, attr).shape[0])
    raise ValueError(f"Batch-norm layer '{bn.name}' is not built; build the model first.")


def _group_norm_like(bn: keras.layers.Layer, groups: int) -> keras.layers.Layer:
    """A GroupNormalization with ``groups`` groups and the axis/epsilon/center/scale of ``bn``."""
    axis = bn.axis[0] if isinstance(bn.axis, (list, tuple)) else bn.axis
    return keras.layers.GroupNormalization(
        groups=groups,
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


@overload
def replace_batch_norm_with_group_norm(
    model: keras.Model, groups: int = ..., copy_weights: bool = ...,
    return_report: Literal[False] = ...,
) -> keras.Model: ...


@overload
def replace_batch_norm_with_group_norm(
    model: keras.Model, groups: int = ..., copy_weights: bool = ..., *,
    return_report: Literal[True],
) -> tuple[keras.Model, GroupNormReport]: ...


def replace_batch_norm_with_group_norm(
    model: keras.Model, groups: int = 16, copy_weights: bool = True,
    return_report: bool = False,
) -> keras.Model | tuple[keras.Model, GroupNormReport]:
    """Rebuilds a Sequential/functional model with every BN replaced by GroupNormalization.

    Each BN with C channels becomes a GroupNorm with g = the largest divisor of C not above
    ``groups`` (GroupNorm needs C % g == 0). Layers where g ≠ ``groups`` are listed in the
    report and summarised in one logged warning. Nested Sequential/functional models (e.g.
    keras.applications backbones) are rebuilt too.

    Args:
      model: a built Sequential or functional model (subclassed models cannot be rebuilt).
      groups: the preferred number of groups.
      copy_weights: copy all other weights, and BN's γ/β into GroupNorm's γ/β.
      return_report: also return a :class:`GroupNormReport`.

    Returns:
      The new model (the original is unchanged), or ``(new_model, report)`` when
      ``return_report`` is True.
    """
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}.")
    if not isinstance(model, keras.Sequential) and not _is_functional(model):
        raise TypeError(
            f"Cannot rebuild subclassed model '{model.name}' ({type(model).__name__}); replace "
            "its BatchNormalization layers with GroupNormalization in its code, or freeze them "
            "with freeze_batch_norm(model).")
    paths = {id(layer): path for path, layer in iter_layers_with_paths(model)}
    pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []
    changes: list[GroupNormChange] = []
    clone_fn = _make_clone_fn(groups, pairs, changes, paths)
    call_fn = None if isinstance(model, keras.Sequential) else _call_with_supported_kwargs
    new_model = keras.models.clone_model(
        model, clone_function=clone_fn, call_function=call_fn, recursive=True)
    if copy_weights:
        _copy_weights(pairs)
    report = GroupNormReport(requested_groups=groups, replaced=tuple(changes))
    if report.adjusted:
        _LOG.warning("%s", report.summary())
    return (new_model, report) if return_report else new_model


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
    groups: int,
    pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]],
    changes: list[GroupNormChange],
    paths: dict[int, str],
) -> Callable[[keras.layers.Layer], keras.layers.Layer]:
    """clone_function for keras.models.clone_model: swaps BN for GN, records pairs and changes."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if is_batch_norm(layer):
            channels = _bn_channels(layer)
            used = num_groups(channels, groups)
            new = _group_norm_like(layer, used)
            changes.append(GroupNormChange(
                path=paths.get(id(layer), layer.name), new_name=new.name, channels=channels,
                requested_groups=groups, groups=used,
                reason=_adjustment_reason(channels, groups, used)))
        else:
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    return clone
