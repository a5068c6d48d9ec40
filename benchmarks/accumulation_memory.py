"""Peak memory of one DP-SGD logical step against its number of accumulated micro-batches.

DPModel.fit accumulates each logical step over k = ceil(|sample| / m) micro-batches of m
examples inside one compiled call, so memory should not grow with k: only one micro-batch's
per-example gradients, the running sums and the tf.data prefetch buffer are live at a time.
This measures it for logical batches up to 262,144 examples.

The data are held fixed (N examples, default 262,144, random 8x8x1 images) and the expected
batch B varies through q = B/N, so every case holds the same training set in memory and only
k changes. Each case runs ONE logical step (DPModel.fit(x, y, steps=1)) in a fresh subprocess,
so one case's peak (getrusage's ru_maxrss is a high-water mark) cannot hide another's.

Before fit, each case traces and instantiates fit()'s compiled call with a zero-step call
(``warm_up``; nothing is sampled or counted), so the step's wall time and memory are not mixed
with tracing (for nfnet_nano ~15-30 s and ~600 MiB, the same for every k).

Per case: B, m, q, the realised sample size and micro-batch count k; RSS after building the
data, model and compile (baseline), after the warm-up, and just before the compiled call (after
fit's own set-up: the data's tf.constant copy, validation); the peak RSS sampled during the
call and the process's peak (ru_maxrss); peak - baseline and call peak - RSS before the call;
the step's wall time (the one compiled call), fit's wall time, and examples/s. The summary gives
the least-squares growth of both differences per 1,000 micro-batches and the range of
peak - baseline over the cases (the training set itself, ``dataset_mib``, is the same in all).

  python benchmarks/accumulation_memory.py [--model nfnet_nano] [--quick]
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from importlib import metadata

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MIB = 2.0 ** 20
FULL = {"num_examples": 262_144, "batches": [1024, 8192, 65_536, 262_144]}
QUICK = {"num_examples": 16_384, "batches": [1024, 4096, 16_384]}


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; ru_maxrss is only the high-water mark)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Peak RSS of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(value: float) -> float:
    return round(value / MIB, 1)


class RssSampler:
    """Samples the RSS every few milliseconds in a thread (TF releases the GIL while it runs)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.peak = current_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def warm_up(dp, x, y) -> bool:
    """Traces and instantiates fit()'s compiled call before fit, so the step is timed alone.

    Builds the loop fit() will reuse (DPModel caches it by variables, plan and data specs) and
    calls it once with zero logical steps: the tf.function is traced and its graph instantiated
    (a few seconds and a few hundred MiB, independent of k), and nothing is sampled, noised or
    counted. Uses DPModel internals; returns False (and the step time then includes the
    tracing) if they have changed.
    """
    import tensorflow as tf

    from tfdpfair.training import input_pipeline

    try:
        data = input_pipeline.training_data(x, y)
        strategy = dp.distribute_strategy
        with strategy.scope():
            plan = dp.prepare(data.num_examples, steps=1)
            loop = dp._loop(plan, data)
        dataset_fn = input_pipeline.dataset_fn(
            data, sampling_seed=dp.dp_state.seeds()["sampling"], sampling_rate=plan.sampling_rate,
            micro_batch_size=dp.dp_config.micro_batch_size, start_step=0, end_step=1)
        iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
        loop.train_call(iterator, tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    except (AttributeError, TypeError) as error:
        print(f"warm-up skipped ({type(error).__name__}: {error})", file=sys.stderr)
        return False
    if dp.logical_steps_done != 0:
        raise RuntimeError("the warm-up call took a logical step")
    return True


def run_case(args) -> dict:
    """One case in this (fresh) process: build, then one logical step; returns its numbers."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfdpfair.models import registry
    from tfdpfair.privacy import sampling
    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.training.dp_model import make_private

    n, batch, m = args.num_examples, args.case_batch, args.micro_batch
    rng = np.random.default_rng(0)
    x = rng.random((n, args.image_size, args.image_size, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = registry.build_model(args.model, x.shape[1:], 10)
    dp = make_private(model, DPConfig(
        expected_batch_size=batch, micro_batch_size=m, noise_multiplier=1.0,
        noise_seed=0, sampling_seed=0))
    dp.compile(optimizer=keras.optimizers.SGD(0.01),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    baseline = current_rss_bytes()
    peak_before_fit = max_rss_bytes()
    warmup_start = time.perf_counter()
    warmed_up = warm_up(dp, x, y) if args.warm_up else False
    warmup_s = time.perf_counter() - warmup_start
    after_warmup, peak_after_warmup = current_rss_bytes(), max_rss_bytes()

    sampler = RssSampler()
    marks = {}

    class Marks(keras.callbacks.Callback):
        """RSS and time at the edges of the one compiled call (one logical step)."""

        def on_train_batch_begin(self, batch_index, logs=None):
            marks["rss_before_call"], marks["peak_before_call"] = (current_rss_bytes(),
                                                                   max_rss_bytes())
            sampler.__enter__()
            marks["start"] = time.perf_counter()

        def on_train_batch_end(self, batch_index, logs=None):
            marks["step_s"] = time.perf_counter() - marks["start"]
            sampler.__exit__()
            marks["rss_after_call"] = current_rss_bytes()

    fit_start = time.perf_counter()
    dp.fit(x, y, steps=1, verbose=0, callbacks=[Marks()])
    fit_s = time.perf_counter() - fit_start
    peak = max_rss_bytes()
    if dp.logical_steps_done != 1:
        raise RuntimeError(f"expected one logical step, got {dp.logical_steps_done}")

    # The same draw as the input pipeline's (sampling seed 0, step 0): the realised sample.
    size = int(tf.size(sampling.poisson_sample(0, 0, n, dp.plan.sampling_rate)))
    k = int(sampling.num_global_microbatches(size, m))
    return {
        "B": batch, "m": m, "q": round(dp.plan.sampling_rate, 6), "sampled": size,
        "micro_batches": k, "baseline_rss_mib": mib(baseline),
        "peak_before_fit_mib": mib(peak_before_fit), "warmed_up": warmed_up,
        "warmup_s": round(warmup_s, 2), "rss_after_warmup_mib": mib(after_warmup),
        "peak_after_warmup_mib": mib(peak_after_warmup),
        "rss_before_call_mib": mib(marks["rss_before_call"]),
        "peak_before_call_mib": mib(marks["peak_before_call"]),
        "call_peak_rss_mib": mib(sampler.peak), "peak_rss_mib": mib(peak),
        "rss_after_call_mib": mib(marks["rss_after_call"]),
        "peak_over_baseline_mib": mib(peak - baseline),
        "call_peak_over_before_call_mib": mib(sampler.peak - marks["rss_before_call"]),
        "step_s": round(marks["step_s"], 2), "fit_s": round(fit_s, 2),
        "examples_per_s": round(size / marks["step_s"], 1),
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="nfnet_nano", help="tfdpfair.models.registry name, e.g. nfnet_nano")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=256, help="micro-batch m")
    parser.add_argument("--num-examples", type=int, default=None,
                        help="N, held fixed over the cases (default 262144; 16384 with --quick)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="expected logical batches B (each <= N; q = B/N)")
    parser.add_argument("--quick", action="store_true", help="N = 16384, B in {1024, 4096, 16384}")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="time the step with the first call's tracing included")
    parser.add_argument("--case-batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    args.num_examples = args.num_examples or preset["num_examples"]
    args.batches = args.batches or preset["batches"]

    if args.case_batch is not None:  # child: one case, one JSON line
        print(json.dumps(run_case(args)), flush=True)
        return
    if any(not 1 <= b <= args.num_examples for b in args.batches):
        parser.error("every --batches value must be in [1, N].")

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(here)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cases, start = [], time.perf_counter()
    for batch in args.batches:
        command = [sys.executable, os.path.abspath(__file__), "--model", args.model,
                   "--image-size", str(args.image_size), "--micro-batch", str(args.micro_batch),
                   "--num-examples", str(args.num_examples), "--case-batch", str(batch)]
        command += [] if args.warm_up else ["--no-warm-up"]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode:
            sys.stderr.write(result.stderr[-4000:])
            raise SystemExit(f"case B={batch} failed (exit {result.returncode})")
        cases.append(json.loads(result.stdout.strip().splitlines()[-1]))

    ks = [c["micro_batches"] for c in cases]
    growth = slope(ks, [c["peak_over_baseline_mib"] for c in cases])
    call_growth = slope(ks, [c["call_peak_over_before_call_mib"] for c in cases])
    print(json.dumps({
        "benchmark": "accumulation_memory", "model": args.model, "image_size": args.image_size,
        "num_examples": args.num_examples, "micro_batch": args.micro_batch,
        "dataset_mib": mib(args.num_examples * (args.image_size ** 2 * 4 + 4)),
        "cases": cases,
        "peak_over_baseline_mib_per_1000_microbatches": round(1000 * growth, 2),
        "call_peak_mib_per_1000_microbatches": round(1000 * call_growth, 2),
        "peak_over_baseline_range_mib": mib(
            MIB * (max(c["peak_over_baseline_mib"] for c in cases)
                   - min(c["peak_over_baseline_mib"] for c in cases))),
        "total_s": round(time.perf_counter() - start, 1),
        "tensorflow": metadata.version("tensorflow"),
        "cpu_count": os.cpu_count(), "machine": platform.machine()}))


if __name__ == "__main__":
    main()
