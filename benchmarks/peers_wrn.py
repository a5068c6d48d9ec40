"""tfdpfair vs PyTorch + Opacus 1.6 on WRN-16-4 (GroupNorm, WS convs), 32×32×3, 10 classes.

Prints one JSON line per case (logical batch B): examples/s without and with DP for both
frameworks, each DP/non-DP time ratio, and tfdpfair DP throughput over Opacus' DP throughput
(each Opacus mode, and its best). ``make bench-peers`` creates the peers virtualenv and runs it.

Method. For each B the two frameworks run alternately in fresh subprocesses, twice (round 1:
TF then torch; round 2: torch then TF), and every number is the best of the two rounds; inside
a worker each case is the median of ``--repeats`` timed steps after ``--warmup`` untimed ones
(tracing / first-call costs are in the warm-up). One DP step = one logical step of B examples
as B/m micro-batches of m: per-example gradients, clipping, accumulation, noise, update.

  * TF worker (this file with ``--worker tf``, under .venv): non-DP = Keras
    ``train_on_batch`` on all B examples (SGD, no XLA, like benchmarks/dp_step_time.py); DP =
    ``make_private(model, DPConfig(expected_batch_size=B, micro_batch_size=m))`` and
    ``DPModel.fit`` over N = 10·B examples, so q = 0.1 and each logical step holds
    |S_t| ~ Binomial(N, q) examples in k_t micro-batches, padded as ``--padding`` says (the real
    Poisson path; ``--q1``: N = B, every step all B), one logical step per Keras batch (timed
    per batch by a callback, host ε update included). A DP case's time is the MEAN logical
    step (steps vary with k_t), normalised per expected example (examples/s = B / mean step);
    ``padded_row_share`` is the share of padding rows computed. TensorFlow's default threading.
  * torch worker (benchmarks/peers_torch_worker.py, under the peers virtualenv): the same
    architecture in PyTorch, non-DP and Opacus DP in hooks and ghost modes;
    ``torch.set_num_threads(2)``, OMP_WAIT_POLICY=PASSIVE (see --torch-omp-wait-policy).

  .venv/bin/python benchmarks/peers_wrn.py --peers-python .venv-peers/bin/python
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)


# ---- TF worker (runs in a subprocess under .venv) ------------------------------------------

def tf_worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import resource
    import statistics

    import keras
    import numpy as np
    import tensorflow as tf

    from tfdpfair.models.wide_resnet import build_wide_resnet
    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.privacy.ghost_clipping import describe_plan
    from tfdpfair.training.dp_model import make_private

    import poisson_steps  # benchmarks/ is on sys.path for a script
    from step_timer import StepTimer

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch,) + IMAGE_SHAPE, dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, args.batch).astype(np.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out = {"worker": "tf", "batch": args.batch, "micro_batch": args.micro_batch,
           "tensorflow": tf.__version__, "keras": keras.__version__,
           "warmup": args.warmup, "repeats": args.repeats, "q1": args.q1}
    dp_x, dp_y = poisson_steps.training_set(x, y, args.batch, args.q1)

    keras.utils.set_random_seed(0)
    plain = build_wide_resnet("WRN-16-4", NUM_CLASSES, IMAGE_SHAPE)
    out["params"] = int(plain.count_params())
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=False)
    for _ in range(args.warmup):
        plain.train_on_batch(x, y)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    out["non_dp"] = {"step_s": round(step_s, 4), "examples_per_s": round(args.batch / step_s, 2)}
    out["max_rss_mb_after_non_dp"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    # Same logical batch as Opacus, as B/m micro-batches of m (Opacus' physical batches), and
    # as one micro-batch of B (what ghost clipping's memory allows; the faster setting here).
    for key, micro in (("tfdpfair_dp", args.micro_batch), ("tfdpfair_dp_one_micro_batch",
                                                           args.batch)):
        if key.endswith("one_micro_batch") and micro == args.micro_batch:
            continue
        config = DPConfig(expected_batch_size=args.batch, micro_batch_size=micro,
                          noise_multiplier=1.0, noise_seed=0, sampling_seed=0,
                          microbatch_padding=args.padding)
        dp = make_private(build_wide_resnet("WRN-16-4", NUM_CLASSES, IMAGE_SHAPE), config)
        dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        timer = StepTimer()
        # N = 10·B (q = 0.1) or, with --q1, N = B; one Keras batch = one logical step.
        dp.fit(dp_x, dp_y, steps=args.warmup + args.repeats, verbose=0, callbacks=[timer])
        timed = poisson_steps.per_expected_example(timer.times[args.warmup:], args.batch)
        out[key] = {"step_s": timed["step_s_mean"], "step_s_median": timed["step_s_median"],
                    "examples_per_s": timed["expected_examples_per_s"],
                    "micro_batch": micro, "logical_steps": int(dp.logical_steps_done),
                    "num_examples": len(dp_x), **poisson_steps.padding_of_steps(
                        dp, range(args.warmup, args.warmup + args.repeats))}
        # What clipping="auto" runs for example units: ghost if every variable has a rule.
        covered = not describe_plan(dp.inner)["fallback"]
        out["dp_clipping"] = "ghost" if covered else "vectorized"
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


# ---- orchestrator (stdlib only) ------------------------------------------------------------

def tf_machine() -> dict:
    """CPU model, core count and 1-minute load (benchmarks/poisson_steps.py)."""
    sys.path.insert(0, HERE)
    import poisson_steps

    return poisson_steps.machine()


def run_worker(cmd: list[str], log, extra_env: dict | None = None) -> dict:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if log:
        log.write(f"$ {' '.join(cmd)}\n{proc.stderr}\n")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["load_avg_1min_at_start"] = round(load, 2)
    result["worker_wall_s"] = round(wall, 1)
    return result


def best(results: list[dict], key: str) -> dict | None:
    """The entry of ``key`` with the highest examples/s over the rounds (None if all failed)."""
    ok = [r[key] for r in results if key in r and "examples_per_s" in r[key]]
    if not ok:
        errors = [r[key] for r in results if key in r]
        return errors[0] if errors else None
    return max(ok, key=lambda e: e["examples_per_s"])


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", choices=["tf"], help=argparse.SUPPRESS)
    parser.add_argument("--peers-python", default=os.path.join(ROOT, ".venv-peers/bin/python"))
    parser.add_argument("--batches", default="32,128", help="logical batches B")
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, default=32, help="micro-batch m (DP)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best of)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per case (default 10, mean for DP / median non-DP; "
                             "3 with --q1)")
    parser.add_argument("--q1", action="store_true",
                        help="tfdpfair DP on N = B (every step all B) instead of N = 10·B")
    parser.add_argument("--padding", default="auto", choices=["auto", "trim", "full"],
                        help="DPConfig.microbatch_padding of the tfdpfair DP runs")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--torch-modes", default="non_dp,hooks,ghost")
    parser.add_argument(
        "--torch-omp-wait-policy", default="PASSIVE",
        help="OMP_WAIT_POLICY for the torch worker ('' = OpenMP's default). PASSIVE: torch's "
             "OpenMP threads sleep instead of spinning at barriers; with 2 threads on a busy "
             "2-core machine the spinning default made steps 3-6x slower (TF's thread pool "
             "does not spin this way).")
    parser.add_argument("--log", default=None, help="file for the workers' stderr")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.q1 else 10
    if args.worker == "tf":
        tf_worker(args)
        return
    if not os.path.exists(args.peers_python):
        sys.exit(f"{args.peers_python} not found: run `make bench-peers`, which creates it.")
    log = open(args.log, "w") if args.log else None
    for batch in [int(b) for b in args.batches.split(",")]:
        micro = min(args.micro_batch, batch)
        common = ["--batch", str(batch), "--micro-batch", str(micro),
                  "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        tf_cmd = [sys.executable, os.path.abspath(__file__), "--worker", "tf",
                  "--padding", args.padding] + (["--q1"] if args.q1 else []) + common
        torch_cmd = [args.peers_python, os.path.join(HERE, "peers_torch_worker.py"),
                     "--threads", str(args.torch_threads), "--modes", args.torch_modes] + common
        tf_runs, torch_runs = [], []
        for r in range(args.rounds):
            order = [("tf", tf_cmd), ("torch", torch_cmd)]
            for name, cmd in (order if r % 2 == 0 else order[::-1]):
                extra = ({"OMP_WAIT_POLICY": args.torch_omp_wait_policy}
                         if name == "torch" and args.torch_omp_wait_policy else None)
                (tf_runs if name == "tf" else torch_runs).append(run_worker(cmd, log, extra))
        tf_non, tf_dp = best(tf_runs, "non_dp"), best(tf_runs, "tfdpfair_dp")
        tf_dp_one = best(tf_runs, "tfdpfair_dp_one_micro_batch")
        pt_non = best(torch_runs, "non_dp")
        opacus = {m: best(torch_runs, m) for m in ("opacus_hooks", "opacus_ghost")
                  if best(torch_runs, m) is not None}
        eps = lambda e: (e or {}).get("examples_per_s")  # noqa: E731
        best_opacus = max((eps(e) or 0.0 for e in opacus.values()), default=0.0) or None
        line = {
            "benchmark": "peers_wrn", "model": "WRN-16-4 GroupNorm(16) WS-conv",
            "input": list(IMAGE_SHAPE), "classes": NUM_CLASSES, "logical_batch": batch,
            "micro_batch": micro,
            "params": {"tfdpfair": tf_runs[0]["params"], "torch": torch_runs[0]["params"]},
            "params_match": tf_runs[0]["params"] == torch_runs[0]["params"],
            "examples_per_s": {
                "tfdpfair_non_dp": eps(tf_non), "tfdpfair_dp": eps(tf_dp),
                "tfdpfair_dp_one_micro_batch": eps(tf_dp_one),
                "torch_non_dp": eps(pt_non), **{m: eps(e) for m, e in opacus.items()}},
            "dp_time_over_non_dp": {
                "tfdpfair": ratio(eps(tf_non), eps(tf_dp)),
                "tfdpfair_one_micro_batch": ratio(eps(tf_non), eps(tf_dp_one)),
                **{m: ratio(eps(pt_non), eps(e)) for m, e in opacus.items()}},
            "tfdpfair_dp_over_opacus": {
                **{m: ratio(eps(tf_dp), eps(e)) for m, e in opacus.items()},
                "best_opacus": ratio(eps(tf_dp), best_opacus),
                "best_opacus_vs_one_micro_batch": ratio(eps(tf_dp_one), best_opacus)},
            "opacus_layer_paths": {m: (e or {}).get("layer_paths") for m, e in opacus.items()},
            "errors": {k: e["error"] for k, e in
                       [("tfdpfair_non_dp", tf_non), ("tfdpfair_dp", tf_dp),
                        ("torch_non_dp", pt_non), *opacus.items()] if e and "error" in e},
            "dp_clipping_tfdpfair": tf_runs[0].get("dp_clipping"),
            "tfdpfair_dp_sampling": "q=1 (N=B)" if args.q1 else "Poisson q=0.1 (N=10B)",
            "tfdpfair_padded_row_share": {k: (e or {}).get("padded_row_share") for k, e in
                                          (("micro", tf_dp), ("one_micro_batch", tf_dp_one))},
            "tfdpfair_padding": (tf_dp or {}).get("padding"),
            "opacus_sampling": "fixed batches of B (q=1)",
            "rounds": args.rounds, "warmup": args.warmup, "repeats": args.repeats,
            "per_round_examples_per_s": {
                "tf": [{k: eps(r.get(k)) for k in ("non_dp", "tfdpfair_dp",
                                                    "tfdpfair_dp_one_micro_batch")}
                       for r in tf_runs],
                "torch": [{k: eps(r.get(k)) for k in ("non_dp", "opacus_hooks", "opacus_ghost")}
                          for r in torch_runs]},
            "load_avg_1min_at_worker_start": [r["load_avg_1min_at_start"]
                                              for r in tf_runs + torch_runs],
            "max_rss_mb": {"tf": max(r["max_rss_mb"] for r in tf_runs),
                           "torch": max(r["max_rss_mb"] for r in torch_runs)},
            "versions": {"tensorflow": tf_runs[0]["tensorflow"], "keras": tf_runs[0]["keras"],
                         "torch": torch_runs[0]["torch"], "opacus": torch_runs[0]["opacus"]},
            "torch_threads": torch_runs[0]["threads"],
            "torch_omp_wait_policy": args.torch_omp_wait_policy or "default",
            "machine": platform.machine(),
            **tf_machine(),
        }
        print(json.dumps(line), flush=True)
    if log:
        log.close()


if __name__ == "__main__":
    main()
