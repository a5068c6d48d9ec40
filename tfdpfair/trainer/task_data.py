"""The trainer's dataset registry: config.data.name -> :class:`TaskData`.

  "digits"     built-in demo (data/demo.py): public split for pre-training, private, test;
               subgroup "ink".
  "chexpert"   CheXpert v1.0(-small) at config.data.root (data/chexpert.py): patient-level
               train / validation / test, 14 labels (uncertain policy and training-only label
               smoothing from the config), groups sex / age / race, patient ids.
  "mimic_cxr"  MIMIC-CXR-JPG at config.data.root + MIMIC-IV at config.data.mimic_iv_dir
               (data/mimic_cxr.py): official train / validate / test; sex, age, race, insurance.
  TFDS names   cifar10, cifar100, mnist, imagenet2012, places365_small (data/tfds.py), read
               random-access (Poisson sampling needs it).

Every reader is called before the model is built or any privacy budget spent, so a missing
directory or a file in the wrong layout fails first, with the reader's own message. For CheXpert
and MIMIC-CXR every image file of every split the run reads (train, validation, test) is also
decoded once here (``config.data.verify_images``, default True; tfdpfair/data/image_check.py):
a bad file is named and refused, or with ``config.data.on_bad="skip"`` dropped before N is
counted (the DP plan's N is then the count without it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from tfdpfair.data.sources import ImageConfig


@dataclasses.dataclass
class EvalSplit:
    """A held-out split: ``data`` is numpy images [N, ...] or an IndexedSource."""

    name: str
    data: Any
    y_true: np.ndarray | None = None  # None: read from the source while predicting
    groups: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    patient_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.data)


@dataclasses.dataclass
class TaskData:
    """Everything the trainer needs from a dataset.

    Attributes:
      train: the private training set: (x, y) numpy arrays, or an IndexedSource.
      task: "multiclass" or "multilabel".
      class_names: class names (multiclass) or task names (multilabel).
      test: the final evaluation split (predictions, fairness report).
      validation: the split evaluated during training (None: use ``test``).
      public: non-private (x, y) for pre-training (demo only).
      eval_tasks: multilabel tasks averaged by the reported macro AUC.
      train_groups: subgroup labels of ``train`` when it is a numpy (x, y) pair (digits);
        an IndexedSource carries its own.
    """

    train: Any
    task: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    test: EvalSplit
    validation: EvalSplit | None = None
    public: tuple[np.ndarray, np.ndarray] | None = None
    eval_tasks: tuple[str, ...] | None = None
    train_groups: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(self.train[1]) if isinstance(self.train, tuple) else len(self.train)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _image_config(data_config: Any) -> ImageConfig:
    size = int(data_config.image_size)
    return ImageConfig((size, size), int(data_config.get("channels", 3)),
                       data_config.get("normalization", "imagenet"))


def _digits(data_config: Any, seed: int) -> TaskData:
    from tfdpfair.data.demo import CLASS_NAMES, load_demo_data
    data = load_demo_data(public_fraction=data_config.public_fraction,
                          test_fraction=data_config.test_fraction,
                          image_size=data_config.image_size, seed=seed)
    test = EvalSplit("test", data.test.images, data.test.labels, dict(data.test.groups))
    return TaskData((data.private.images, data.private.labels), "multiclass", CLASS_NAMES,
                    tuple(data.private.images.shape[1:]), test,
                    public=(data.public.images, data.public.labels),
                    train_groups=dict(data.private.groups))


def _bad_input(data_config: Any) -> dict[str, Any]:
    """The loaders' bad-input options from config.data (both default to the safe choice)."""
    return dict(on_bad=data_config.get("on_bad", "error"),
                verify_images=bool(data_config.get("verify_images", True)))


def file_split(name: str, source: Any) -> EvalSplit:
    """An ImageFileSource as an EvalSplit: 0/1 targets, group names, patient ids."""
    groups = {g: np.asarray(source.group_names[g], dtype=object)[codes].astype(str)
              for g, codes in source.groups.items()}
    return EvalSplit(name, source, (source.labels >= 0.5).astype(np.float32), groups,
                     np.asarray(source.patient_ids).astype(str))


def _chexpert(data_config: Any, seed: int) -> TaskData:
    from tfdpfair.data import chexpert
    smoothing = data_config.get("train_label_smoothing", None)
    splits = chexpert.load_chexpert_splits(  # one read and one image check of train.csv
        data_config.root, image_config=_image_config(data_config),
        policy=data_config.uncertain_policy, frontal_only=bool(data_config.frontal_only),
        seed=seed, with_official_valid=False, **_bad_input(data_config),
        smoothing={"train": tuple(smoothing) if smoothing else None})  # held-out: unsmoothed
    train = splits["train"]
    return TaskData(train, "multilabel", chexpert.CHEXPERT_LABELS,
                    tuple(train.element_spec["image"].shape),
                    file_split("test", splits["test"]),
                    file_split("validation", splits["validation"]),
                    eval_tasks=chexpert.EVAL_TASKS)


def _mimic_cxr(data_config: Any, seed: int) -> TaskData:
    from tfdpfair.data import chexpert, mimic_cxr
    kwargs = dict(mimic_iv_dir=data_config.mimic_iv_dir, image_config=_image_config(data_config),
                  policy=data_config.uncertain_policy, **_bad_input(data_config))
    train = mimic_cxr.load_mimic_cxr(data_config.root, "train", **kwargs)
    return TaskData(train, "multilabel", mimic_cxr.MIMIC_LABELS,
                    tuple(train.element_spec["image"].shape),
                    file_split("test", mimic_cxr.load_mimic_cxr(data_config.root, "test",
                                                                **kwargs)),
                    file_split("validation", mimic_cxr.load_mimic_cxr(
                        data_config.root, "validate", **kwargs)),
                    eval_tasks=chexpert.EVAL_TASKS)


def tfds_split(name: str, split: str, data_config: Any) -> Any:
    """An index-addressable TFDS split (random access, as Poisson sampling needs).

    data/tfds.py's ``tfds_source``: on disk through TFDS ``data_source`` (ArrayRecord), or in
    memory with ``data.in_memory=True`` (pure TF lookups: what TPU hosts need).
    """
    from tfdpfair.data import tfds as tfds_lib
    size = data_config.get("image_size", None)
    return tfds_lib.tfds_source(
        name, split, (int(size), int(size)) if size else None,
        normalization=data_config.get("normalization", "dataset"),
        channels=data_config.get("channels", None), data_dir=data_config.get("data_dir", None),
        download=bool(data_config.get("download", False)),
        in_memory=bool(data_config.get("in_memory", False)))


def _tfds(data_config: Any, seed: int) -> TaskData:
    from tfdpfair.data import tfds as tfds_lib
    name = data_config.name
    spec = tfds_lib.get_spec(name)
    train = tfds_split(name, data_config.train_split, data_config)
    test = tfds_split(name, data_config.eval_split, data_config)
    validation = None
    if data_config.get("validation_split", None):
        validation = EvalSplit("validation", tfds_split(name, data_config.validation_split,
                                                        data_config))
    return TaskData(train, "multiclass", tuple(str(i) for i in range(spec.num_classes)),
                    tuple(train.element_spec["image"].shape), EvalSplit("test", test),
                    validation)


DATASETS: dict[str, Callable[[Any, int], TaskData]] = {
    "digits": _digits, "chexpert": _chexpert, "mimic_cxr": _mimic_cxr}
TFDS_NAMES = ("cifar10", "cifar100", "mnist", "imagenet2012", "places365_small")


def load_task_data(data_config: Any, seed: int) -> TaskData:
    """Reads the dataset named ``data_config.name`` (DATASETS or a TFDS name)."""
    name = data_config.name
    if name in DATASETS:
        return DATASETS[name](data_config, seed)
    if name in TFDS_NAMES:
        return _tfds(data_config, seed)
    raise ValueError(f"unknown data.name {name!r}; known: {sorted(DATASETS)} and TFDS "
                     f"{list(TFDS_NAMES)}.")


def train_split(data: TaskData) -> EvalSplit:
    """The private training set as an EvalSplit (for evaluations of the members, e.g. the
    membership audit): arrays with ``train_groups``, or the source's own groups/patients."""
    if isinstance(data.train, tuple):
        return EvalSplit("train", data.train[0], data.train[1], dict(data.train_groups))
    if hasattr(data.train, "patient_ids") and hasattr(data.train, "group_names"):
        return file_split("train", data.train)
    return EvalSplit("train", data.train)


def predict_split(model: Any, split: EvalSplit, batch_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, K], y_true) of ``model`` on a split, in index order."""
    if isinstance(split.data, np.ndarray):
        logits = model.predict(split.data, batch_size=batch_size, verbose=0)
        return np.asarray(logits), split.y_true
    dataset = split.data.sequential(batch_size)
    logits, labels = [], []
    predict = tf.function(lambda x: model(x, training=False))
    for batch in dataset:
        logits.append(np.asarray(predict(batch["image"])))
        labels.append(np.asarray(batch["label"]))
    y_true = split.y_true if split.y_true is not None else np.concatenate(labels)
    return np.concatenate(logits), y_true


def non_private_dataset(train: Any, batch_size: int, seed: int) -> tuple[Any, dict]:
    """(x, fit kwargs) for a plain Keras fit over the training set (shuffled batches)."""
    if isinstance(train, tuple):
        return train[0], {"y": train[1], "batch_size": batch_size, "shuffle": True}
    n = len(train)
    dataset = (tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size).map(lambda i: _image_label(train.get_batch(i)),
                                      num_parallel_calls=tf.data.AUTOTUNE)
               .prefetch(tf.data.AUTOTUNE))
    return dataset, {}


def _image_label(example: dict) -> tuple[tf.Tensor, tf.Tensor]:
    return example["image"], example["label"]
