"""tfdpfair.models: DP-safe image classifiers (NFNets, GroupNorm WideResNets) and checks.

Main entry points:
  build_nfnet(variant, num_classes, input_shape, …)     NFNet-F0…F7, "nano", "micro"
  build_wide_resnet(variant, num_classes, input_shape)  WRN-16-4 / 28-10 / 40-4
  set_trainable(model, "all" | "head" | ("last_stages", n)), backbone(model), reset_head(…)
  check_dp_compatible(model), find_example_mixing_layers(model)
  check_training_call_is_stateless(model, input_shape=None)   behavioural state probe
  replace_batch_norm_with_group_norm(model, groups, return_report=False), freeze_batch_norm
  load_haiku_checkpoint(model, path), load_pretrained_nfnet(variant, path, num_classes)
"""

from tfdpfair.models.finetune import (
    backbone, count_trainable_params, reset_head, set_trainable)
from tfdpfair.models.layers import (
    GELU_GAMMA, RELU_GAMMA, PerExampleDropout, ScaledActivation, SqueezeExcite,
    StochasticDepth, WSConv2D)
from tfdpfair.models.nfnet import (
    VARIANTS as NFNET_VARIANTS, NFBlock, NFNetConfig, block_specs, build_nfnet, nfnet_blocks)
from tfdpfair.models.pretrained import (
    CheckpointError, LoadReport, load_haiku_checkpoint, load_pretrained_nfnet,
    read_haiku_params)
from tfdpfair.models.validate import (
    DPIncompatibleModelError, ExampleMixingLayer, GroupNormChange, GroupNormReport,
    check_dp_compatible, check_training_call_is_stateless, find_example_mixing_layers,
    freeze_batch_norm, replace_batch_norm_with_group_norm)
from tfdpfair.models.wide_resnet import WRN_VARIANTS, WideResNetBlock, build_wide_resnet

__all__ = [
    "GELU_GAMMA", "RELU_GAMMA", "NFNET_VARIANTS", "WRN_VARIANTS",
    "CheckpointError", "DPIncompatibleModelError", "ExampleMixingLayer", "GroupNormChange",
    "GroupNormReport", "LoadReport",
    "NFBlock", "NFNetConfig", "PerExampleDropout", "ScaledActivation", "SqueezeExcite",
    "StochasticDepth", "WSConv2D", "WideResNetBlock",
    "backbone", "block_specs", "build_nfnet", "build_wide_resnet", "check_dp_compatible",
    "check_training_call_is_stateless",
    "count_trainable_params", "find_example_mixing_layers", "freeze_batch_norm",
    "load_haiku_checkpoint", "load_pretrained_nfnet", "nfnet_blocks", "read_haiku_params",
    "replace_batch_norm_with_group_norm", "reset_head", "set_trainable",
]
