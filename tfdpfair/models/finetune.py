"""Backbone / head split and fine-tuning modes for our functional models (NFNet, WideResNet).

Both model families follow one layer-naming convention, which this module relies on:
  stem_*              the stem (convs, activations)
  stage{s}_block{b}   residual blocks of stage s (0-based)
  final_*             layers after the last stage (final conv / norm, activation)
  pool                global average pooling: the backbone's output (the features)
  head_dropout        optional dropout on the features
  head                the Dense classifier (logits)

Fine-tuning modes (:func:`set_trainable`):
  "all"                    every layer is trained;
  "head"                   only ``head`` (a linear probe on frozen features);
  ("last_stages", n)       ``head``, the ``final_*`` layers and the blocks of the last n stages;
                           n = 0 trains head and final layers only.
Freezing matters for DP: a frozen layer gets no per-example gradient (less memory, less
compute) and no noise, so fewer trained parameters means less total noise for the same ε.
"""

from __future__ import annotations

import re
from typing import Union

import keras

from tfdpfair.models.layers import PerExampleDropout

_STAGE_RE = re.compile(r"^stage(\d+)_")

TrainableMode = Union[str, tuple[str, int]]


def layer_stage(layer: keras.layers.Layer) -> int | None:
    """Stage index s of a layer named "stage{s}_…", else None."""
    match = _STAGE_RE.match(layer.name)
    return int(match.group(1)) if match else None


def num_stages(model: keras.Model) -> int:
    """Number of stages (1 + the largest s among layers named "stage{s}_…")."""
    stages = [s for s in map(layer_stage, model.layers) if s is not None]
    if not stages:
        raise ValueError(f"Model '{model.name}' has no 'stage{{s}}_' layers.")
    return max(stages) + 1


def _is_trained(layer: keras.layers.Layer, mode: TrainableMode, stages: int) -> bool:
    """Whether ``layer`` is trained under ``mode`` (see the module docstring)."""
    if layer.name == "head":
        return True
    if mode == "all":
        return True
    if mode == "head":
        return False
    if isinstance(mode, tuple) and len(mode) == 2 and mode[0] == "last_stages":
        n = int(mode[1])
        if not 0 <= n <= stages:
            raise ValueError(f"last_stages n must be in [0, {stages}], got {n}.")
        if layer.name.startswith("final_"):
            return True
        stage = layer_stage(layer)
        return stage is not None and stage >= stages - n
    raise ValueError(
        f"Unknown trainable mode {mode!r}; use 'all', 'head' or ('last_stages', n).")


def set_trainable(model: keras.Model, mode: TrainableMode = "all") -> int:
    """Sets ``layer.trainable`` on every top-level layer for a fine-tuning mode.

    Args:
      model: an NFNet or WideResNet from this package (naming in the module docstring).
      mode: "all", "head" or ("last_stages", n).

    Returns:
      The number of trainable parameters afterwards (Σ sizes of model.trainable_weights).
    """
    if not any(layer.name == "head" for layer in model.layers):
        raise ValueError(f"Model '{model.name}' has no layer named 'head'.")
    stages = num_stages(model) if isinstance(mode, tuple) else 0
    model.trainable = True
    for layer in model.layers:
        layer.trainable = _is_trained(layer, mode, stages)
    return count_trainable_params(model)


def count_trainable_params(model: keras.Model) -> int:
    """Σ over trainable weights of their number of elements."""
    total = 0
    for weight in model.trainable_weights:
        size = 1
        for dim in weight.shape:
            size *= int(dim)
        total += size
    return total


def head_initializer(head_init: str) -> keras.initializers.Initializer:
    """"zeros" (default: all-zero logits at init) or "normal" (N(0, 0.01²), the paper's)."""
    if head_init == "zeros":
        return keras.initializers.Zeros()
    if head_init == "normal":
        return keras.initializers.RandomNormal(stddev=0.01)
    raise ValueError(f"head_init must be 'zeros' or 'normal', got '{head_init}'.")


def backbone(model: keras.Model) -> keras.Model:
    """The feature extractor: same input, output of the "pool" layer; shares all weights."""
    return keras.Model(model.input, model.get_layer("pool").output, name=f"{model.name}_backbone")


def reset_head(
    model: keras.Model, num_classes: int, head_init: str = "zeros", drop_rate: float | None = None
) -> keras.Model:
    """A new model sharing the backbone's layers and weights, with a fresh head.

    Args:
      model: a model following this module's naming.
      num_classes: number of logits of the new head.
      head_init: "zeros" (all-zero logits at init) or "normal" (N(0, 0.01²)).
      drop_rate: dropout on the features (None keeps the old model's rate, 0 if it had none).

    Returns:
      A functional model; the old model keeps its own head.
    """
    if drop_rate is None:
        names = [layer.name for layer in model.layers]
        drop_rate = model.get_layer("head_dropout").rate if "head_dropout" in names else 0.0
    features = model.get_layer("pool").output
    x = PerExampleDropout(drop_rate, name="head_dropout")(features)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=head_initializer(head_init), name="head")(x)
    return keras.Model(model.input, logits, name=model.name)
