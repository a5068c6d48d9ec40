"""Name -> Keras model builders used by the experiment configs."""

from __future__ import annotations

import keras


def simple_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """A small conv net without normalisation layers (DP-safe), for tests and quick runs."""
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(num_classes, name="head")(h)
    return keras.Model(inputs, outputs, name="simple_cnn")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Builds the model named in ``config.model.name``."""
    if name == "simple_cnn":
        return simple_cnn(input_shape, num_classes)
    if name.startswith("nfnet_"):
        from tfdpfair.models import nfnet
        return nfnet.build_nfnet(name.removeprefix("nfnet_"), input_shape=input_shape,
                                 num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; use 'simple_cnn' or 'nfnet_<variant>'.")
