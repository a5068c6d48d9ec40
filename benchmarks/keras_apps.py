"""DP vs non-private step time and peak RSS of keras.applications models (issue 23).

MobileNetV2 and ResNet50 (weights=None, 10 classes, logits) after
``replace_batch_norm_with_group_norm``, 32×32 inputs. One JSON line per case, each case in a
fresh subprocess (its own ru_maxrss), with the CPU model and the 1-minute load average.

Two kinds of case:
* ``step``: one compiled micro-batch step on B examples, as benchmarks/clipping_methods.py
  (same helpers): "nonprivate" (gradient of the summed loss), "ghost" (what
  DPConfig(clipping="auto") runs whenever a trained variable has a rule: ghost norms plus
  per-example fallback for the rest), "vectorized". Variants ``+dw_norule`` / ``+conv_norule``
  make DepthwiseConv2D (the situation before issue 23) or every conv rule-less, so their
  kernels fall back: the check that "ghost with fallback" is not slower than "vectorized".
* ``fit``: DPModel.fit with DPConfig(clipping="auto") ("dp"; "dp_vectorized" forces
  vectorized) at Poisson rate q = B/N < 1 (micro-batch B), against plain ``model.fit`` at
  batch B: median wall time per logical step (StepTimer, first step dropped), the clipping
  method DPModel chose and the fallback variables.

  python benchmarks/keras_apps.py                         # the docs/benchmarks.md rows
  python benchmarks/keras_apps.py --cases mobilenetv2:step:ghost mobilenetv2:fit:dp
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import statistics
import subprocess
import sys

from clipping_methods import _rss_mb, make_step, time_step  # benchmarks/ is on sys.path
from step_timer import StepTimer

SHAPE, CLASSES, BATCH = (32, 32, 3), 10, 32
DEFAULT_CASES = [
    "mobilenetv2:step:nonprivate", "mobilenetv2:step:ghost", "mobilenetv2:step:vectorized",
    "mobilenetv2+dw_norule:step:ghost", "mobilenetv2+conv_norule:step:ghost",
    "mobilenetv2:fit:nonprivate", "mobilenetv2:fit:dp", "mobilenetv2:fit:dp_vectorized",
    "resnet50:step:nonprivate", "resnet50:step:ghost",
    "resnet50:fit:nonprivate", "resnet50:fit:dp",
]


FIT_CLIPPING = {"dp": "auto", "dp_vectorized": "vectorized"}
"""fit methods -> DPConfig.clipping ("dp_vectorized": what "auto" chose before issue 23)."""


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def build(name: str):
    """The keras.applications model ``name`` ("mobilenetv2" / "resnet50", optionally
    "+dw_norule" / "+conv_norule") with GroupNorm instead of BatchNorm."""
    import keras

    from tfdpfair.models.group_norm import replace_batch_norm_with_group_norm

    base, _, variant = name.partition("+")
    app = {"mobilenetv2": keras.applications.MobileNetV2,
           "resnet50": keras.applications.ResNet50}[base]
    keras.utils.set_random_seed(0)
    model = replace_batch_norm_with_group_norm(
        app(weights=None, input_shape=SHAPE, classes=CLASSES, classifier_activation=None))
    if variant:
        model = _without_rules(model, variant)
    return model


def _without_rules(model, variant: str):
    """A clone whose DepthwiseConv2D (dw_norule) or all conv layers (conv_norule) are
    rule-less subclasses (ghost rules match exact classes), so their kernels fall back."""
    import keras

    class NoRuleDepthwise(keras.layers.DepthwiseConv2D):
        pass

    class NoRuleConv2D(keras.layers.Conv2D):
        pass

    swap = {keras.layers.DepthwiseConv2D: NoRuleDepthwise}
    if variant == "conv_norule":
        swap[keras.layers.Conv2D] = NoRuleConv2D

    def clone(layer):
        cls = swap.get(type(layer), type(layer))
        return cls.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def run_step(name: str, method: str, repeats: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from tfdpfair.privacy.ghost_clipping import describe_plan

    model = build(name)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH,) + SHAPE).astype(np.float32))
    y = tf.constant(rng.integers(0, CLASSES, BATCH).astype(np.int32))
    rss_before = _rss_mb()
    timing = time_step(make_step(model, method, x, y), repeats)
    fallback = describe_plan(model)["fallback"] if method == "ghost" else []
    return {**timing, "rss_before_step_mb": round(rss_before, 1),
            "fallback_variables": len(fallback), "fallback": fallback[:8],
            "params": int(model.count_params())}


def run_fit(name: str, method: str, steps: int, examples: int) -> dict:
    import keras
    import numpy as np

    import tfdpfair
    from tfdpfair.privacy.ghost_clipping import describe_plan

    model = build(name)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples,) + SHAPE).astype(np.float32)
    y = rng.integers(0, CLASSES, examples).astype(np.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    timer = StepTimer()
    out = {"examples": examples}
    if method == "nonprivate":
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        model.fit(x, y, batch_size=BATCH, epochs=1, steps_per_epoch=steps, verbose=0,
                  callbacks=[timer])
    else:
        dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
            expected_batch_size=BATCH, micro_batch_size=BATCH, noise_multiplier=1.0,
            delta=1e-5, l2_norm_clip=1.0, clipping=FIT_CLIPPING[method]))
        dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        dp.fit(x, y, steps=steps, verbose=0, callbacks=[timer])
        fallback = describe_plan(model)["fallback"]
        out.update(sampling_rate=BATCH / examples, clipping_method=dp.clipping_method,
                   fallback_variables=len(fallback), fallback=fallback[:8])
    out.update(step_s=round(statistics.median(timer.times[1:]), 4),
               first_step_s=round(timer.times[0], 2), steps=steps)
    return out


def run_case(spec: str, repeats: int, steps: int, examples: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    name, kind, method = spec.split(":")
    result = (run_step(name, method, repeats) if kind == "step"
              else run_fit(name, method, steps, examples))
    return {"model": name, "kind": kind, "method": method, "input": list(SHAPE),
            "batch": BATCH, **result, "peak_rss_mb": round(_rss_mb(), 1),
            "cpu": cpu_model(), "threads": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                        help="model[+dw_norule|+conv_norule]:step:{nonprivate,ghost,vectorized} "
                             "or model:fit:{nonprivate,dp,dp_vectorized}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="fit steps (first one dropped)")
    parser.add_argument("--examples", type=int, default=128, help="fit: N (q = B/N)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats, args.steps, args.examples)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base: dict[tuple, dict] = {}
    for spec in args.cases:
        print(f"[keras_apps] {spec} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--case", spec, "--repeats", str(args.repeats),
             "--steps", str(args.steps), "--examples", str(args.examples)],
            capture_output=True, text=True, env=env)
        name, kind, method = spec.split(":")
        if out.returncode:
            line = {"case": spec, "error": out.stderr.strip().splitlines()[-1:],
                    "returncode": out.returncode}
        else:
            line = json.loads(out.stdout.strip().splitlines()[-1])
            key = (name.partition("+")[0], kind)
            if method == "nonprivate":
                base[key] = line
            elif key in base:
                line["time_vs_nonprivate"] = round(line["step_s"] / base[key]["step_s"], 2)
                line["rss_vs_nonprivate"] = round(line["peak_rss_mb"]
                                                  / base[key]["peak_rss_mb"], 2)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
