"""Shared pieces of the experiment configs: argument parsing and the runtime section.

A config file defines ``get_config(arg=None)``; ``arg`` is the text after ``:`` in
``--config=tfdpfair/configs/<name>.py:runlocal=True,variant=F1`` (or the string passed to
``get_config`` in tests). Hyper-parameters live in each config file; this module holds only
structure and runtime-only values (logging / checkpoint cadence), which may change between a
run and its resumption.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """"runlocal=True,variant=F1" -> ConfigDict; keys must be among ``defaults``."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}.")
        try:
            values[key] = ast.literal_eval(text.strip()) if text else True
        except (ValueError, SyntaxError):
            values[key] = text.strip()
    return ml_collections.ConfigDict(values)


def runtime(steps_per_execution: int = 1, checkpoint_every_steps: int = 100,
            log_every_steps: int = 10, eval_every_steps: int | None = None,
            eval_batch_size: int = 256) -> ml_collections.ConfigDict:
    """config.train: cadence only (tfdpfair.trainer.workdir.RUNTIME_KEYS); never changes ε or results."""
    train = ml_collections.ConfigDict()
    train.steps_per_execution = steps_per_execution  # logical steps per compiled call
    train.checkpoint_every_steps = checkpoint_every_steps
    train.log_every_steps = log_every_steps
    train.eval_every_steps = config_dict.placeholder(int) if eval_every_steps is None \
        else eval_every_steps  # None: evaluate only at the end
    train.eval_batch_size = eval_batch_size
    return train


def tfds_data(name: str, eval_split: str, image_size: int,
              normalization: str) -> ml_collections.ConfigDict:
    """config.data for a TFDS image dataset (random access through TFDS ``data_source``)."""
    data = ml_collections.ConfigDict()
    data.name = name
    data.train_split = "train"
    data.eval_split = eval_split
    data.validation_split = config_dict.placeholder(str)
    data.image_size = image_size
    data.normalization = normalization  # "dataset": per-channel mean/std of the dataset
    data.data_dir = config_dict.placeholder(str)  # TFDS data_dir
    data.in_memory = False  # True: ArraySource, materialised in memory (TPU hosts)
    return data


def runlocal(config: ml_collections.ConfigDict, image_size: int,
             model: ml_collections.ConfigDict, augmult: int = 1) -> None:
    """The tiny ``:runlocal=True`` variant used by the tests: the same pipeline on small images
    and a tiny model, 2 DP steps of 4 examples at ε = 50, δ = 1e-3, checkpoint every step."""
    config.data.image_size = image_size
    config.model = model
    config.dp.target_epsilon = 50.0
    config.dp.delta = 1e-3
    config.dp.expected_batch_size = 4
    config.dp.micro_batch_size = 4
    config.dp.augmult = augmult
    config.dp.steps = 2
    config.train = runtime(checkpoint_every_steps=1, log_every_steps=1, eval_batch_size=8)


def dp_section(**values: Any) -> ml_collections.ConfigDict:
    """config.dp with every DPConfig field present (None placeholders where unset)."""
    dp = ml_collections.ConfigDict()
    dp.enabled = True
    dp.target_epsilon = config_dict.placeholder(float)
    dp.noise_multiplier = config_dict.placeholder(float)  # None: calibrated from the target ε
    dp.delta = config_dict.placeholder(float)  # None: N^-1.1 (accounting.default_delta)
    dp.delta_policy = config_dict.placeholder(str)  # "1/N": δ = 1/N once N is known
    dp.accountant = "rdp"
    dp.l2_norm_clip = 1.0
    dp.rescale_to_unit_norm = True
    dp.expected_batch_size = 256
    dp.micro_batch_size = 64  # physical batch: memory only, never changes ε
    dp.steps = config_dict.placeholder(int)  # T; or give epochs
    dp.epochs = config_dict.placeholder(float)
    dp.augmult = 1
    dp.augment_pad = 4  # augmult views: reflect-pad, random crop (shift ±pad), flip
    dp.augment_crop = True
    dp.augment_flip = True
    dp.privacy_unit = "example"  # or "patient" (all of a patient's images; N counts patients)
    dp.max_examples_per_patient = 1  # k images of a sampled patient per step ("patient" only)
    dp.clipping = "auto"  # execution only (same ε): ghost when the model is covered
    dp.ema_decay = config_dict.placeholder(float)
    dp.polyak = False
    dp.noise_seed = config_dict.placeholder(int)  # None: secret, from OS entropy (fix in tests)
    dp.sampling_seed = config_dict.placeholder(int)
    for key, value in values.items():
        if key not in dp:
            raise KeyError(f"config.dp has no field {key!r}.")
        dp[key] = value
    return dp


def sgd(learning_rate: float, momentum: float = 0.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": learning_rate, "momentum": momentum})


def adam(learning_rate: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": "adam", "learning_rate": learning_rate,
                                      "momentum": 0.0})


def schedule(name: str = "constant", warmup_steps: int = 0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, "warmup_steps": warmup_steps,
                                      "end_fraction": 0.0})


def model(name: str, variant: str | None, train: str = "all", init: str | None = None,
          from_scratch: bool = False, **kwargs: Any) -> ml_collections.ConfigDict:
    """config.model: registry name, variant, fine-tuning mode, initial weights, kwargs."""
    section = ml_collections.ConfigDict()
    section.name = name
    section.variant = variant
    section.train = train  # "all", "head" or "last_stages:N"
    section.init = config_dict.placeholder(str) if init is None else init
    section.from_scratch = from_scratch
    section.kwargs = ml_collections.ConfigDict(kwargs)
    return section


def non_private(enabled: bool, optimizer: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
    """config.non_private: the baseline (also run alone by --config.dp.enabled=False)."""
    section = ml_collections.ConfigDict()
    section.enabled = enabled
    section.optimizer = optimizer
    section.batch_size = config_dict.placeholder(int)  # None: dp.expected_batch_size
    section.steps = config_dict.placeholder(int)  # None: as many steps as the DP run
    return section


def patient_level(config: ml_collections.ConfigDict, images_per_patient: int = 4) -> None:
    """The patient-level variant (``:unit=patient``): one patient with all their images is the
    unit of privacy (tfdpfair/training/patients.py). No paper has published this setting, so
    every value here is our choice (UNPUBLISHED): k = 4 images of a sampled patient per step
    (CheXpert and MIMIC-CXR average about 3-4 images per patient), and the expected batch,
    now counted in patients, divided by 3 so a step still sees about as many images."""
    config.dp.privacy_unit = "patient"
    config.dp.max_examples_per_patient = images_per_patient
    config.dp.expected_batch_size = max(1, config.dp.expected_batch_size // 3)
