"""Places-365, NFNet fine-tuned with DP-SGD (De et al. 2022): 55.1 % top-1 at ε = 8.

Published: ε = 8, C = 1 with unit-norm rescaling, SGD without momentum, constant LR, weight
decay 0, EMA. δ: the leaderboard entry gives 5e-7 (the paper's seeds say 8e-7 for
ImageNet/Places; we follow the leaderboard). UNVERIFIED: the model and its pre-training (we
assume NFNet-F3 pre-trained on JFT-4B, as for ImageNet). Every value marked UNPUBLISHED is
our choice. TFDS ``places365_small`` (256×256 images).
"""

import ml_collections

from tfdpfair.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, runlocal=False, epsilon=8.0, variant="F3")
    config = ml_collections.ConfigDict()
    config.seed = 0
    # 256 px: the native places365_small size; UNPUBLISHED.
    config.data = common.tfds_data("places365_small", "validation", 256, "imagenet")

    config.model = common.model("nfnet", args.variant, train="all")
    config.dp = common.dp_section(
        target_epsilon=float(args.epsilon), delta=5e-7, accountant="rdp",
        l2_norm_clip=1.0, rescale_to_unit_norm=True,
        expected_batch_size=16384, micro_batch_size=16, steps=2000,  # UNPUBLISHED
        augmult=4, ema_decay=0.9999, polyak=True)  # augmult UNPUBLISHED
    config.optimizer = common.sgd(4.0)  # UNPUBLISHED
    config.schedule = common.schedule("constant")
    config.non_private = common.non_private(False, common.sgd(0.1, momentum=0.9))  # UNPUBLISHED
    config.train = common.runtime(checkpoint_every_steps=20, log_every_steps=1,
                                  eval_every_steps=200, eval_batch_size=250)
    if args.runlocal:
        common.runlocal(config, 16, common.model("nfnet", "nano", train="last_stages:1",
                                                 from_scratch=True))
    return config
