"""TFX Trainer module file: ``Trainer(module_file="tfdpfair/tfx/trainer_module.py", ...)``.

Follows the generic Trainer contract of TFX 1.21 (TF 2.21) duck-typed: :func:`run_fn` reads
``fn_args.train_files`` / ``eval_files`` (file patterns of gzipped TFRecords of tf.Example, as
ExampleGen writes them), ``train_steps``, ``eval_steps``, ``schema_path`` / ``schema_file``,
``transform_graph_path`` / ``transform_output``, ``serving_model_dir``, ``model_run_dir``,
``base_model`` and ``custom_config`` (keys: tfdpfair/tfx/config.py, README "TFX").

What it does, in order:
1. validates custom_config (before any data is read);
2. decodes the image of every training and evaluation record once (a bad record is refused,
   named by file and number, before anything is spent), then counts the training examples and
   materialises them in memory (DP-SGD needs random access
   and a known N; over the memory limit it refuses and names the alternative) - it never
   samples from the stream, and it refuses a stream-only input (a data_accessor without files);
3. builds the model (a models/registry.py name, fine-tuning mode, initial weights);
4. fixes the DP plan. TFX's ``train_steps`` is only a request: the plan (target ε, epochs,
   expected batch) decides T, and both are logged;
5. trains with DPModel.fit, evaluates on eval_files (with group labels: a fairness summary);
6. exports the SavedModel + privacy_statement.json + model_card.md to serving_model_dir
   (tfx/export.py), and a run summary (no seeds, no training statistics) to model_run_dir.
"""

# No `from __future__ import annotations`: TFX may exec this file as a module it does not
# register in sys.modules, where dataclasses cannot resolve string annotations.
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import keras
import numpy as np

from tfdpfair.models import finetune
from tfdpfair.tfx import examples as examples_lib
from tfdpfair.tfx import export as export_lib
from tfdpfair.tfx.config import TFXTrainerConfig, from_custom_config
from tfdpfair.tfx.model_card import ModelCardInfo, fairness_summary
from tfdpfair.training.dp_model import DPModel, make_private
from tfdpfair.training.input_pipeline import StreamNotSupportedError

log = logging.getLogger("tfdpfair.tfx")

STREAM_ONLY_MESSAGE = (
    "fn_args has no train_files: this Trainer module reads the TFRecord files itself, because "
    "DP-SGD needs random access to the N training examples (Poisson sampling decides for each "
    "example independently whether it joins a step); batches from fn_args.data_accessor's "
    "tf_dataset_factory are a stream, which cannot be Poisson-sampled and would make the "
    "reported ε wrong. Pass the ExampleGen/Transform examples to the Trainer so that TFX fills "
    "train_files, or train outside TFX on an IndexedSource (tfdpfair.data: ArraySource, "
    "CheXpert/MIMIC-CXR readers) and export with tfdpfair.tfx.export.export_serving.")

TRANSFORM_MESSAGE = (
    "fn_args.transform_graph_path is set, but this module does not apply a TensorFlow "
    "Transform graph (tensorflow-transform is not a dependency): its preprocessing (decode, "
    "resize, normalise) lives in the serving graph and is configured by custom_config. Give "
    "the Trainer the raw ExampleGen examples and no transform_graph.")


@dataclasses.dataclass
class RunResult:
    """What run_fn did (TFX ignores the return value; tests and notebooks use it)."""

    dp_model: DPModel
    config: TFXTrainerConfig
    privacy: dict[str, Any]
    requested_train_steps: int | None
    evaluation: dict[str, float]
    fairness: dict[str, Any] | None
    serving_model_dir: pathlib.Path


def _arg(fn_args: Any, *names: str) -> Any:
    """The first of ``names`` that fn_args has and is not None (TFX renamed some fields)."""
    for name in names:
        value = getattr(fn_args, name, None)
        if value is not None:
            return value
    return None


def _check_inputs(fn_args: Any, config: TFXTrainerConfig) -> None:
    """Refuses stream-only input and a Transform graph; checks the schema names our features."""
    if not getattr(fn_args, "train_files", None):
        raise StreamNotSupportedError(STREAM_ONLY_MESSAGE)
    transform = _arg(fn_args, "transform_graph_path", "transform_output")
    if transform:
        raise ValueError(TRANSFORM_MESSAGE)
    schema = _arg(fn_args, "schema_path", "schema_file")
    if schema and os.path.exists(schema) and schema.endswith(".pbtxt"):
        text = pathlib.Path(schema).read_text()
        fmt = config.example_format
        for key in (fmt.image_key, fmt.label_key, *fmt.group_keys, fmt.patient_key):
            if key and f'name: "{key}"' not in text:
                raise ValueError(f"custom_config names feature {key!r}, which the schema "
                                 f"{schema} does not list.")


def build_model(config: TFXTrainerConfig) -> keras.Model:
    """The model named by config.model, with its fine-tuning mode and initial weights."""
    from tfdpfair.models import registry

    image = config.example_format.image_config
    shape = (*image.image_size, image.channels)
    model = registry.build_model(config.model, shape, config.num_classes)
    if config.init_weights:
        _load_weights(model, config)
    mode = config.trainable
    if mode.startswith("last_stages:"):
        mode = ("last_stages", int(mode.split(":", 1)[1]))
    trained = finetune.set_trainable(model, mode)
    log.info("model %s: %d trainable parameters (mode %s)", config.model, trained,
             config.trainable)
    return model


def _load_weights(model: keras.Model, config: TFXTrainerConfig) -> None:
    path = config.init_weights
    if not os.path.exists(path):
        raise FileNotFoundError(f"custom_config init_weights={path!r} does not exist.")
    if path.endswith((".npz", ".pkl")):
        from tfdpfair.models import pretrained
        params = pretrained.read_haiku_params(path, allow_pickle=config.init_allow_pickle)
        bias = params.get(pretrained.HEAD_PREFIX + "b")
        same_head = bias is not None and bias.shape[0] == config.num_classes
        pretrained.load_haiku_checkpoint(
            model, pretrained.params_as_tree(params), head="load" if same_head else "reset",
            adapt_input_channels=int(model.input_shape[-1]) == 1)
    else:
        model.load_weights(path)
    log.info("initial weights from %s", path)


def _optimizer(config: TFXTrainerConfig) -> keras.optimizers.Optimizer:
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(config.learning_rate, momentum=config.momentum)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(config.learning_rate)
    raise ValueError(f"optimizer must be sgd or adam, got {config.optimizer!r}.")


def _loss(config: TFXTrainerConfig) -> keras.losses.Loss:
    if config.task == "multiclass":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return keras.losses.BinaryCrossentropy(from_logits=True)


def train(fn_args: Any, config: TFXTrainerConfig) -> tuple[DPModel, int]:
    """Materialises the training split, plans and runs DP-SGD; returns (DPModel, N)."""
    fmt = config.example_format
    files = examples_lib.resolve_files(fn_args.train_files, "train_files")
    data = examples_lib.load_training_examples(
        files, fmt, config.task, config.num_classes, config.max_train_examples,
        config.max_train_bytes)
    log.info("materialised %d training examples from %d files", len(data), len(files))
    dp = make_private(build_model(config), config.dp_config)
    dp.compile(optimizer=_optimizer(config), loss=_loss(config))
    patient_ids = data.columns.get(fmt.patient_key) if fmt.patient_key else None
    units = len(data) if patient_ids is None else len(np.unique(patient_ids))
    plan = dp.prepare(units, epochs=config.epochs)
    requested = _arg(fn_args, "train_steps")
    log.info("TFX train_steps=%s is a request; the DP plan decides T=%d logical steps "
             "(epochs=%g, expected batch %g, q=%.6g, sigma=%.4g, planned epsilon=%.4g, "
             "delta=%.3g, N=%d %ss)", requested, plan.steps, config.epochs,
             plan.expected_batch_size, plan.sampling_rate, plan.noise_multiplier,
             plan.epsilon(), plan.delta, plan.num_examples, plan.unit)
    callbacks = []
    run_dir = _arg(fn_args, "model_run_dir")
    if config.tensorboard and run_dir:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=run_dir))
    dp.fit(data.x, data.y, epochs=config.epochs, callbacks=callbacks, verbose=0,
           patient_ids=patient_ids)
    log.info("trained %d logical steps; epsilon spent %.4g", dp.logical_steps_done,
             dp.epsilon_spent())
    return dp, len(data)


def evaluate(dp: DPModel, files: list[str], config: TFXTrainerConfig, privacy: dict[str, Any]
             ) -> tuple[dict[str, float], dict[str, Any] | None, int]:
    """Probabilities on every eval example (streamed) -> metrics, fairness summary, count."""
    fmt = config.example_format
    labels, scores, groups = [], [], {k: [] for k in fmt.group_keys}
    with dp.swapped_weights(config.export_weights):
        for x, y, columns in examples_lib.iterate_batches(
                files, fmt, config.task, config.num_classes, config.eval_batch_size,
                fmt.group_keys):
            logits = np.asarray(dp.inner(x, training=False), np.float64)
            scores.append(_probabilities(logits, config.task))
            labels.append(y)
            for key in fmt.group_keys:
                groups[key].append(columns[key])
    y_true, y_score = np.concatenate(labels), np.concatenate(scores)
    metrics = _metrics(y_true, y_score, config.task)
    fairness = None
    if fmt.group_keys:
        fairness = fairness_summary(
            config.task, y_true.astype(np.int64) if config.task == "multiclass" else y_true,
            y_score, {k: np.concatenate(v) for k, v in groups.items()}, config.label_names,
            epsilon=privacy["epsilon"], delta=privacy["delta"],
            num_bootstrap=config.fairness_num_bootstrap,
            min_group_size=config.fairness_min_group_size)
    return metrics, fairness, len(y_true)


def _probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _metrics(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    if task == "multiclass":
        return {"eval accuracy": float(np.mean(np.argmax(y_score, axis=1) == y_true))}
    from sklearn.metrics import roc_auc_score
    aucs = [roc_auc_score(y_true[:, t], y_score[:, t]) for t in range(y_true.shape[1])
            if len(np.unique(y_true[:, t])) == 2]
    return {"eval macro AUC": float(np.mean(aucs)) if aucs else float("nan")}


def _card(config: TFXTrainerConfig, dp: DPModel, fn_args: Any, num_train: int, num_eval: int,
          metrics: dict[str, float], fairness: dict[str, Any] | None) -> ModelCardInfo:
    fmt, image = config.example_format, config.example_format.image_config
    return ModelCardInfo(
        title=f"{config.model}: differentially private image classifier",
        model={"architecture": config.model, "fine-tuning mode": config.trainable,
               "initial weights": config.init_weights or "random initialisation",
               "parameters": dp.inner.count_params(), "classes": ", ".join(config.label_names),
               "input": f"{image.image_size[0]}x{image.image_size[1]}x{image.channels}, "
                        f"{image.normalization} normalisation",
               "output": "sigmoid" if config.task == "multilabel" else "softmax"},
        data={"training examples (N)": num_train, "evaluation examples": num_eval,
              "image feature": f"{fmt.image_key} ({fmt.encoding})",
              "label feature": fmt.label_key,
              "group features": ", ".join(fmt.group_keys) or "none",
              "TFX train_steps requested": _arg(fn_args, "train_steps"),
              "logical steps run (plan decides)": dp.logical_steps_done},
        evaluation=metrics, fairness=fairness)


def run_fn(fn_args: Any) -> RunResult:
    """The TFX Trainer entry point (generic trainer): train with DP-SGD and export for serving."""
    config = from_custom_config(_arg(fn_args, "custom_config"))
    _check_inputs(fn_args, config)
    if _arg(fn_args, "base_model"):
        log.warning("fn_args.base_model is ignored: give initial weights as custom_config "
                    "init_weights (a warm start from a private model would spend budget twice).")
    if _arg(fn_args, "hyperparameters"):
        log.warning("fn_args.hyperparameters (from a Tuner) are ignored: set the values in "
                    "custom_config. Tuning on the private data is not covered by the DP "
                    "guarantee.")
    check_images(fn_args, config)  # every split's images, before the plan is fixed
    dp, num_train = train(fn_args, config)
    privacy = export_lib.privacy_record_of(dp, config.export_weights)
    metrics, fairness, num_eval = {}, None, 0
    if getattr(fn_args, "eval_files", None):
        eval_files = examples_lib.resolve_files(fn_args.eval_files, "eval_files")
        if _arg(fn_args, "eval_steps"):
            log.info("TFX eval_steps=%s ignored: every evaluation example is scored.",
                     fn_args.eval_steps)
        metrics, fairness, num_eval = evaluate(dp, eval_files, config, privacy)
        log.info("evaluation on %d examples: %s", num_eval, metrics)
    card = _card(config, dp, fn_args, num_train, num_eval, metrics, fairness)
    serving_dir = export_lib.export_serving(
        dp, fn_args.serving_model_dir, config.example_format, privacy,
        weights=config.export_weights,
        output="sigmoid" if config.task == "multilabel" else "softmax", card=card)
    log.info("serving export written to %s", serving_dir)
    _write_run_summary(fn_args, privacy, metrics, fairness)
    return RunResult(dp, config, privacy, _arg(fn_args, "train_steps"), metrics, fairness,
                     serving_dir)


def check_images(fn_args: Any, config: TFXTrainerConfig) -> None:
    """Decodes every encoded image of train_files and eval_files once, before any DP plan or
    step exists (DESIGN.md invariant 10); a bad record is refused, named by file and number."""
    splits = [("train_files", fn_args.train_files)]
    if getattr(fn_args, "eval_files", None):
        splits.append(("eval_files", fn_args.eval_files))
    for what, patterns in splits:
        count = examples_lib.check_encoded_images(
            examples_lib.resolve_files(patterns, what), config.example_format, what)
        log.info("checked the images of %d %s records", count, what)


def _write_run_summary(fn_args: Any, privacy: dict[str, Any], metrics: dict[str, float],
                       fairness: dict[str, Any] | None) -> None:
    run_dir = _arg(fn_args, "model_run_dir")
    if not run_dir:
        return
    pathlib.Path(run_dir).mkdir(parents=True, exist_ok=True)
    summary = {"requested_train_steps": _arg(fn_args, "train_steps"), "privacy": privacy,
               "evaluation": metrics, "fairness": fairness}
    (pathlib.Path(run_dir) / "tfdpfair_run.json").write_text(
        json.dumps(summary, indent=2, default=str) + "\n")
