"""Example-level vs patient-level DP on the demo digits at the same ε; prints one JSON line.

The digits have no patients, so patients are synthetic: the private split is shuffled (seed 0)
and cut into consecutive groups of ``--images-per-patient`` digits (one "patient" = several
images, as a CheXpert patient has several studies). Both runs start from the same model
pre-trained on the public split and fine-tune all its layers with DP-SGD for the same number of
expected passes at the same target ε; the patient-level run samples patients (expected batch
= examples' batch / images per patient, so a step sees about as many images) and clips each
patient's mean loss once, protecting a whole patient instead of one image.

  python benchmarks/patient_vs_example.py [--epsilon 4] [--epochs 20]
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfdpfair  # noqa: E402
from tfdpfair.data.demo import load_demo_data  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build(shape) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                             keras.layers.Dense(64, activation="tanh"),
                             keras.layers.Dense(10, name="head")])


def accuracy(model, split) -> float:
    return float(np.mean(model.predict(split.images, verbose=0).argmax(1) == split.labels))


def dp_run(pretrained, data, config, patient_ids=None) -> tuple[float, float]:
    model = build(data.public.images.shape[1:])
    model.set_weights(pretrained.get_weights())
    dp = tfdpfair.make_private(model, config)
    dp.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
    dp.fit(data.private.images, data.private.labels, epochs=ARGS.epochs, verbose=0,
           patient_ids=patient_ids)
    return accuracy(model, data.test), dp.epsilon_spent()


def main() -> None:
    data = load_demo_data(public_fraction=0.15, test_fraction=0.2)
    k = ARGS.images_per_patient
    order = np.random.default_rng(0).permutation(len(data.private))
    patient_ids = np.empty(len(data.private), np.int64)
    patient_ids[order] = np.arange(len(data.private)) // k
    pretrained = build(data.public.images.shape[1:])
    pretrained.compile(optimizer=keras.optimizers.Adam(3e-3), loss=LOSS)
    pretrained.fit(data.public.images, data.public.labels, epochs=60, batch_size=64, verbose=0)
    common = dict(l2_norm_clip=1.0, micro_batch_size=64, target_epsilon=ARGS.epsilon,
                  rescale_to_unit_norm=True)
    start = time.time()
    example_acc, example_eps = dp_run(pretrained, data, tfdpfair.DPConfig(
        expected_batch_size=256, **common))
    patient_acc, patient_eps = dp_run(pretrained, data, tfdpfair.DPConfig(
        expected_batch_size=256 // k, privacy_unit="patient", max_examples_per_patient=k,
        **common), patient_ids)
    print(json.dumps({
        "benchmark": "patient_vs_example", "target_epsilon": ARGS.epsilon,
        "epochs": ARGS.epochs, "images_per_patient": k,
        "num_examples": len(data.private), "num_patients": int(patient_ids.max() + 1),
        "pretrained_test_accuracy": round(accuracy(pretrained, data.test), 4),
        "example_level_test_accuracy": round(example_acc, 4),
        "example_level_epsilon": round(example_eps, 4),
        "patient_level_test_accuracy": round(patient_acc, 4),
        "patient_level_epsilon": round(patient_eps, 4),
        "wall_seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--images-per-patient", type=int, default=3)
    ARGS = parser.parse_args()
    main()
