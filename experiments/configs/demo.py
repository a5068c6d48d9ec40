"""Demo: pre-train on the public digits, DP fine-tune on the private digits, compare to non-DP.

Runs in a few minutes on 2 CPU cores. Override any field from the command line, e.g.
  python -m experiments.train --config=experiments/configs/demo.py --config.dp.target_epsilon=2
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"
    config.data.public_fraction = 0.15  # pre-training data, not protected
    config.data.test_fraction = 0.2
    config.data.image_size = 8  # digits are 8x8 (16, 24, ... upsample them)

    config.model = ml_collections.ConfigDict()
    config.model.name = "nfnet_nano"  # see experiments/model_factory.py
    config.model.train = "last_stages:1"  # "all", "head", or "last_stages:N" (DP and non-DP)

    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.epochs = 25
    config.pretrain.batch_size = 64
    config.pretrain.learning_rate = 3e-3  # Adam

    config.dp = ml_collections.ConfigDict()
    config.dp.enabled = True
    config.dp.target_epsilon = 4.0
    config.dp.noise_multiplier = config_dict.placeholder(float)  # None: calibrated from ε
    config.dp.delta = config_dict.placeholder(float)  # None: N^-1.1 (accounting.default_delta)
    config.dp.accountant = "rdp"
    config.dp.l2_norm_clip = 1.0
    config.dp.rescale_to_unit_norm = True
    config.dp.expected_batch_size = 256
    config.dp.micro_batch_size = 64
    config.dp.epochs = 20.0
    config.dp.augmult = 1
    config.dp.noise_seed = config_dict.placeholder(int)  # None: secret, from OS entropy
    config.dp.sampling_seed = config_dict.placeholder(int)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # the papers: SGD, no momentum, constant learning rate
    config.optimizer.learning_rate = 1.0  # on unit-norm updates
    config.optimizer.momentum = 0.0

    config.non_private = ml_collections.ConfigDict()
    config.non_private.enabled = True
    config.non_private.learning_rate = 1e-3  # Adam, same batch size and epochs as DP
    return config
