"""MIMIC-CXR-JPG, NFNet-F0 fine-tuned with DP-SGD (Berrada, De, Shen et al. 2023).

Published (paper / its seeds): C = 0.001 with unit-norm rescaling, δ = 1/N, SGD without
momentum, constant learning rate, EMA, uncertain and blank labels -> 0, the official
MIMIC-CXR-JPG split, demographics (sex, age, race, insurance) from MIMIC-IV. The configs were
never released: values marked UNPUBLISHED are our choice (as for CheXpert).

  tfdpfair-train --config=mimic_cxr_nfnet_f0 \
      --config.data.root=/data/mimic-cxr-jpg/2.0.0 --config.data.mimic_iv_dir=/data/mimiciv/2.2 \
      --config.model.init=/ckpt/F0_haiku.npz --workdir=runs/mimic_f0_eps8
"""

import ml_collections

from tfdpfair.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, runlocal=False, epsilon=8.0, unit="example")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict()
    config.data.name = "mimic_cxr"
    config.data.root = ml_collections.config_dict.placeholder(str)  # MIMIC-CXR-JPG
    config.data.mimic_iv_dir = ml_collections.config_dict.placeholder(str)  # hosp/*.csv.gz
    config.data.image_size = 224  # UNPUBLISHED
    config.data.channels = 3
    config.data.normalization = "imagenet"
    config.data.verify_images = True  # decode every image of every split before the plan
    config.data.on_bad = "error"  # a bad file stops the run; "skip" drops it before N counts
    config.data.uncertain_policy = "zeros"  # published: uncertain and blank -> 0

    # Dropout and stochastic depth: the NFNet paper's F0 values. Initial weights: pass
    # --config.model.init=/path/to/F0_haiku.npz.
    config.model = common.model("nfnet", "F0", train="all", drop_rate=0.2, stochdepth_rate=0.1)
    config.dp = common.dp_section(
        target_epsilon=float(args.epsilon), delta_policy="1/N", accountant="rdp",
        l2_norm_clip=1e-3, rescale_to_unit_norm=True,  # published (C = 0.001)
        expected_batch_size=4096, micro_batch_size=32, steps=1000,  # UNPUBLISHED
        augmult=1, ema_decay=0.9999, polyak=True,  # augmult UNPUBLISHED; EMA from the seeds
        augment_pad=8, augment_flip=False)  # views UNPUBLISHED: shifts, no flips (anatomy)
    config.optimizer = common.sgd(1.0)  # published: SGD, no momentum; LR UNPUBLISHED
    config.schedule = common.schedule("constant")
    config.non_private = common.non_private(False, common.sgd(0.1, momentum=0.9))  # UNPUBLISHED
    config.train = common.runtime(checkpoint_every_steps=50, log_every_steps=10,
                                  eval_every_steps=250, eval_batch_size=64)
    if args.unit == "patient":
        common.patient_level(config)
    if args.runlocal:
        config.data.image_size = 16
        config.model = common.model("nfnet", "nano", train="all", from_scratch=True)
        config.dp.expected_batch_size = 3
        config.dp.micro_batch_size = 4
        config.dp.steps = 2
        config.dp.target_epsilon = 50.0
        config.non_private.enabled = True
        config.train = common.runtime(checkpoint_every_steps=1, log_every_steps=1,
                                      eval_batch_size=8)
        if args.unit == "patient":
            config.dp.expected_batch_size = 2
    return config
