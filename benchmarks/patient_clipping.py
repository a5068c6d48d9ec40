"""Patient-level DP step time and peak memory: ghost vs vectorized clipping, and patient vs
example units at ghost clipping. One JSON line per case, each case in a fresh subprocess (its
peak RSS, ru_maxrss, is its own).

A case is one DPModel.fit run on synthetic images with every unit in every logical step
(N = expected batch, so q = 1 and each step has the same micro-batches). Patient units: P
patients with 2k images each, k chosen per step (the choose_images path), m patients per
micro-batch (m·k images). Example units: P·k examples (the same images per step), m·k per
micro-batch. Time per logical step: median of --repeats Keras batches (one logical step each:
clipping, accumulation, noise, update) after 2 warm-up steps (also the minimum, which is
less sensitive to other processes on a shared machine). All layers are trained. Peak RSS
includes about 0.7 GB of TF runtime and data; the ratios also compare the increase during fit.

  python benchmarks/patient_clipping.py                        # wrn_16_2 at 16 px, k = 2, 4
  python benchmarks/patient_clipping.py --model nfnet_nano --ks 2
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

MODELS = {  # name -> (registry name, variant, input shape)
    "wrn_16_2": ("wide_resnet", (16, 2), (16, 16, 3)),
    "nfnet_nano": ("nfnet", "nano", (16, 16, 3)),  # the demo model (all layers trained here)
}
CASES = [("patient", "ghost"), ("patient", "vectorized"), ("example", "ghost")]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), "unknown")


def run_case(model_name: str, unit: str, clipping: str, k: int, patients: int, micro: int,
             repeats: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_timer import StepTimer
    import tfdpfair
    from tfdpfair.models import registry

    name, variant, shape = MODELS[model_name]
    keras.utils.set_random_seed(0)
    model = registry.build_model(name, shape, 10, variant=variant)
    rng = np.random.default_rng(0)
    per_patient = 2 * k if unit == "patient" else k
    n = patients * per_patient
    x = rng.normal(size=(n,) + shape).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    common = dict(noise_multiplier=1.0, delta=1e-5, l2_norm_clip=1.0, clipping=clipping,
                  noise_seed=0, sampling_seed=0)
    if unit == "patient":
        config = tfdpfair.DPConfig(expected_batch_size=patients, micro_batch_size=micro,
                                   privacy_unit="patient", max_examples_per_patient=k, **common)
        ids = np.repeat(np.arange(patients), per_patient)
    else:
        config = tfdpfair.DPConfig(expected_batch_size=n, micro_batch_size=micro * k, **common)
        ids = None
    dp = tfdpfair.make_private(model, config)
    dp.compile(optimizer=keras.optimizers.SGD(0.01),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rss_before = _rss_mb()
    timer = StepTimer()
    dp.fit(x, y, steps=repeats + 2, patient_ids=ids, verbose=0, callbacks=[timer])
    step_s = statistics.median(timer.times[2:])
    images = patients * k
    return {"benchmark": "patient_clipping", "model": model_name, "input": list(shape),
            "params": int(model.count_params()), "unit": unit, "clipping": dp.clipping_method,
            "images_per_patient": k, "units_per_step": patients if unit == "patient" else images,
            "images_per_step": images,
            "micro_batch_images": micro * k, "step_s": round(step_s, 4),
            "step_min_s": round(min(timer.times[2:]), 4),
            "images_per_s": round(images / step_s, 1),
            "first_steps_s": round(sum(timer.times[:2]), 2),
            "peak_rss_mb": round(_rss_mb(), 1), "rss_before_fit_mb": round(rss_before, 1),
            "repeats": repeats, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "tensorflow": tf.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wrn_16_2", choices=list(MODELS))
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4],
                        help="images per patient per step (k)")
    parser.add_argument("--patients", type=int, default=32, help="patients per logical step")
    parser.add_argument("--micro", type=int, default=16, help="patients per micro-batch")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # unit clipping k (child)
    args = parser.parse_args()
    if args.case:
        unit, clipping, k = args.case
        print(json.dumps(run_case(args.model, unit, clipping, int(k), args.patients, args.micro,
                                  args.repeats)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in args.ks:
        base = None  # patient units, ghost clipping: the reference of the ratios
        for unit, clipping in CASES:
            print(f"[patient_clipping] {args.model} k={k} {unit} {clipping} ...",
                  file=sys.stderr, flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--case", unit, clipping, str(k), "--model",
                 args.model, "--patients", str(args.patients), "--micro", str(args.micro),
                 "--repeats", str(args.repeats)], capture_output=True, text=True, env=env)
            if out.returncode:
                line = {"benchmark": "patient_clipping", "model": args.model, "unit": unit,
                        "clipping": clipping, "images_per_patient": k,
                        "error": out.stderr.strip().splitlines()[-1:],
                        "returncode": out.returncode}  # -9: killed, e.g. by the OOM killer
            else:
                line = json.loads(out.stdout.strip().splitlines()[-1])
                if base is None and (unit, clipping) == CASES[0]:
                    base = line
                elif base is not None:
                    line["time_vs_patient_ghost"] = round(line["step_s"] / base["step_s"], 2)
                    line["rss_vs_patient_ghost"] = round(
                        line["peak_rss_mb"] / base["peak_rss_mb"], 2)
                    line["fit_rss_increase_vs_patient_ghost"] = round(
                        (line["peak_rss_mb"] - line["rss_before_fit_mb"])
                        / (base["peak_rss_mb"] - base["rss_before_fit_mb"]), 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
