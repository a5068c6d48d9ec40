"""CIFAR-100, WRN-28-10 pre-trained on ImageNet-32, fine-tuned with DP-SGD (De et al. 2022;
jax_privacy's released config).

Published: SGD without momentum, constant LR 1.0, weight decay 0, logical batch 16384,
T = 250 steps, C = 1 with unit-norm rescaling, σ = 21.1, δ = 1e-5, augmult 16, EMA 0.9;
ε ≈ 1.0 (RDP). Images are used at 32×32.
The ImageNet-32 pre-trained WRN-28-10 is not distributed in a format we read: give a Keras
``.weights.h5`` of models/wide_resnet.py's WRN-28-10 (100-class head) as
--config.model.init. UNPUBLISHED here: which layers are fine-tuned (we train all) and the
non-private baseline's optimizer.
"""

import ml_collections

from tfdpfair.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = common.tfds_data("cifar100", "test", 32, "dataset")

    config.model = common.model("wide_resnet", "WRN-28-10", train="all")
    config.dp = common.dp_section(
        noise_multiplier=21.1, target_epsilon=1.0, delta=1e-5, accountant="rdp",
        l2_norm_clip=1.0, rescale_to_unit_norm=True, expected_batch_size=16384,
        micro_batch_size=32, steps=250, augmult=16, ema_decay=0.9, polyak=False)
    config.optimizer = common.sgd(1.0)
    config.schedule = common.schedule("constant")
    config.non_private = common.non_private(False, common.sgd(0.01, momentum=0.9))
    config.train = common.runtime(checkpoint_every_steps=10, log_every_steps=1,
                                  eval_every_steps=50, eval_batch_size=500)
    if args.runlocal:
        common.runlocal(config, 32, common.model("wide_resnet", (10, 1), train="last_stages:1",
                                                 from_scratch=True), augmult=2)
        config.dp.noise_multiplier = None
    return config
