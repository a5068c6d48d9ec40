"""Loading Haiku-named NFNet checkpoints (the published F{n}_haiku.npz naming)."""

import importlib.metadata
import sys

import numpy as np
import pytest

from tfdpfair.models import nfnet, pretrained
from tfdpfair.models.pretrained import CheckpointError


def haiku_shapes(model, num_classes=None):
    """The Haiku module/param names of an NFNet checkpoint, written out from the published
    naming (NFNet/~/stem_convI, NFNet/~/nf_block[_I]/~/convX, .../squeeze_excite/~/linear[_1],
    NFNet/~/final_conv, NFNet/~/linear), with the shapes of the matching model weights."""
    shapes = {}
    conv = lambda module, layer: shapes.update({  # noqa: E731
        f"{module}/w": layer.kernel.shape, f"{module}/gain": layer.gain.shape,
        f"{module}/bias": layer.bias.shape})
    for i in range(4):
        conv(f"NFNet/~/stem_conv{i}", model.get_layer(f"stem_conv{i}"))
    for i, block in enumerate(nfnet.nfnet_blocks(model)):
        module = "NFNet/~/nf_block" + ("" if i == 0 else f"_{i}")
        shapes[f"{module}/skip_gain"] = ()
        for name in ("conv0", "conv1", "conv1b", "conv2", "conv_shortcut"):
            if hasattr(block, name):
                conv(f"{module}/~/{name}", getattr(block, name))
        for suffix, dense in (("", block.se.fc0), ("_1", block.se.fc1)):
            shapes[f"{module}/~/squeeze_excite/~/linear{suffix}/w"] = dense.kernel.shape
            shapes[f"{module}/~/squeeze_excite/~/linear{suffix}/b"] = dense.bias.shape
    conv("NFNet/~/final_conv", model.get_layer("final_conv"))
    features, classes = model.get_layer("head").kernel.shape
    classes = classes if num_classes is None else num_classes
    shapes["NFNet/~/linear/w"] = (features, classes)
    shapes["NFNet/~/linear/b"] = (classes,)
    return shapes


def random_checkpoint(model, num_classes=None, seed=0):
    rng = np.random.RandomState(seed)
    return {k: np.asarray(rng.randn(*s), np.float32)
            for k, s in haiku_shapes(model, num_classes).items()}


@pytest.fixture()
def nano():
    return nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 3))


def test_npz_with_haiku_names_loads_into_the_right_variables(nano, tmp_path):
    ckpt = random_checkpoint(nano)
    path = tmp_path / "nano_haiku.npz"
    np.savez(path, **ckpt)
    report = pretrained.load_haiku_checkpoint(nano, path)
    assert len(report.loaded) == len(ckpt) and not report.head_reset
    block1 = nano.get_layer("stage1_block0")
    checks = {
        "NFNet/~/stem_conv2/w": nano.get_layer("stem_conv2").kernel,
        "NFNet/~/stem_conv0/gain": nano.get_layer("stem_conv0").gain,
        "NFNet/~/nf_block_1/~/conv1/w": block1.conv1.kernel,
        "NFNet/~/nf_block_1/~/conv_shortcut/bias": block1.conv_shortcut.bias,
        "NFNet/~/nf_block_1/~/squeeze_excite/~/linear_1/w": block1.se.fc1.kernel,
        "NFNet/~/nf_block_1/skip_gain": block1.skip_gain,
        "NFNet/~/nf_block/~/conv1b/w": nano.get_layer("stage0_block0").conv1b.kernel,
        "NFNet/~/nf_block_3/~/squeeze_excite/~/linear/b":
            nano.get_layer("stage3_block0").se.fc0.bias,
        "NFNet/~/final_conv/w": nano.get_layer("final_conv").kernel,
        "NFNet/~/linear/w": nano.get_layer("head").kernel,
    }
    for key, variable in checks.items():
        np.testing.assert_array_equal(variable.numpy(), ckpt[key], err_msg=key)


def test_dotted_and_nested_formats(nano, tmp_path):
    ckpt = random_checkpoint(nano, seed=1)
    dotted = {k.replace("/~/", ".").replace("/", "."): v for k, v in ckpt.items()}
    np.savez(tmp_path / "dotted.npz", **dotted)
    pretrained.load_haiku_checkpoint(nano, tmp_path / "dotted.npz")
    np.testing.assert_array_equal(nano.get_layer("final_conv").gain.numpy(),
                                  ckpt["NFNet/~/final_conv/gain"])
    nested = {}
    for key, value in random_checkpoint(nano, seed=2).items():
        module, _, param = key.rpartition("/")
        nested.setdefault(module, {})[param] = value
    pretrained.load_haiku_checkpoint(nano, nested)
    np.testing.assert_array_equal(nano.get_layer("stage2_block0").skip_gain.numpy(),
                                  nested["NFNet/~/nf_block_2"]["skip_gain"])


def test_missing_key_and_wrong_shape_are_reported_and_nothing_is_written(nano, tmp_path):
    ckpt = random_checkpoint(nano)
    before = [w.numpy().copy() for w in nano.weights]
    missing = dict(ckpt)
    del missing["NFNet/~/nf_block_2/~/conv1/w"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match=r"missing from checkpoint \(1\): nf_block_2/conv1/w"):
        pretrained.load_haiku_checkpoint(nano, tmp_path / "missing.npz")
    wrong = dict(ckpt)
    wrong["NFNet/~/stem_conv1/w"] = np.zeros((3, 3, 8, 9), np.float32)
    with pytest.raises(CheckpointError, match=r"stem_conv1/w: checkpoint \(3, 3, 8, 9\) vs model"):
        pretrained.load_haiku_checkpoint(nano, wrong)
    extra = dict(ckpt, **{"NFNet/~/nf_block_9/skip_gain": np.zeros(())})
    with pytest.raises(CheckpointError, match="unexpected in checkpoint"):
        pretrained.load_haiku_checkpoint(nano, extra)
    for old, w in zip(before, nano.weights):
        np.testing.assert_array_equal(old, w.numpy())


def test_head_reset_for_a_new_number_of_classes(nano, tmp_path):
    ckpt = random_checkpoint(nano, num_classes=1000)
    np.savez(tmp_path / "imagenet.npz", **ckpt)
    with pytest.raises(CheckpointError, match="head='reset'"):
        pretrained.load_haiku_checkpoint(nano, tmp_path / "imagenet.npz")
    report = pretrained.load_haiku_checkpoint(nano, tmp_path / "imagenet.npz", head="reset")
    assert report.head_reset and report.skipped_head == ["linear/b", "linear/w"]
    np.testing.assert_array_equal(nano.get_layer("head").kernel.numpy(), 0.0)
    np.testing.assert_array_equal(nano.get_layer("final_conv").kernel.numpy(),
                                  ckpt["NFNet/~/final_conv/w"])
    model = pretrained.load_pretrained_nfnet("nano", tmp_path / "imagenet.npz", num_classes=4,
                                             input_shape=(8, 8, 3))
    assert model.get_layer("head").kernel.shape == (128, 4)
    np.testing.assert_array_equal(model(np.ones((1, 8, 8, 3), np.float32)).numpy(), 0.0)
    same = pretrained.load_pretrained_nfnet("nano", tmp_path / "imagenet.npz",
                                            num_classes=1000, input_shape=(8, 8, 3))
    np.testing.assert_array_equal(same.get_layer("head").bias.numpy(), ckpt["NFNet/~/linear/b"])


def test_grayscale_model_matches_rgb_model_on_grey_images():
    rgb = nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 3))
    ckpt = random_checkpoint(rgb)
    for key in ckpt:
        if key.endswith("skip_gain"):
            ckpt[key] = np.float32(0.7)  # let every block contribute
    gray = nfnet.build_nfnet("nano", 10, input_shape=(8, 8, 1))
    with pytest.raises(CheckpointError, match="adapt_input_channels"):
        pretrained.load_haiku_checkpoint(gray, ckpt)
    pretrained.load_haiku_checkpoint(gray, ckpt, adapt_input_channels=True)
    pretrained.load_haiku_checkpoint(rgb, ckpt)
    x = np.random.RandomState(0).rand(3, 8, 8, 1).astype(np.float32)
    expected = rgb(np.repeat(x, 3, axis=-1)).numpy()
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(gray(x).numpy(), expected, rtol=1e-3, atol=1e-4)


def write_pickled_tree(model, path, seed=3):
    """A nested {module: {param: array}} tree written with dill, like the published files."""
    dill = pytest.importorskip("dill")  # in the `checkpoints` and `test` extras
    nested = {}
    for key, value in random_checkpoint(model, seed=seed).items():
        module, _, param = key.rpartition("/")
        nested.setdefault(module, {})[param] = value
    with open(path, "wb") as f:
        dill.dump(nested, f)
    return nested


def test_pickled_tree_needs_explicit_permission(nano, tmp_path):
    path = tmp_path / "F0_haiku.npz"  # the published files are pickles despite the name
    nested = write_pickled_tree(nano, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        pretrained.load_haiku_checkpoint(nano, path)
    pretrained.load_haiku_checkpoint(nano, path, allow_pickle=True)
    np.testing.assert_array_equal(nano.get_layer("stem_conv3").bias.numpy(),
                                  nested["NFNet/~/stem_conv3"]["bias"])
    with pytest.raises(CheckpointError, match="does not exist"):
        pretrained.load_haiku_checkpoint(nano, tmp_path / "nope.npz")


def test_pickle_without_dill_names_the_checkpoints_extra(nano, tmp_path, monkeypatch):
    path = tmp_path / "F0_haiku.npz"
    write_pickled_tree(nano, path)
    before = nano.get_layer("stem_conv0").kernel.numpy().copy()
    monkeypatch.setitem(sys.modules, "dill", None)  # `import dill` now raises ImportError
    with pytest.raises(CheckpointError, match=r"pip install 'tfdpfair\[checkpoints\]'"):
        pretrained.load_haiku_checkpoint(nano, path, allow_pickle=True)
    np.testing.assert_array_equal(nano.get_layer("stem_conv0").kernel.numpy(), before)
    # Without allow_pickle the error is about permission first, and also names the extra.
    with pytest.raises(CheckpointError, match=r"allow_pickle.*tfdpfair\[checkpoints\]"):
        pretrained.load_haiku_checkpoint(nano, path)


def test_checkpoints_extra_installs_dill():
    metadata = importlib.metadata.metadata("tfdpfair")
    assert "checkpoints" in metadata.get_all("Provides-Extra")
    requirements = metadata.get_all("Requires-Dist")
    assert any(r.startswith("dill") and 'extra == "checkpoints"' in r for r in requirements)
