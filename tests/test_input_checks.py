"""Bad inputs are found before the privacy plan is fixed (issue 19 case 8; DESIGN.md inv. 10).

Each case writes a small CheXpert-layout directory (tests/trainer_fixtures.py) and breaks one
file: a truncated JPEG in the test split, a text file named .jpg in the training split, an RGB
file in a grayscale dataset. Expected counts come from the CSV and the patient split computed
without image checks, independently of the checking code.
"""

from __future__ import annotations

import importlib
import json
import logging
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from ml_collections import config_flags
from PIL import Image

import tfdpfair
import trainer_fixtures
from tfdpfair.data import chexpert, image_check, mimic_cxr
from tfdpfair.data.sources import ImageConfig
from tfdpfair.trainer import runner as trainer
from tfdpfair.trainer import task_data as trainer_data
from tfdpfair.trainer import workdir as trainer_workdir
from tfdpfair.training import input_pipeline
from test_trainer import runlocal_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "tfdpfair" / "configs"


@pytest.fixture()
def cx_root(tmp_path):
    return trainer_fixtures.write_chexpert(tmp_path / "data", patients=20)


def split_paths(root: str, seed: int = 0) -> dict[str, list[str]]:
    """Each split's files, read without any image check (what the trainer would read)."""
    splits = chexpert.load_chexpert_splits(root, seed=seed, verify_images=False,
                                           with_official_valid=False)
    return {name: list(source.paths) for name, source in splits.items()}


def _config(root: str, tmp_path: pathlib.Path):
    config = runlocal_config("chexpert_nfnet_f0", {"chexpert": root})
    config.dp.expected_batch_size = 1  # q ≈ 0.03: a single bad file is rarely sampled
    return config


def _assert_nothing_spent(workdir: pathlib.Path) -> None:
    assert not (workdir / trainer_workdir.CHECKPOINT_DIR).exists()  # no plan, no step
    assert not (workdir / "metrics.json").exists() and not (workdir / "release").exists()


def test_truncated_jpeg_in_test_split_is_refused_before_any_step(cx_root, tmp_path):
    bad = split_paths(cx_root)["test"][0]
    data = pathlib.Path(bad).read_bytes()
    pathlib.Path(bad).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"1 corrupt image file.*{bad} \(truncated or corrupt"):
        trainer.train_and_evaluate(_config(cx_root, tmp_path), tmp_path / "run")
    _assert_nothing_spent(tmp_path / "run")


def test_text_file_in_train_split_is_refused_at_tiny_q(cx_root, tmp_path):
    bad = split_paths(cx_root)["train"][5]
    pathlib.Path(bad).write_text("not an image")
    with pytest.raises(ValueError, match=rf"{bad} \(not a JPEG/PNG file\).*on_bad=skip"):
        trainer.train_and_evaluate(_config(cx_root, tmp_path), tmp_path / "run")
    _assert_nothing_spent(tmp_path / "run")


def test_on_bad_skip_drops_the_file_before_n_is_counted(cx_root, tmp_path):
    paths = split_paths(cx_root)
    bad = paths["train"][5]
    pathlib.Path(bad).write_text("not an image")
    config = runlocal_config("chexpert_nfnet_f0", {"chexpert": cx_root})
    config.dp.clipping = "vectorized"  # same ε; ghost clipping fails on this nano NFNet
    config.data.on_bad = "skip"
    trainer.train_and_evaluate(config, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    n = len(paths["train"]) - 1
    assert metrics["num_private_examples"] == n
    assert metrics["delta"] == pytest.approx(1.0 / n)  # delta_policy 1/N uses the same N
    assert metrics["sampling_rate"] == pytest.approx(config.dp.expected_batch_size / n)


def test_mimic_every_split_is_checked_and_skip_follows_the_config(tmp_path):
    root, iv = trainer_fixtures.write_mimic(tmp_path / "mimic", subjects=15)
    config = runlocal_config("mimic_cxr_nfnet_f0", {"mimic": (root, iv)}).data
    test = mimic_cxr.load_mimic_cxr(root, "test", mimic_iv_dir=iv, verify_images=False)
    bad = test.paths[0]
    pathlib.Path(bad).write_bytes(pathlib.Path(bad).read_bytes()[:60])
    with pytest.raises(ValueError, match=rf"{bad} \(truncated or corrupt"):
        trainer_data.load_task_data(config, seed=0)
    config.on_bad = "skip"
    data = trainer_data.load_task_data(config, seed=0)
    assert len(data.test) == len(test) - 1 and bad not in list(data.test.data.paths)
    assert data.num_train == len(mimic_cxr.load_mimic_cxr(root, "train", verify_images=False))


def test_bad_input_options_are_reachable_from_the_command_line():
    for name in ("chexpert_nfnet_f0", "mimic_cxr_nfnet_f0"):
        argv = ["prog", f"--config={CONFIGS / name}.py", "--config.data.on_bad=skip",
                "--config.data.verify_images=False"]
        values = flags.FlagValues()  # as experiments/train.py parses its command line
        config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                        sys_argv=argv)
        values(argv)
        assert values.config.data.on_bad == "skip"
        assert values.config.data.verify_images is False
        default = importlib.import_module(f"tfdpfair.configs.{name}").get_config()
        assert default.data.on_bad == "error" and default.data.verify_images is True


def test_a_run_started_before_the_new_data_keys_still_resumes(cx_root, tmp_path):
    config = runlocal_config("chexpert_nfnet_f0", {"chexpert": cx_root})
    old = trainer_workdir.config_as_dict(config)
    del old["data"]["on_bad"], old["data"]["verify_images"]
    (tmp_path / trainer_workdir.CONFIG_FILE).write_text(json.dumps(old))
    (tmp_path / trainer_workdir.CHECKPOINT_DIR).mkdir()  # the old run's artefacts
    config.data.verify_images = False  # runtime-only: may differ between run and resumption
    assert trainer_workdir.claim_workdir(tmp_path, config) is True
    config.data.on_bad = "skip"  # changes N: a different run
    with pytest.raises(trainer_workdir.WorkdirConfigMismatchError, match="data.on_bad"):
        trainer_workdir.claim_workdir(tmp_path, config)


def test_rgb_file_in_a_grayscale_dataset_is_refused_or_skipped(tmp_path, caplog):
    root = trainer_fixtures.write_chexpert(tmp_path / "data", patients=4)
    table = chexpert.read_chexpert_csv(root, verify_images=False)
    bad = table["path"][2]
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(bad, format="JPEG")
    with caplog.at_level(logging.INFO, logger="tfdpfair.data"):
        with pytest.raises(ValueError, match=rf"{bad} \(3 channels, expected 1\)"):
            chexpert.load_chexpert(root, "train_all")
    assert f"checked {len(table)} image files in" in caplog.text  # the progress log's last line
    skipped = chexpert.load_chexpert(root, "train_all", on_bad="skip")
    assert len(skipped) == len(table) - 1 and bad not in list(skipped.paths)
    assert skipped.report.removed == {"corrupt image file": 1}
    # The check follows the expected channels, not a fixed rule: RGB passes when expected.
    gray = table["path"][0]
    assert [b.path for b in image_check.check_images([bad, gray], expected_channels=3)] == [gray]
    assert image_check.check_images([bad, gray]) == []
    assert mimic_cxr.FILE_CHANNELS == chexpert.FILE_CHANNELS == 1


def test_every_bad_file_is_named_with_its_reason(tmp_path, caplog):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((5, 6), np.uint8), "L").save(good)
    gif = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((5, 6), np.uint8), "L").save(gif, format="GIF")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "t.jpg"
    Image.fromarray(np.full((40, 40), 7, np.uint8), "L").save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:200])
    with caplog.at_level(logging.INFO, logger="tfdpfair.data"):
        bad = image_check.check_images([good, gif, empty, truncated, tmp_path / "none.jpg"], 1,
                                       progress_every=2)
    assert "checked 2/5 image files (40%)" in caplog.text
    assert "checked 5 image files in" in caplog.text and "4 bad" in caplog.text
    assert [(b.row, b.reason) for b in bad] == [
        (1, image_check.NOT_AN_IMAGE), (2, image_check.NOT_AN_IMAGE), (3, image_check.CORRUPT),
        (4, image_check.MISSING)]


# ---- materialize: explicit batching --------------------------------------------------------

def test_materialize_refuses_an_ambiguous_stream_and_takes_batched():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 10, 10, 3)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 30)]  # one-hot: y [10] like x [10, ..]
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(ValueError, match=r"x \[10, \.\.\.\], y \[10, \.\.\.\].*batched=False"):
        input_pipeline.materialize(unbatched)
    got_x, got_y = input_pipeline.materialize(unbatched, batched=False)
    assert got_x.shape == (30, 10, 10, 3) and got_y.shape == (30, 10)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    with pytest.raises(ValueError, match="batched=True, but"):
        input_pipeline.materialize(tf.data.Dataset.from_tensor_slices((x, y[:, :4])),
                                   batched=True)
    even = unbatched.batch(10)  # three batches of 10: also ambiguous
    with pytest.raises(ValueError, match="cannot tell"):
        input_pipeline.materialize(even)
    np.testing.assert_array_equal(input_pipeline.materialize(even, batched=True)[0], x)
    # Proven by the stream: varying batch sizes -> batches; scalar labels -> examples.
    np.testing.assert_array_equal(input_pipeline.materialize(unbatched.batch(7))[1], y)
    labels = np.arange(30)
    assert input_pipeline.materialize(tf.data.Dataset.from_tensor_slices(
        (x, labels)))[0].shape == (30, 10, 10, 3)


# ---- the withheld-error message points at the input pipeline -------------------------------

def test_input_pipeline_failure_message_points_at_the_file_check(tmp_path):
    root = trainer_fixtures.write_chexpert(tmp_path / "data", patients=4)
    source = chexpert.load_chexpert(root, "train_all", verify_images=False,
                                    image_config=ImageConfig((8, 8), 1, "zero_one"))
    pathlib.Path(source.paths[3]).write_text("not an image")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(14)])
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        expected_batch_size=len(source), micro_batch_size=4, noise_multiplier=1.0, delta=1e-3,
        sampling_seed=1, noise_seed=2))
    dp.compile(optimizer="sgd", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    with pytest.raises(RuntimeError) as info:
        dp.fit(source, steps=2, verbose=0)
    message = str(info.value)
    assert "input pipeline" in message and "input file could not be read" in message
    assert "image check" in message and "check the model and the loss" not in message
    assert dp.logical_steps_done == 1  # the failed step is still counted
