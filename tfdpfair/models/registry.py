"""The model registry: one table of model builders for the trainer, the TFX module and benchmarks.

  MODELS  name -> builder(input_shape, num_classes, **kwargs) -> keras.Model (untrained)
          "nfnet"        NFNet (variant F0…F7, nano, micro; models/nfnet.py)
          "wide_resnet"  GroupNorm WideResNet (variant WRN-16-4, WRN-28-10, WRN-40-4)
          "simple_cnn"   two ReLU convolutions, global pooling and a dense head (tests, demos)

A model is named either by (name, variant) — the trainer's ``config.model.name`` and
``config.model.variant`` — or by the short form "<name>_<variant>" ("nfnet_F0", "nfnet_nano"),
which the TFX custom config and the benchmarks use (:func:`split_name`).
"""

from __future__ import annotations

from typing import Any, Callable

import keras

ModelBuilder = Callable[..., keras.Model]


def _nfnet(input_shape: tuple, num_classes: int, variant: str = "F0", **kwargs) -> keras.Model:
    from tfdpfair.models import nfnet
    return nfnet.build_nfnet(variant, num_classes=num_classes, input_shape=input_shape, **kwargs)


def _wide_resnet(input_shape: tuple, num_classes: int, variant: str = "WRN-16-4",
                 **kwargs) -> keras.Model:
    from tfdpfair.models import wide_resnet
    return wide_resnet.build_wide_resnet(variant, num_classes=num_classes,
                                         input_shape=input_shape, **kwargs)


def simple_cnn(input_shape: tuple, num_classes: int, variant: str | None = None
               ) -> keras.Model:
    """A small conv net without normalisation layers (DP-safe): 16 and 32 ReLU 3×3 filters (the
    second with stride 2), global average pooling, a dense head named "head"."""
    if variant is not None:
        raise ValueError(f"simple_cnn has no variants, got {variant!r}.")
    inputs = keras.Input(input_shape, name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="stage0_conv")(inputs)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu",
                            name="stage1_conv")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="head")(h),
                       name="simple_cnn")


MODELS: dict[str, ModelBuilder] = {
    "nfnet": _nfnet, "wide_resnet": _wide_resnet, "simple_cnn": simple_cnn}


def split_name(short_name: str) -> tuple[str, str | None]:
    """"nfnet_F0" -> ("nfnet", "F0"); "simple_cnn" -> ("simple_cnn", None)."""
    if short_name in MODELS:
        return short_name, None
    for name in MODELS:
        if short_name.startswith(name + "_"):
            return name, short_name[len(name) + 1:]
    raise ValueError(f"unknown model {short_name!r}; known: {sorted(MODELS)}, or "
                     "'<name>_<variant>' such as 'nfnet_F0' or 'wide_resnet_WRN-16-4'.")


def build_model(name: str, input_shape: tuple, num_classes: int, variant: str | None = None,
                **kwargs: Any) -> keras.Model:
    """The untrained model ``name`` (a MODELS key, or the short form "<name>_<variant>")."""
    if name not in MODELS:
        name, short_variant = split_name(name)
        variant = variant or short_variant
    if variant is not None:
        kwargs["variant"] = variant
    return MODELS[name](tuple(input_shape), int(num_classes), **kwargs)
