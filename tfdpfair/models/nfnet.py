"""NFNet-F0…F7 (Brock, De, Smith, Simonyan 2021) and small variants, as Keras 3 models.

Architecture (one config drives every variant):
  stem    4 WS convs 3×3 (stem_widths…, widths[0]/2) with scaled activations in between;
  body    4 stages of NF bottleneck blocks (``NFBlock``), stage strides (1, 2, 2, 2);
  final   1×1 WS conv to final_conv_mult · widths[-1] channels, activation, global mean pool;
  head    dropout (per variant) and a Dense classifier, zero-initialised by default.

Signal propagation. Block l computes
    x_{l+1} = α · skip_gain_l · f_l(β_l · act(x_l)) + shortcut_l,
with β_l = 1/σ_l and σ_l the expected std of x_l at initialisation: σ_0 = 1, σ² grows by α²
per block, and after a transition block (the first of each stage, whose shortcut is a
projection of the normalised input) it restarts at σ² = 1 + α². The residual branch f_l has
unit variance at init, so each block's branch sees an ≈ N(0, 1) input. SkipInit: skip_gain is
a learnable scalar initialised to 0, so every block starts as the identity on its shortcut.
Stochastic depth rate of block l (of L) is stochdepth_rate · l / L.

The published F-variants use the NFNet paper's values (widths [256, 512, 1536, 1536], depths
[1, 2, 6, 3]·N for FN−1, group width 128, bottleneck ratio 0.5, SE ratio 0.5, α = 0.2,
stochastic depth 0.1, dropout 0.2…0.5); "nano" and "micro" are small CPU variants built by the
same code for 8×8 … 32×32 images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import keras
import tensorflow as tf

from tfdpfair.models.finetune import (  # noqa: F401 (the fine-tuning helpers re-exported)
    backbone, head_initializer, reset_head, set_trainable)
from tfdpfair.models.layers import (
    PerExampleDropout, ScaledActivation, SqueezeExcite, StochasticDepth, WSConv2D,
    scaled_activation)


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
    """Everything that defines an NFNet variant (see the module docstring for the maths)."""

    name: str
    widths: tuple[int, ...] = (256, 512, 1536, 1536)
    depths: tuple[int, ...] = (1, 2, 6, 3)
    group_width: int = 128
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5
    alpha: float = 0.2
    stochdepth_rate: float = 0.1
    drop_rate: float = 0.2
    stem_widths: tuple[int, ...] = (16, 32, 64)
    stem_strides: tuple[int, ...] = (2, 1, 1, 2)
    stage_strides: tuple[int, ...] = (1, 2, 2, 2)
    final_conv_mult: int = 2
    activation: str = "gelu"
    train_resolution: int = 192
    test_resolution: int = 256

    def __post_init__(self):
        if not len(self.widths) == len(self.depths) == len(self.stage_strides):
            raise ValueError("widths, depths and stage_strides must have the same length.")
        if len(self.stem_strides) != len(self.stem_widths) + 1:
            raise ValueError("stem_strides needs one entry per stem conv (len(stem_widths)+1).")


def _f_variant(n: int, train: int, test: int, drop: float) -> NFNetConfig:
    return NFNetConfig(
        name=f"F{n}", depths=tuple(d * (n + 1) for d in (1, 2, 6, 3)), drop_rate=drop,
        train_resolution=train, test_resolution=test)


VARIANTS: dict[str, NFNetConfig] = {
    "F0": _f_variant(0, 192, 256, 0.2),
    "F1": _f_variant(1, 224, 320, 0.3),
    "F2": _f_variant(2, 256, 352, 0.4),
    "F3": _f_variant(3, 320, 416, 0.4),
    "F4": _f_variant(4, 384, 512, 0.5),
    "F5": _f_variant(5, 416, 544, 0.5),
    "F6": _f_variant(6, 448, 576, 0.5),
    "F7": _f_variant(7, 480, 608, 0.5),
    # CPU-sized variants (not from the paper): same code, tiny widths, no stem downsampling
    # for 8×8 / 16×16 inputs ("nano") and one stem downsampling for 16×16 … 32×32 ("micro").
    "nano": NFNetConfig(
        name="nano", widths=(16, 32, 64, 64), depths=(1, 1, 1, 1), group_width=8,
        stem_widths=(8, 8, 16), stem_strides=(1, 1, 1, 1), drop_rate=0.1,
        train_resolution=16, test_resolution=16),
    "micro": NFNetConfig(
        name="micro", widths=(32, 64, 128, 128), depths=(1, 2, 2, 1), group_width=16,
        stem_widths=(16, 16, 32), stem_strides=(1, 1, 1, 2), drop_rate=0.1,
        train_resolution=32, test_resolution=32),
}


def get_config(variant: str | NFNetConfig, **overrides: Any) -> NFNetConfig:
    """The :class:`NFNetConfig` of a named variant, with optional field overrides."""
    if isinstance(variant, NFNetConfig):
        config = variant
    elif variant in VARIANTS:
        config = VARIANTS[variant]
    else:
        raise ValueError(f"Unknown NFNet variant '{variant}'; known: {sorted(VARIANTS)}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **overrides) if overrides else config


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one NF block: where it is and its init-time scalars."""

    stage: int
    index: int  # global block index, 0-based
    in_channels: int
    out_channels: int
    stride: int
    beta: float
    expected_var_in: float  # σ_l², the expected variance of the block input at init
    stochdepth_rate: float


def block_specs(config: NFNetConfig) -> list[BlockSpec]:
    """β_l, σ_l², strides, widths and stochastic depth rate for every block (module docstring)."""
    specs = []
    expected_var = 1.0
    channels = config.widths[0] // 2
    num_blocks = sum(config.depths)
    for stage, (width, depth, stride) in enumerate(
            zip(config.widths, config.depths, config.stage_strides)):
        for b in range(depth):
            index = len(specs)
            specs.append(BlockSpec(
                stage=stage, index=index, in_channels=channels, out_channels=width,
                stride=stride if b == 0 else 1, beta=expected_var ** -0.5,
                expected_var_in=expected_var,
                stochdepth_rate=config.stochdepth_rate * index / num_blocks))
            channels = width
            expected_var = (1.0 if b == 0 else expected_var) + config.alpha ** 2
    return specs


@keras.saving.register_keras_serializable(package="tfdpfair")
class NFBlock(keras.layers.Layer):
    """NF bottleneck block: 1×1 → grouped 3×3 → grouped 3×3 → 1×1, SE, SkipInit gain.

    out = α · skip_gain · SD(SE(conv2(act(conv1b(act(conv1(act(conv0(h))))))))) + shortcut,
    h = β · act(x); shortcut = x, or conv_shortcut(avgpool2×2(h) if strided else h) when the
    stride or the channel count changes. Bottleneck width = group_width · ⌊ratio·C_out /
    group_width⌋ (at least one group).
    """

    def __init__(
        self, out_channels: int, stride: int = 1, beta: float = 1.0, alpha: float = 0.2,
        group_width: int = 128, bottleneck_ratio: float = 0.5, se_ratio: float = 0.5,
        stochdepth_rate: float = 0.0, activation: str = "gelu", stage: int = 0,
        index: int = 0, **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.out_channels, self.stride = int(out_channels), int(stride)
        self.beta, self.alpha = float(beta), float(alpha)
        self.group_width, self.bottleneck_ratio = int(group_width), float(bottleneck_ratio)
        self.se_ratio, self.stochdepth_rate = float(se_ratio), float(stochdepth_rate)
        self.activation, self.stage, self.index = activation, int(stage), int(index)
        groups = max(1, int(self.out_channels * self.bottleneck_ratio) // self.group_width)
        self.groups, self.width = groups, groups * self.group_width

    def build(self, input_shape: tuple) -> None:
        in_ch = int(input_shape[-1])
        self.use_projection = self.stride > 1 or in_ch != self.out_channels
        w, g = self.width, self.groups
        self.conv0 = WSConv2D(w, 1, name="conv0")
        self.conv1 = WSConv2D(w, 3, strides=self.stride, groups=g, name="conv1")
        self.conv1b = WSConv2D(w, 3, groups=g, name="conv1b")
        self.conv2 = WSConv2D(self.out_channels, 1, name="conv2")
        self.se = SqueezeExcite(self.se_ratio, name="squeeze_excite")
        self.stoch_depth = StochasticDepth(self.stochdepth_rate, name="stoch_depth")
        shapes = [(None, None, None, c) for c in (in_ch, w, w, w, self.out_channels)]
        for layer, shape in zip((self.conv0, self.conv1, self.conv1b, self.conv2, self.se),
                                shapes):
            layer.build(shape)
        if self.use_projection:
            self.conv_shortcut = WSConv2D(self.out_channels, 1, name="conv_shortcut")
            self.conv_shortcut.build((None, None, None, in_ch))
        self.skip_gain = self.add_weight(name="skip_gain", shape=(), initializer="zeros")

    def residual_branch(self, normalized: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        """f(h) before stochastic depth and the skip gain; ``normalized`` is h = β·act(x)."""
        act = lambda t: scaled_activation(self.activation, t)  # noqa: E731
        out = self.conv0(normalized)
        out = self.conv1(act(out))
        out = self.conv1b(act(out))
        out = self.conv2(act(out))
        return self.se(out)

    def branch_and_shortcut(self, inputs: tf.Tensor, training: bool | None = None
                            ) -> tuple[tf.Tensor, tf.Tensor]:
        """(r, shortcut) with call(x) = r·(skip_gain·α) + shortcut; r after stochastic depth.

        Ghost clipping (privacy/ghost_rules.py) reads r to form ∂l/∂skip_gain = α·Σ r·δ.
        """
        normalized = scaled_activation(self.activation, inputs) * self.beta
        shortcut = inputs
        if self.stride > 1:
            shortcut = tf.nn.avg_pool2d(normalized, 2, 2, "SAME")
        elif self.use_projection:
            shortcut = normalized
        if self.use_projection:
            shortcut = self.conv_shortcut(shortcut)
        return self.stoch_depth(self.residual_branch(normalized), training=training), shortcut

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        branch, shortcut = self.branch_and_shortcut(inputs, training=training)
        return branch * (self.skip_gain * self.alpha) + shortcut

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        def out_dim(d):
            return None if d is None else -(-d // self.stride)

        return (input_shape[0], out_dim(input_shape[1]), out_dim(input_shape[2]),
                self.out_channels)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(), "out_channels": self.out_channels, "stride": self.stride,
            "beta": self.beta, "alpha": self.alpha, "group_width": self.group_width,
            "bottleneck_ratio": self.bottleneck_ratio, "se_ratio": self.se_ratio,
            "stochdepth_rate": self.stochdepth_rate, "activation": self.activation,
            "stage": self.stage, "index": self.index,
        }


def _stem(x: keras.KerasTensor, config: NFNetConfig) -> keras.KerasTensor:
    """4 WS convs 3×3 with scaled activations between them (none after the last)."""
    widths = tuple(config.stem_widths) + (config.widths[0] // 2,)
    for i, (width, stride) in enumerate(zip(widths, config.stem_strides)):
        if i > 0:
            x = ScaledActivation(config.activation, name=f"stem_act{i - 1}")(x)
        x = WSConv2D(width, 3, strides=stride, name=f"stem_conv{i}")(x)
    return x


def _body(x: keras.KerasTensor, config: NFNetConfig) -> keras.KerasTensor:
    """All NF blocks, named "stage{s}_block{b}", with β and SD rates from :func:`block_specs`."""
    specs = block_specs(config)
    for spec in specs:
        first_index = min(s.index for s in specs if s.stage == spec.stage)
        x = NFBlock(
            spec.out_channels, stride=spec.stride, beta=spec.beta, alpha=config.alpha,
            group_width=config.group_width, bottleneck_ratio=config.bottleneck_ratio,
            se_ratio=config.se_ratio, stochdepth_rate=spec.stochdepth_rate,
            activation=config.activation, stage=spec.stage, index=spec.index,
            name=f"stage{spec.stage}_block{spec.index - first_index}")(x)
    return x


def build_nfnet(
    variant: str | NFNetConfig = "F0",
    num_classes: int = 1000,
    input_shape: Sequence[int | None] = (None, None, 3),
    drop_rate: float | None = None,
    stochdepth_rate: float | None = None,
    head_init: str = "zeros",
    name: str | None = None,
) -> keras.Model:
    """Builds an NFNet as a functional Keras model (logits, no softmax).

    Args:
      variant: "F0"…"F7", "nano", "micro", or an :class:`NFNetConfig`.
      num_classes: number of logits.
      input_shape: (H, W, C) without batch; H, W may be None.
      drop_rate: dropout before the head (None: the variant's value; 0 disables it).
      stochdepth_rate: maximal stochastic depth rate (None: the variant's; 0 disables it).
      head_init: "zeros" or "normal" (see :func:`head_initializer`).
      name: model name (default "nfnet_<variant>").

    Layer names: stem_conv{0..3}, stage{s}_block{b}, final_conv, pool, head_dropout, head.
    """
    config = get_config(variant, drop_rate=drop_rate, stochdepth_rate=stochdepth_rate)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _body(_stem(inputs, config), config)
    x = WSConv2D(config.final_conv_mult * config.widths[-1], 1, name="final_conv")(x)
    x = ScaledActivation(config.activation, name="final_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = PerExampleDropout(config.drop_rate, name="head_dropout")(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=head_initializer(head_init), name="head")(x)
    return keras.Model(inputs, logits, name=name or f"nfnet_{config.name.lower()}")


def nfnet_blocks(model: keras.Model) -> list[NFBlock]:
    """The model's NF blocks in forward order (sorted by their global index)."""
    blocks = [layer for layer in model.layers if isinstance(layer, NFBlock)]
    return sorted(blocks, key=lambda block: block.index)
