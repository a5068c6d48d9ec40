"""The experiment loop behind tfdpfair-train (cli/train.py): ``train_and_evaluate(config, workdir)``.

One readable run, in fixed sections (the config is the only source of hyper-parameters):

  set-up     claim the workdir (refuse a different config's run), seeds, metric writer
  data       DATASETS[config.data.name] (training_data.py): every file is read and checked here
  model      MODELS[config.model.name] + initial weights (Haiku / Keras file, or the demo's
             public pre-training, cached in the workdir) + fine-tuning mode
  optimizer  config.optimizer + config.schedule (one optimizer step = one logical step)
  restore    checkpoint in workdir > config.model.init; a new run fixes its privacy plan
             (an unreachable ε fails here) and checkpoints step 0, so the secret seeds
             survive a crash before the first periodic checkpoint
  loop       DPModel.fit with callbacks: checkpoint every K steps (atomic), SIGTERM ->
             checkpoint and stop, metrics.jsonl + TensorBoard (``nonprivate/`` tags for
             un-noised statistics), progress line with ETA, periodic held-out evaluation of
             the last / EMA / Polyak weights
  final      evaluation of every variant on the test split -> predictions/*.npz (groups,
             patient ids), metrics.json, report.md with the privacy statement
  baseline   ``config.non_private.enabled`` (or ``dp.enabled=False``): the same data, model
             and initial weights trained by a plain Keras fit

Rerunning the same command in the same workdir resumes (same plan, seeds and ε) or, when the
run had finished, only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfdpfair.data.sources import ImageConfig
from tfdpfair.fairness import run_io
from tfdpfair.privacy import accounting
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.trainer import registries as models
from tfdpfair.trainer import workdir as wd
from tfdpfair.training.checkpoint import STATE_FILE, restore_dp_checkpoint, save_dp_checkpoint
from tfdpfair.training.dp_model import make_private
from tfdpfair.trainer.metric_writer import MetricWriter
from tfdpfair.trainer.callbacks import (DPCheckpointCallback, PeriodicEvalCallback,
                                                 Preemption, ProgressCallback, log)
from tfdpfair.trainer.task_data import TaskData, load_task_data, predict_split
from tfdpfair.trainer.task_data import non_private_dataset
from tfdpfair.trainer.report import (render_report, score_metrics, scores_from_logits,
                                              write_variant)

# config.dp keys that are not DPConfig fields:
DP_RUN_KEYS = ("enabled", "steps", "epochs", "delta_policy")


def train_and_evaluate(config: Any, workdir: str | pathlib.Path,
                       strategy: tf.distribute.Strategy | None = None,
                       export_dir: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Runs ``config`` end to end in ``workdir`` (see module docstring); returns the summary
    written to metrics.json (``{"preempted": True, ...}`` if stopped by SIGTERM).

    A DP run also writes release exports (no seeds) to ``workdir/release`` (last weights) and
    ``workdir/release_<average>`` (EMA, Polyak), and with ``export_dir`` a serving SavedModel
    (tfdpfair.tfx.export.export_serving: tf.Example and image signatures, model card).
    """
    # ---- set-up ------------------------------------------------------------------------
    workdir = pathlib.Path(workdir)
    resuming = wd.claim_workdir(workdir, config)
    keras.utils.set_random_seed(config.seed)
    strategy = strategy or tf.distribute.get_strategy()
    writer, start = MetricWriter(workdir), time.time()
    log(f"{'resuming' if resuming else 'starting'} run in {workdir}")
    # ---- data --------------------------------------------------------------------------
    data = load_task_data(config.data, config.seed)
    log(f"data {config.data.name}: {data.num_train} private training examples, "
        f"{len(data.test)} test, input {data.input_shape}, {data.num_classes} outputs")
    if config.dp.enabled and not (workdir / wd.CHECKPOINT_DIR / STATE_FILE).exists():
        check_budget(config, data)  # an unreachable ε fails now, before pre-training
    # ---- model: architecture and initial weights ----------------------------------------
    weights, summary = initial_weights(config, data, workdir)
    # ---- optimizer, restore, loop, final evaluation --------------------------------------
    dp_model = None
    if config.dp.enabled:
        dp_model, private = run_private(config, data, weights, workdir, writer, strategy)
        summary.update(private)
        if private.get("preempted"):
            writer.close()
            return summary
    if config.non_private.enabled or not config.dp.enabled:
        summary["variants"]["non_private"] = run_non_private(config, data, weights, workdir)
    # ---- outputs -----------------------------------------------------------------------
    if dp_model is not None:
        export_private(dp_model, data, workdir, export_dir)
    return finish(config, workdir, summary, dp_model, writer, start)


def export_private(dp_model: Any, data: TaskData, workdir: pathlib.Path,
                   export_dir: str | pathlib.Path | None) -> None:
    """Release exports of every weight variant, and the serving export if asked for."""
    for name in ["last", *dp_model.average_names()]:
        dp_model.export_release(workdir / ("release" if name == "last" else f"release_{name}"),
                                weights=name)
    if export_dir is None:
        return
    from tfdpfair.tfx.export import export_serving  # serving deps only when exporting
    weights = "ema" if "ema" in dp_model.average_names() else "last"
    export_serving(dp_model, export_dir, serving_image_config(data), weights=weights,
                   output="sigmoid" if data.task == "multilabel" else "softmax")
    log(f"serving SavedModel ({weights} weights) in {export_dir}")


def serving_image_config(data: TaskData) -> ImageConfig:
    """How the training inputs were made from pixels in [0, 1] (the serving preprocessing)."""
    config = getattr(data.train, "config", None)
    if config is not None:
        return config
    height, width, channels = data.input_shape
    return ImageConfig((height, width), channels=channels, normalization="zero_one")


def initial_weights(config: Any, data: TaskData, workdir: pathlib.Path
                    ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The starting weights of every trained variant, and the summary's first entries."""
    model = models.build_model(config.model, data.input_shape, data.num_classes)
    description = models.load_initial_weights(model, config.model)
    summary: dict[str, Any] = {"initial_weights": description, "variants": {}}
    if description == "public_pretraining":
        pretrain_public(config, data, model, workdir / wd.PRETRAINED_FILE)
        logits, y_true = predict_split(model, data.test, config.train.eval_batch_size)
        summary["pretrained_test_accuracy"] = float(np.mean(logits.argmax(1) == y_true))
        log(f"pre-trained test accuracy {summary['pretrained_test_accuracy']:.4f}")
    return model.get_weights(), summary


def pretrain_public(config: Any, data: TaskData, model: keras.Model,
                    cache: pathlib.Path) -> None:
    """Non-private training on the public split (not protected), cached in the workdir."""
    if data.public is None:
        raise ValueError(f"model.init='public_pretraining' needs a dataset with a public "
                         f"split; {config.data.name!r} has none.")
    if cache.exists():
        model.load_weights(cache)
        return
    model.compile(optimizer=keras.optimizers.Adam(config.pretrain.learning_rate),
                  loss=models.make_loss(data.task), metrics=models.train_metrics(data.task))
    log(f"pre-training {model.name} ({model.count_params():,} parameters) on "
        f"{len(data.public[1])} public examples for {config.pretrain.epochs} epochs")
    model.fit(*data.public, batch_size=config.pretrain.batch_size,
              epochs=config.pretrain.epochs, verbose=0)
    model.save_weights(cache)


def fresh_model(config: Any, data: TaskData, weights: list[np.ndarray]) -> keras.Model:
    """A new model holding ``weights``, with the configured layers trainable."""
    model = models.build_model(config.model, data.input_shape, data.num_classes)
    model.set_weights(weights)
    models.set_trainable(model, config.model.train)
    return model


def dp_config_from(dp: Any, num_examples: int) -> DPConfig:
    """DPConfig from config.dp; an unknown key is an error (never silently dropped).

    ``dp.delta_policy="1/N"`` sets δ = 1/N (the papers' choice for medical data).
    """
    values = {k: v for k, v in dp.to_dict().items() if k not in DP_RUN_KEYS}
    policy = dp.get("delta_policy", None)
    if policy is not None:
        if policy != "1/N" or values.get("delta") is not None:
            raise ValueError(f"dp.delta_policy must be None or '1/N' (with dp.delta unset); "
                             f"got {policy!r}, delta={values.get('delta')!r}.")
        values["delta"] = 1.0 / num_examples
    known = {f.name for f in dataclasses.fields(DPConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config.dp has unknown keys {unknown}; DPConfig fields: "
                         f"{sorted(known)} (plus {list(DP_RUN_KEYS)}).")
    return DPConfig(**values)


def privacy_units(config: Any, data: TaskData) -> int:
    """N for the accountant: training examples, or patients with dp.privacy_unit="patient"."""
    if config.dp.get("privacy_unit", "example") != "patient":
        return data.num_train
    ids = getattr(data.train, "patient_ids", None)
    if ids is None:
        raise ValueError(f"dp.privacy_unit='patient' needs patient ids; data.name="
                         f"{config.data.name!r} has none (CheXpert and MIMIC-CXR do).")
    return int(np.unique(np.asarray(ids)).size)


def check_budget(config: Any, data: TaskData) -> accounting.PrivacyPlan:
    """The plan a new DP run would fix (raises for an unreachable ε); nothing is stored."""
    units = privacy_units(config, data)
    cfg = dp_config_from(config.dp, units)
    return accounting.plan_dp_sgd(
        num_examples=units, expected_batch_size=cfg.expected_batch_size,
        steps=planned_steps(config.dp, units), noise_multiplier=cfg.noise_multiplier,
        target_epsilon=cfg.target_epsilon, delta=cfg.delta, accountant=cfg.accountant)


def planned_steps(dp: Any, num_examples: int) -> int:
    """T from config.dp.steps, or from config.dp.epochs over N examples."""
    if dp.get("steps", None):
        return int(dp.steps)
    return accounting.steps_for_epochs(dp.epochs, num_examples, dp.expected_batch_size)


def run_private(config: Any, data: TaskData, weights: list[np.ndarray], workdir: pathlib.Path,
                writer: MetricWriter, strategy: tf.distribute.Strategy) -> tuple[Any, dict]:
    """DP-SGD fine-tuning (restore -> loop -> final evaluation); returns (DPModel, summary)."""
    units = privacy_units(config, data)
    total = planned_steps(config.dp, units)
    with strategy.scope():
        dp = make_private(fresh_model(config, data, weights), dp_config_from(config.dp, units))
        dp.compile(optimizer=models.make_optimizer(config.optimizer, config.schedule, total),
                   loss=models.make_loss(data.task), metrics=models.train_metrics(data.task),
                   steps_per_execution=int(config.train.steps_per_execution))
    plan = restore_or_plan(dp, workdir / wd.CHECKPOINT_DIR, units, total)
    log(f"DP plan: N = {plan.num_examples} {plan.unit}s, σ = {plan.noise_multiplier:.4f}, "
        f"q = {plan.sampling_rate:.4g}, T = {plan.steps} steps ({dp.logical_steps_done} done), "
        f"δ = {plan.delta:.3g}, planned ε = {plan.epsilon():.3f} ({plan.accountant}); "
        f"averages: {dp.average_names() or 'none'}")
    if dp.logical_steps_done < plan.steps:
        with Preemption() as preemption:
            x, y = data.train if isinstance(data.train, tuple) else (data.train, None)
            dp.fit(x, y, steps=total, verbose=0,
                   callbacks=dp_callbacks(config, data, dp, workdir, writer, preemption))
        if preemption.requested and dp.logical_steps_done < plan.steps:
            log(f"stopped at step {dp.logical_steps_done} after SIGTERM; rerun the same "
                "command to resume")
            return dp, {"preempted": True, "steps": dp.logical_steps_done}
    summary = {"epsilon": dp.epsilon_spent(), "delta": plan.delta,
               "noise_multiplier": plan.noise_multiplier, "steps": dp.logical_steps_done,
               "sampling_rate": plan.sampling_rate, "expected_batch_size":
               plan.expected_batch_size, "num_private_examples": plan.num_examples,
               "accountant": plan.accountant, "target_epsilon": plan.target_epsilon,
               "planned_steps": plan.steps, "privacy_unit": plan.unit}
    plan_info = {"epsilon": summary["epsilon"], "delta": plan.delta,
                 "steps": dp.logical_steps_done, "noise_multiplier": plan.noise_multiplier,
                 "privacy_unit": plan.unit}
    summary["variants"] = evaluate_private(config, data, dp, workdir, plan_info)
    return dp, summary


def restore_or_plan(dp: Any, directory: pathlib.Path, num_examples: int, total: int
                    ) -> accounting.PrivacyPlan:
    """Restores the workdir's checkpoint, or fixes a new plan and checkpoints step 0.

    Both happen before any example is read for training, so an unreachable ε, or a checkpoint
    that does not fit the model, costs no privacy budget.
    """
    if (directory / STATE_FILE).exists():
        try:
            restore_dp_checkpoint(dp, directory)
        except Exception as err:
            raise ValueError(
                f"the checkpoint in {directory} does not fit this model/config "
                f"({type(err).__name__}: {err}). Start fresh with a new --workdir.") from None
        log(f"restored checkpoint at step {dp.logical_steps_done} from {directory}")
        return dp.prepare(num_examples, steps=total)  # checks it matches N and the config
    plan = dp.prepare(num_examples, steps=total)
    dp.optimizer.build(dp.inner.trainable_variables)
    save_dp_checkpoint(dp, directory)  # persists the secret seeds before any step
    return plan


def dp_callbacks(config: Any, data: TaskData, dp: Any, workdir: pathlib.Path,
                 writer: MetricWriter, preemption: Preemption) -> list:
    """Checkpoint, progress and periodic-evaluation callbacks of the DP loop."""
    train = config.train
    split = data.validation or data.test

    def evaluate() -> dict[str, float]:
        out = {}
        for name in ["last", *dp.average_names()]:
            with dp.swapped_weights(name):
                logits, y_true = predict_split(dp.inner, split, train.eval_batch_size)
            for key, value in score_metrics(data, y_true, scores_from_logits(
                    data.task, logits)).items():
                out[f"eval/{split.name}/{name}/{key}"] = value
        return out

    return [DPCheckpointCallback(workdir / wd.CHECKPOINT_DIR, train.checkpoint_every_steps,
                                 preemption),
            ProgressCallback(writer, dp.plan.steps, train.log_every_steps,
                             lambda: models.current_learning_rate(dp.optimizer)),
            PeriodicEvalCallback(writer, train.eval_every_steps, evaluate)]


def evaluate_private(config: Any, data: TaskData, dp: Any, workdir: pathlib.Path,
                     plan_info: dict) -> dict[str, dict[str, float]]:
    """Test metrics and predictions of the last, EMA and Polyak weights."""
    results = {}
    for name in ["last", *dp.average_names()]:
        variant = "private" if name == "last" else f"private_{name}"
        with dp.swapped_weights(name):
            logits, y_true = predict_split(dp.inner, data.test, config.train.eval_batch_size)
        results[variant] = write_variant(workdir, variant, data, data.test, y_true,
                                         scores_from_logits(data.task, logits), True, plan_info)
        log(f"{variant}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[variant].items()))
    return results


def run_non_private(config: Any, data: TaskData, weights: list[np.ndarray],
                    workdir: pathlib.Path) -> dict[str, float]:
    """The baseline: same data, model and initial weights, plain Keras fit, no DP."""
    model = fresh_model(config, data, weights)
    baseline = config.non_private
    batch = int(baseline.get("batch_size", None) or config.dp.expected_batch_size)
    total = int(baseline.get("steps", None) or planned_steps(config.dp, data.num_train))
    epochs = math.ceil(total / math.ceil(data.num_train / batch))
    cache = workdir / wd.NON_PRIVATE_FILE
    if cache.exists():
        model.load_weights(cache)
    else:
        model.compile(optimizer=models.make_optimizer(baseline.optimizer, config.schedule,
                                                      epochs * math.ceil(data.num_train / batch)),
                      loss=models.make_loss(data.task), metrics=models.train_metrics(data.task))
        log(f"non-private baseline: {data.num_train} examples, batch {batch}, {epochs} epochs")
        x, kwargs = non_private_dataset(data.train, batch, config.seed)
        model.fit(x, epochs=epochs, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(
            str(workdir / wd.NON_PRIVATE_BACKUP))], **kwargs)
        model.save_weights(cache)
    logits, y_true = predict_split(model, data.test, config.train.eval_batch_size)
    results = write_variant(workdir, "non_private", data, data.test, y_true,
                            scores_from_logits(data.task, logits), False, None)
    log("non_private: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


def finish(config: Any, workdir: pathlib.Path, summary: dict, dp_model: Any,
           writer: MetricWriter, start: float) -> dict[str, Any]:
    """metrics.json (run_io layout + the summary), report.md; returns the summary."""
    for variant, results in summary["variants"].items():
        for key, value in results.items():
            summary[f"{variant}_test_{key}"] = value
    summary["wall_seconds"] = time.time() - start
    if writer.nonfinite:
        summary["nonfinite_scalars"] = writer.nonfinite
    writer.close()
    metrics_path = workdir / run_io.METRICS_FILE
    metrics = run_io.to_jsonable(dict(_read_json(metrics_path), **{
        k: v for k, v in summary.items() if k != "variants"}))
    metrics["summary_variants"] = summary["variants"]
    run_io.write_json(metrics_path, metrics)
    (workdir / "report.md").write_text(render_report(config, summary, dp_model))
    log(f"wrote {metrics_path} and {workdir / 'report.md'} in {summary['wall_seconds']:.0f} s")
    return summary


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
