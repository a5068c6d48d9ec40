"""The TFX Trainer module (tfdpfair/tfx) against TFX's contract, duck-typed (TFX is not installed).

Writes small gzipped TFRecord files of tf.Example as ExampleGen does (PNG-encoded 8x8 digits),
runs run_fn with an FnArgs-like object, loads the SavedModel with tf.saved_model.load and checks
the served probabilities against the in-memory model and an independent numpy preprocessing.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from tfdpfair.data import demo
from tfdpfair.tfx import examples as examples_lib
from tfdpfair.tfx import export as export_lib
from tfdpfair.tfx import trainer_module
from tfdpfair.tfx.config import from_custom_config
from tfdpfair.training.input_pipeline import StreamNotSupportedError

NOISE_SEED = 0x1D2C3B4A5F6E7A
SAMPLING_SEED = 0x2A3B4C5D6E7F81
SAVED_MODEL_CLI = pathlib.Path(sys.executable).with_name("saved_model_cli")


def _example(image_u8: np.ndarray, label: int, group: str) -> bytes:
    png = tf.io.encode_png(tf.constant(image_u8)).numpy()
    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "ink": tf.train.Feature(bytes_list=tf.train.BytesList(value=[group.encode()])),
    })).SerializeToString()


def _write(path: pathlib.Path, records: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for record in records:
            writer.write(record)


@pytest.fixture(scope="module")
def tfrecords(tmp_path_factory):
    """ExampleGen-style layout: Split-train (2 files, 60 examples), Split-eval (1 file, 40)."""
    root = tmp_path_factory.mktemp("examples")
    data = demo.load_demo_data(image_size=8, seed=0)
    splits = {}
    for name, split, n in (("train", data.private, 60), ("eval", data.test, 40)):
        images = np.round(split.images[:n] * 255).astype(np.uint8)
        records = [_example(images[i], split.labels[i], split.groups["ink"][i]) for i in range(n)]
        if name == "train":
            _write(root / "Split-train" / "data_tfrecord-00000-of-00002.gz", records[:35])
            _write(root / "Split-train" / "data_tfrecord-00001-of-00002.gz", records[35:])
        else:
            _write(root / "Split-eval" / "data_tfrecord-00000-of-00001.gz", records)
        splits[name] = (images, split.labels[:n], records)
    return root, splits


def _custom_config(**overrides):
    config = dict(
        image_key="image", label_key="label", image_encoding="png", image_size=[8, 8],
        channels=1, normalization="zero_one", num_classes=10, group_keys=["ink"],
        model="simple_cnn", trainable="all", target_epsilon=8.0, delta=1e-3, l2_norm_clip=1.0,
        expected_batch_size=20, micro_batch_size=10, epochs=3, ema_decay=0.9,
        learning_rate=0.5, fairness_num_bootstrap=50, fairness_min_group_size=5,
        noise_seed=NOISE_SEED, sampling_seed=SAMPLING_SEED)
    config.update(overrides)
    return config


def _fn_args(root: pathlib.Path, out: pathlib.Path, custom_config: dict, **overrides):
    """The FnArgs fields TFX 1.21 passes to a generic Trainer's run_fn."""
    fields = dict(
        train_files=[str(root / "Split-train" / "*")], eval_files=[str(root / "Split-eval" / "*")],
        data_accessor=None, train_steps=1000, eval_steps=5, schema_path=None, schema_file=None,
        transform_graph_path=None, transform_output=None,
        serving_model_dir=str(out / "Format-Serving"), eval_model_dir=str(out / "Format-TFMA"),
        model_run_dir=str(out / "model_run"), base_model=None, hyperparameters=None,
        custom_config=custom_config)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def trained(tfrecords, tmp_path_factory):
    root, splits = tfrecords
    out = tmp_path_factory.mktemp("trainer_output")
    fn_args = _fn_args(root, out, _custom_config())
    result = trainer_module.run_fn(fn_args)
    return fn_args, result, splits


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_plan_decides_steps_and_export_layout(trained):
    fn_args, result, _ = trained
    plan = result.dp_model.plan
    assert plan.num_examples == 60 and plan.steps == 9  # ceil(3 epochs * 60 / 20), not 1000
    assert result.requested_train_steps == 1000
    assert result.dp_model.logical_steps_done == plan.steps
    out = pathlib.Path(fn_args.serving_model_dir)
    assert (out / "saved_model.pb").exists() and (out / "variables").is_dir()
    record = json.loads((out / "privacy_statement.json").read_text())
    assert record["unit_of_privacy"] == "example" and record["num_examples"] == 60
    assert record["steps"] == 9 and record["weights"] == "ema"
    assert record["sampling_rate"] == pytest.approx(20 / 60)
    assert record["epsilon"] == pytest.approx(plan.epsilon(9)) and record["epsilon"] <= 8.0
    assert record["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    card = (out / "model_card.md").read_text()
    for text in ("## Privacy", "## Data", "## Fairness", "### ink", "serving_default",
                 f"{record['noise_multiplier']:.4g}", "unit of privacy | example"):
        assert text in card
    assert result.fairness["attributes"]["ink"]["groups"]  # groups from the eval examples
    assert not list(out.parent.glob(".Format-Serving*"))  # no staging left behind


def test_serving_default_matches_in_memory_model(trained):
    fn_args, result, splits = trained
    images, _, records = splits["eval"]
    loaded = tf.saved_model.load(fn_args.serving_model_dir)
    served = loaded.signatures["serving_default"](examples=tf.constant(records))
    served = served["probabilities"].numpy()
    dp = result.dp_model
    eval_x = examples_lib.read_examples(
        examples_lib.resolve_files(fn_args.eval_files, "eval_files"),
        result.config.example_format, "multiclass", 10).x
    independent_x = images.astype(np.float32) / 255.0  # PNG is lossless; zero_one normalisation
    with dp.swapped_weights("ema"):
        in_memory = _softmax(np.asarray(dp.inner(eval_x, training=False), np.float64))
        independent = _softmax(np.asarray(dp.inner(independent_x, training=False), np.float64))
    assert served.shape == (40, 10)
    np.testing.assert_allclose(served, in_memory, atol=1e-5)
    np.testing.assert_allclose(served, independent, atol=1e-5)
    by_images = loaded.signatures["serving_images"](images=tf.constant(independent_x))
    np.testing.assert_allclose(by_images["probabilities"].numpy(), independent, atol=1e-5)
    assert result.evaluation["eval accuracy"] == pytest.approx(
        np.mean(np.argmax(independent, 1) == splits["eval"][1]))


def test_saved_model_cli_lists_signatures(trained):
    fn_args, _, _ = trained
    shown = subprocess.run([str(SAVED_MODEL_CLI), "show", "--dir", fn_args.serving_model_dir,
                            "--all"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert shown.returncode == 0, shown.stderr
    assert "signature_def['serving_default']" in shown.stdout
    assert "signature_def['serving_images']" in shown.stdout
    assert "examples" in shown.stdout and "probabilities" in shown.stdout


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _seed_needles() -> dict[str, bytes]:
    needles = {}
    for seed in (NOISE_SEED, NOISE_SEED + 1, SAMPLING_SEED):  # noise + 1: the augment seed
        needles[f"{seed} int64 LE"] = seed.to_bytes(8, "little")
        needles[f"{seed} int64 BE"] = seed.to_bytes(8, "big")
        needles[f"{seed} low int32 LE"] = (seed & 0xFFFFFFFF).to_bytes(4, "little")
        needles[f"{seed} high int32 LE"] = (seed >> 32).to_bytes(4, "little")
        needles[f"{seed} varint"] = _varint(seed)
        needles[f"{seed} decimal"] = str(seed).encode()
        needles[f"{seed} hex"] = f"{seed:x}".encode()
        needles[f"{seed} float64"] = np.float64(seed).tobytes()
    return needles


def _files(directory: str) -> list[pathlib.Path]:
    return [p for p in pathlib.Path(directory).rglob("*") if p.is_file()]


def test_export_contains_no_seed_values(trained, tmp_path):
    fn_args, result, _ = trained
    assert result.dp_model.seeds["noise"] == NOISE_SEED  # the run really used these seeds
    resume = tmp_path / "resume.weights.h5"  # positive control: a resume checkpoint has them
    result.dp_model.save_weights(str(resume))
    assert any(needle in resume.read_bytes() for needle in _seed_needles().values())
    files = _files(fn_args.serving_model_dir) + _files(fn_args.model_run_dir)
    assert any(p.name == "saved_model.pb" for p in files)
    needles = _seed_needles()
    for path in files:
        content = path.read_bytes()
        found = [name for name, needle in needles.items() if needle in content]
        assert not found, f"{path} contains seed values: {found}"


def test_stream_only_input_is_refused(tfrecords, tmp_path):
    root, _ = tfrecords
    fn_args = _fn_args(root, tmp_path, _custom_config(), train_files=[],
                       data_accessor=object())
    with pytest.raises(StreamNotSupportedError, match="random access"):
        trainer_module.run_fn(fn_args)
    assert not os.path.exists(fn_args.serving_model_dir)


def test_too_large_training_set_is_refused(tfrecords, tmp_path):
    root, _ = tfrecords
    fn_args = _fn_args(root, tmp_path, _custom_config(max_train_examples=50))
    with pytest.raises(examples_lib.TrainingSetTooLargeError,
                       match=r"60 examples.*IndexedSource.*ImageFileSource.*chexpert"):
        trainer_module.run_fn(fn_args)
    assert not os.path.exists(fn_args.serving_model_dir)


def test_unknown_custom_config_key_is_refused():
    with pytest.raises(ValueError, match="target_epsilion"):
        from_custom_config(_custom_config(target_epsilion=1.0))


def test_export_serving_needs_a_privacy_record_for_a_plain_keras_model(trained, tmp_path):
    _, result, _ = trained
    with pytest.raises(ValueError, match="privacy statement"):
        export_lib.export_serving(result.dp_model.inner, tmp_path / "serving",
                                  result.config.example_format.image_config)


def test_export_serving_from_a_release_export(trained, tmp_path):
    """The non-TFX path: DPModel.export_release -> model.keras -> export_serving."""
    import keras

    fn_args, result, splits = trained
    release = result.dp_model.export_release(tmp_path / "release", weights="ema")
    model = keras.saving.load_model(release / "model.keras", compile=False)
    record = export_lib.privacy_record_from_release(release)
    assert record["epsilon"] == pytest.approx(result.privacy["epsilon"])
    out = export_lib.export_serving(model, tmp_path / "serving", result.config.example_format,
                                    record)
    records = tf.constant(splits["eval"][2])
    ours = tf.saved_model.load(str(out)).signatures["serving_default"](examples=records)
    tfx = tf.saved_model.load(fn_args.serving_model_dir).signatures["serving_default"](
        examples=records)
    np.testing.assert_allclose(ours["probabilities"].numpy(), tfx["probabilities"].numpy(),
                               atol=1e-6)
    assert json.loads((out / "privacy_statement.json").read_text())["steps"] == 9


def test_module_file_loads_as_tfx_loads_it():
    """TFX execs module_file from its path, as a module not registered in sys.modules."""
    import importlib.machinery
    import importlib.util

    path = str(pathlib.Path(trainer_module.__file__))
    loader = importlib.machinery.SourceFileLoader("user_module_0", path)
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_loader(loader.name, loader, origin=path))
    loader.exec_module(module)
    assert callable(module.run_fn)


def test_float_list_images_decode_like_numpy():
    """image_encoding="float": a float list reshaped to image_shape, divided by float_scale."""
    config = from_custom_config(_custom_config(
        image_encoding="float", image_shape=[8, 8, 1], float_scale=255.0, image_size=None,
        normalization="minus_one_one"))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.float32)
    serialized = [tf.train.Example(features=tf.train.Features(feature={"image": tf.train.Feature(
        float_list=tf.train.FloatList(value=p.ravel()))})).SerializeToString() for p in pixels]
    images = examples_lib.images_from_serialized(tf.constant(serialized), config.example_format)
    np.testing.assert_allclose(images.numpy(), pixels / 255.0 * 2.0 - 1.0, atol=1e-5)


def test_bad_encoded_image_in_eval_files_is_refused_before_training(tfrecords, tmp_path,
                                                                     monkeypatch):
    """Invariant 10: eval records are otherwise read only after training spent the budget."""
    root, splits = tfrecords
    records = list(splits["eval"][2])
    png = tf.io.encode_png(tf.constant(splits["eval"][0][3])).numpy()
    records[3] = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png[:len(png) // 2]])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        "ink": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"light"])),
    })).SerializeToString()
    bad_eval = tmp_path / "Split-eval" / "data_tfrecord-00000-of-00001.gz"
    _write(bad_eval, records)
    calls = []
    monkeypatch.setattr(trainer_module, "make_private", lambda *a, **k: calls.append(a))
    fn_args = _fn_args(root, tmp_path / "out", _custom_config(),
                       eval_files=[str(tmp_path / "Split-eval" / "*")])
    with pytest.raises(ValueError, match=rf"eval_files record.*{bad_eval} record 3 \("):
        trainer_module.run_fn(fn_args)
    assert calls == [] and not os.path.exists(fn_args.serving_model_dir)
    assert examples_lib.check_encoded_images(
        examples_lib.resolve_files(fn_args.train_files, "train_files"),
        from_custom_config(_custom_config()).example_format, "train_files") == 60
