"""The Trainer's ``custom_config``: every key, its default, and validation.

TFX hands ``custom_config`` (a JSON-serialisable dict given to ``Trainer(custom_config=...)``) to
``run_fn`` as ``fn_args.custom_config``. :func:`from_custom_config` turns it into a frozen
:class:`TFXTrainerConfig`; an unknown key is refused (a typo such as ``target_epsilion`` must not
silently fall back to a default privacy setting).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from tfdpfair.data.sources import ImageConfig
from tfdpfair.privacy.dp_sgd import DPConfig

ENCODINGS = ("encoded", "float")  # "png" and "jpeg" are accepted as aliases of "encoded"
TASKS = ("multiclass", "multilabel")
DEFAULT_MAX_TRAIN_BYTES = 4 * 1024 ** 3  # in-memory float32 training images


@dataclasses.dataclass(frozen=True)
class ExampleFormat:
    """Where the image, label and group features are in a tf.Example, and how to decode them.

    Attributes:
      image_key: feature holding the image: one bytes value (PNG/JPEG, ``encoding="encoded"``)
        or a float list of ``image_shape`` values (``encoding="float"``, row-major H, W, C).
      label_key: int64 class id (multiclass) or a float list of ``num_classes`` 0/1 targets
        (multilabel).
      encoding: "encoded" or "float".
      image_shape: (H, W, C) of float-list images (required for "float").
      decode_channels: channels an encoded image is decoded to (1: grayscale, 3: RGB).
      float_scale: float-list values are divided by this to lie in [0, 1] (e.g. 255).
      group_keys: demographic features (bytes, int64 or float) for the fairness summary; read
        from the evaluation examples only.
      patient_key: optional feature with a patient id: training then protects patients
        (DPConfig.privacy_unit="patient").
      image_config: model input size, channels and normalisation (data/sources.py).
    """

    image_key: str = "image"
    label_key: str = "label"
    encoding: str = "encoded"
    image_shape: tuple[int, int, int] | None = None
    decode_channels: int = 3
    float_scale: float = 1.0
    group_keys: tuple[str, ...] = ()
    patient_key: str | None = None
    image_config: ImageConfig = ImageConfig()

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"image_encoding must be one of {ENCODINGS} (or png/jpeg), got "
                             f"{self.encoding!r}.")
        if self.encoding == "float" and (self.image_shape is None or len(self.image_shape) != 3):
            raise ValueError("image_encoding='float' needs image_shape = [H, W, C] (the float "
                             "list is reshaped to it).")
        if self.decode_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 or 3, got {self.decode_channels}.")

    @property
    def input_channels(self) -> int:
        """Channels of the image before conversion to the model's channels."""
        return int(self.image_shape[2]) if self.encoding == "float" else self.decode_channels


@dataclasses.dataclass(frozen=True)
class TFXTrainerConfig:
    """Everything run_fn reads from custom_config (see README, "TFX", for the key list)."""

    example_format: ExampleFormat
    dp_config: DPConfig
    num_classes: int
    task: str = "multiclass"
    class_names: tuple[str, ...] | None = None
    epochs: float = 1.0
    model: str = "simple_cnn"
    trainable: str = "all"
    init_weights: str | None = None
    init_allow_pickle: bool = False
    optimizer: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.0
    export_weights: str = "last"
    max_train_examples: int = 1_000_000
    max_train_bytes: int = DEFAULT_MAX_TRAIN_BYTES
    eval_batch_size: int = 256
    fairness_num_bootstrap: int = 200
    fairness_min_group_size: int = 30
    tensorboard: bool = True

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.class_names or tuple(str(i) for i in range(self.num_classes))


_DP_KEYS = ("target_epsilon", "delta", "l2_norm_clip", "expected_batch_size", "micro_batch_size",
            "noise_multiplier", "ema_decay", "polyak", "accountant", "augmult",
            "rescale_to_unit_norm", "max_examples_per_patient", "noise_seed", "sampling_seed")
_FORMAT_KEYS = ("image_key", "label_key", "image_encoding", "image_shape", "image_channels",
                "float_scale", "group_keys", "patient_key")
_IMAGE_KEYS = ("image_size", "channels", "normalization", "resize", "crop_fraction", "mean",
               "std")
_TOP_KEYS = ("num_classes", "task", "class_names", "epochs", "model", "trainable",
             "init_weights", "init_allow_pickle", "optimizer", "learning_rate", "momentum",
             "export_weights",
             "max_train_examples", "max_train_bytes", "eval_batch_size",
             "fairness_num_bootstrap", "fairness_min_group_size", "tensorboard")
KNOWN_KEYS = frozenset(_DP_KEYS + _FORMAT_KEYS + _IMAGE_KEYS + _TOP_KEYS)


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(value)


def _image_config(c: Mapping[str, Any]) -> ImageConfig:
    shape = c.get("image_shape")
    size = c.get("image_size") or (None if shape is None else list(shape)[:2])
    if size is None:
        raise ValueError("custom_config needs image_size = [H, W] (the model input size; "
                         "images are resized to it inside the serving graph).")
    kwargs = {k: (tuple(c[k]) if k in ("mean", "std") else c[k])
              for k in ("normalization", "resize", "crop_fraction", "mean", "std") if k in c}
    return ImageConfig(image_size=tuple(int(s) for s in size), channels=int(c.get("channels", 3)),
                       **kwargs)


def _example_format(c: Mapping[str, Any], image_config: ImageConfig) -> ExampleFormat:
    encoding = str(c.get("image_encoding", "encoded")).lower()
    encoding = "encoded" if encoding in ("png", "jpeg", "jpg") else encoding
    shape = c.get("image_shape")
    return ExampleFormat(
        image_key=str(c.get("image_key", "image")), label_key=str(c.get("label_key", "label")),
        encoding=encoding, image_shape=None if shape is None else tuple(int(s) for s in shape),
        decode_channels=int(c.get("image_channels", image_config.channels)),
        float_scale=float(c.get("float_scale", 1.0)),
        group_keys=tuple(c.get("group_keys", ()) or ()), patient_key=c.get("patient_key"),
        image_config=image_config)


def _dp_config(c: Mapping[str, Any]) -> DPConfig:
    kwargs = {k: c[k] for k in _DP_KEYS if k in c and c[k] is not None}
    if c.get("patient_key"):
        kwargs["privacy_unit"] = "patient"
    return DPConfig(**kwargs)


def from_custom_config(custom_config: Mapping[str, Any] | None) -> TFXTrainerConfig:
    """Validates ``fn_args.custom_config`` and returns the typed configuration.

    Raises ValueError naming any unknown key, a missing ``num_classes`` or ``image_size``, or
    DP settings that DPConfig refuses (e.g. neither target_epsilon nor noise_multiplier).
    """
    c = dict(custom_config or {})
    unknown = sorted(set(c) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown custom_config keys {unknown}; known keys: "
                         f"{sorted(KNOWN_KEYS)} (see README, 'TFX').")
    if "num_classes" not in c:
        raise ValueError("custom_config needs num_classes (classes, or tasks for multilabel).")
    task = c.get("task", "multiclass")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    image_config = _image_config(c)
    dp_config = _dp_config(c)
    default_weights = "ema" if dp_config.ema_decay is not None else "last"
    top = {k: c[k] for k in _TOP_KEYS if k in c and k not in ("task", "class_names")}
    config = TFXTrainerConfig(
        example_format=_example_format(c, image_config), dp_config=dp_config, task=task,
        class_names=_tuple(c.get("class_names")),
        **{"export_weights": default_weights, **top})
    if config.class_names is not None and len(config.class_names) != config.num_classes:
        raise ValueError(f"class_names has {len(config.class_names)} names for num_classes="
                         f"{config.num_classes}.")
    if config.export_weights not in ("last", "ema", "polyak"):
        raise ValueError(f"export_weights must be last, ema or polyak, got "
                         f"{config.export_weights!r}.")
    return config
