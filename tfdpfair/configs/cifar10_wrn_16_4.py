"""CIFAR-10 from scratch, WRN-16-4 (De et al. 2022, arXiv 2204.13650; jax_privacy's released
config for this model).

Published: SGD without momentum, constant LR 2.0, weight decay 0, logical batch 4096,
T = 875 steps, C = 1 with updates rescaled to unit norm, σ = 10.0, δ = 1e-5, augmentation
multiplicity 16 (reflect-pad 4, random crop, flip), EMA 0.999; this gives ε ≈ 0.99 (RDP).
The paper's headline WRN-16-4 result, 79.5 ± 0.7 % at ε = 8, uses a different σ/T:
  --config.dp.noise_multiplier=None --config.dp.target_epsilon=8   (σ calibrated for T)
Architecture: WS convs + GroupNorm(16), pre-activation blocks (models/wide_resnet.py).
"""

import ml_collections

from tfdpfair.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = common.tfds_data("cifar10", "test", 32, "dataset")  # CIFAR-10 mean/std

    config.model = common.model("wide_resnet", "WRN-16-4", train="all", from_scratch=True)
    config.dp = common.dp_section(
        noise_multiplier=10.0, target_epsilon=1.0, delta=1e-5, accountant="rdp",
        l2_norm_clip=1.0, rescale_to_unit_norm=True, expected_batch_size=4096,
        micro_batch_size=64,  # memory only
        steps=875, augmult=16, ema_decay=0.999, polyak=False)
    config.optimizer = common.sgd(2.0)
    config.schedule = common.schedule("constant")
    config.non_private = common.non_private(False, common.sgd(0.1, momentum=0.9))  # UNPUBLISHED
    config.train = common.runtime(checkpoint_every_steps=25, log_every_steps=5,
                                  eval_every_steps=100, eval_batch_size=500)
    if args.runlocal:
        common.runlocal(config, 32, common.model("wide_resnet", (10, 1), train="all",
                                                 from_scratch=True), augmult=2)
        config.dp.noise_multiplier = None
        config.non_private.enabled = True
    return config
