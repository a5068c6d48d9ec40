r"""Main job: pre-train publicly, fine-tune with DP-SGD, train a non-private baseline, report.

  python -m experiments.train --workdir=runs/demo
  python -m experiments.train --config=experiments/configs/demo.py --config.dp.target_epsilon=2

Writes into --workdir:
  metrics.json            ε, δ, σ, steps, q, private and non-private test accuracy, per-variant
                          entries (tfdpfair/fairness/run_io.py layout)
  predictions/<name>.npz  test-set predictions with subgroup labels, for experiments.evaluate
  report.md               what was run, the numbers, and the privacy statement
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags
from ml_collections import config_flags

from experiments import model_factory
from tfdpfair.data.demo import DemoData, load_demo_data
from tfdpfair.fairness import run_io
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.privacy.statement import privacy_statement
from tfdpfair.privacy.tf_privacy_compat import tf_privacy_statement
from tfdpfair.training.dp_model import make_private

_CONFIG = config_flags.DEFINE_config_file(  # default: the packaged demo, from any directory
    "config", str(pathlib.Path(__file__).resolve().parent / "configs" / "demo.py"),
    "Experiment configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Directory for the run's outputs.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored", "multiworker", "tpu"],
    "tf.distribute strategy of the DP fine-tuning: default (one device), mirrored (all local "
    "devices), multiworker (hosts from TF_CONFIG), tpu (--tpu).")
_TPU = flags.DEFINE_string("tpu", "local", "TPU name or address for --strategy=tpu "
                           "('local' on a Cloud TPU VM).")


def make_strategy(name: str, tpu: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy named by --strategy (see README, "Distributed training")."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def log(message: str) -> None:
    """Progress output (flushed immediately)."""
    print(f"[train {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_data(config) -> DemoData:
    if config.data.name != "digits":
        raise ValueError(f"unknown data.name {config.data.name!r}; the demo supports 'digits'.")
    return load_demo_data(public_fraction=config.data.public_fraction,
                          test_fraction=config.data.test_fraction,
                          image_size=config.data.image_size, seed=config.seed)


def classification_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def set_trainable(model: keras.Model, mode: str) -> None:
    """"all", "head" (only the layer named "head"), or "last_stages:N" (NFNet / WRN)."""
    from tfdpfair.models import finetune
    if mode in ("all", "head"):
        finetune.set_trainable(model, mode)
    elif mode.startswith("last_stages:"):
        finetune.set_trainable(model, ("last_stages", int(mode.split(":", 1)[1])))
    else:
        raise ValueError(f"unknown model.train {mode!r}: use all, head or last_stages:N.")


def pretrain(config, data: DemoData) -> keras.Model:
    """Non-private training on the public split; returns the pre-trained model."""
    shape = data.public.images.shape[1:]
    model = model_factory.build_model(config.model.name, shape, len(data.class_names))
    model.compile(optimizer=keras.optimizers.Adam(config.pretrain.learning_rate),
                  loss=classification_loss(), metrics=["accuracy"])
    log(f"pre-training {model.name} ({model.count_params():,} parameters) on "
        f"{len(data.public)} public examples for {config.pretrain.epochs} epochs")
    model.fit(data.public.images, data.public.labels, batch_size=config.pretrain.batch_size,
              epochs=config.pretrain.epochs, verbose=2)
    return model


def fresh_copy(config, data: DemoData, pretrained: keras.Model) -> keras.Model:
    model = model_factory.build_model(config.model.name, data.public.images.shape[1:],
                                      len(data.class_names))
    model.set_weights(pretrained.get_weights())
    set_trainable(model, config.model.train)
    return model


def dp_finetune(config, data: DemoData, pretrained: keras.Model,
                strategy: tf.distribute.Strategy):
    """DP-SGD fine-tuning on the private split under ``strategy``; returns (model, DPModel)."""
    with strategy.scope():
        model, private = _make_private_model(config, data, pretrained)
    dp = config.dp
    plan = private.prepare(len(data.private), epochs=dp.epochs)
    log(f"DP fine-tuning on N = {plan.num_examples} private examples over "
        f"{strategy.num_replicas_in_sync} replica(s): σ = {plan.noise_multiplier:.4f}, "
        f"q = {plan.sampling_rate:.4f}, T = {plan.steps} steps, δ = {plan.delta:.3g}, "
        f"planned ε = {plan.epsilon():.3f} ({plan.accountant})")
    private.fit(data.private.images, data.private.labels, verbose=2)
    return model, private


def _make_private_model(config, data: DemoData, pretrained: keras.Model):
    model = fresh_copy(config, data, pretrained)
    dp = config.dp
    dp_config = DPConfig(
        l2_norm_clip=dp.l2_norm_clip, expected_batch_size=dp.expected_batch_size,
        micro_batch_size=dp.micro_batch_size, noise_multiplier=dp.noise_multiplier,
        target_epsilon=dp.target_epsilon, delta=dp.delta, accountant=dp.accountant,
        rescale_to_unit_norm=dp.rescale_to_unit_norm, augmult=dp.augmult,
        noise_seed=dp.noise_seed, sampling_seed=dp.sampling_seed)
    private = make_private(model, dp_config)
    private.compile(optimizer=make_optimizer(config), loss=classification_loss(),
                    metrics=["accuracy"])
    return model, private


def make_optimizer(config) -> keras.optimizers.Optimizer:
    opt = config.optimizer
    if opt.name == "sgd":
        return keras.optimizers.SGD(opt.learning_rate, momentum=opt.momentum)
    if opt.name == "adam":
        return keras.optimizers.Adam(opt.learning_rate)
    raise ValueError(f"unknown optimizer {opt.name!r}: use sgd or adam.")


def non_private_finetune(config, data: DemoData, pretrained: keras.Model) -> keras.Model:
    """The same fine-tuning without DP: same batch size and number of epochs."""
    model = fresh_copy(config, data, pretrained)
    model.compile(optimizer=keras.optimizers.Adam(config.non_private.learning_rate),
                  loss=classification_loss())
    log(f"non-private fine-tuning on {len(data.private)} examples for {config.dp.epochs:g} epochs")
    model.fit(data.private.images, data.private.labels, batch_size=config.dp.expected_batch_size,
              epochs=int(np.ceil(config.dp.epochs)), verbose=2)
    return model


def evaluate(model: keras.Model, data: DemoData) -> tuple[float, np.ndarray]:
    """(test accuracy, class probabilities [N, C])."""
    logits = model.predict(data.test.images, batch_size=256, verbose=0)
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
    return float(np.mean(probs.argmax(axis=1) == data.test.labels)), probs


def write_variant(workdir: pathlib.Path, name: str, data: DemoData, probs: np.ndarray,
                  accuracy: float, **extra) -> None:
    run_io.write_variant(
        workdir, name, task="multiclass", class_names=list(data.class_names),
        private=extra.pop("private"), epsilon=extra.pop("epsilon", None),
        delta=extra.pop("delta", None), test_accuracy=accuracy, y_true=data.test.labels,
        y_score=probs, groups=data.test.groups, **extra)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    keras.utils.set_random_seed(config.seed)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    start = time.time()
    data = load_data(config)
    log(f"data: {len(data.public)} public, {len(data.private)} private, {len(data.test)} test")
    pretrained = pretrain(config, data)
    pre_acc, _ = evaluate(pretrained, data)
    log(f"pre-trained test accuracy {pre_acc:.4f}")
    summary = {"pretrained_test_accuracy": pre_acc}
    if config.dp.enabled:
        model, private = dp_finetune(config, data, pretrained,
                                     make_strategy(_STRATEGY.value, _TPU.value))
        acc, probs = evaluate(model, data)
        plan, steps = private.plan, private.logical_steps_done
        eps = plan.epsilon(steps)
        summary.update(epsilon=eps, delta=plan.delta, noise_multiplier=plan.noise_multiplier,
                       steps=steps, sampling_rate=plan.sampling_rate,
                       expected_batch_size=plan.expected_batch_size,
                       num_private_examples=plan.num_examples, accountant=plan.accountant,
                       target_epsilon=plan.target_epsilon, private_test_accuracy=acc)
        write_variant(workdir, "private", data, probs, acc, private=True, epsilon=eps,
                      delta=plan.delta, steps=steps, noise_multiplier=plan.noise_multiplier)
        log(f"private test accuracy {acc:.4f} at ε = {eps:.3f}, δ = {plan.delta:.3g}")
    if config.non_private.enabled:
        model = non_private_finetune(config, data, pretrained)
        acc, probs = evaluate(model, data)
        summary["non_private_test_accuracy"] = acc
        write_variant(workdir, "non_private", data, probs, acc, private=False)
        log(f"non-private test accuracy {acc:.4f}")
    summary["wall_seconds"] = time.time() - start
    metrics_path = workdir / run_io.METRICS_FILE
    metrics = json.loads(metrics_path.read_text())
    metrics.update(summary)
    run_io.write_json(metrics_path, metrics)
    (workdir / "report.md").write_text(render_report(config, summary, private if config.dp.enabled else None))
    log(f"wrote {metrics_path} and {workdir / 'report.md'} in {summary['wall_seconds']:.0f} s")


def render_report(config, summary: dict, private) -> str:
    """Markdown summary of the run, with the privacy statement."""
    lines = ["# tfdpfair run report", "",
             f"Data: {config.data.name}; model: {config.model.name} (trained: {config.model.train}).",
             "", "| model | test accuracy |", "|---|---|",
             f"| pre-trained (public data only) | {summary['pretrained_test_accuracy']:.4f} |"]
    if "private_test_accuracy" in summary:
        lines.append(f"| DP fine-tuned (ε = {summary['epsilon']:.3f}, δ = {summary['delta']:.3g}) "
                     f"| {summary['private_test_accuracy']:.4f} |")
    if "non_private_test_accuracy" in summary:
        lines.append(f"| non-private fine-tuned | {summary['non_private_test_accuracy']:.4f} |")
    if private is not None:
        plan = private.plan
        lines += ["", "## Privacy", "", privacy_statement(plan, private.logical_steps_done), "",
                  "### Cross-check: TensorFlow Privacy's statement", "",
                  "TF Privacy computes the same mechanism independently (RDP). Our sampler does "
                  "real Poisson sampling, so its \"assuming Poisson sampling\" line is the one "
                  "that applies (it matches ours when we also use RDP).", "", "```",
                  tf_privacy_statement(plan.num_examples, int(round(plan.expected_batch_size)),
                                       private.logical_steps_done * plan.expected_batch_size
                                       / plan.num_examples,
                                       plan.noise_multiplier, plan.delta), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
