r"""Trains one experiment config end to end: DP fine-tuning, baselines, evaluation, report.

  tfdpfair-train --workdir=runs/demo              # or: python -m experiments.train (a clone)
  tfdpfair-train --config=chexpert_nfnet_f0 \
      --config.data.root=/data/CheXpert-v1.0-small --config.model.init=/ckpt/F0_haiku.npz \
      --workdir=runs/chexpert_eps8

``--config`` takes a config file or the name of one shipped in tfdpfair/configs
(cli/config_path.py).

The loop lives in tfdpfair/trainer/runner.py (``train_and_evaluate``); this binary only
parses flags. Rerunning the same command in the same --workdir resumes the run. Writes into
--workdir: metrics.json, predictions/<variant>.npz (for tfdpfair-evaluate), report.md,
metrics.jsonl + tensorboard/, and checkpoint/ (private: holds the secret seeds).
"""

from __future__ import annotations

import logging
import sys

import tensorflow as tf
from absl import app, flags
from ml_collections import config_flags

from tfdpfair.cli import config_path
from tfdpfair.trainer.runner import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(  # default: the packaged demo, from any directory
    "config", config_path.default_config("demo"),
    "Experiment configuration file or the name of a packaged config "
    f"({', '.join(config_path.packaged_configs())}), optionally ':<arg>', e.g. "
    "':runlocal=True'.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Directory for the run's outputs.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored", "multiworker", "tpu"],
    "tf.distribute strategy of the DP fine-tuning: default (one device), mirrored (all local "
    "devices), multiworker (hosts from TF_CONFIG), tpu (--tpu).")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Also write a serving SavedModel (tf.Example and image signatures, "
    "privacy_statement.json, model_card.md; no seeds) of the DP model here.")
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                 make_strategy(_STRATEGY.value, _TPU.value), _EXPORT_DIR.value)
    if summary.get("preempted"):
        raise SystemExit(143)  # stopped by SIGTERM after checkpointing: rerun to resume


def run() -> None:
    """Console script ``tfdpfair-train``."""
    app.run(main, argv=config_path.resolve_argv(sys.argv))


if __name__ == "__main__":
    run()
