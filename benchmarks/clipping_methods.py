"""Step time and peak memory of the clipping methods: vectorized vs ghost vs non-private.

One JSON line per (model, batch, method); each case runs in its own subprocess, so its peak
RSS (ru_maxrss) is its own.

Default (Poisson) mode: a DP "step" is one logical step of DPModel.fit with expected batch
B = micro-batch m (``--micro-batch`` to change m) on N = 10·B synthetic examples, so q = 0.1 and
each step holds |S_t| ~ Binomial(N, q) examples in k_t micro-batches, padded as
``--padding`` (auto|trim|full) says: everything a real step does (clipping, accumulation,
noise, update, the host's ε update). The non-private step is Keras ``train_on_batch`` on B
examples. Times: mean of --repeats logical steps after 2 warm-ups; ratios per *expected*
example (mean DP step / non-private step on B). ``padded_row_share`` is the share of padding
rows in the DP steps; ``rss_after_step_mb`` the resident set size after each step (warm-ups
included), to tell the first call's peak from growth over later steps.

``--q1``: the older mode, one compiled micro-batch step on exactly B examples: the non-private
step is the gradient of the summed loss; "vectorized" is clipping.clipped_grad_sum
(tf.vectorized_map per-example gradients); "ghost" is ghost_clipping.ghost_clipped_grad_sum
(ghost norms + book-keeping sum). No optimizer update and no noise. Median of --repeats calls
after 2 warm-ups.

``--policy mixed_bfloat16`` runs every method with bf16 compute (fp32 variables, norms and
sums); ``--jit`` compiles every step with XLA. A vectorized case whose per-example gradients
alone would exceed --max-vectorized-gb is skipped (reported as such).

  python benchmarks/clipping_methods.py                  # the issue-12 table (~25 min, 2 cores)
  python benchmarks/clipping_methods.py --cases nfnet_nano:32 wrn_16_4:128,512
  python benchmarks/clipping_methods.py --q1             # one micro-batch step per case
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

import poisson_steps  # benchmarks/, on sys.path for a script

MODELS = {  # name -> (builder, variant, input shape)
    "nfnet_nano": ("nfnet", "nano", (16, 16, 3)),
    "nfnet_micro": ("nfnet", "micro", (32, 32, 3)),
    "wrn_16_2": ("wrn", (16, 2), (16, 16, 3)),
    "wrn_16_4": ("wrn", (16, 4), (32, 32, 3)),
    "nfnet_f0_64": ("nfnet", "F0", (64, 64, 3)),
    "nfnet_f0_192": ("nfnet", "F0", (192, 192, 3)),
}
DEFAULT_CASES = ["nfnet_nano:32,128", "nfnet_micro:32,128", "wrn_16_4:32,128,512",
                 "nfnet_f0_64:8,32", "nfnet_f0_192:4"]
METHODS = ("nonprivate", "vectorized", "ghost")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def build_model(model_name: str):
    import keras

    from tfdpfair.models.nfnet import build_nfnet
    from tfdpfair.models.wide_resnet import build_wide_resnet

    kind, variant, shape = MODELS[model_name]
    keras.utils.set_random_seed(0)
    if kind == "nfnet":
        return build_nfnet(variant, 10, shape, drop_rate=0.0, stochdepth_rate=0.0)
    return build_wide_resnet(variant, 10, shape)


def run_poisson_case(model_name: str, batch: int, method: str, args) -> dict:
    """One case through DPModel.fit at q = 0.1 (or train_on_batch for "nonprivate")."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    keras.mixed_precision.set_global_policy(args.policy)
    from step_timer import StepTimer, current_rss_mb
    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.training.dp_model import make_private

    shape = MODELS[model_name][2]
    model = build_model(model_name)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    line = {"model": model_name, "input": list(shape), "batch": batch, "method": method,
            "mode": "poisson", "policy": args.policy, "jit": args.jit,
            "params": int(model.count_params())}
    rss_before = _rss_mb()
    warmup = 2
    if method == "nonprivate":
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=args.jit)
        times, rss = [], []
        for _ in range(warmup + args.repeats):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - start)
            rss.append(round(current_rss_mb()))
        line.update(poisson_steps.per_expected_example(times[warmup:], batch),
                    rss_after_step_mb=rss)
    else:
        micro = args.micro_batch or batch
        dp = make_private(model, DPConfig(
            expected_batch_size=batch, micro_batch_size=micro, noise_multiplier=1.0,
            noise_seed=0, sampling_seed=0, clipping=method, microbatch_padding=args.padding))
        dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=args.jit)
        xs, ys = poisson_steps.training_set(x, y, batch, q1=False)
        timer = StepTimer()
        dp.fit(xs, ys, steps=warmup + args.repeats, verbose=0, callbacks=[timer])
        line.update(micro_batch=micro, num_examples=len(xs), sampling_rate=0.1,
                    **poisson_steps.per_expected_example(timer.times[warmup:], batch),
                    **poisson_steps.padding_of_steps(dp, range(warmup, warmup + args.repeats)),
                    rss_after_step_mb=timer.rss_mb)
    line["step_s"] = line["step_s_mean"]
    line.update(peak_rss_mb=round(_rss_mb(), 1), rss_before_step_mb=round(rss_before, 1),
                **poisson_steps.machine())
    return line


def run_case(model_name: str, batch: int, method: str, repeats: int, policy: str,
             jit: bool) -> dict:
    """``--q1``: one compiled micro-batch step on exactly B examples."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(policy)
    shape = MODELS[model_name][2]
    model = build_model(model_name)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch,) + shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch).astype(np.int32))
    step = make_step(model, method, x, y, jit)
    rss_before = _rss_mb()
    timing = time_step(step, repeats)
    return {"model": model_name, "input": list(shape), "batch": batch, "method": method,
            "mode": "q1", **timing, "peak_rss_mb": round(_rss_mb(), 1),
            "rss_before_step_mb": round(rss_before, 1),
            "examples_per_s": round(batch / timing["step_s"], 1),
            "params": int(model.count_params()), "policy": policy, "jit": jit,
            **poisson_steps.machine()}


def make_step(model, method: str, x, y, jit: bool = False):
    """A compiled micro-batch step on (x, y): "nonprivate" (gradient of the summed loss),
    "vectorized" (clipping.clipped_grad_sum) or "ghost" (ghost_clipped_grad_sum), C = 1."""
    import keras
    import tensorflow as tf

    from tfdpfair.privacy.clipping import clipped_grad_sum
    from tfdpfair.privacy.ghost_clipping import batch_example_loss_fn, ghost_clipped_grad_sum
    from tfdpfair.training.example_loss import example_loss_fn

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    mask = tf.ones([int(x.shape[0])])
    variables = model.trainable_variables

    if method == "nonprivate":
        per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                reduction="sum")

        @tf.function(jit_compile=jit)
        def step():
            with tf.GradientTape() as tape:
                value = per_sample(y, model(x, training=True))
            return tape.gradient(value, variables)
    elif method == "vectorized":
        fn = example_loss_fn(model, loss)

        @tf.function(jit_compile=jit)
        def step():
            return clipped_grad_sum(fn, variables, (x, y), mask, 1.0, has_aux=True).grad_sum
    else:
        fn = batch_example_loss_fn(model, loss)

        @tf.function(jit_compile=jit)
        def step():
            return ghost_clipped_grad_sum(model, fn, variables, (x, y), mask, 1.0,
                                          has_aux=True).grad_sum
    return step


def time_step(step, repeats: int) -> dict:
    """{"step_s": median of ``repeats`` calls after 2 warm-ups, "trace_and_first_s"}."""
    start = time.perf_counter()
    [g.numpy() for g in step()]
    first = time.perf_counter() - start
    [g.numpy() for g in step()]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        [g.numpy() for g in step()]
        times.append(time.perf_counter() - start)
    return {"step_s": round(statistics.median(times), 4), "trace_and_first_s": round(first, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                        help="model:batch[,batch...], models: " + ", ".join(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps (default 10 logical steps; 3 calls with --q1)")
    parser.add_argument("--q1", action="store_true",
                        help="one compiled micro-batch step on exactly B (the older mode)")
    parser.add_argument("--padding", default="auto", choices=["auto", "trim", "full"])
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="micro-batch m of the DP steps (default B)")
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--jit", action="store_true", help="XLA-compile every step")
    parser.add_argument("--max-vectorized-gb", type=float, default=6.0)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # model batch method (child)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.q1 else 10
    if args.case:
        model, batch, method = args.case[0], int(args.case[1]), args.case[2]
        print(json.dumps(run_case(model, batch, method, args.repeats, args.policy, args.jit)
                         if args.q1 else run_poisson_case(model, batch, method, args)))
        return
    cases = []
    for spec in args.cases:
        model, _, batches = spec.partition(":")
        if model not in MODELS or not batches:
            parser.error(f"bad case {spec!r}: use model:batch[,batch], models {list(MODELS)}")
        cases += [(model, int(b)) for b in batches.split(",")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for model, batch in cases:
        results = {}
        for method in args.methods:
            line = {"model": model, "batch": batch, "method": method, "policy": args.policy,
                    "jit": args.jit}
            params = results.get("nonprivate", {}).get("params")
            per_example_gb = (params or 0) * batch * 4 / 2**30
            if method == "vectorized" and per_example_gb > args.max_vectorized_gb:
                line["skipped"] = (f"per-example gradients alone need {per_example_gb:.1f} GB "
                                   f"(> --max-vectorized-gb {args.max_vectorized_gb})")
                print(json.dumps(line), flush=True)
                continue
            print(f"[clipping_methods] {model} B={batch} {method} ...", file=sys.stderr,
                  flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--case", model, str(batch), method,
                 "--repeats", str(args.repeats), "--policy", args.policy,
                 "--padding", args.padding]
                + (["--jit"] if args.jit else []) + (["--q1"] if args.q1 else [])
                + (["--micro-batch", str(args.micro_batch)] if args.micro_batch else []),
                capture_output=True, text=True, env=env)
            if out.returncode:
                line["error"] = out.stderr.strip().splitlines()[-1:]
                line["returncode"] = out.returncode  # -9: killed, e.g. by the OOM killer
            else:
                line = json.loads(out.stdout.strip().splitlines()[-1])
                results[method] = line
                base = results.get("nonprivate")
                if base and method != "nonprivate":
                    # Per expected example: both steps are over B (expected) examples.
                    line["time_vs_nonprivate"] = round(line["step_s"] / base["step_s"], 2)
                    line["rss_vs_nonprivate"] = round(
                        line["peak_rss_mb"] / base["peak_rss_mb"], 2)
                    line["step_rss_vs_nonprivate"] = round(
                        (line["peak_rss_mb"] - line["rss_before_step_mb"])
                        / (base["peak_rss_mb"] - base["rss_before_step_mb"]), 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
