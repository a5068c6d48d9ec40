"""DP-SGD under tf.distribute (GitHub issue 9): one code path for no strategy, MirroredStrategy
and MultiWorkerMirroredStrategy, with DESIGN.md invariants 1-3 holding across replicas and hosts.

* Replicated training equals single-device training (and an independent numpy DP-SGD).
* The noise is one N(0, σ²C²) draw per logical step, not one per replica (√R·σC) nor the same
  draw added by every replica (R·σC).
* One example moves the pre-noise sum by at most C wherever the replica layout puts it, and the
  per-host input shards partition each step's Poisson sample.
* Two local workers with secret seeds agree with each other and with a single-process run on
  the broadcast seeds; workers that disagree on the data fail fast instead of hanging.
* The step counter and ε match the plan for any steps_per_execution; XLA (one device) changes
  the weights by float rounding only.

Logical CPU devices must be configured before TensorFlow initialises, so every test that needs
them runs in a subprocess (``sys.executable -c SCRIPT``) that prints one JSON line. The
MirroredStrategy runs share ONE subprocess (a strategy over a subset of 4 logical devices per
run). Every subprocess has a timeout; multi-worker processes are killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_reference import numpy_dp_sgd_softmax_regression, reference_epsilon

from tfdpfair.privacy import noise as noise_lib
from tfdpfair.privacy import sampling
from tfdpfair.privacy.clipping import clipped_grad_sum
from tfdpfair.privacy.dp_sgd import DPConfig, DPGradientAccumulator
from tfdpfair.training.dp_model import make_private
from tfdpfair.training.input_pipeline import host_shard

REPO = Path(__file__).resolve().parents[1]
MIRRORED_TIMEOUT = 420  # seconds; the whole Mirrored subprocess takes 25-35 s on 2 CPU cores
WORKER_TIMEOUT = 150

# ---- shared configurations (the test owns the data; subprocesses only train) --------------

# Softmax regression (one Dense layer) so tests/dp_reference.py's numpy DP-SGD is a reference.
SOFTMAX = dict(num_examples=160, inputs=6, classes=4)
# Equivalence runs: B = 48 ≫ m·R = 2·4, so every step spans several micro-batches per replica.
EQUIVALENCE = dict(l2_norm_clip=1.0, expected_batch_size=48, micro_batch_size=2,
                   noise_multiplier=1e-3, delta=1e-3, noise_seed=11, sampling_seed=22)
EQUIVALENCE_STEPS, EQUIVALENCE_LR = 6, 0.5
# Padding runs: m = 20, so a last micro-batch has 8 rows per replica (trimmed) or 20; with R = 2
# a step is 2 micro-batches of 40 and the trimmed remainder is split over the replicas.
PADDING = dict(EQUIVALENCE, micro_batch_size=20)
# steps_per_execution runs: 10 steps per Keras epoch, T = 14 (calls cross epoch ends), σ = 1.
PER_CALL = dict(l2_norm_clip=1.0, expected_batch_size=16, micro_batch_size=2,
                noise_multiplier=1.0, delta=1e-3, noise_seed=3, sampling_seed=4)
PER_CALL_STEPS, PER_CALL_LR, PER_CALL_S = 14, 0.5, (1, 3, 8)
# Noise runs: zero-gradient loss, one step; the update is pure noise -lr·n/B.
NOISE = dict(num_examples=64, inputs=100, units=128)  # a 12,800-parameter kernel
NOISE_DP = dict(l2_norm_clip=2.0, expected_batch_size=16, micro_batch_size=2,
                noise_multiplier=1.0, delta=1e-3, noise_seed=5, sampling_seed=6)


def softmax_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, d, k = SOFTMAX["num_examples"], SOFTMAX["inputs"], SOFTMAX["classes"]
    return {"x": rng.normal(size=(n, d)).astype(np.float32),
            "y": rng.integers(0, k, n).astype(np.int32),
            "kernel": (0.3 * rng.normal(size=(d, k))).astype(np.float32),
            "bias": (0.1 * rng.normal(size=(k,))).astype(np.float32)}


def noise_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n, d = NOISE["num_examples"], NOISE["inputs"]
    return {"x": rng.normal(size=(n, d)).astype(np.float32),
            "y": np.zeros(n, np.int32)}


def numpy_reference(data: dict, dp: dict, steps: int, lr: float,
                    sampling_seed: int | None = None, noise_seed: int | None = None):
    """tests/dp_reference.py's numpy DP-SGD (float64) for the softmax model."""
    return numpy_dp_sgd_softmax_regression(
        data["x"], data["y"], data["kernel"], data["bias"], steps=steps,
        sampling_seed=dp["sampling_seed"] if sampling_seed is None else sampling_seed,
        noise_seed=dp["noise_seed"] if noise_seed is None else noise_seed,
        sampling_rate=dp["expected_batch_size"] / len(data["x"]), clip=dp["l2_norm_clip"],
        sigma=dp["noise_multiplier"], expected_batch=dp["expected_batch_size"], lr=lr)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ---- 1, 2, 5, 6: MirroredStrategy over 1, 2 and 4 logical CPU devices (one subprocess) ----

MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys, time, traceback
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
    import keras
    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.training.dp_model import make_private

    runs = json.loads(sys.argv[1])
    arrays = dict(np.load(sys.argv[2]))

    def strategy_for(replicas):
        if replicas == 0:
            return tf.distribute.get_strategy()  # no strategy
        # TF's hook for tests: each strategy of this process gets its own collective group
        # keys (a 2- and a 4-device strategy would otherwise both claim group key 1).
        strategy_for.count += 1
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
        loss = lambda y_true, y_pred: 0.0 * keras.ops.sum(y_pred)  # zero gradient
        return model, loss, arrays["noise_x"], arrays["noise_y"]

    def train(run):
        start = time.time()
        strategy = strategy_for(run["replicas"])
        with strategy.scope():
            model, loss, x, y = build(run)
            dp = make_private(model, DPConfig(**run["dp"]))
            dp.compile(optimizer=keras.optimizers.SGD(run["lr"]), loss=loss,
                       steps_per_execution=run["per_call"], jit_compile=run["jit"])
        dp.fit(x, y, steps=run["steps"], verbose=0)
        plan = dp.plan
        return {"replicas": strategy.num_replicas_in_sync,
                "weights": [w.tolist() for w in model.get_weights()],
                "iterations": int(dp.optimizer.iterations.numpy()),
                "logical_steps": dp.logical_steps_done, "plan_steps": plan.steps,
                "epsilon": dp.epsilon_spent(), "sampling_rate": plan.sampling_rate,
                "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
                "seconds": time.time() - start}

    results = {}
    for name, run in runs.items():
        try:
            results[name] = train(run)
        except Exception:
            results[name] = {"error": traceback.format_exc()[-3000:]}
    print(json.dumps(results))
""")


def mirrored_runs() -> dict[str, dict]:
    def run(model, replicas, dp, steps, lr, per_call=1, jit=False, **extra):
        return dict(model=model, replicas=replicas, dp=dp, steps=steps, lr=lr,
                    per_call=per_call, jit=jit, **extra)

    runs = {}
    for replicas in (0, 1, 2, 4):  # 0 = no strategy
        runs[f"equal_R{replicas}"] = run("softmax", replicas, EQUIVALENCE, EQUIVALENCE_STEPS,
                                         EQUIVALENCE_LR)
    for padding in ("trim", "full"):
        for replicas in (0, 2):
            runs[f"padding_{padding}_R{replicas}"] = run(
                "softmax", replicas, dict(PADDING, microbatch_padding=padding),
                EQUIVALENCE_STEPS, EQUIVALENCE_LR)
    for replicas in (0, 1):  # XLA under >1 logical CPU device: see test_jit_compile_...
        runs[f"jit_R{replicas}"] = run("softmax", replicas, EQUIVALENCE, EQUIVALENCE_STEPS,
                                       EQUIVALENCE_LR, jit=True)
    for replicas in (0, 2):
        for s in PER_CALL_S:
            runs[f"per_call_R{replicas}_s{s}"] = run("softmax", replicas, PER_CALL,
                                                     PER_CALL_STEPS, PER_CALL_LR, per_call=s)
    for replicas in (0, 2, 4):
        runs[f"noise_R{replicas}"] = run("noise", replicas, NOISE_DP, 1, 1.0,
                                         units=NOISE["units"])
    return runs


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory) -> dict[str, dict]:
    """Results of every MirroredStrategy / no-strategy run, from one subprocess."""
    arrays = tmp_path_factory.mktemp("distributed") / "arrays.npz"
    soft, noisy = softmax_data(), noise_data()
    np.savez(arrays, **{f"softmax_{k}": v for k, v in soft.items()},
             **{f"noise_{k}": v for k, v in noisy.items()})
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, json.dumps(mirrored_runs()), str(arrays)],
        capture_output=True, text=True, timeout=MIRRORED_TIMEOUT, env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return last_json_line(result.stdout)


def finished(results: dict, name: str) -> dict:
    run = results[name]
    assert "error" not in run, f"{name} failed:\n{run.get('error')}"
    return run


def max_abs_diff(a: list, b: list) -> float:
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(a, b))


def test_mirrored_replicas_train_like_one_device(mirrored):
    """R ∈ {1, 2, 4}: the same weights as no strategy (within 1e-6), which itself matches the
    independent numpy DP-SGD; one optimizer update per logical step, T steps as planned."""
    data = softmax_data()
    q = EQUIVALENCE["expected_batch_size"] / SOFTMAX["num_examples"]
    sizes = [int(tf.size(sampling.poisson_sample(EQUIVALENCE["sampling_seed"], t,
                                                 SOFTMAX["num_examples"], q)))
             for t in range(EQUIVALENCE_STEPS)]
    per_step = EQUIVALENCE["micro_batch_size"] * 4
    assert min(sizes) >= 3 * per_step, "each step must span several micro-batches at R = 4"

    single = finished(mirrored, "equal_R0")
    kernel, bias = numpy_reference(data, EQUIVALENCE, EQUIVALENCE_STEPS, EQUIVALENCE_LR)
    assert max_abs_diff(single["weights"], [kernel, bias]) < 1e-6
    assert max_abs_diff(single["weights"], [data["kernel"], data["bias"]]) > 1e-2  # it trained
    for replicas in (1, 2, 4):
        run = finished(mirrored, f"equal_R{replicas}")
        assert run["replicas"] == replicas
        assert max_abs_diff(run["weights"], single["weights"]) <= 1e-6, replicas
        assert run["iterations"] == run["logical_steps"] == run["plan_steps"] \
            == EQUIVALENCE_STEPS


def test_trimmed_and_full_padding_train_alike_across_replicas(mirrored):
    """microbatch_padding "trim" (last micro-batch of 8 rows per replica, its remainder split
    over the replicas, or 20 when more than half full) and "full" (every micro-batch 20 rows
    per replica), without a strategy and under R = 2: the weights of the independent numpy
    DP-SGD (1e-6)."""
    data = softmax_data()
    q = PADDING["expected_batch_size"] / SOFTMAX["num_examples"]
    sizes = [int(tf.size(sampling.poisson_sample(PADDING["sampling_seed"], t,
                                                 SOFTMAX["num_examples"], q)))
             for t in range(EQUIVALENCE_STEPS)]
    lasts = {int(sampling.last_microbatch_rows(b - (-(-b // (20 * r)) - 1) * 20 * r, 20, r))
             for b in sizes for r in (1, 2)}
    assert lasts == {8, 20}, sizes  # both kinds of last micro-batch occur
    kernel, bias = numpy_reference(data, PADDING, EQUIVALENCE_STEPS, EQUIVALENCE_LR)
    for padding in ("trim", "full"):
        for replicas in (0, 2):
            run = finished(mirrored, f"padding_{padding}_R{replicas}")
            assert max_abs_diff(run["weights"], [kernel, bias]) < 1e-6, (padding, replicas)
            assert run["iterations"] == run["logical_steps"] == EQUIVALENCE_STEPS


def test_noise_is_one_draw_per_step_across_replicas(mirrored):
    """Zero-gradient loss, σ = 1, C = 2, lr = 1, one step: the kernel's update is the step's
    noise draw over B. Under R = 2 and 4 it equals the single-device update element-wise, and
    its std is σC/B (within 3%): independent noise per replica would give √R·σC/B, the same
    draw added by every replica R·σC/B."""
    sigma, clip = NOISE_DP["noise_multiplier"], NOISE_DP["l2_norm_clip"]
    batch = NOISE_DP["expected_batch_size"]
    single = np.asarray(finished(mirrored, "noise_R0")["weights"][0])  # started at zero
    assert single.size >= 10_000
    # The step's draw from the documented stateless primitive (seed = (noise_seed, step 0)).
    draw = noise_lib.gaussian_noise_like([tf.zeros(single.shape)], sigma * clip,
                                         noise_lib.step_seed(NOISE_DP["noise_seed"], 0))[0]
    np.testing.assert_allclose(single, -draw.numpy() / batch, rtol=0, atol=1e-7)
    assert single.std() == pytest.approx(sigma * clip / batch, rel=0.03)
    for replicas in (2, 4):
        run = finished(mirrored, f"noise_R{replicas}")
        assert run["replicas"] == replicas and run["iterations"] == 1
        update = np.asarray(run["weights"][0])
        np.testing.assert_allclose(update, single, rtol=0, atol=1e-7)
        ratio = update.std() / (sigma * clip / batch)
        assert abs(ratio - 1) < 0.03, (replicas, ratio)  # √R: 1.41 or 2; R: 2 or 4


def test_steps_per_execution_keeps_counter_epsilon_and_weights(mirrored):
    """s ∈ {1, 3, 8} logical steps per compiled call (T = 14 crosses calls and Keras epochs of
    10 steps), without a strategy and under R = 2: T steps counted, ε as dp_accounting
    composes T Poisson-Gaussian steps, and the same weights (= numpy DP-SGD at σ = 1)."""
    data = softmax_data()
    q = PER_CALL["expected_batch_size"] / SOFTMAX["num_examples"]
    expected_eps = reference_epsilon(PER_CALL["noise_multiplier"], q, PER_CALL_STEPS,
                                     PER_CALL["delta"])
    kernel, bias = numpy_reference(data, PER_CALL, PER_CALL_STEPS, PER_CALL_LR)
    first = finished(mirrored, "per_call_R0_s1")
    assert max_abs_diff(first["weights"], [kernel, bias]) < 1e-6
    for replicas in (0, 2):
        for s in PER_CALL_S:
            run = finished(mirrored, f"per_call_R{replicas}_s{s}")
            assert run["logical_steps"] == run["plan_steps"] == run["iterations"] \
                == PER_CALL_STEPS
            assert run["sampling_rate"] == pytest.approx(q, rel=1e-12)
            assert run["epsilon"] == pytest.approx(expected_eps, rel=1e-9)
            assert max_abs_diff(run["weights"], first["weights"]) <= 1e-7, (replicas, s)


def test_jit_compile_gives_the_same_weights(mirrored):
    """compile(jit_compile=True) trains like the default (no strategy, and MirroredStrategy on
    one device) up to float rounding: atol 1e-5, loose on purpose. XLA may fuse and reorder
    float operations, and stateless random draws are not guaranteed to be bit-identical between
    XLA and non-XLA kernels; with σ = 1e-3 any difference in the noise is negligible.

    Not covered: XLA with R > 1 *logical CPU* devices. XLA places the jit-compiled replica
    function on CPU:0, which cannot read replica 1's variables on logical device CPU:1 ("Trying
    to access resource ... located in device CPU:1 from device CPU:0"); plain
    ``keras.Model.fit(jit_compile=True)`` fails the same way, so it is a TF limitation of
    logical CPU devices, not of this library."""
    reference = finished(mirrored, "equal_R0")
    for replicas in (0, 1):
        run = finished(mirrored, f"jit_R{replicas}")
        assert run["iterations"] == run["logical_steps"] == EQUIVALENCE_STEPS
        assert max_abs_diff(run["weights"], reference["weights"]) < 1e-5, replicas


# ---- 3: sensitivity across replica layouts, and per-host shards (in-process) ---------------

SENSITIVITY_CLIP = 1.2  # raw gradient norms of the examples below: 0.70 ... 2.46


def sensitivity_model_and_data():
    """A small tanh MLP and 23 examples; with C = 1.2, examples 3 and 20 are clipped (raw
    gradient norms 2.0 and 2.5), examples 5 and 12 are not (0.70 and 0.87)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(23, 5)).astype(np.float32)
    y = rng.integers(0, 3, 23).astype(np.int32)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(3)])
    model.set_weights([(0.5 * rng.normal(size=w.shape)).astype(np.float32)
                       for w in model.get_weights()])
    return model, x, y


def example_loss(model):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def loss_fn(example):
        x, y = example
        return loss(y[None], model(x[None]))[0]

    return loss_fn


def brute_force_clipped(model, x, y, clip):
    """Per example, a separate GradientTape; clipping and the sum in float64 numpy."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    clipped = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            value = loss(y[i:i + 1], model(x[i:i + 1]))
        grads = [g.numpy().astype(np.float64).ravel()
                 for g in tape.gradient(value, model.trainable_variables)]
        flat = np.concatenate(grads)
        clipped.append(flat * min(1.0, clip / np.linalg.norm(flat)))
    return np.stack(clipped)  # [N, number of parameters]


def pre_noise_sum(model, x, y, order, replicas, micro_batch_size, clip):
    """Σ_r L_r: the examples ``order`` laid out as the input pipeline does ([k, R, m], replica
    r reading column r of every global micro-batch), each replica's micro-batches clipped and
    added to its own accumulator; the replica sums are then added (the SUM all-reduce)."""
    indices, mask = sampling.pack_sample(tf.constant(order, tf.int64),
                                         micro_batch_size * replicas)
    indices = tf.reshape(indices, [-1, replicas, micro_batch_size])
    mask = tf.reshape(mask, [-1, replicas, micro_batch_size])
    loss_fn, variables = example_loss(model), model.trainable_variables
    total = 0.0
    for r in range(replicas):
        accumulator = DPGradientAccumulator(variables, clip, 1.0, 1.0)
        for k in range(indices.shape[0]):
            rows = indices[k, r]
            accumulator.accumulate(clipped_grad_sum(
                loss_fn, variables, (tf.gather(x, rows), tf.gather(y, rows)), mask[k, r], clip))
        total = total + np.concatenate([s.numpy().astype(np.float64).ravel()
                                        for s in accumulator.grad_sums])
    return total


@pytest.mark.parametrize("replicas,micro_batch_size", [(2, 1), (4, 3)])
def test_one_example_moves_the_pre_noise_sum_by_at_most_c(replicas, micro_batch_size):
    """Invariant 1 across replicas. Against a brute-force per-example loop:
    * the replicated pre-noise sum equals Σ clip(g_i) for every layout;
    * moving one example to another replica (same set) changes it by float rounding only;
    * removing one example (which shifts every later example to another replica and
      micro-batch) changes it by exactly ||clip(g_j)|| ≤ C (= C for a clipped example)."""
    clip = SENSITIVITY_CLIP
    model, x, y = sensitivity_model_and_data()
    per_example = brute_force_clipped(model, x, y, clip)
    norms = np.linalg.norm(per_example, axis=1)
    assert norms[3] == pytest.approx(clip) and norms[20] == pytest.approx(clip)  # clipped
    assert norms[5] < 0.9 * clip and norms[12] < 0.9 * clip  # not clipped

    sample = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 17, 18, 20, 22]
    full = pre_noise_sum(model, x, y, sample, replicas, micro_batch_size, clip)
    np.testing.assert_allclose(full, per_example[sample].sum(0), rtol=0, atol=1e-5)

    # Example 3 sits on replica 0; move it to the last position (another replica).
    moved = [i for i in sample if i != 3] + [3]
    assert np.linalg.norm(pre_noise_sum(model, x, y, moved, replicas, micro_batch_size, clip)
                          - full) < 1e-5

    for j in (3, 5, 12, 20):
        neighbour = [i for i in sample if i != j]
        change = np.linalg.norm(
            full - pre_noise_sum(model, x, y, neighbour, replicas, micro_batch_size, clip))
        assert change <= clip * (1 + 1e-5), j
        assert change == pytest.approx(norms[j], abs=1e-5), j


@pytest.mark.parametrize("num_hosts,num_replicas",
                         [(1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (2, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("trim_multiple", [None, 2])
def test_host_shards_partition_the_poisson_sample(num_hosts, num_replicas, trim_multiple):
    """Every sampled index is read by exactly one host; nothing else is read (full padding,
    and trimmed last micro-batches of 2 rows per replica, or 5)."""
    seed, n, q, m = 1234, 200, 0.3, 5  # ~60 sampled: several micro-batches even at R = 8
    for step in (0, 1, 5):
        shards = [host_shard(step, sampling_seed=seed, num_examples=n, sampling_rate=q,
                             micro_batch_size=m, num_replicas=num_replicas,
                             num_hosts=num_hosts, host=h, trim_multiple=trim_multiple)
                  for h in range(num_hosts)]
        joined = np.concatenate(shards)
        sample = sampling.poisson_sample(seed, step, n, q).numpy()
        assert len(sample) > m * num_replicas  # the step spans several global micro-batches
        assert len(np.unique(joined)) == len(joined), "shards overlap"
        np.testing.assert_array_equal(np.sort(joined), np.sort(sample))
        if num_hosts > 1:
            assert all(len(s) for s in shards), "a host read nothing"


# ---- 4: two MultiWorkerMirroredStrategy workers on 127.0.0.1 --------------------------------

WORKER_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import keras
    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.training.dp_model import make_private

    config = json.loads(sys.argv[1])
    arrays = dict(np.load(sys.argv[2]))
    x, y = arrays["x"], arrays["y"]
    if config["drop_last_example"]:  # this worker loads a different data set
        x, y = x[:-1], y[:-1]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # cluster from TF_CONFIG
    with strategy.scope():
        model = keras.Sequential([keras.Input((x.shape[1],)),
                                  keras.layers.Dense(arrays["bias"].shape[0])])
        model.set_weights([arrays["kernel"], arrays["bias"]])
        dp = make_private(model, DPConfig(**config["dp"]))  # secret seeds: None
        dp.compile(optimizer=keras.optimizers.SGD(config["lr"]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dp.fit(x, y, steps=config["steps"], verbose=0)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "seeds": dp.seeds,
                      "logical_steps": dp.logical_steps_done,
                      "iterations": int(dp.optimizer.iterations.numpy()),
                      "weights": [w.tolist() for w in model.get_weights()]}))
""")
WORKER_DP = dict(l2_norm_clip=1.0, expected_batch_size=24, micro_batch_size=2,
                 noise_multiplier=0.5, delta=1e-3, noise_seed=None, sampling_seed=None)
WORKER_STEPS, WORKER_LR = 4, 0.5


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_two_workers(arrays: Path, drop_last_on_worker_1: bool
                    ) -> list[tuple[int, str, str]]:
    """Starts two local workers; returns (return code, stdout, stderr) of each."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    try:
        for index in range(2):
            config = {"dp": WORKER_DP, "steps": WORKER_STEPS, "lr": WORKER_LR,
                      "drop_last_example": drop_last_on_worker_1 and index == 1}
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            processes.append(subprocess.Popen(
                [sys.executable, "-c", WORKER_SCRIPT, json.dumps(config), str(arrays)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                env=clean_env(TF_CONFIG=json.dumps(tf_config))))
        outputs = [p.communicate(timeout=WORKER_TIMEOUT) for p in processes]
        return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.fixture
def worker_arrays(tmp_path) -> tuple[dict, Path]:
    data = softmax_data(seed=3)
    path = tmp_path / "worker_arrays.npz"
    np.savez(path, **data)
    return data, path


@pytest.mark.slow
@pytest.mark.ci
def test_two_workers_with_secret_seeds_agree_with_one_process(worker_arrays):
    """Secret seeds are drawn once and broadcast: both workers report the same seeds and end
    with identical weights, equal to a single-process run (and to numpy DP-SGD) that uses the
    broadcast seeds. σ = 0.5, so the weights depend strongly on the noise seed."""
    data, path = worker_arrays
    results = run_two_workers(path, drop_last_on_worker_1=False)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    workers = [last_json_line(out) for _, out, _ in results]
    assert workers[0]["seeds"] == workers[1]["seeds"]
    for worker in workers:
        assert worker["replicas"] == 2
        assert worker["logical_steps"] == worker["iterations"] == WORKER_STEPS
    for a, b in zip(workers[0]["weights"], workers[1]["weights"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    seeds = workers[0]["seeds"]  # augment = noise + 1 below; irrelevant with augmult = 1
    model = keras.Sequential([keras.Input((data["x"].shape[1],)),
                              keras.layers.Dense(data["bias"].shape[0])])
    model.set_weights([data["kernel"], data["bias"]])
    dp = make_private(model, DPConfig(**{**WORKER_DP, "noise_seed": seeds["noise"],
                                         "sampling_seed": seeds["sampling"]}))
    dp.compile(optimizer=keras.optimizers.SGD(WORKER_LR),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dp.fit(data["x"], data["y"], steps=WORKER_STEPS, verbose=0)
    single = [w.tolist() for w in model.get_weights()]
    assert max_abs_diff(workers[0]["weights"], single) <= 1e-6
    kernel, bias = numpy_reference(data, WORKER_DP, WORKER_STEPS, WORKER_LR,
                                   sampling_seed=seeds["sampling"], noise_seed=seeds["noise"])
    assert max_abs_diff(workers[0]["weights"], [kernel, bias]) < 1e-5
    assert max_abs_diff(workers[0]["weights"], [data["kernel"], data["bias"]]) > 1e-2


@pytest.mark.slow
@pytest.mark.ci
def test_workers_that_disagree_on_the_data_fail_fast(worker_arrays):
    """Worker 1 loads N - 1 examples: both workers stop with a clear error before the first
    step instead of hanging in a collective (the timeout would fail the test)."""
    _, path = worker_arrays
    results = run_two_workers(path, drop_last_on_worker_1=True)
    for code, _, err in results:
        assert code != 0
        assert "the hosts of this DP run disagree on num_examples" in err, err[-3000:]
