"""The trainer's model, optimizer, schedule and loss registries (read from the config only).

  models      config.model.name (and .variant) -> models/registry.py MODELS: "nfnet" (F0…F7,
              nano, micro), "wide_resnet" (WRN-16-4, WRN-28-10, WRN-40-4), "simple_cnn";
              constructor kwargs from config.model.kwargs.
  OPTIMIZERS  config.optimizer.name -> keras optimizer: "sgd" (momentum 0 = plain SGD), "adam".
  SCHEDULES   config.schedule.name -> learning rate (a float or a keras schedule of the
              optimizer step, which DPModel advances once per logical step): "constant",
              "cosine" (with optional linear warm-up), "linear_warmup" (then constant).

Initial weights (config.model.init): None (from scratch; a fine-tuning config must say so with
``model.from_scratch=True``), a Haiku NFNet checkpoint ``*.npz`` (models/pretrained.py; the head
is reset when the class count differs, a 1-channel input adapts the stem), or a Keras
``*.weights.h5`` of the same architecture. Fine-tuning mode (config.model.train): "all",
"head" or "last_stages:N" (models/finetune.py).
"""

from __future__ import annotations

import os
from typing import Any

import keras

from tfdpfair.models import finetune, registry

def _kwargs(model_config: Any) -> dict[str, Any]:
    kwargs = model_config.get("kwargs", None)
    return {} if kwargs is None else dict(kwargs.to_dict() if hasattr(kwargs, "to_dict")
                                          else kwargs)


def build_model(model_config: Any, input_shape: tuple, num_classes: int) -> keras.Model:
    """The model named by ``model_config.name`` (models/registry.py MODELS), untrained."""
    if model_config.name not in registry.MODELS:
        raise ValueError(f"unknown model.name {model_config.name!r}; known: "
                         f"{sorted(registry.MODELS)}.")
    return registry.build_model(model_config.name, input_shape, num_classes,
                                variant=model_config.get("variant", None),
                                **_kwargs(model_config))


def load_initial_weights(model: keras.Model, model_config: Any) -> str:
    """Loads ``model_config.init`` into ``model``; returns a description for the report.

    Raises a clear error (before any privacy budget is spent) for a missing file, a
    checkpoint of another architecture, or a fine-tuning config without initial weights.
    """
    init = model_config.get("init", None)
    if init in (None, "", "None", "none"):  # flags cannot pass None: "None" means none
        init = None
    if init is None:
        if not model_config.get("from_scratch", False):
            raise ValueError(
                "config.model.init is not set: this config fine-tunes a pre-trained model. Pass "
                "--config.model.init=/path/to/F0_haiku.npz (or a Keras .weights.h5), or "
                "--config.model.from_scratch=True to train from random weights.")
        return "random initialisation (from scratch)"
    if init == "public_pretraining":
        return init  # the trainer pre-trains on the dataset's public split
    if not os.path.exists(init):
        raise FileNotFoundError(f"config.model.init={init!r} does not exist.")
    if init.endswith(".npz") or init.endswith(".pkl"):
        from tfdpfair.models import pretrained
        if model_config.name != "nfnet":
            raise ValueError(f"{init} is a Haiku NFNet checkpoint but model.name is "
                             f"{model_config.name!r}.")
        report = pretrained.load_haiku_checkpoint(
            model, init, head="reset" if _head_differs(model, init) else "load",
            adapt_input_channels=int(model.input_shape[-1]) == 1)
        return f"Haiku checkpoint {init} ({len(report.loaded)} tensors, head " \
               f"{'reset' if report.head_reset else 'loaded'})"
    try:
        model.load_weights(init)
    except Exception as err:  # Keras raises several types for a mismatch
        raise ValueError(f"config.model.init={init!r} does not fit model "
                         f"{model.name} ({type(err).__name__}: {err}); wrong architecture?"
                         ) from None
    return f"Keras weights {init}"


def _head_differs(model: keras.Model, path: str) -> bool:
    from tfdpfair.models import pretrained
    params = pretrained.read_haiku_params(path)
    bias = params.get(pretrained.HEAD_PREFIX + "b")
    return bias is None or bias.shape[0] != int(model.get_layer("head").units)


def set_trainable(model: keras.Model, mode: str) -> int:
    """"all", "head" or "last_stages:N"; returns the number of trained parameters."""
    if mode in ("all", "head"):
        return finetune.set_trainable(model, mode)
    if mode.startswith("last_stages:"):
        return finetune.set_trainable(model, ("last_stages", int(mode.split(":", 1)[1])))
    raise ValueError(f"unknown model.train {mode!r}: use all, head or last_stages:N.")


def make_schedule(schedule_config: Any, learning_rate: float, total_steps: int):
    """A learning rate or keras schedule of the optimizer step (one step = one logical step)."""
    name = schedule_config.name
    warmup = int(schedule_config.get("warmup_steps", 0) or 0)
    if name == "constant":
        return float(learning_rate)
    if name == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else learning_rate, decay_steps=max(1, total_steps - warmup),
            alpha=float(schedule_config.get("end_fraction", 0.0) or 0.0),
            warmup_target=learning_rate if warmup else None, warmup_steps=warmup)
    if name == "linear_warmup":
        return keras.optimizers.schedules.PolynomialDecay(
            1e-12 if warmup else learning_rate, max(1, warmup), learning_rate, power=1.0)
    raise ValueError(f"unknown schedule.name {name!r}: use constant, cosine or linear_warmup.")


def make_optimizer(optimizer_config: Any, schedule_config: Any,
                   total_steps: int) -> keras.optimizers.Optimizer:
    """SGD (with or without momentum) or Adam with the configured schedule."""
    rate = make_schedule(schedule_config, optimizer_config.learning_rate, total_steps)
    name = optimizer_config.name
    if name == "sgd":
        return keras.optimizers.SGD(rate, momentum=float(optimizer_config.get("momentum", 0.0)),
                                    nesterov=bool(optimizer_config.get("nesterov", False)))
    if name == "adam":
        return keras.optimizers.Adam(rate)
    raise ValueError(f"unknown optimizer.name {name!r}: use sgd or adam.")


def make_loss(task: str) -> keras.losses.Loss:
    """Softmax cross-entropy (multiclass) or per-task sigmoid cross-entropy (multilabel)."""
    if task == "multiclass":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return keras.losses.BinaryCrossentropy(from_logits=True)


def train_metrics(task: str) -> list:
    """Compiled (monitoring) metrics; under DP they are logged as nonprivate/*."""
    return ["accuracy"] if task == "multiclass" else []


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate at the optimizer's current step."""
    rate = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(rate))
