"""Wide ResNets for DP training from scratch (De et al. 2022): WS convs + GroupNorm(16).

WRN-d-k (Zagoruyko & Komodakis 2016) with the DP modifications of De et al. 2022:
  * every convolution is a weight-standardised ``WSConv2D`` (no batch statistics anywhere);
  * normalisation is GroupNorm with 16 groups (per example, so DP-safe);
  * pre-activation residual blocks, in the order of the authors' code: act → norm → conv.

Structure: stem conv 3×3 (16 channels); 3 stages of n = (d − 4)/6 blocks with widths
(16k, 32k, 64k) and strides (1, 2, 2); final act → GroupNorm → global mean pool → Dense.
Block i of a stage computes
    y = conv3×3(norm(act(conv3×3_s(norm(act(x)))))) · g + skip,
with skip = conv1×1_s(norm(act(x))) for the first block of a stage and skip = x otherwise,
and g a learnable SkipInit scalar (init 0) only if ``use_skip_init`` (off by default, as in
the authors' CIFAR-10 configs).
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf

from tfdpfair.models.layers import PerExampleDropout, WSConv2D
from tfdpfair.models.finetune import head_initializer

WRN_VARIANTS: dict[str, tuple[int, int]] = {
    "WRN-16-4": (16, 4),
    "WRN-28-10": (28, 10),
    "WRN-40-4": (40, 4),
}
"""Named variants as (depth d, widening factor k)."""


def _activation(name: str):
    """relu / gelu / identity by name (unscaled: GroupNorm re-normalises anyway)."""
    table = {"relu": tf.nn.relu, "gelu": tf.nn.gelu, "identity": tf.identity}
    if name not in table:
        raise ValueError(f"Unknown activation '{name}'; expected one of {sorted(table)}.")
    return table[name]


@keras.saving.register_keras_serializable(package="tfdpfair")
class WideResNetBlock(keras.layers.Layer):
    """Pre-activation WRN block with GroupNorm and WS convs (see the module docstring)."""

    def __init__(
        self, width: int, stride: int = 1, project: bool = False, groups: int = 16,
        activation: str = "relu", use_skip_init: bool = False, **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.width, self.stride, self.project = int(width), int(stride), bool(project)
        self.groups, self.activation = int(groups), activation
        self.use_skip_init = bool(use_skip_init)
        self._act = _activation(activation)

    def build(self, input_shape: tuple) -> None:
        in_ch = int(input_shape[-1])
        if not self.project and (self.stride > 1 or in_ch != self.width):
            raise ValueError(
                f"Block '{self.name}' changes shape (stride {self.stride}, {in_ch}→"
                f"{self.width} channels) and needs project=True.")
        gn = lambda n: keras.layers.GroupNormalization(self.groups, name=n)  # noqa: E731
        self.norm0, self.norm1 = gn("norm0"), gn("norm1")
        self.conv0 = WSConv2D(self.width, 3, strides=self.stride, name="conv0")
        self.conv1 = WSConv2D(self.width, 3, name="conv1")
        self.norm0.build((None, None, None, in_ch))
        self.conv0.build((None, None, None, in_ch))
        self.norm1.build((None, None, None, self.width))
        self.conv1.build((None, None, None, self.width))
        if self.project:
            self.skip_norm = gn("skip_norm")
            self.skip_conv = WSConv2D(self.width, 1, strides=self.stride, name="skip_conv")
            self.skip_norm.build((None, None, None, in_ch))
            self.skip_conv.build((None, None, None, in_ch))
        if self.use_skip_init:
            self.skip_gain = self.add_weight(name="skip_gain", shape=(), initializer="zeros")

    def branch_and_shortcut(self, inputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(r, skip) with call(x) = r·skip_gain + skip (or r + skip without SkipInit)."""
        skip = inputs
        if self.project:
            skip = self.skip_conv(self.skip_norm(self._act(inputs)))
        out = self.conv0(self.norm0(self._act(inputs)))
        return self.conv1(self.norm1(self._act(out))), skip

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        out, skip = self.branch_and_shortcut(inputs)
        if self.use_skip_init:
            out = out * self.skip_gain
        return out + skip

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        def out_dim(d):
            return None if d is None else -(-d // self.stride)

        return (input_shape[0], out_dim(input_shape[1]), out_dim(input_shape[2]), self.width)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(), "width": self.width, "stride": self.stride,
            "project": self.project, "groups": self.groups, "activation": self.activation,
            "use_skip_init": self.use_skip_init,
        }


def _resolve_variant(variant: str | tuple[int, int]) -> tuple[int, int]:
    """(depth, width) from a name like "WRN-16-4" or a (depth, width) tuple."""
    if isinstance(variant, str):
        if variant not in WRN_VARIANTS:
            raise ValueError(f"Unknown WRN variant '{variant}'; known: {sorted(WRN_VARIANTS)}.")
        return WRN_VARIANTS[variant]
    depth, width = variant
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4, got {depth}.")
    return int(depth), int(width)


def build_wide_resnet(
    variant: str | tuple[int, int] = "WRN-16-4",
    num_classes: int = 10,
    input_shape: Sequence[int | None] = (32, 32, 3),
    groups: int = 16,
    activation: str = "relu",
    drop_rate: float = 0.0,
    use_skip_init: bool = False,
    head_init: str = "zeros",
    name: str | None = None,
) -> keras.Model:
    """Builds WRN-d-k with GroupNorm(``groups``) and WS convs as a functional Keras model.

    Args:
      variant: "WRN-16-4", "WRN-28-10", "WRN-40-4" or (depth, width) with depth = 6n + 4.
      num_classes: number of logits.
      input_shape: (H, W, C) without batch.
      groups: GroupNorm groups (16 in De et al. 2022); must divide 16·width.
      activation: "relu" (default), "gelu" or "identity".
      drop_rate: dropout on the pooled features (0 in the authors' configs).
      use_skip_init: multiply each residual branch by a learnable scalar initialised to 0.
      head_init: "zeros" or "normal".
      name: model name (default "wrn_{d}_{k}").

    Layer names follow tfdpfair.models.finetune: stem_conv, stage{s}_block{b}, final_act,
    final_norm, pool, head_dropout, head.
    """
    depth, width = _resolve_variant(variant)
    blocks_per_stage = (depth - 4) // 6
    _activation(activation)  # validates the name
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = WSConv2D(16, 3, name="stem_conv")(inputs)
    for stage, (channels, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
        for b in range(blocks_per_stage):
            x = WideResNetBlock(
                channels * width, stride=stride if b == 0 else 1, project=b == 0,
                groups=groups, activation=activation, use_skip_init=use_skip_init,
                name=f"stage{stage}_block{b}")(x)
    x = keras.layers.Activation(
        "linear" if activation == "identity" else activation, name="final_act")(x)
    x = keras.layers.GroupNormalization(groups, name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = PerExampleDropout(drop_rate, name="head_dropout")(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=head_initializer(head_init), name="head")(x)
    return keras.Model(inputs, logits, name=name or f"wrn_{depth}_{width}")
