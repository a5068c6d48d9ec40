"""Walking the layers of a (possibly nested) Keras model, and listing them in messages.

Shared by :mod:`tfdpfair.models.validate` (the DP-safety checks) and
:mod:`tfdpfair.models.group_norm` (the BatchNorm → GroupNorm rebuild).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import keras

DEFAULT_LIST_LIMIT = 10
"""How many names :func:`format_names` prints before "... and N more"."""


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
    The path is the "/"-joined names from the outer model down to the layer, e.g.
    "clf/mobilenetv2_0.35_32/Conv1_bn". ``model`` itself is not yielded.
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


def format_names(
    names: Sequence[str], limit: int = DEFAULT_LIST_LIMIT, indent: str = "  - "
) -> str:
    """One line per name for the first ``limit`` names, then "... and N more" if any are left.

    Keeps error messages short for big models (MobileNetV2 has 52 batch-norm layers).
    """
    lines = [f"{indent}{name}" for name in names[:limit]]
    if len(names) > limit:
        lines.append(f"{indent}... and {len(names) - limit} more")
    return "\n".join(lines)
