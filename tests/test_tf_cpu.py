"""tfdpfair.tf_cpu: TensorFlow's oneDNN switch is set before TensorFlow loads, a user's choice
is kept, and ghost clipping is exact on the plain Eigen kernels too (where it forms im2col
patches, having no grouped Conv2DBackpropFilter)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tfdpfair import tf_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if k != tf_cpu.ONEDNN_ENV}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_prefer_onednn_sets_the_switch_only_before_tensorflow_and_keeps_a_user_choice():
    probe = """
        import json, os, sys
        from tfdpfair import tf_cpu
        before = "tensorflow" in sys.modules
        {pre}
        state = tf_cpu.prefer_onednn()
        print(json.dumps([before, state, os.environ.get("TF_ENABLE_ONEDNN_OPTS")]))
    """
    assert json.loads(run_python(probe.format(pre=""))) == [False, "on", "1"]
    assert json.loads(run_python(probe.format(pre=""), TF_ENABLE_ONEDNN_OPTS="0")) == [
        False, "off (TF_ENABLE_ONEDNN_OPTS=0)", "0"]
    assert json.loads(run_python(probe.format(pre="import tensorflow"))) == [
        False, "unchanged (TensorFlow already imported)", None]
    # The binaries ask for it when their package is imported, before TensorFlow.
    binaries = """
        import os, sys
        import tfdpfair.cli
        print(tfdpfair.cli.ONEDNN, os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
              "tensorflow" in sys.modules)
    """
    assert run_python(binaries) == "on 1 False"


def test_import_tfdpfair_alone_does_not_touch_the_switch():
    code = """
        import os, tfdpfair
        print(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), callable(tfdpfair.prefer_onednn))
    """
    assert run_python(code) == "None True"


def test_ghost_clipping_matches_brute_force_on_the_eigen_kernels():
    """TF_ENABLE_ONEDNN_OPTS=0: no grouped Conv2DBackpropFilter, so no native per-example
    gradients even where NATIVE_MIN_POSITIONS admits them; norms and the clipped sum still
    equal a per-example loop of tf.GradientTape (independent of ghost clipping)."""
    code = """
        import json
        import keras, numpy as np, tensorflow as tf
        from tfdpfair.privacy import ghost_linear
        from tfdpfair.privacy.ghost_clipping import batch_example_loss_fn, ghost_clipped_grad_sum
        ghost_linear.NATIVE_MIN_POSITIONS = 0
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((9, 9, 3)), keras.layers.Conv2D(8, 3),
                                  keras.layers.Activation("tanh"), keras.layers.Conv2D(4, 3, 2),
                                  keras.layers.Flatten(), keras.layers.Dense(3)])
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(6, 9, 9, 3)).astype(np.float32)
        y = rng.integers(0, 3, 6).astype(np.int32)
        clip = 0.5
        variables = model.trainable_variables
        total, norms = [np.zeros(v.shape, np.float32) for v in variables], []
        for i in range(6):
            with tf.GradientTape() as tape:
                l = loss(y[i:i + 1], model(x[i:i + 1]))
            g = [t.numpy() for t in tape.gradient(l, variables)]
            n = float(np.sqrt(sum(np.sum(t.astype(np.float64) ** 2) for t in g)))
            norms.append(n)
            for acc, t in zip(total, g):
                acc += t * min(1.0, clip / n)
        result = ghost_clipped_grad_sum(model, batch_example_loss_fn(model, loss), variables,
                                        (tf.constant(x), tf.constant(y)), tf.ones([6]), clip,
                                        has_aux=True)
        norm_err = float(np.max(np.abs(result.grad_norms.numpy() - norms) / np.array(norms)))
        sum_err = max(float(np.max(np.abs(a.numpy() - b))) for a, b in zip(result.grad_sum, total))
        print(json.dumps([ghost_linear.native_grouped_backprop_supported(), norm_err, sum_err,
                          float(np.median(norms))]))
    """
    native, norm_err, sum_err, median = json.loads(run_python(code, TF_ENABLE_ONEDNN_OPTS="0"))
    assert native is False
    assert 0.0 < median
    assert norm_err < 1e-4 and sum_err < 1e-5


def test_a_cpu_without_grouped_kernel_gradients_logs_how_to_get_them(monkeypatch, caplog):
    import tensorflow as tf

    from tfdpfair.privacy import ghost_linear

    def no_grouped_kernel(**_):
        raise tf.errors.InvalidArgumentError(None, None, "filter_size does not have enough "
                                             "elements")

    monkeypatch.setattr(tf.raw_ops, "Conv2DBackpropFilter", no_grouped_kernel)
    probe = ghost_linear.native_grouped_backprop_supported.__wrapped__
    monkeypatch.delenv(tf_cpu.ONEDNN_ENV, raising=False)
    with caplog.at_level("WARNING", logger="tfdpfair"):
        assert probe() is False
    assert "TF_ENABLE_ONEDNN_OPTS=1" in caplog.text
    caplog.clear()
    monkeypatch.setenv(tf_cpu.ONEDNN_ENV, "0")  # the user chose: no advice
    with caplog.at_level("WARNING", logger="tfdpfair"):
        assert probe() is False
    assert caplog.text == ""


@pytest.mark.parametrize("value", ["1", "true"])
def test_prefer_onednn_reports_on_for_a_set_switch(monkeypatch, value):
    monkeypatch.setenv(tf_cpu.ONEDNN_ENV, value)
    assert tf_cpu.prefer_onednn() == "on"
    assert tf_cpu.onednn_setting() == value
