"""NFNet-F0 at 224×224 (CheXpert's input size): ghost clipping against the non-private step.

Two parts, each case in a fresh subprocess (its peak RSS, ``ru_maxrss``, is its own); one JSON
line per case and one summary line.

1. One compiled micro-batch step per micro-batch size (``--micro``, default 2 4 8), the
   non-private gradient vs ghost clipping's clipped sum (benchmarks/ghost_memory.py's cases:
   no noise, no update). The summary fits peak RSS = a + b·m by least squares per method and
   EXTRAPOLATES the largest micro-batch m whose peak fits in ``--memory-gb`` (24 GB here): a
   linear extrapolation beyond the measured sizes, not a measurement.
2. The whole fine-tuning step through ``DPModel.fit`` with Poisson sampling (q = B/N < 1:
   ``--fit-batch`` B, ``--fit-examples`` N, micro-batches of ``--fit-micro``), for
   trainable "all" and ("last_stages", 1) (tfdpfair.models.finetune.set_trainable), against
   Keras ``train_on_batch`` on B examples with the same trainable layers. Time: median of the
   logical steps after the first (tracing); a Poisson step holds a random number of examples
   (realised sizes in the JSON line), so the DP/non-private ratio is per expected batch.

Accelerators (untested here, no accelerator on this machine): ``--device /GPU:0``,
``--jit_compile`` (XLA), ``--policy mixed_bfloat16``; ``--tpu NAME`` runs the fit cases under a
TPUStrategy (TPUClusterResolver(NAME), e.g. ``local`` on a TPU VM), where XLA is always on.

  python benchmarks/nfnet_f0.py                       # ≈ 20 min on 2 cores
  python benchmarks/nfnet_f0.py --micro 4 --fit-modes all
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# benchmarks/ is this script's directory
from ghost_memory import accelerator_flags, add_accelerator_flags, machine_info  # noqa: E402

SHAPE = (224, 224, 3)
NUM_CLASSES = 10
FIT_MODES = {"all": "all", "last_stages": ("last_stages", 1)}


def tpu_strategy(name: str):
    """A TPUStrategy on the TPU ``name`` (TPUClusterResolver; untested on this machine)."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def fit_case(args) -> dict:
    """One process: the fine-tuning step of ``args.fit_case`` = (mode, "dp" | "nonprivate")."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import contextlib

    import keras
    import numpy as np
    import tensorflow as tf

    from tfdpfair.models.finetune import set_trainable
    from tfdpfair.models.nfnet import build_nfnet
    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.training.dp_model import make_private

    from step_timer import StepTimer

    mode, method = args.fit_case
    keras.mixed_precision.set_global_policy(args.policy)
    strategy = tpu_strategy(args.tpu) if args.tpu else None
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    rng = np.random.default_rng(0)
    n = args.fit_examples if method == "dp" else args.fit_batch
    x = rng.normal(size=(n,) + SHAPE).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with scope, tf.device(args.device if not args.tpu else ""):
        keras.utils.set_random_seed(0)
        model = build_nfnet("F0", NUM_CLASSES, SHAPE)
        trainable = set_trainable(model, FIT_MODES[mode])
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        line = {"benchmark": "nfnet_f0_fit", "trainable": mode, "method": method,
                "trainable_params": trainable, "params": int(model.count_params()),
                "expected_batch": args.fit_batch}
        if method == "nonprivate":
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss,
                          jit_compile=args.jit_compile)
            times = []
            for _ in range(1 + args.fit_steps):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times.append(time.perf_counter() - start)
        else:
            config = DPConfig(expected_batch_size=args.fit_batch, micro_batch_size=args.fit_micro,
                              noise_multiplier=1.0, noise_seed=0, sampling_seed=0)
            dp = make_private(model, config)
            dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss,
                       jit_compile=args.jit_compile)
            timer = StepTimer()
            dp.fit(x, y, steps=1 + args.fit_steps, verbose=0, callbacks=[timer])
            times = timer.times
            from tfdpfair.privacy import sampling

            line.update(q=round(args.fit_batch / n, 4), micro_batch=args.fit_micro,
                        examples=n, realised_sizes=[
                            int(tf.size(sampling.poisson_sample(0, s, n, args.fit_batch / n)))
                            for s in range(1 + args.fit_steps)])
    line.update(step_s=round(statistics.median(times[1:]), 3), first_step_s=round(times[0], 1),
                step_times_s=[round(t, 3) for t in times[1:]],
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                rss_before_mb=round(rss_before, 1), policy=args.policy, device=args.device,
                jit_compile=args.jit_compile, tpu=args.tpu, **machine_info())
    return line


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y on x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def run(command: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    print("[nfnet_f0] " + " ".join(command[2:]), file=sys.stderr, flush=True)
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return [{"error": out.stderr.strip().splitlines()[-3:], "returncode": out.returncode}]
    return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-gb", type=float, default=24.0)
    parser.add_argument("--fit-modes", nargs="*", default=list(FIT_MODES), choices=list(FIT_MODES))
    parser.add_argument("--fit-batch", type=int, default=8, help="expected logical batch B")
    parser.add_argument("--fit-examples", type=int, default=32, help="N (q = B/N)")
    parser.add_argument("--fit-micro", type=int, default=4)
    parser.add_argument("--fit-steps", type=int, default=2, help="timed logical steps")
    add_accelerator_flags(parser)
    parser.add_argument("--tpu", default="", help="TPU name for TPUClusterResolver (fit cases)")
    parser.add_argument("--fit-case", nargs=2, help=argparse.SUPPRESS)  # mode method (child)
    args = parser.parse_args()
    if args.fit_case:
        print(json.dumps(fit_case(args)), flush=True)
        return
    start = time.perf_counter()
    common = accelerator_flags(args)
    peaks: dict[str, list] = {"nonprivate": [], "ghost": []}
    for micro in args.micro:
        lines = run([sys.executable, os.path.join(HERE, "ghost_memory.py"), "--model",
                     "nfnet_f0_224", "--batch", str(micro), "--variants", "nonprivate", "ghost",
                     "--repeats", str(args.repeats)] + common)
        for line in lines:
            print(json.dumps(line), flush=True)
            if "peak_rss_mb" in line:
                peaks[line["variant"]].append((micro, line["peak_rss_mb"]))
    fits = {}
    for mode in args.fit_modes:
        base = None
        for method in ("nonprivate", "dp"):
            line = run([sys.executable, __file__, "--fit-case", mode, method, "--fit-batch",
                        str(args.fit_batch), "--fit-examples", str(args.fit_examples),
                        "--fit-micro", str(args.fit_micro), "--fit-steps", str(args.fit_steps),
                        "--tpu", args.tpu] + common)[-1]
            if method == "nonprivate":
                base = line
            elif "step_s" in line and base and "step_s" in base:
                line["time_vs_nonprivate"] = round(line["step_s"] / base["step_s"], 2)
                line["rss_vs_nonprivate"] = round(line["peak_rss_mb"] / base["peak_rss_mb"], 2)
                fits[mode] = {k: line[k] for k in ("time_vs_nonprivate", "rss_vs_nonprivate")}
            print(json.dumps(line), flush=True)
    summary = {"benchmark": "nfnet_f0_summary", "memory_gb": args.memory_gb, "fit": fits,
               "total_s": round(time.perf_counter() - start, 1), **machine_info()}
    for method, points in peaks.items():
        if len(points) >= 2:
            a, b = linear_fit(points)
            summary[f"{method}_rss_mb_fit"] = {"intercept": round(a, 1), "per_example": round(b, 1)}
            summary[f"{method}_max_micro_extrapolated"] = int((args.memory_gb * 1024 - a) / b)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
