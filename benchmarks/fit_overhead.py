"""Where a DPModel.fit logical step spends its time, outside the clipped micro-batch (issue 23).

keras.applications MobileNetV2 / ResNet50 (weights=None, GroupNorm, 32×32) under
DPConfig(clipping="auto"), N = B = micro-batch = 32 (q = 1: exactly one micro-batch per step).
One fit() runs --steps logical steps; every phase of the host loop (training/fit_loop.py) is
timed by wrapping it, so the phases of one step add up to its wall time:

* ``train_call``: the compiled call (input pipeline, k_t micro-batch accumulates, release:
  noise, optimizer apply, averages);
* ``verify`` / ``record``: the release binding's fingerprint check before and record after
  the call (training/release_binding.py); since issue 23's fix ``check_unchanged`` /
  ``mark_released`` per step and ``flush`` per epoch (``verify`` then runs once per fit);
* ``epsilon``: the ε shown in the per-step logs (EpsilonLog);
* ``callbacks``: on_train_batch_begin/end of the callback list (progress bar off);
* ``step``: wall time of one whole loop iteration (StepTimer-like: batch begin -> batch end);
* ``release_*``: after fit, parts of the release compiled alone: the noise draw, the
  accumulator's replica_update (sums read + noise + reset), and that plus optimizer.apply.

Plus, in the same process: the compiled micro-batch step alone (benchmarks/clipping_methods.py
``make_step``, "ghost"). One JSON line per (model, phase): median seconds over the steps after
the first, with the CPU model and the 1-minute load average.

  python benchmarks/fit_overhead.py --models mobilenetv2 --steps 8
  PYTHONPATH=/path/to/other/checkout python benchmarks/fit_overhead.py   # before/after
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _timed(table: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            table[name].append(time.perf_counter() - start)
    return wrapper


def run(name: str, steps: int, repeats: int) -> list[dict]:
    import keras
    import numpy as np
    import tensorflow as tf

    import tfdpfair
    from clipping_methods import make_step, time_step
    from keras_apps import BATCH, CLASSES, SHAPE, build, cpu_model
    from tfdpfair.training import dp_model as dp_model_lib
    from tfdpfair.training import fit_loop, release_binding

    model = build(name)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH,) + SHAPE).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    micro = time_step(make_step(model, "ghost", tf.constant(x), tf.constant(y)), repeats)

    table: dict[str, list[float]] = defaultdict(list)
    patches = {(release_binding, name): name for name in (
        "verify", "record", "check_unchanged", "mark_released", "flush")
        if hasattr(release_binding, name)}  # the last three: after issue 23's fix
    patches.update({
               (fit_loop.EpsilonLog, "epsilon"): "epsilon",
               (keras.callbacks.CallbackList, "on_train_batch_begin"): "callbacks_begin",
               (keras.callbacks.CallbackList, "on_train_batch_end"): "callbacks_end"})
    originals = {key: getattr(*key) for key in patches}
    for (owner, attr), label in patches.items():
        setattr(owner, attr, _timed(table, label, originals[(owner, attr)]))
    original_loop = dp_model_lib.DPModel._loop

    def loop_with_timer(self, *args):
        loop = original_loop(self, *args)
        if not hasattr(loop, "_untimed_call"):
            loop._untimed_call = loop.train_call
            loop.train_call = _timed(table, "train_call", loop._untimed_call)
        return loop

    dp_model_lib.DPModel._loop = loop_with_timer

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            table["step"].append(time.perf_counter() - self.start)

    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        expected_batch_size=BATCH, micro_batch_size=BATCH, noise_multiplier=1.0, delta=1e-5,
        l2_norm_clip=1.0, clipping="auto"))
    dp.compile(optimizer=keras.optimizers.SGD(0.01),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dp.fit(x, y, steps=steps, verbose=0, callbacks=[StepClock()])
    for key, fn in originals.items():
        setattr(*key, fn)
    dp_model_lib.DPModel._loop = original_loop
    parts = release_parts(dp, repeats)  # after fit: these change the (benchmark's) weights

    common = {"code": os.path.dirname(os.path.dirname(tfdpfair.__file__)), "model": name, "batch": BATCH, "sampling_rate": 1.0, "steps": steps,
              "params": int(model.count_params()), "weight_variables": len(model.weights),
              "cpu": cpu_model(), "threads": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 2)}
    lines = [{**common, "phase": "microbatch_ghost_alone", "s": micro["step_s"]}]
    lines += [{**common, "phase": label, "s": value} for label, value in parts.items()]
    for label, times in table.items():
        # verify runs once before the loop too (continue_from_state): skip the set-up calls.
        per_step = times[-(steps - 1):] if len(times) >= steps else times
        lines.append({**common, "phase": label, "s": round(statistics.median(per_step), 4),
                      "calls": len(times)})
    return lines


def release_parts(dp, repeats: int) -> dict[str, float]:
    """Median seconds of the release's parts, each compiled alone as in the loop: the noise
    draw (one stateless normal per variable), the accumulator's read + noise + reset
    (replica_update) and the optimizer's apply of the update."""
    import tensorflow as tf

    from tfdpfair.privacy import noise as noise_lib

    loop = dp._runtime["loop"]
    acc = loop.accumulator

    # The step is an argument: with constant seeds grappler would fold the noise into a
    # constant once, and later calls would not draw at all.
    @tf.function
    def draw(step):
        return noise_lib.gaussian_noise_like(acc.grad_sums, acc.noise_stddev,
                                             noise_lib.step_seed(7, step))

    @tf.function
    def update(step):
        return acc.replica_update(7, step)

    @tf.function
    def update_and_apply(step):
        loop.optimizer.apply(acc.replica_update(7, step), loop.variables)
        return tf.constant(0)

    def timed(fn):
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), fn(tf.constant(i, tf.int64)))
            times.append(time.perf_counter() - start)
        return round(statistics.median(times[1:]), 4)  # the first call traces

    return {"release_noise_only": timed(draw), "release_replica_update": timed(update),
            "release_update_and_apply": timed(update_and_apply)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv2"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.models:
        for line in run(name, args.steps, args.repeats):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
