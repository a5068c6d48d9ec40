"""Demo: pre-train on the public digits, DP fine-tune on the private digits, compare to non-DP.

Runs in about two minutes on 2 CPU cores (`make demo`). Override any field, e.g.
  tfdpfair-train --config=demo --config.dp.target_epsilon=2
`--config=tfdpfair/configs/demo.py:runlocal=True` shrinks it to a few steps (tests).
Every value here is a choice for this toy task, not a published hyper-parameter.
"""

import ml_collections

from tfdpfair.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"
    config.data.public_fraction = 0.15  # pre-training data, not protected
    config.data.test_fraction = 0.2
    config.data.image_size = 8  # digits are 8x8 (16, 24, ... upsample them)

    # Pre-trained on the public split (cached in the workdir), then the last stage is tuned.
    config.model = common.model("nfnet", "nano", train="last_stages:1", init="public_pretraining",
                                drop_rate=0.1, stochdepth_rate=0.1)
    config.pretrain = ml_collections.ConfigDict(
        {"epochs": 25, "batch_size": 64, "learning_rate": 3e-3})  # Adam, public data only

    config.dp = common.dp_section(
        target_epsilon=4.0, l2_norm_clip=1.0, rescale_to_unit_norm=True,
        expected_batch_size=256, micro_batch_size=64, epochs=20.0, augmult=1,
        # Views for --config.dp.augmult=K: digits are 8x8 and not mirror-symmetric, so shift by
        # at most 1 pixel and never flip (pad 4 + flips turned 91% into 41% at augmult 4).
        augment_pad=1, augment_flip=False,
        ema_decay=0.9, polyak=True)
    config.optimizer = common.sgd(1.0)  # SGD, no momentum, constant LR on unit-norm updates
    config.schedule = common.schedule("constant")
    config.non_private = common.non_private(True, common.adam(1e-3))
    config.train = common.runtime(checkpoint_every_steps=25, log_every_steps=20,
                                  eval_every_steps=50)

    if args.runlocal:
        config.pretrain.epochs = 1
        config.dp.epochs = None
        config.dp.steps = 2
        config.dp.expected_batch_size = 64
        config.dp.micro_batch_size = 32
        config.train = common.runtime(checkpoint_every_steps=1, log_every_steps=1)
    return config
