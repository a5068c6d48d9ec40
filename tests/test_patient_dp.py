"""Patient-level DP (issue 14): Poisson sampling over patients, up to k images each, one clip
per patient, accounting over patients. References are brute-force loops and dp_accounting."""

import os

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from dp_reference import reference_epsilon as rdp_epsilon
from PIL import Image

import tfdpfair
from tfdpfair.data import chexpert
from tfdpfair.data.sources import ImageConfig
from tfdpfair.privacy.clipping import clipped_grad_sum
from tfdpfair.privacy.sampling import poisson_sample
from tfdpfair.training import input_pipeline
from tfdpfair.training.example_loss import example_loss_fn
from tfdpfair.training.patients import PatientIndex, choose_images

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def patient_data(num_patients=15, seed=0):
    """Patients with 0..6 images each (ids shuffled over the examples)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, num_patients)
    ids = rng.permutation(np.repeat(np.arange(num_patients) * 7 + 100, counts))
    x = rng.normal(size=(ids.size, 5)).astype(np.float32)
    y = rng.integers(0, 3, ids.size).astype(np.int32)
    return x, y, ids


def model_fn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                             keras.layers.Dense(3)])


def test_patient_index_groups_examples():
    ids = np.array(["b", "a", "b", "c", "b"])
    index = PatientIndex.from_ids(ids)
    assert list(index.ids) == ["b", "a", "c"]
    assert list(index.counts) == [3, 1, 1]
    assert sorted(index.table[0][:3]) == [0, 2, 4] and index.table[1][0] == 1


def test_choose_images_caps_at_k_without_replacement_and_uniformly():
    rows = tf.constant([[10, 11, 12, 13, 14], [20, 21, 0, 0, 0], [0, 0, 0, 0, 0]], tf.int64)
    counts = tf.constant([5, 2, 0], tf.int64)
    hits = np.zeros(5)
    for trial in range(400):
        keys = tf.random.stateless_uniform([3, 5], seed=[trial, 1])
        chosen, mask = choose_images(rows, counts, 3, keys)
        chosen, mask = chosen.numpy(), mask.numpy()
        assert mask[0].sum() == 3 and len(set(chosen[0])) == 3  # k caps, no repeats
        assert set(chosen[1][mask[1] > 0]) == {20, 21} and mask[1].sum() == 2
        assert mask[2].sum() == 0  # a patient without images contributes nothing
        hits[chosen[0] - 10] += 1
    np.testing.assert_allclose(hits / 400, 3 / 5, atol=0.08)  # uniform over the 5 images


def step_elements(data, step, m, seed=3, q=0.5):
    make = input_pipeline.dataset_fn(data, sampling_seed=seed, sampling_rate=q,
                                     micro_batch_size=m, start_step=step, end_step=step + 1)
    return list(make(tf.distribute.InputContext()))


@pytest.mark.parametrize("m", [1, 4])
def test_one_clip_per_patient_matches_brute_force_and_bounds_sensitivity(m):
    """The step's clipped sum equals Σ_p clip_C(∇ mean loss over p's chosen images), for any
    micro-batch size, so removing a patient moves it by ‖clip(g_p)‖ <= C."""
    x, y, ids = patient_data()
    model, clip, k = model_fn(), 0.05, 3
    data = input_pipeline.with_patients(input_pipeline.training_data(x, y), ids, k)
    loss_fn = example_loss_fn(model, LOSS, patient=True)
    elements = step_elements(data, step=2, m=m)
    total = [np.zeros(v.shape) for v in model.trainable_variables]
    per_patient = {}
    for _, xs, ys, mask in elements:
        clipped = clipped_grad_sum(loss_fn, model.trainable_variables, (xs, ys), mask, clip,
                                   has_aux=True)
        total = [t + g.numpy() for t, g in zip(total, clipped.grad_sum)]
        for i in np.flatnonzero(mask.numpy()):
            images = xs[i].numpy()[ys["image_mask"][i].numpy() > 0]
            labels = ys["labels"][i].numpy()[ys["image_mask"][i].numpy() > 0]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    labels, model(images), from_logits=True))
            grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
            norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
            per_patient[len(per_patient)] = [g * min(1.0, clip / norm) for g in grads]
            assert 1 <= len(images) <= k
    sampled = poisson_sample(3, 2, data.num_units, 0.5).numpy()
    assert len(per_patient) == sampled.size  # every sampled patient, once
    brute = [sum(p[v] for p in per_patient.values()) for v in range(len(total))]
    for got, want in zip(total, brute):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    for grads in per_patient.values():
        assert np.sqrt(sum(np.sum(g ** 2) for g in grads)) <= clip * (1 + 1e-6)


def test_padding_slots_never_hold_another_patients_image():
    x, y, ids = patient_data()
    data = input_pipeline.with_patients(input_pipeline.training_data(x, y), ids, 6)
    for _, xs, ys, mask in step_elements(data, step=0, m=4):
        image_mask = ys["image_mask"].numpy()
        assert np.all(xs.numpy()[image_mask == 0] == 0)
        assert np.all(image_mask[mask.numpy() == 0] == 0)


def test_fit_accounts_over_patients_with_patient_delta_and_statement():
    x, y, ids = patient_data(num_patients=30)
    dp = tfdpfair.make_private(model_fn(), tfdpfair.DPConfig(
        expected_batch_size=6, micro_batch_size=4, noise_multiplier=1.1,
        privacy_unit="patient", max_examples_per_patient=2, noise_seed=0, sampling_seed=1))
    dp.compile(optimizer=keras.optimizers.SGD(0.2), loss=LOSS, metrics=["accuracy"])
    history = dp.fit(x, y, steps=7, patient_ids=ids, verbose=0)
    plan = dp.plan
    assert plan.num_examples == 30 and plan.unit == "patient"
    assert plan.delta == pytest.approx(30 ** -1.1)
    assert dp.epsilon_spent() == pytest.approx(rdp_epsilon(1.1, 6 / 30, 7, 30 ** -1.1),
                                               rel=1e-9)
    assert np.isfinite(history.history["nonprivate_accuracy"][-1])
    from tfdpfair.privacy.statement import privacy_statement
    statement = privacy_statement(plan, 7)
    assert "one patient (all their images)" in " ".join(statement.split())
    no_ids = tfdpfair.make_private(model_fn(), tfdpfair.DPConfig(
        noise_multiplier=1.0, privacy_unit="patient"))
    no_ids.compile(optimizer="sgd", loss=LOSS)
    with pytest.raises(ValueError, match="patient ids"):
        no_ids.fit(x, y, steps=1)


@pytest.fixture
def chexpert_root(tmp_path):
    """A CheXpert-layout directory: 6 patients with 1-3 studies each."""
    root = tmp_path / "CheXpert-v1.0-small"
    rng = np.random.default_rng(0)
    labels = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
              "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
              "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
    records = []
    for p in range(6):
        for study in range(1 + p % 3):
            path = f"CheXpert-v1.0-small/train/patient{p:05d}/study{study + 1}/view1_frontal.jpg"
            os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L").save(
                tmp_path / path)
            record = {"Path": path, "Sex": "Female" if p % 2 else "Male", "Age": 30 + p,
                      "Frontal/Lateral": "Frontal", "AP/PA": "PA"}
            record.update({name: float(rng.choice([1.0, 0.0])) for name in labels})
            records.append(record)
    pd.DataFrame(records).to_csv(root / "train.csv", index=False)
    return str(root)


def test_patient_level_fit_on_a_chexpert_directory(chexpert_root):
    source = chexpert.load_chexpert(
        chexpert_root, split="train_all", demo_path=None,
        image_config=ImageConfig(image_size=(16, 16), channels=1, normalization="zero_one"))
    assert len(set(source.patient_ids)) == 6 and len(source) == 12
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(2, 3, strides=2),
                              keras.layers.Flatten(),
                              keras.layers.Dense(source.labels.shape[1])])
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        expected_batch_size=2, micro_batch_size=2, noise_multiplier=1.0, delta=1e-3,
        privacy_unit="patient", max_examples_per_patient=2, augmult=2))
    dp.compile(optimizer=keras.optimizers.SGD(0.1),
               loss=keras.losses.BinaryCrossentropy(from_logits=True))
    history = dp.fit(source, steps=3, verbose=0)
    assert dp.logical_steps_done == 3 and dp.plan.num_examples == 6
    assert np.isfinite(history.history["nonprivate_loss"][-1])


def test_patients_are_poisson_sampled_with_binomial_moments():
    """The pipeline samples patients (not images) by poisson_sample over P: |S_t| has mean qP
    and variance q(1-q)P, and the elements of a step hold exactly those patients."""
    num_patients, q = 200, 0.1
    sizes = [poisson_sample(9, t, num_patients, q).numpy().size for t in range(400)]
    assert np.mean(sizes) == pytest.approx(q * num_patients, rel=0.05)
    assert np.var(sizes) == pytest.approx(q * (1 - q) * num_patients, rel=0.25)
    x, y, ids = patient_data()
    data = input_pipeline.with_patients(input_pipeline.training_data(x, y), ids, 2)
    index = data.patients
    row_of = {x[i].tobytes(): i for i in range(len(x))}
    patient_of_id = {pid: p for p, pid in enumerate(index.ids)}
    for step in (0, 4):
        seen = []
        for _, xs, ys, mask in step_elements(data, step=step, m=3, seed=9):
            for i in np.flatnonzero(mask.numpy()):
                images = xs[i].numpy()[ys["image_mask"][i].numpy() > 0]
                owners = {patient_of_id[ids[row_of[image.tobytes()]]] for image in images}
                assert len(owners) == 1  # one patient's own images, at most k = 2
                assert 1 <= len(images) <= 2
                seen.append(owners.pop())
        want = poisson_sample(9, step, index.num_patients, 0.5).numpy()
        assert sorted(seen) == sorted(want.tolist())
