"""The custom-loop API (training/custom_loop.py) under MirroredStrategy over 4 logical CPUs.

* R ∈ {1, 2, 4}: the custom loop gives DPModel.fit's single-device weights within 1e-6.
* The noise is added once per logical step: with a zero-gradient loss the update of one step is
  −n/B with std σC/B (within 3%) for R = 1, 2, 4, and equals the documented stateless draw.

Logical CPU devices must be configured before TensorFlow initialises, so, as in
tests/test_distributed.py, all runs share ONE subprocess that prints one JSON line (the script
is written to a file: AutoGraph must read the source of the user's ``tf.range`` loop).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from test_distributed import (EQUIVALENCE, EQUIVALENCE_LR, EQUIVALENCE_STEPS, NOISE, NOISE_DP,
                              REPO, clean_env, finished, last_json_line, max_abs_diff,
                              noise_data, softmax_data)

from tfdpfair.privacy import noise as noise_lib

TIMEOUT = 420

SCRIPT = textwrap.dedent("""
    import json, sys, traceback
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
    import keras
    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.training.custom_loop import DPOptimizer
    from tfdpfair.training.dp_model import make_private

    runs = json.loads(sys.argv[1])
    arrays = dict(np.load(sys.argv[2]))

    def strategy_for(replicas):
        if replicas == 0:
            return tf.distribute.get_strategy()
        strategy_for.count += 1  # own collective keys per strategy (as test_distributed.py)
        tf.distribute.MirroredStrategy._collective_key_base = 1000 * strategy_for.count
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    strategy_for.count = 0

    def build(run):
        if run["model"] == "softmax":
            model = keras.Sequential([keras.Input((arrays["softmax_x"].shape[1],)),
                                      keras.layers.Dense(arrays["softmax_bias"].shape[0])])
            model.set_weights([arrays["softmax_kernel"], arrays["softmax_bias"]])
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            return model, loss, arrays["softmax_x"], arrays["softmax_y"]
        model = keras.Sequential([keras.Input((arrays["noise_x"].shape[1],)),
                                  keras.layers.Dense(run["units"], use_bias=False)])
        model.set_weights([np.zeros(model.weights[0].shape, np.float32)])
        loss = lambda y_true, y_pred: 0.0 * keras.ops.sum(y_pred, axis=-1)  # zero, per example
        return model, loss, arrays["noise_x"], arrays["noise_y"]

    def train(run):
        strategy = strategy_for(run["replicas"])
        with strategy.scope():
            model, loss, x, y = build(run)
            if run["api"] == "fit":
                dp = make_private(model, DPConfig(**run["dp"]))
                dp.compile(optimizer=keras.optimizers.SGD(run["lr"]), loss=loss)
            else:
                opt = DPOptimizer(model, keras.optimizers.SGD(run["lr"]), loss,
                                  DPConfig(**run["dp"]), x=x, y=y, steps=run["steps"])
        if run["api"] == "fit":
            dp.fit(x, y, steps=run["steps"], verbose=0)
            return {"weights": [w.tolist() for w in model.get_weights()]}

        @tf.function
        def train_step(iterator):
            for _ in tf.range(opt.microbatches_in_step()):
                strategy.run(opt.accumulate, args=(next(iterator),))
            strategy.run(opt.release)

        iterator = iter(opt.distribute_dataset())
        while opt.steps_remaining:
            opt.run(train_step, iterator)
        return {"replicas": strategy.num_replicas_in_sync,
                "weights": [w.tolist() for w in model.get_weights()],
                "iterations": int(opt.optimizer.iterations.numpy()),
                "logical_steps": opt.logical_steps_done}

    results = {}
    for name, run in runs.items():
        try:
            results[name] = train(run)
        except Exception:
            results[name] = {"error": traceback.format_exc()[-3000:]}
    print(json.dumps(results))
""")


def runs() -> dict[str, dict]:
    out = {"fit_R0": dict(api="fit", model="softmax", replicas=0, dp=EQUIVALENCE,
                          steps=EQUIVALENCE_STEPS, lr=EQUIVALENCE_LR)}
    for replicas in (0, 1, 2, 4):
        out[f"custom_R{replicas}"] = dict(api="custom", model="softmax", replicas=replicas,
                                          dp=EQUIVALENCE, steps=EQUIVALENCE_STEPS,
                                          lr=EQUIVALENCE_LR)
    for replicas in (1, 2, 4):
        out[f"noise_R{replicas}"] = dict(api="custom", model="noise", replicas=replicas,
                                         dp=NOISE_DP, steps=1, lr=1.0, units=NOISE["units"])
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    arrays = tmp_path_factory.mktemp("custom_loop") / "arrays.npz"
    soft, noisy = softmax_data(), noise_data()
    np.savez(arrays, **{f"softmax_{k}": v for k, v in soft.items()},
             **{f"noise_{k}": v for k, v in noisy.items()})
    script = arrays.parent / "custom_loop_runs.py"  # a file: AutoGraph reads loop source
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), json.dumps(runs()), str(arrays)],
                            capture_output=True, text=True, timeout=TIMEOUT, env=clean_env(),
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return last_json_line(result.stdout)


def test_custom_loop_under_mirrored_gives_the_weights_of_fit(results):
    reference = finished(results, "fit_R0")["weights"]
    assert max_abs_diff(reference, [softmax_data()["kernel"], softmax_data()["bias"]]) > 1e-2
    for replicas in (0, 1, 2, 4):
        run = finished(results, f"custom_R{replicas}")
        difference = max_abs_diff(run["weights"], reference)
        print(f"custom loop vs fit, R = {replicas}: max |Δw| = {difference:.3g}")
        assert difference <= 1e-6, replicas
        assert run["iterations"] == run["logical_steps"] == EQUIVALENCE_STEPS
        if replicas:
            assert run["replicas"] == replicas


def test_custom_loop_adds_the_noise_once_across_replicas(results):
    sigma, clip = NOISE_DP["noise_multiplier"], NOISE_DP["l2_norm_clip"]
    batch = NOISE_DP["expected_batch_size"]
    shape = np.asarray(finished(results, "noise_R1")["weights"][0]).shape
    draw = noise_lib.gaussian_noise_like([tf.zeros(shape)], sigma * clip,
                                         noise_lib.step_seed(NOISE_DP["noise_seed"], 0))[0]
    for replicas in (1, 2, 4):
        run = finished(results, f"noise_R{replicas}")
        update = np.asarray(run["weights"][0])  # started at zero, lr = 1
        assert run["replicas"] == replicas and run["iterations"] == 1
        np.testing.assert_allclose(update, -draw.numpy() / batch, rtol=0, atol=1e-7)
        ratio = update.std() / (sigma * clip / batch)
        print(f"custom loop noise std / (σC/B), R = {replicas}: {ratio:.4f}")
        assert ratio == pytest.approx(1.0, abs=0.03), replicas
