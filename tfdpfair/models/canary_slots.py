"""CanarySlots: trainable coordinates that no example's loss depends on (audit runs only).

``CanarySlots(num_slots)`` is an identity layer (``call(x) = x``) that owns one trainable
variable ``slots`` of shape [num_slots], initialised to zero, which its call never reads. Put it
in a model (:func:`with_canary_slots`) and DP-SGD trains ``slots`` like every other variable:
each logical step adds the step's noise N(0, σ²C²) to every slot (divided by B·s, through the
optimizer), but the per-example gradient of every real example on ``slots`` is exactly zero,
whatever the data and the weights, because the loss does not depend on it. A white-box audit
can therefore place one Dirac canary per slot (tfdpfair/audit/dirac.py): in that coordinate the
released update is noise plus the canary, and nothing else.

The model's predictions are unchanged (identity), so the audited model is the recipe's model
plus m extra, unused parameters. Ghost clipping has a rule for this exact class
(privacy/ghost_rules.py: per-example gradient zero, nothing recorded), so ``clipping="auto"``
keeps ghost clipping; vectorized clipping gets exact zeros (unconnected gradients are zero).
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tfdpfair")
class CanarySlots(keras.layers.Layer):
    """Identity on its input; owns ``slots`` [num_slots] (trainable, zeros, never read)."""

    def __init__(self, num_slots: int, **kwargs):
        super().__init__(**kwargs)
        if int(num_slots) < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}.")
        self.num_slots = int(num_slots)

    def build(self, input_shape=None):
        self.slots = self.add_weight(shape=(self.num_slots,), initializer="zeros",
                                     trainable=True, name="slots")
        self.built = True

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "num_slots": self.num_slots}


def with_canary_slots(model: keras.Model, num_slots: int) -> tuple[keras.Model, CanarySlots]:
    """(audited model, its CanarySlots): ``model`` followed by an identity CanarySlots layer.

    The audited model shares ``model``'s layers and variables and computes the same outputs; its
    trainable variables are ``model``'s followed by the slots. Single-input, single-output
    models only.
    """
    if not model.built:
        raise ValueError("build the model first (e.g. start it with keras.Input(shape)).")
    slots = CanarySlots(num_slots, name="canary_slots")
    inputs = keras.Input(tuple(model.input_shape[1:]), dtype=model.inputs[0].dtype)
    audited = keras.Model(inputs, slots(model(inputs)), name=f"{model.name}_with_canary_slots")
    return audited, slots
