"""Checks that run before a DP run spends any budget, and refusals of Keras usage DP forbids.

Every check here runs on the host before the first logical step, so a bad input fails while ε is
still 0. Error messages state counts and shapes, never the value of a private example or label
(DESIGN.md invariant 6).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import keras
import numpy as np
import tensorflow as tf

from tfdpfair.training import held_out
from tfdpfair.training.input_pipeline import TrainingData

PUBLIC_LOG_KEYS = ("epsilon", "logical_steps")


class DPUsageError(ValueError):
    """A Keras feature used in a way that would break the DP guarantee."""


def check_callbacks(callbacks: Iterable[keras.callbacks.Callback]) -> None:
    """Refuses callbacks that *act* on un-noised training statistics.

    EarlyStopping, ReduceLROnPlateau and ModelCheckpoint(save_best_only=True) choose what
    happens next (stop, change the learning rate, which weights to keep) from the value they
    monitor. Training loss, accuracy and clip fraction are computed on private data without
    noise, so a decision taken from them is a release that no accountant counts. Monitoring a
    validation metric (held-out or public data) or ``epsilon`` is fine.
    """
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor is None:
            continue
        acts = not isinstance(callback, keras.callbacks.ModelCheckpoint) or getattr(
            callback, "save_best_only", False)
        if acts and not (str(monitor).startswith("val_") or monitor in PUBLIC_LOG_KEYS):
            raise DPUsageError(
                f"{type(callback).__name__}(monitor={monitor!r}) would act on a statistic of the "
                "private training data that has no noise (training metrics are logged as "
                "'nonprivate_*' for monitoring only), and that decision is not covered by the "
                "privacy accounting. Monitor a validation metric instead, e.g. "
                "monitor='val_loss' with validation_data held out from (or public next to) the "
                "private training set.")


def check_validation_is_held_out(data: TrainingData, validation_data: Any) -> None:
    """Refuses validation inputs that repeat rows of the private training inputs (by content).

    ``val_*`` metrics are what callbacks may act on; computed on training rows they would be
    un-noised private statistics under a public name. Rows are compared by value, so copies,
    tensors, subsets and shuffles of the training arrays are caught (training/held_out.py). The
    message gives only the number of repeated rows. What cannot be checked is named in a
    warning: training inputs not held in memory (an IndexedSource), and validation data that is
    not arrays/tensors or a finite tf.data.Dataset (generators, PyDataset).
    """
    if validation_data is None:
        return
    if data.inputs is None:
        warnings.warn("validation_data was not checked for copies of training rows: the "
                      "training inputs are not held in memory as an array (an IndexedSource). "
                      "Make sure it is a held-out split.", UserWarning, stacklevel=3)
        return
    train = np.asarray(data.inputs)
    val, why = held_out.validation_inputs(validation_data, train.shape[1:])
    if val is None:
        warnings.warn(f"validation_data was not checked for copies of training rows ({why}). "
                      "Make sure it is a held-out split.", UserWarning, stacklevel=3)
        return
    repeated = held_out.count_rows_in_training(train, val)
    if repeated:
        raise DPUsageError(
            f"{repeated} of the {len(val)} validation rows are identical to rows of the private "
            "training inputs: val_* metrics computed on training data are un-noised private "
            "statistics, and callbacks act on them. Pass a held-out split (or public data) as "
            "validation_data, without the repeated rows.")


def check_precision_policy(model: keras.Model, optimizer: Any) -> None:
    """Refuses ``mixed_float16``: dynamic loss scaling is a data-dependent, un-noised decision.

    Keras wraps the optimizer in a LossScaleOptimizer, which skips a step and shrinks the scale
    whenever the (private) gradients overflow, and divides every update by the scale; the DP
    update never scales the loss, so the budget would be spent while the model does not train.
    bfloat16 needs no loss scaling and is supported.
    """
    names = {getattr(getattr(layer, "dtype_policy", None), "name", None)
             for layer in model._flatten_layers()}
    names.add(keras.config.dtype_policy().name)
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if "mixed_float16" in names or scaled:
        raise DPUsageError(
            "the 'mixed_float16' policy (or a LossScaleOptimizer) is not supported by DP "
            "training: dynamic loss scaling skips and rescales steps depending on whether the "
            "private gradients overflowed, a decision without noise, and its unscaling does not "
            "match the DP update. Use keras.mixed_precision.set_global_policy('mixed_bfloat16') "
            "(no loss scaling; noise and accumulation stay float32) or float32.")


def check_variables_in_scope(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Under a strategy every variable must be created in its scope (else replicas race)."""
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return
    outside = [v.path for v in model.weights
               if not strategy.extended.variable_created_in_scope(getattr(v, "value", v))]
    if outside:
        raise DPUsageError(
            f"{len(outside)} variables of the model (e.g. {outside[0]!r}) were created outside "
            f"the scope of {type(strategy).__name__}. Build the model, make_private and compile "
            "inside `with strategy.scope():` so every replica holds a mirrored copy.")


def check_jit_placement(strategy: tf.distribute.Strategy, jit_compile: bool) -> None:
    """Refuses XLA over several logical CPU replicas, which TensorFlow cannot place.

    An XLA-compiled replica function on CPU:1 cannot read the per-replica variables TF keeps on
    CPU:0 (plain keras.Model.fit fails the same way). GPUs and TPUs are not affected.
    """
    if not jit_compile or strategy.num_replicas_in_sync < 2:
        return
    devices = list(strategy.extended.worker_devices)
    if len(devices) > 1 and all("CPU" in d.upper() for d in devices):
        raise DPUsageError(
            f"jit_compile=True with {len(devices)} CPU replicas is not supported by TensorFlow "
            "(XLA cannot place per-replica variables across logical CPU devices). Use "
            "jit_compile=False on CPU, or one CPU replica.")


def validate_training_data(data: TrainingData, model: keras.Model, loss: Any) -> None:
    """Checks shapes, dtypes and labels of the whole training set before the first step.

    Messages give counts, never example values. Non-finite *inputs* are allowed: an example
    whose gradient is not finite contributes zero to its steps (privacy/clipping.py).
    """
    _check_input_shape(data.x_spec, model)
    if not (data.x_spec.dtype.is_floating or data.x_spec.dtype.is_integer):
        raise TypeError(f"inputs must be numeric, got dtype {data.x_spec.dtype.name}.")
    if data.labels is not None:
        _check_labels(data.labels, model, loss)


def _check_input_shape(spec: tf.TensorSpec, model: keras.Model) -> None:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return
    if len(inputs) != 1:
        raise ValueError(f"the model takes {len(inputs)} inputs; DPModel.fit supports one.")
    expected = tuple(inputs[0].shape[1:])
    got = tuple(spec.shape)
    compatible = len(expected) == len(got) and all(
        e is None or e == g for e, g in zip(expected, got))
    if not compatible:
        raise ValueError(f"each training example has shape {got}, the model expects "
                         f"{expected} (None = any).")


def _check_labels(labels: np.ndarray, model: keras.Model, loss: Any) -> None:
    labels = np.asarray(labels)
    if labels.dtype == object or not (np.issubdtype(labels.dtype, np.number)
                                      or labels.dtype == bool):
        raise TypeError(f"labels must be numeric, got dtype {labels.dtype}.")
    if np.issubdtype(labels.dtype, np.floating):
        bad = int(labels.size - np.count_nonzero(np.isfinite(labels)))
        if bad:
            raise ValueError(f"{bad} labels are NaN or infinite; fix or drop those examples.")
    name = _loss_name(loss)
    outputs = getattr(model, "outputs", None)
    classes = outputs[0].shape[-1] if outputs else None
    if "sparse_categorical" in name and classes:
        integral = np.all(np.mod(labels, 1) == 0)
        bad = int(np.count_nonzero((labels < 0) | (labels >= classes)))
        if bad or not integral:
            raise ValueError(
                f"{bad} labels are outside the class ids 0..{classes - 1} of the model's "
                f"{classes} outputs{'' if integral else ', or not whole numbers'}; fix the labels "
                "or the output size before training.")
    elif ("binary" in name or name.startswith("categorical")) and classes:
        if labels.ndim >= 1 and labels.shape[1:] and labels.shape[-1] != classes:
            raise ValueError(f"labels have {labels.shape[-1]} columns, the model {classes} "
                             "outputs.")
        if "binary" in name or "categorical" in name:
            bad = int(np.count_nonzero((labels < 0) | (labels > 1)))
            if bad:
                raise ValueError(f"{bad} label values are outside [0, 1] for {name}.")


def _loss_name(loss: Any) -> str:
    if isinstance(loss, str):
        return loss.lower()
    name = getattr(loss, "name", None) or getattr(loss, "__name__", "") or ""
    fn = getattr(loss, "fn", None)
    if fn is not None:
        name = getattr(fn, "__name__", name)
    return str(name).lower()
